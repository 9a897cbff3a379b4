"""DiffuseVAE's statements: Formulation 2's shifted forward process, its marginal, its posterior and
its sampler; Formulation 1 and the unconditional baseline through the same code; the joint
objective."""

import math

import pytest
import torch
from oracles import full, gaussian_eps_oracle, linear_schedule_by_hand, refiner
from test_ddpm import bayes_posterior_on_grid

import ddpm
import diffusevae as DV
from ddpm import extract

T = 1000


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def refine(net, diffusion, x_hat0, form=1, target="eps", t_start=None, guidance=0.0, **options):
    """DiffuseVAE.refine of `net` trained on every t, with ddpm.sample's defaults: every timestep
    from the start, DDIM at eta 0 (the yardsticks below are exact for these)."""
    model = refiner(net, diffusion, form, target, cond_drop=0.1 if guidance else 0.0)
    top = diffusion.T - 1 if t_start is None else t_start
    options = dict(steps=top + 1, eta=0.0) | options
    return model.refine(x_hat0, t_start=t_start, guidance=guidance, **options)


def chain_eps(net, x_hat0, form, diffusion=None, target="eps", guidance=0.0):
    """DiffuseVAE.eps_fn of `net`: eps_theta on the chain, as the samplers and the bound call it."""
    diffusion = ddpm.make_diffusion() if diffusion is None else diffusion
    model = refiner(net, diffusion, form, target, cond_drop=0.1 if guidance else 0.0)
    return model.eps_fn(x_hat0, guidance)


def bound(net, diffusion, x0, vae=None, form=1, target="eps", t_start=None, prior="expost"):
    """DiffuseVAE.bound_bpd of `net` and `vae`, the chain started at t_start (default: x_T)."""
    return refiner(net, diffusion, form, target, t_start, vae=vae).bound_bpd(x0, prior=prior)


def test_form2_per_step_chain_composes_to_the_shifted_marginal_exact(diff):
    # form2_q_step is affine in (x_prev, x_hat_0, noise): its noise-free output carries the mean,
    # its coefficient on the noise (output at x_prev = x_hat_0 = 0, noise = 1) the added standard
    # deviation. Composed over every step they must give the closed-form marginal N(sqrt(ab_t) x_0 +
    # x_hat_0, (1 - ab_t) I), which form2_q_sample draws.
    x0, x_hat0, zero, one = f64(0.7), f64(-0.4), f64(0.0), f64(1.0)
    m, v = x0, 0.0
    for i in range(T):
        t = torch.tensor([i])
        m = DV.form2_q_step(diff, m, t, x_hat0, zero)
        gain = DV.form2_q_step(
            diff, one, t, zero, zero
        ).item()  # sqrt(alpha_t), the factor on x_{t-1}
        v = gain**2 * v + DV.form2_q_step(diff, zero, t, zero, one).item() ** 2  # + beta_t
        ab = diff.alphas_cumprod[i].item()
        assert m.item() == pytest.approx(math.sqrt(ab) * 0.7 - 0.4, rel=1e-11, abs=1e-14)
        assert v == pytest.approx(1 - ab, rel=1e-12)
        assert DV.form2_q_sample(diff, x0, t, x_hat0, zero).item() == pytest.approx(
            m.item(), rel=1e-12, abs=1e-14
        )
        assert DV.form2_q_sample(diff, zero, t, zero, one).item() == pytest.approx(
            math.sqrt(1 - ab), rel=1e-12
        )
    assert (
        abs(m.item() + 0.4) < 0.01 * 0.7
    )  # x_T ~ N(x_hat_0, I): the data is forgotten, x_hat_0 is not


def test_form2_step_function_follows_the_recursion_and_monte_carlo_marginal(diff):
    g = torch.Generator().manual_seed(0)
    N = 40000
    x0, x_hat0 = (
        torch.full((N,), 0.5, dtype=torch.float64),
        torch.full((N,), -0.3, dtype=torch.float64),
    )
    x = x0.clone()
    for i in range(200):
        x = DV.form2_q_step(
            diff, x, full(i, N), x_hat0, torch.randn(N, generator=g, dtype=torch.float64)
        )
    ab = diff.alphas_cumprod[199].item()
    mean, var = math.sqrt(ab) * 0.5 - 0.3, 1 - ab
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / N)
    assert abs(x.var().item() - var) < 4 * var * math.sqrt(2 / N)
    y = DV.form2_q_sample(
        diff, x0, full(199, N), x_hat0, torch.randn(N, generator=g, dtype=torch.float64)
    )
    assert abs(y.mean().item() - mean) < 4 * math.sqrt(var / N)
    assert abs(y.var().item() - var) < 4 * var * math.sqrt(2 / N)


def test_form2_shifted_chain_is_a_standard_ddpm_chain(diff):
    # y_t = x_t - x_hat_0 (t >= 1), y_0 = x_0: one step of form 2 equals one standard step on y,
    # same noise
    g = torch.Generator().manual_seed(1)
    x_hat0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    for i in [0, 1, 17, 999]:
        x_prev = torch.randn(64, 3, generator=g, dtype=torch.float64)
        noise = torch.randn(64, 3, generator=g, dtype=torch.float64)
        y_prev = x_prev if i == 0 else x_prev - x_hat0
        got = DV.form2_q_step(diff, x_prev, full(i, 64), x_hat0, noise) - x_hat0
        assert torch.allclose(
            got, diff.q_step_sample(y_prev, full(i, 64), noise), rtol=0, atol=1e-14
        )


@pytest.mark.parametrize("i", [1, 50, 700])
def test_form2_posterior_equals_bayes_rule_and_the_shifted_formula(diff, i):
    x0, x_hat0 = 0.6, -0.5
    x_t = DV.form2_q_sample(diff, f64(x0), full(i), f64(x_hat0), f64(0.8))
    mean, var, _ = DV.form2_q_posterior_mean_variance(diff, f64(x0), x_t, full(i), f64(x_hat0))
    # Bayes on the grid in y = x - x_hat_0 (both factors shift by x_hat_0 for t - 1 >= 1), shifted
    # back
    grid_mean, grid_var = bayes_posterior_on_grid(diff, x0, x_t.item() - x_hat0, i)
    assert mean.item() == pytest.approx(grid_mean + x_hat0, rel=1e-9, abs=1e-12)
    assert var.item() == pytest.approx(grid_var, rel=1e-7)
    # the README's form: c1 x_0 + c2 x_t + (1 - c2) x_hat_0
    c1, c2 = diff.posterior_mean_coef1[i].item(), diff.posterior_mean_coef2[i].item()
    assert mean.item() == pytest.approx(
        c1 * x0 + c2 * x_t.item() + (1 - c2) * x_hat0, rel=1e-12, abs=1e-14
    )


def test_form2_x0_from_eps_inverts_the_shifted_marginal(diff):
    g = torch.Generator().manual_seed(2)
    x0, x_hat0, eps = (torch.randn(32, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.randint(0, T, (32,), generator=g)
    x_t = DV.form2_q_sample(diff, x0, t, x_hat0, eps)
    assert torch.allclose(
        DV.form2_predict_x0_from_eps(diff, x_t, t, x_hat0, eps), x0, rtol=0, atol=1e-9
    )


def shifted_oracle(diff, m, s):
    """The exact form-2 denoiser for x_0 ~ N(m, s^2): the standard one evaluated at y_t = x_t -
    x_hat_0."""
    base = gaussian_eps_oracle(diff, m, s)
    return lambda x_t, t, x_hat0: base(x_t - x_hat0, t)


@pytest.mark.parametrize(
    "sampler,steps,eta", [("ddpm", T, 0.0), ("ddim", T, 1.0), ("ddim", T, 0.0)]
)
def test_form2_sampler_with_exact_denoiser_recovers_the_data_gaussian(diff, sampler, steps, eta):
    m, s, N = 0.25, 0.5, 20000
    x_hat0 = torch.full(
        (N, 1), -0.7, dtype=torch.float64
    )  # any x_hat_0: the data law does not depend on it here
    x = refine(
        shifted_oracle(diff, m, s),
        diff,
        x_hat0,
        form=2,
        steps=steps,
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(3),
        clip_x0=False,
    )  # Gaussian data is unbounded
    tol_sd = 0.004 * s if eta == 0 else 0.0  # DDIM's first-order error at T steps (see test_ddpm)
    assert abs(x.mean().item() - m) < 4 * s / math.sqrt(N) + tol_sd
    assert abs(x.std().item() - s) < 4 * s / math.sqrt(2 * N) + tol_sd


def test_form2_sampler_starts_at_x_hat0_plus_noise_and_removes_the_shift(diff):
    # one DDIM step from t = T-1 straight to x_0 with the exact denoiser: x_T = x_hat_0 + z, output
    # = x_0-hat
    m, s = 0.25, 0.5
    x_hat0, z = f64(-0.7).reshape(1, 1), f64(0.3).reshape(1, 1)
    out = refine(shifted_oracle(diff, m, s), diff, x_hat0, form=2, steps=1, noise=z, clip_x0=False)
    t = full(T - 1)
    x_T = x_hat0 + z
    expected = DV.form2_predict_x0_from_eps(
        diff, x_T, t, x_hat0, shifted_oracle(diff, m, s)(x_T, t, x_hat0)
    )
    assert torch.allclose(out, expected, rtol=1e-12)


@pytest.mark.parametrize("form", [1, 2])
def test_truncated_start_is_the_forward_marginal_at_x0_equal_x_hat0(diff, form):
    # the chain's first state: sqrt(ab_s) x_hat_0 + sqrt(1 - ab_s) eps (form 2: on y = x - x_hat_0),
    # checked through what the denoiser is first called with, mean and variance within 4 standard
    # errors
    t_s, N = 300, 40000
    x_hat0 = torch.linspace(-0.9, 0.9, 4, dtype=torch.float64).repeat(
        N, 1
    )  # (N, 4): four pixel values
    seen = []

    def model(x, t, cond):
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    refine(
        model,
        diff,
        x_hat0,
        form=form,
        steps=1,
        t_start=t_s,
        generator=torch.Generator().manual_seed(5),
    )
    x, t = seen[0]
    assert (t == t_s).all()
    ab = diff.alphas_cumprod[t_s].item()
    mean = math.sqrt(ab) * x_hat0[0] + (
        x_hat0[0] if form == 2 else 0
    )  # form 2's denoiser sees x = y + x_hat_0
    sd = math.sqrt(1 - ab)
    assert (x.mean(0) - mean).abs().max() < 4 * sd / math.sqrt(N)
    assert (x.std(0) - sd).abs().max() < 4 * sd / math.sqrt(2 * N)
    with pytest.raises(ValueError, match="needs x_hat_0"):
        refine(
            model,
            diff,
            None,
            form=1,
            steps=1,
            t_start=t_s,
            noise=torch.zeros(2, 4, dtype=torch.float64),
        )


@pytest.mark.parametrize("form", [1, 2])
def test_truncated_start_is_exact_when_x_hat0_is_a_draw_from_the_data(diff, form):
    # if x_hat_0 ~ p_data, the truncated start IS q(x_{t_s}), so ancestral sampling over 0..t_s with
    # the exact denoiser returns the data law; when x_hat_0 is far from x_0 the start's mean is off
    # by sqrt(ab_s)(x_hat_0 - x_0)
    m, s, N, t_s = 0.25, 0.5, 20000, 200
    g = torch.Generator().manual_seed(11)
    x_hat0 = m + s * torch.randn(N, 1, generator=g, dtype=torch.float64)
    oracle = (
        shifted_oracle(diff, m, s)
        if form == 2
        else (lambda x, t, c: gaussian_eps_oracle(diff, m, s)(x, t))
    )
    x = refine(
        oracle,
        diff,
        x_hat0,
        form=form,
        steps=t_s + 1,
        sampler="ddpm",
        var_type="fixedsmall",
        t_start=t_s,
        generator=g,
        clip_x0=False,
    )
    assert abs(x.mean().item() - m) < 4 * s / math.sqrt(N)
    assert abs(x.std().item() - s) < 4 * s / math.sqrt(2 * N)
    far = refine(
        oracle,
        diff,
        x_hat0 + 1.0,
        form=form,
        steps=t_s + 1,
        sampler="ddpm",
        var_type="fixedsmall",
        t_start=t_s,
        generator=g,
        clip_x0=False,
    )  # a biased x_hat_0 leaves a bias the chain can't remove
    assert far.mean().item() - m > 10 * s / math.sqrt(N)


def test_form1_and_unconditional_baseline_share_the_sampler(diff):
    m, s, N = -0.1, 0.4, 20000
    base = gaussian_eps_oracle(diff, m, s)
    cond_model = lambda x, t, c: base(x, t)  # a form-1 denoiser that happens to ignore x_hat_0
    x_hat0 = torch.zeros(N, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x1 = refine(
        cond_model, diff, x_hat0, form=1, steps=T, sampler="ddpm", generator=g, clip_x0=False
    )
    uncond = lambda x, t, c: base(x, t) if c is None else None
    g2 = torch.Generator().manual_seed(4)
    x_T = torch.randn(
        N, 1, generator=g2, dtype=torch.float64
    )  # the unconditional model's noise sets the shape
    x2 = refine(
        uncond, diff, None, form=1, steps=T, sampler="ddpm", noise=x_T, generator=g2, clip_x0=False
    )
    for x in (x1, x2):
        assert abs(x.mean().item() - m) < 4 * s / math.sqrt(N)
        assert abs(x.std().item() - s) < 4 * s / math.sqrt(2 * N)
    with pytest.raises(ValueError, match="form"):
        refine(cond_model, diff, None, form=2, noise=torch.zeros(2, 1, dtype=torch.float64))
    with pytest.raises(
        ValueError, match="pass noise"
    ):  # no x_hat_0 and no noise: nothing gives the shape
        refine(uncond, diff, None, form=1, steps=1)


def point_mass_oracle(diff, c, form):
    """The exact denoiser when every x_0 equals c: eps = (x_t - sqrt(alpha-bar_t) c) / sqrt(1 -
    alpha-bar_t), on the standard chain (form 1) or on y_t = x_t - x_hat_0 (form 2). Its x_0-hat is
    c exactly at every step."""

    def eps(x_t, t, x_hat0):
        y = x_t - x_hat0 if form == 2 else x_t
        return (y - extract(diff.sqrt_alphas_cumprod, t, y) * c) / extract(
            diff.sqrt_one_minus_alphas_cumprod, t, y
        )

    return eps


@pytest.mark.parametrize("form", [1, 2])
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_clipping_x0_changes_nothing_inside_the_data_range_and_bounds_the_output(
    diff, form, sampler, eta
):
    N, c = 64, 0.6
    x_hat0 = torch.linspace(-1, 1, N, dtype=torch.float64).reshape(N, 1)
    out = {}
    for clip in (False, True):
        out[clip] = refine(
            point_mass_oracle(diff, c, form),
            diff,
            x_hat0,
            form=form,
            steps=10,
            sampler=sampler,
            eta=eta,
            generator=torch.Generator().manual_seed(6),
            clip_x0=clip,
        )
    # x_0-hat = c is inside [-1, 1] at every step, so clipping is a no-op and both runs land on c
    assert torch.allclose(out[True], out[False], rtol=0, atol=1e-9)
    assert torch.allclose(out[True], torch.full_like(x_hat0, c), rtol=0, atol=1e-9)
    # a denoiser whose eps is far off (as an undertrained one is at large t) gives x_0-hat far
    # outside the range; with clipping the last step returns a clipped x_0-hat, so the sample stays
    # in [-1, 1]
    wild = lambda x_t, t, x_hat0: -3 * torch.ones_like(x_t)
    x = refine(
        wild,
        diff,
        x_hat0,
        form=form,
        steps=10,
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(6),
        clip_x0=True,
    )
    assert x.abs().max() <= 1 + 1e-12
    x = refine(
        wild,
        diff,
        x_hat0,
        form=form,
        steps=10,
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(6),
        clip_x0=False,
    )
    assert (
        x.abs().max() > 10
    )  # the same denoiser without clipping leaves the range: the test can fail


def test_ddpm_loss_form2_equals_the_standard_loss_on_shifted_variables(diff):
    # L_simple of a known network, by hand: x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, plus x_hat_0
    # in form 2 (the derivation's marginal q(x_t | x_0, x_hat_0) = N(sqrt(ab_t) x_0 + x_hat_0, (1 -
    # ab_t) I)), ab_t from the linear schedule's definition, and the loss the mean over pixels of
    # (eps - net(x_t, t, x_hat_0))^2. The network is a fixed random affine map of (x_t, x_hat_0, t),
    # so a wrong shift, marginal, conditioning input or target changes its loss. Float64: the two
    # computations differ only by roundoff (~1e-16 relative), far inside rtol 1e-12.
    g = torch.Generator().manual_seed(5)
    B, D = 16, 16
    x0, x_hat0, noise = (
        torch.randn(B, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)
    )
    t = torch.randint(0, T, (B,), generator=g)
    W = torch.randn(2 * D + 1, D, generator=g, dtype=torch.float64) / math.sqrt(2 * D + 1)

    def net(x_t, t_, cond):
        h = torch.cat([x_t.flatten(1), cond.flatten(1), t_.double()[:, None] / T], 1) @ W
        return h.reshape(x_t.shape)

    _, ab = linear_schedule_by_hand(T)
    a = ab[t].reshape(B, 1, 1, 1)
    standard = a.sqrt() * x0 + (1 - a).sqrt() * noise
    for form, x_t in ((2, standard + x_hat0), (1, standard)):
        by_hand = (noise - net(x_t, t, x_hat0)).pow(2).flatten(1).mean(1)
        got, t_used = DV.ddpm_loss(net, diff, x0, x_hat0, form=form, t=t, noise=noise)
        assert torch.equal(t_used, t)
        assert torch.allclose(got, by_hand, rtol=1e-12, atol=0), (form, (got - by_hand).abs().max())
    with pytest.raises(ValueError, match="form"):
        DV.ddpm_loss(net, diff, x0, x_hat0, form=3)


def test_joint_objective_is_the_sum_and_ddpm_gradients_do_not_reach_the_vae(diff):
    import vae as V
    from unet import UNet

    torch.manual_seed(0)
    vae = V.VAE(img_ch=1, image_size=32, ch=32, z_dim=4)
    net = UNet(
        img_ch=1,
        cond_ch=1,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
    )
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    torch.manual_seed(1)
    total, l_vae, l_ddpm = DV.joint_loss(vae, net, diff, x0, form=2)
    # the same draws by hand, in joint_loss's order: z for L_VAE; z, t and the noise for L_DDPM
    torch.manual_seed(1)
    mu, logvar = vae.encode(x0)
    x_hat = vae.decode(mu + (0.5 * logvar).exp() * torch.randn_like(mu))
    s2 = vae.obs_logvar.exp()
    nll = 0.5 * (math.log(2 * math.pi) + vae.obs_logvar + (x0 - x_hat) ** 2 / s2).sum((1, 2, 3))
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    with torch.no_grad():
        mu, logvar = vae.encode(x0)
        x_hat0 = vae.decode(mu + (0.5 * logvar).exp() * torch.randn_like(mu))
    t, noise = torch.randint(0, T, (4,)), torch.randn_like(x0)
    ab = linear_schedule_by_hand()[1][t].float().reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise + x_hat0  # form 2's shifted marginal
    expected_vae = ((nll + kl) / x0[0].numel()).mean()
    expected_ddpm = (net(x_t, t, x_hat0) - noise).pow(2).mean()
    assert torch.allclose(l_vae, expected_vae, rtol=1e-5) and torch.allclose(
        l_ddpm, expected_ddpm, rtol=1e-5
    )
    assert torch.allclose(total, expected_vae + expected_ddpm, rtol=1e-5)
    l_ddpm.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in vae.parameters())


class AffineVAE:
    """A stand-in VAE: q(z|x) = N(A x, e^c I), dec(z) = B z. Enough to check how bound_bpd composes
    the bound."""

    def __init__(self, D, K, seed):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(K, D, generator=g, dtype=torch.float64) / D**0.5
        self.B = torch.randn(D, K, generator=g, dtype=torch.float64) / K**0.5
        L = torch.randn(2, K, K, generator=g, dtype=torch.float64).tril() * 0.3 + torch.eye(
            K, dtype=torch.float64
        )
        self.prior = dict(
            weights=torch.tensor([0.3, 0.7], dtype=torch.float64),  # an ex-post mixture of two
            means=torch.randn(2, K, generator=g, dtype=torch.float64),
            covs=L @ L.transpose(1, 2),
        )

    def encode(self, x):
        mu = x.flatten(1) @ self.A.T
        return mu, torch.full_like(mu, -1.5)

    def decode(self, z):
        return (z @ self.B.T).reshape(z.shape[0], 1, 2, 2)

    def reconstruct(self, x):
        mu, logvar = self.encode(x)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        return self.decode(z), (mu, logvar, z)


@pytest.mark.parametrize("form", [1, 2])
def test_bound_bpd_is_the_ddpm_bound_given_x_hat0_plus_the_latent_kl(diff, form):
    # the DiffuseVAE bound: -log p(x_0) <= E_z[L_DDPM(x_0 | dec(z))] + KL(q(z|x_0) || p(z)), in
    # bits/dim
    B, D, K = 6, 4, 3
    g = torch.Generator().manual_seed(7)
    x0 = (
        torch.randint(0, 256, (B, 1, 2, 2), generator=g).double() / 127.5 - 1
    )  # 8-bit grid in [-1, 1]
    vae, base = AffineVAE(D, K, seed=8), gaussian_eps_oracle(diff, 0.1, 0.5)
    # the same network in both forms: it denoises x_t (form 1) or y_t = x_t - x_hat_0 (form 2) and
    # reads x_hat_0 only through that shift, so the two bounds must come out equal, draw for draw
    eps_model = (lambda x, t, c: base(x, t)) if form == 1 else (lambda x, t, c: base(x - c, t))
    torch.manual_seed(9)
    got = bound(eps_model, diff, x0, vae=vae, form=form, prior="normal")
    torch.manual_seed(9)
    mu, logvar = vae.encode(x0)
    eps = torch.randn_like(mu)  # the z draw, so the reference sees the same x_t draws
    expected_ddpm = diff.vlb_terms_bpd(base, x0)["total"]
    expected_kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1) / (D * math.log(2))
    assert torch.allclose(got["ddpm"], expected_ddpm, rtol=1e-12, atol=0)
    assert torch.allclose(got["kl_z"], expected_kl, rtol=1e-12, atol=0)
    assert torch.allclose(got["total"], expected_ddpm + expected_kl, rtol=1e-12, atol=0)
    # the model sample.py samples draws z from the ex-post mixture: its KL is log q(z|x) - log p(z)
    # at the decoded z
    torch.manual_seed(9)
    got = bound(eps_model, diff, x0, vae=vae, form=form)  # prior="expost", the default
    z = mu + (0.5 * logvar).exp() * eps
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(1)
    parts = torch.distributions.MultivariateNormal(vae.prior["means"], vae.prior["covs"])
    p = torch.logsumexp(parts.log_prob(z[:, None]) + vae.prior["weights"].log(), 1)
    assert torch.allclose(got["ddpm"], expected_ddpm, rtol=1e-12, atol=0)
    assert torch.allclose(got["kl_z"], (q - p) / (D * math.log(2)), rtol=1e-10, atol=0)
    # and the unconditional baseline is the DDPM bound alone
    torch.manual_seed(9)
    uncond = bound(lambda x, t, c: base(x, t), diff, x0)
    torch.manual_seed(9)
    assert torch.allclose(
        uncond["total"], diff.vlb_terms_bpd(base, x0)["total"], rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("form", [1, 2])
@pytest.mark.parametrize("target", DV.TARGETS)
def test_every_parameterisation_converts_its_target_back_to_the_noise_exactly(diff, form, target):
    # the network's ideal output for each target, turned into eps by eps_from_output, is the forward
    # draw's noise
    g = torch.Generator().manual_seed(4)
    x0, x_hat0, noise = (
        torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)
    )
    t = torch.tensor([0, 1, 150, 500, 998, 999])
    chain_t = diff.q_sample(x0, t, noise)  # the chain: x_t (form 1) or y_t = x_t - x_hat_0 (form 2)
    ideal = DV.training_target(target, diff, x0, x_hat0, t, noise)
    assert torch.allclose(
        DV.eps_from_output(target, diff, ideal, chain_t, t, x_hat0), noise, rtol=0, atol=1e-10
    )

    def perfect(
        x_t, tt, cond
    ):  # returns the target: the loss is zero and the chain's eps is the noise
        assert torch.equal(x_t, chain_t + (x_hat0 if form == 2 else 0)) and torch.equal(
            cond, x_hat0
        )
        return ideal

    losses, _ = DV.ddpm_loss(perfect, diff, x0, x_hat0, form=form, t=t, noise=noise, target=target)
    assert losses.abs().max() == 0
    eps = chain_eps(perfect, x_hat0, form, diff, target)(chain_t, t)
    assert torch.allclose(eps, noise, rtol=0, atol=1e-10)


def test_v_is_a_rotation_of_x0_and_eps(diff):
    g = torch.Generator().manual_seed(6)
    x0, eps = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 999, 700])
    x_t, v = diff.q_sample(x0, t, eps), diff.predict_v(x0, t, eps)
    assert torch.allclose(diff.predict_x0_from_v(x_t, t, v), x0, atol=1e-12)
    assert torch.allclose(diff.predict_eps_from_v(x_t, t, v), eps, atol=1e-12)
    assert torch.allclose(x_t**2 + v**2, x0**2 + eps**2, atol=1e-12)  # a rotation keeps the norm


@pytest.mark.parametrize("form,t_start", [(1, None), (2, None), (2, 300)])
def test_residual_model_that_outputs_zero_returns_x_hat0(diff, form, t_start):
    # a freshly initialised residual refiner (its last conv is zero) is the identity on x_hat_0:
    # training starts from the VAE's sample, not from noise
    x_hat0 = (
        torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
        - 1
    )
    out = refine(
        lambda x, t, c: torch.zeros_like(x),
        diff,
        x_hat0,
        form=form,
        steps=10,
        t_start=t_start,
        target="residual",
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.allclose(out, x_hat0, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs x_hat_0"):
        DV.ddpm_loss(lambda x, t, c: x, diff, x_hat0, None, form=1, target="residual")


def test_condition_dropout_replaces_x_hat0_by_the_null_input_at_its_rate():
    torch.manual_seed(0)
    x_hat0 = torch.rand(20000, 1, 2, 2) + 0.5  # never zero: a dropped row is recognisable
    assert DV.drop_condition(x_hat0, 0.0) is x_hat0
    out = DV.drop_condition(x_hat0, 0.2)
    dropped = (out == 0).flatten(1).all(1)
    kept = (out == x_hat0).flatten(1).all(1)
    assert (dropped ^ kept).all()  # each example is either null or untouched
    assert abs(dropped.float().mean().item() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 20000)
    assert (DV.drop_condition(x_hat0, 1.0) == 0).all()


@pytest.mark.parametrize("form", [1, 2])
def test_guidance_zero_is_the_conditional_model_and_the_null_path_never_sees_x_hat0(diff, form):
    g = torch.Generator().manual_seed(1)
    x_hat0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y, t = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), torch.tensor([5, 100, 300])
    conds = []

    def model(x, tt, cond):  # a network whose output depends on its conditioning input
        conds.append(cond)
        return 0.3 * x + cond.sin() + tt.double().reshape(-1, 1, 1, 1) / 1000

    plain = chain_eps(model, x_hat0, form)(y, t)
    assert len(conds) == 1 and conds[0] is x_hat0
    conds.clear()
    assert torch.equal(
        chain_eps(model, x_hat0, form, guidance=0.0)(y, t), plain
    )  # w = 0: exactly it
    w = 1.5
    conds.clear()
    guided = chain_eps(model, x_hat0, form, guidance=w)(y, t)
    assert (
        len(conds) == 2 and conds[0] is x_hat0 and (conds[1] == 0).all()
    )  # the second call gets the null input
    null_eps = model(
        y, t, torch.zeros_like(x_hat0)
    )  # both forms: the null branch sees the chain y_t unshifted
    assert torch.allclose(guided, (1 + w) * plain - w * null_eps, atol=1e-12)
    # so the null branch's output does not depend on x_hat_0 at all: d guided / d x_hat_0 is (1 + w)
    # times the conditional branch's, 0.3 [form 2: through its input y + x_hat_0] + cos(x_hat_0)
    # [through its condition]
    out = chain_eps(model, x_hat0, form, guidance=w)(y, t)
    grad = torch.autograd.grad(out.sum(), x_hat0)[0]
    assert torch.allclose(grad, (1 + w) * (0.3 * (form == 2) + x_hat0.cos()), atol=1e-12)
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        chain_eps(model, x_hat0, form, guidance=-1.0)


@pytest.mark.parametrize("form", [1, 2])
def test_a_dropped_condition_trains_the_null_branch_on_the_unshifted_chain(diff, form):
    # cond_drop: the null input (0) and, in both forms, x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps (DDPM
    # eq. 4), the chain the null branch is sampled on (chain_eps_fn); a kept condition in form 2
    # sees that chain shifted by x_hat_0
    g = torch.Generator().manual_seed(2)
    x0, x_hat0, noise = (
        torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)
    )
    t = torch.tensor([0, 10, 200, 999])
    ab = linear_schedule_by_hand(1000)[1][t].reshape(-1, 1, 1, 1)
    y_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    seen = []
    model = lambda x, tt, cond: seen.append((x, cond)) or torch.zeros_like(x)
    for p, shift in ((1.0, 0), (0.0, x_hat0 if form == 2 else 0)):
        seen.clear()
        DV.ddpm_loss(model, diff, x0, x_hat0, form=form, t=t, noise=noise, cond_drop=p)
        x_in, cond = seen[0]
        assert torch.allclose(x_in, y_t + shift, atol=1e-12)
        assert torch.equal(cond, torch.zeros_like(x_hat0) if p else x_hat0)


@pytest.mark.parametrize("form", [1, 2])
def test_a_residual_is_taken_from_the_input_the_network_saw_so_its_null_branch_predicts_x0(
    diff, form
):
    # residual + guidance: with the null input (zeros) the residual target is x_0 itself, in
    # training and in sampling, so the unconditional branch's x_0 estimate is the network's output
    # and never x_hat_0 + output
    g = torch.Generator().manual_seed(4)
    x0, x_hat0 = torch.randn(2, 6, 1, 4, 4, generator=g, dtype=torch.float64)
    t, noise = (
        torch.tensor([3, 50, 120, 200, 280, 299]),
        torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64),
    )
    seen = []

    def model(x, tt, cond):
        seen.append(cond)
        return torch.zeros_like(x)

    # every example dropped: the loss of a zero output is |x_0|^2, not |x_0 - x_hat_0|^2
    loss, _ = DV.ddpm_loss(
        model, diff, x0, x_hat0, form=form, t=t, noise=noise, target="residual", cond_drop=1.0
    )
    assert (seen[0] == 0).all()
    assert torch.allclose(loss, x0.pow(2).flatten(1).mean(1), atol=1e-12)
    # nothing dropped: the usual residual x_0 - x_hat_0
    loss, _ = DV.ddpm_loss(model, diff, x0, x_hat0, form=form, t=t, noise=noise, target="residual")
    assert torch.allclose(loss, (x0 - x_hat0).pow(2).flatten(1).mean(1), atol=1e-12)
    # sampling: guided eps = (1 + w) eps(x0_hat = x_hat_0 + 0) - w eps(x0_hat = 0 + 0)
    y = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    w = 0.7
    guided = chain_eps(model, x_hat0, form, diff, target="residual", guidance=w)(y, t)
    cond_eps, null_eps = (
        diff.predict_eps_from_x0(y, t, x_hat0),
        diff.predict_eps_from_x0(y, t, torch.zeros_like(y)),
    )
    assert torch.allclose(guided, (1 + w) * cond_eps - w * null_eps, atol=1e-12)


def test_the_refiner_starts_at_its_trained_t_start_unless_told_and_never_above_it(diff):
    # the chain's first denoiser call is at the start: the trained top (here code t 300) by default,
    # a lower one when given; a start above the trained range is refused, as is any truncated start
    # of the unconditional model, whose only start is x_T ~ N(0, I)
    seen = []

    def net(x, t, cond):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    x_hat0 = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    model = refiner(net, diff, form=2, target="residual", t_start=300)
    for t_start, first in ((None, 300), (100, 100), (0, 0)):
        seen.clear()
        model.refine(x_hat0, steps=1, t_start=t_start)
        assert seen == [first]
    with pytest.raises(ValueError, match="trained on the code timesteps 0..300"):
        model.refine(x_hat0, steps=1, t_start=301)
    uncond = refiner(lambda x, t, c: torch.zeros_like(x), diff)
    noise = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs x_hat_0"):
        uncond.refine(None, steps=1, t_start=50, noise=noise)
    assert uncond.refine(None, steps=1, noise=noise).shape == noise.shape  # from x_T at T - 1
