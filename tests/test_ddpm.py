"""Every DDPM statement of the derivations README, checked: closed forms in float64 to near machine
precision, Monte Carlo checks to a few standard errors (SE)."""

import math

import pytest
import torch
from oracles import (
    discrete_eps_oracle,
    discrete_gaussian_probs,
    entropy_bits,
    full,
    gaussian_eps_oracle,
    grid_values,
    linear_schedule_by_hand,
    log_bin_mass,
)

import ddpm

T = 1000


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_alpha_bar_T_is_4_04e_minus_5(diff):
    # derivations README: for 1e-4 -> 0.02 over T = 1000, alpha-bar_T ~= 4.04e-5 (prod of 1 -
    # beta_t)
    exact = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / (T - 1)) for i in range(T))
    assert diff.alphas_cumprod[-1].item() == pytest.approx(exact, rel=1e-12)
    assert round(diff.alphas_cumprod[-1].item() * 1e5, 2) == 4.04


def test_cosine_schedule_follows_its_alpha_bar_formula():
    d = ddpm.GaussianDiffusion(ddpm.cosine_beta_schedule(T))
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for i in [0, 10, 500, 900, 990]:  # before the 0.999 clip acts
        assert d.alphas_cumprod[i].item() == pytest.approx(f(i + 1) / f(0), rel=1e-10)


def test_derived_buffers_obey_their_definitions(diff):
    ab, ab_prev, b = diff.alphas_cumprod, diff.alphas_cumprod_prev, diff.betas
    assert torch.allclose(ab, torch.cumprod(1 - b, 0), rtol=1e-14)
    assert ab_prev[0] == 1 and torch.equal(ab_prev[1:], ab[:-1])
    assert torch.allclose(diff.posterior_variance, (1 - ab_prev) / (1 - ab) * b, rtol=1e-13)
    assert diff.posterior_variance[0] == 0  # beta-tilde_1 = 0: x_0 is determined by x_1 and x_0


# ----------------------------------------------------------------------------- forward process


def test_closed_form_marginal_matches_iterated_chain_exact(diff):
    # iterate the per-step mean/variance recursion m_t = sqrt(a_t) m_{t-1}, v_t = a_t v_{t-1} + b_t
    # (eq. 2)
    x0 = 0.73
    m, v = x0, 0.0
    for i in range(T):
        a = diff.alphas[i].item()
        m, v = math.sqrt(a) * m, a * v + diff.betas[i].item()
        mean, var = diff.q_mean_variance(torch.tensor([x0], dtype=torch.float64), full(i))
        assert mean.item() == pytest.approx(m, rel=1e-12, abs=1e-15)
        assert var.item() == pytest.approx(v, rel=1e-12)


def test_closed_form_marginal_matches_iterated_chain_monte_carlo(diff):
    g = torch.Generator().manual_seed(0)
    N = 40000
    x0 = torch.full((N,), 0.5, dtype=torch.float64)
    x = x0.clone()
    for i in [*range(300)]:
        x = diff.q_step_sample(x, full(i, N), torch.randn(N, generator=g, dtype=torch.float64))
    mean, var = diff.q_mean_variance(x0[:1], full(299))
    se_mean, se_var = math.sqrt(var.item() / N), var.item() * math.sqrt(2 / N)
    assert abs(x.mean().item() - mean.item()) < 4 * se_mean
    assert abs(x.var().item() - var.item()) < 4 * se_var
    # and q_sample draws from the same distribution
    y = diff.q_sample(x0, full(299, N), torch.randn(N, generator=g, dtype=torch.float64))
    assert abs(y.mean().item() - mean.item()) < 4 * se_mean
    assert abs(y.var().item() - var.item()) < 4 * se_var


# ----------------------------------------------------------------------------- posterior


def bayes_posterior_on_grid(diff, x0, x_t, i, n=400001):
    """q(x_{t-1} | x_t, x_0) proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0), integrated on a 1-D
    grid."""
    a, b, ab_prev = diff.alphas[i].item(), diff.betas[i].item(), diff.alphas_cumprod_prev[i].item()
    lik_mean, lik_sd = (
        x_t / math.sqrt(a),
        math.sqrt(b / a),
    )  # q(x_t | x_{t-1}) as a function of x_{t-1}
    pri_mean, pri_sd = math.sqrt(ab_prev) * x0, math.sqrt(1 - ab_prev)  # q(x_{t-1} | x_0)
    c, w = (lik_mean, lik_sd) if lik_sd < pri_sd else (pri_mean, pri_sd)
    xs = torch.linspace(c - 30 * w, c + 30 * w, n, dtype=torch.float64)
    log_p = -((xs - lik_mean) ** 2) / (2 * lik_sd**2) - (xs - pri_mean) ** 2 / (2 * pri_sd**2)
    p = torch.exp(log_p - log_p.max())
    p = p / torch.trapezoid(p, xs)
    mean = torch.trapezoid(p * xs, xs)
    return mean.item(), torch.trapezoid(p * (xs - mean) ** 2, xs).item()


@pytest.mark.parametrize("i", [1, 5, 100, 500, 999])
def test_posterior_equals_bayes_rule_on_a_grid(diff, i):
    x0 = torch.tensor([0.6], dtype=torch.float64)
    x_t = diff.q_sample(x0, full(i), torch.tensor([0.8], dtype=torch.float64))
    grid_mean, grid_var = bayes_posterior_on_grid(diff, x0.item(), x_t.item(), i)
    mean, var, log_var = diff.q_posterior_mean_variance(x0, x_t, full(i))
    assert mean.item() == pytest.approx(grid_mean, rel=1e-9, abs=1e-12)
    assert var.item() == pytest.approx(grid_var, rel=1e-7)
    assert log_var.item() == pytest.approx(math.log(grid_var), abs=1e-7)


# ----------------------------------------------------------------------------- parameterisations


def test_x0_eps_round_trips(diff):
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64),
    )
    t = torch.randint(0, T, (64,), generator=g)
    x_t = diff.q_sample(x0, t, eps)
    assert torch.allclose(
        diff.predict_x0_from_eps(x_t, t, eps), x0, rtol=0, atol=1e-9
    )  # /sqrt(ab_T) ~ 157x
    assert torch.allclose(diff.predict_eps_from_x0(x_t, t, x0), eps, rtol=0, atol=1e-12)


def test_eq11_eps_mean_equals_posterior_mean_of_predicted_x0(diff):
    # DDPM eq. 11: (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(a_t) == mu-tilde(x_t, x0_hat(x_t,
    # eps)), any eps
    g = torch.Generator().manual_seed(2)
    x_t, eps = (
        torch.randn(256, 5, generator=g, dtype=torch.float64),
        torch.randn(256, 5, generator=g, dtype=torch.float64),
    )
    t = torch.randint(1, T, (256,), generator=g)
    mu_eps = diff.p_mean_from_eps(x_t, t, eps)
    mu_post = diff.q_posterior_mean_variance(diff.predict_x0_from_eps(x_t, t, eps), x_t, t)[0]
    assert torch.allclose(mu_eps, mu_post, rtol=0, atol=1e-12)


def test_tweedie_exact_gaussian_score_matches_eps_relation(diff):
    # x_0 ~ N(m, s^2) => q(x_t) = N(sqrt(ab) m, ab s^2 + 1 - ab); its score by autograd vs
    # -E[eps|x_t]/sqrt(1-ab)
    m, s = 0.3, 0.5
    eps_fn = gaussian_eps_oracle(diff, m, s)
    x_t = torch.linspace(-3, 3, 61, dtype=torch.float64).requires_grad_()
    for i in [0, 10, 250, 999]:
        ab = diff.alphas_cumprod[i]
        log_q = (
            torch.distributions.Normal(ab.sqrt() * m, (ab * s**2 + 1 - ab).sqrt())
            .log_prob(x_t)
            .sum()
        )
        score = torch.autograd.grad(log_q, x_t)[0]
        t = full(i, 61)
        assert torch.allclose(
            diff.score_from_eps(t, eps_fn(x_t.detach(), t)), score, rtol=1e-12, atol=1e-12
        )


# ----------------------------------------------------------------------------- losses and the bound


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_vlb_weight_turns_eps_error_into_the_kl_term(diff, var_type):
    # DDPM eq. 12: KL(q(x_{t-1}|x_t,x_0) || N(mu_theta, sigma^2)) = w_t ||eps - eps_theta||^2 + (a
    # term free of theta)
    g = torch.Generator().manual_seed(3)
    x0, eps, eps_hat = (torch.randn(128, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.randint(1, T, (128,), generator=g)
    x_t = diff.q_sample(x0, t, eps)
    true_mean, _, true_log_var = diff.q_posterior_mean_variance(x0, x_t, t)
    log_sigma2 = diff.model_log_variance(t, x_t, var_type)
    kl_hat = ddpm.normal_kl(
        true_mean, true_log_var, diff.p_mean_from_eps(x_t, t, eps_hat), log_sigma2
    ).sum(1)
    kl_true = ddpm.normal_kl(
        true_mean, true_log_var, diff.p_mean_from_eps(x_t, t, eps), log_sigma2
    ).sum(1)
    w = diff.vlb_weight(t, var_type)
    assert torch.allclose(
        kl_hat - kl_true, w * (eps - eps_hat).pow(2).sum(1), rtol=1e-9, atol=1e-12
    )


def test_loss_simple_of_exact_denoiser_is_the_conditional_variance_of_eps(diff):
    # For Gaussian data the optimal eps-MSE at t is Var(eps | x_t) = ab s^2 / (ab s^2 + 1 - ab)
    g = torch.Generator().manual_seed(4)
    m, s, N = -0.2, 0.4, 200000
    eps_fn = gaussian_eps_oracle(diff, m, s)
    for i in [50, 400]:
        x0 = m + s * torch.randn(N, 1, generator=g, dtype=torch.float64)
        noise = torch.randn(N, 1, generator=g, dtype=torch.float64)
        t = full(i, N)
        losses = ddpm.loss_simple(eps_fn(diff.q_sample(x0, t, noise), t), noise)
        ab = diff.alphas_cumprod[i].item()
        expected = ab * s**2 / (ab * s**2 + 1 - ab)
        assert abs(losses.mean().item() - expected) < 4 * losses.std().item() / math.sqrt(N)


def test_discretized_decoder_is_a_distribution_over_the_256_levels():
    xs = grid_values()
    for mean, log_scale in [(0.1, math.log(0.01)), (-0.99, math.log(0.3)), (0.5, math.log(1e-3))]:
        lp = ddpm.discretized_gaussian_log_likelihood(
            xs, torch.full_like(xs, mean), torch.full_like(xs, log_scale)
        )
        # each bin's mass is floored at 1e-12 so the log stays finite: at most 256e-12 of extra mass
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=256e-12)


def expected_vlb_bits_by_quadrature(probs, T=T):
    """E_{x_0, x_{1:T}}[L] of DDPM eq. 5 for 1-D data on the 8-bit grid with probabilities `probs`,
    the exact denoiser and sigma_t^2 = beta_t (beta-tilde_2 at the first step, as
    ddpm.model_log_variance 'fixedlarge'), in bits, from the linear schedule's definition. With the
    exact denoiser mu_theta(x_t) = mu-tilde(x_t, E[x_0 | x_t]), so
    mu-tilde - mu_theta = c1 (x_0 - E[x_0 | x_t]) and, by the law of total variance, for t >= 2
    (code t >= 1)
        E L_{t-1} = 1/2 [log(sigma^2 / beta-tilde) + beta-tilde / sigma^2 - 1]
                    + c1^2 E[Var(x_0 | x_t)] / (2 sigma^2),
    c1 = sqrt(ab_{t-1}) beta_t / (1 - ab_t); at t = 1, c1 = 1 and c2 = 0, so
    L_0 = E[-log P(x_0 | mean E[x_0 | x_1])]; L_T = KL(N(sqrt(ab_T) x_0, 1 - ab_T) || N(0, 1))
    averaged over x_0. The x_t integrals are Riemann sums on a grid of step sd / 3 over +-7 sd
    beyond the data's range, sd = sqrt(1 - ab_t), which the integrands (Gaussian mixtures) make
    accurate to ~1e-13 bits: halving the step changes the result by less."""
    betas, ab = linear_schedule_by_hand(T)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    sigma2 = torch.cat([post_var[1:2], betas[1:]])
    c1 = betas * ab_prev.sqrt() / (1 - ab)
    xs, log_p = grid_values(), probs.log()

    def posterior_on_grid(i):
        """(grid step, x_t grid, q(x_t), E[x_0 | x_t], Var(x_0 | x_t), q(x_0 | x_t) over the
        levels)."""
        sd, c = (1 - ab[i]).sqrt(), ab[i].sqrt()
        x = torch.linspace(
            -c - 7 * sd, c + 7 * sd, int((2 * c + 14 * sd) / (sd / 3)) + 2, dtype=torch.float64
        )
        log_w = log_p - (x[:, None] - c * xs) ** 2 / (2 * sd**2)  # (n, 256)
        log_q = torch.logsumexp(log_w, 1)
        w = (log_w - log_q[:, None]).exp()
        mean = (w * xs).sum(1)
        var = (w * (xs - mean[:, None]) ** 2).sum(1)
        return x[1] - x[0], x, (log_q - 0.5 * math.log(2 * math.pi) - sd.log()).exp(), mean, var, w

    nats = (probs * 0.5 * (-(1 - ab[-1]).log() + (1 - ab[-1]) + ab[-1] * xs**2 - 1)).sum()  # L_T
    for i in range(1, T):  # L_{t-1}, t >= 2
        h, _, q, _, var, _ = posterior_on_grid(i)
        nats += 0.5 * ((sigma2[i] / post_var[i]).log() + post_var[i] / sigma2[i] - 1)
        nats += c1[i] ** 2 * (q * var).sum() * h / (2 * sigma2[i])
    h, _, q, mean, _, w = posterior_on_grid(0)  # L_0
    joint = q[:, None] * w  # density of (x_1, x_0 = level)
    log_mass = log_bin_mass(xs, mean[:, None], sigma2[0].sqrt())
    nats -= torch.where(joint > 0, joint * log_mass, torch.zeros_like(joint)).sum() * h
    return nats.item() / math.log(2)


def test_vlb_bounds_the_true_nll_for_discrete_gaussian_data_with_the_exact_denoiser():
    """E[VLB] >= -log p(x_0) (the data's entropy) with the exact optimal denoiser, and that denoiser
    minimises the bound: denoisers exact for a slightly wrong data law give a larger bound on the
    same draws (paired test). Data: a discretised Gaussian on the 8-bit grid, 1 dimension, sigma_t^2
    = beta_t. E[VLB] is computed twice: by quadrature from the derivation
    (expected_vlb_bits_by_quadrature), which must exceed the entropy, and by vlb_terms_bpd's Monte
    Carlo estimate (one x_t per image and t), which must agree with it to 4 standard errors of its
    mean over the N images (each image's total is an independent draw of the same law)."""
    diff = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(T))
    probs = discrete_gaussian_probs(m=0.1, s=0.25)
    nll_bits = entropy_bits(probs)
    N = 1000
    x0 = grid_values()[
        torch.multinomial(probs, N, replacement=True, generator=torch.Generator().manual_seed(5))
    ]
    x0 = x0.reshape(N, 1)

    def bound(probs_model):
        torch.manual_seed(6)  # the same x_t draws for every denoiser: differences are paired
        return diff.vlb_terms_bpd(
            discrete_eps_oracle(diff, probs_model), x0, var_type="fixedlarge"
        )["total"]

    exact = expected_vlb_bits_by_quadrature(probs)
    # the gap (0.12 bits/dim of 7.04) is the Gaussian reverse kernels' misfit to the discrete
    # posterior at small t; the quadrature's error (~1e-13) cannot make it change sign
    assert exact > nll_bits, (exact, nll_bits)
    vlb = bound(probs)
    mean, se = vlb.mean().item(), vlb.std().item() / math.sqrt(N)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    for wrong_s in [0.15, 0.4]:
        delta = bound(discrete_gaussian_probs(m=0.1, s=wrong_s)) - vlb
        assert delta.mean().item() > 4 * delta.std().item() / math.sqrt(N)


# ----------------------------------------------------------------------------- samplers


def test_ddim_timesteps_span_the_process_and_reject_bad_counts():
    taus = ddpm.ddim_timesteps(T, 10)
    assert taus[0] == 0 and taus[-1] == T - 1 and len(taus) == 10 and (taus.diff() > 0).all()
    assert torch.equal(ddpm.ddim_timesteps(T, T), torch.arange(T))
    for bad in [0, -3, T + 1]:
        with pytest.raises(ValueError, match=f"between 1 and {T}"):
            ddpm.ddim_timesteps(T, bad)


@pytest.mark.parametrize("spacing", ddpm.SPACINGS)
def test_truncated_timesteps_span_0_to_t_start_by_the_same_formula(diff, spacing):
    t_s, S = 300, 10
    taus = ddpm.ddim_timesteps(T, S, spacing, t_start=t_s)
    p = 1 if spacing == "uniform" else 2
    assert taus.tolist() == [round(t_s * (i / (S - 1)) ** p) for i in range(S)]
    assert torch.equal(ddpm.ddim_timesteps(T, t_s + 1, spacing, t_start=t_s), torch.arange(t_s + 1))
    assert torch.equal(
        ddpm.ddim_timesteps(T, S, spacing, t_start=T - 1), ddpm.ddim_timesteps(T, S, spacing)
    )
    d = diff.respace_to(taus)  # the respaced process keeps alpha-bar on the truncated subsequence
    assert torch.allclose(d.alphas_cumprod, diff.alphas_cumprod[taus], rtol=1e-12)
    for bad in (-1, T):
        with pytest.raises(ValueError, match="t_start must be between 0 and T - 1"):
            ddpm.ddim_timesteps(T, S, spacing, t_start=bad)
    with pytest.raises(ValueError, match="between 1 and 11"):
        ddpm.ddim_timesteps(T, 12, spacing, t_start=10)


def test_quadratic_timesteps_follow_their_formula_and_stay_distinct():
    for S in (2, 3, 10, 25):  # few steps: tau_i = round((T - 1) (i / (S - 1))^2), nothing collides
        taus = ddpm.ddim_timesteps(T, S, "quadratic")
        expect = [round((T - 1) * (i / (S - 1)) ** 2) for i in range(S)]
        assert taus.tolist() == expect
    assert ddpm.ddim_timesteps(T, 10, "quadratic").tolist() == [
        0,
        12,
        49,
        111,
        197,
        308,
        444,
        604,
        789,
        999,
    ]
    for S in (
        100,
        500,
        T - 1,
        T,
    ):  # many steps: rounding collides near t = 0 and each index moves one up
        taus = ddpm.ddim_timesteps(T, S, "quadratic")
        assert taus[0] == 0 and taus[-1] == T - 1 and len(taus) == S and (taus.diff() > 0).all()
        q = torch.tensor([round((T - 1) * (i / (S - 1)) ** 2) for i in range(S)])
        assert torch.equal(
            taus, torch.maximum(q, torch.arange(S))
        )  # the fix-up is exactly max(formula, i)
    assert torch.equal(ddpm.ddim_timesteps(T, T, "quadratic"), torch.arange(T))
    with pytest.raises(ValueError, match="spacing"):
        ddpm.ddim_timesteps(T, 10, "cubic")


@pytest.mark.parametrize("spacing", ddpm.SPACINGS)
def test_respaced_process_keeps_alpha_bar_on_its_subsequence(diff, spacing):
    taus = ddpm.ddim_timesteps(T, 10, spacing)
    d = diff.respace_to(taus)
    assert torch.allclose(d.alphas_cumprod, diff.alphas_cumprod[taus], rtol=1e-12)
    assert torch.equal(d.timestep_map, taus)


def test_ddim_eta1_with_all_steps_equals_ancestral_with_posterior_variance(diff):
    eps_fn = gaussian_eps_oracle(diff, 0.2, 0.3)
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a = diff.p_sample_loop(
        eps_fn, x_T, var_type="fixedsmall", generator=torch.Generator().manual_seed(8)
    )
    b = diff.ddim_sample_loop(eps_fn, x_T, eta=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(a, b, rtol=0, atol=1e-9)
    c = diff.p_sample_loop(
        eps_fn, x_T, var_type="fixedlarge", generator=torch.Generator().manual_seed(8)
    )
    assert (a - c).abs().max() > 1e-3  # and sigma^2 = beta_t really is a different sampler


def ddim_gain(diff, taus, s):
    """For x_0 ~ N(m, s^2) and the exact denoiser, DDIM (eta = 0) maps x_t - sqrt(ab_t) m linearly;
    its gain per step from t to t' is (sqrt(ab' ab) s^2 + sqrt((1 - ab')(1 - ab))) / (ab s^2 + 1 -
    ab)."""
    ab = diff.alphas_cumprod[taus].tolist()
    gain = 1.0
    for k in range(len(ab) - 1, -1, -1):
        a, a_prev = ab[k], (ab[k - 1] if k > 0 else 1.0)
        gain *= (math.sqrt(a_prev * a) * s**2 + math.sqrt((1 - a_prev) * (1 - a))) / (
            a * s**2 + 1 - a
        )
    return gain


@pytest.mark.parametrize("steps,spacing", [(10, "uniform"), (10, "quadratic"), (T, "uniform")])
def test_ddim_eta0_with_exact_denoiser_maps_noise_to_the_data_gaussian(diff, steps, spacing):
    m, s = 0.3, 0.5
    eps_fn = gaussian_eps_oracle(diff, m, s)
    x_T = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    out = ddpm.sample(diff, eps_fn, x_T, steps=steps, sampler="ddim", eta=0.0, spacing=spacing)
    gain = (out[1] - out[0]).item()
    ab_T = diff.alphas_cumprod[-1].item()
    assert gain == pytest.approx(
        ddim_gain(diff, ddpm.ddim_timesteps(T, steps, spacing), s), rel=1e-10
    )
    assert out[0].item() == pytest.approx(m - gain * math.sqrt(ab_T) * m, rel=1e-10)
    if steps == T:  # the many-step limit is the probability-flow map N(0, 1) -> N(m, s^2)
        # DDIM is a first-order solver: the gain's error halves when the step count doubles, so it
        # tends to s
        err = {S: s - ddim_gain(diff, ddpm.ddim_timesteps(T, S), s) for S in (250, 500, T)}
        assert 1.8 < err[250] / err[500] < 2.2 and 1.8 < err[500] / err[T] < 2.2
        assert abs(gain - s) / s < 0.004
        g = torch.Generator().manual_seed(9)
        N = 20000
        x = ddpm.sample(
            diff, eps_fn, torch.randn(N, 1, generator=g, dtype=torch.float64), steps=T, eta=0.0
        )
        assert abs(x.mean().item() - m) < 4 * s / math.sqrt(N)
        assert abs(x.std().item() - gain) < 4 * s / math.sqrt(2 * N)
    else:  # with 10 steps DDIM shrinks the variance (Cauchy-Schwarz on the gain), by a known amount
        assert gain < s


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_ancestral_sampling_with_exact_denoiser_recovers_the_data_gaussian(diff, var_type):
    m, s, N = -0.4, 0.6, 20000
    g = torch.Generator().manual_seed(10)
    x = diff.p_sample_loop(
        gaussian_eps_oracle(diff, m, s),
        torch.randn(N, 1, generator=g, dtype=torch.float64),
        var_type=var_type,
        generator=g,
    )
    assert abs(x.mean().item() - m) < 4 * s / math.sqrt(N)
    assert abs(x.std().item() - s) < 4 * s / math.sqrt(2 * N)


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_clipped_ancestral_sampling_steps_to_the_ddpm_eq7_mean_at_the_clipped_x0(diff, var_type):
    # ddpm.sample(sampler="ddpm", clip_x0=True) over 10 respaced steps against the same chain
    # written out here from the linear schedule's definition alone. At each visited code step t,
    # with t' the next one visited (ab_t' = 1 after the last) and the respaced step's beta_t = 1 -
    # ab_t / ab_t', alpha_t = ab_t / ab_t': x0_hat = clip((x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t),
    # -1, 1)                            (eq. 4 for x_0) mean   = sqrt(ab_t') beta_t / (1 - ab_t)
    # x0_hat + sqrt(alpha_t) (1 - ab_t') / (1 - ab_t) x_t    (DDPM eq. 7) x_t'   = mean + sigma_t z,
    # sigma_t^2 = beta-tilde_t = (1 - ab_t') beta_t / (1 - ab_t) (fixedsmall) or beta_t
    # (fixedlarge); no z at the last step with z from an identically seeded generator. The data
    # N(0.2, 1) reach past [-1, 1], so the exact denoiser's x0_hat is clipped for some samples
    # (5-25%) at the late steps and for none at the first: both sides of the clip are exercised.
    # Float64 throughout: roundoff (1e-16) amplified by 1/sqrt(ab_T) ~ 157 in x0_hat, over 10 steps,
    # stays below 1e-12; the tolerance 1e-11 is ten times that.
    m, s, N, S = 0.2, 1.0, 4000, 10
    _, ab_all = linear_schedule_by_hand(T)

    def eps_fn(x, t):
        # E[eps | x_t] for x_0 ~ N(m, s^2) (Gaussian conditioning; oracles.py's formula),
        # from ab_all
        a = ab_all[t].reshape(-1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s**2 + 1 - a)

    taus = [round((T - 1) * k / (S - 1)) for k in range(S)]  # the uniform spacing of ddim_timesteps
    x_T = torch.randn(N, 1, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    got = ddpm.sample(
        diff,
        eps_fn,
        x_T,
        steps=S,
        sampler="ddpm",
        var_type=var_type,
        clip_x0=True,
        generator=torch.Generator().manual_seed(13),
    )
    g = torch.Generator().manual_seed(13)
    x, clipped = x_T, []
    for k in reversed(range(S)):
        a = ab_all[taus[k]]
        a_prev = ab_all[taus[k - 1]] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta, alpha = 1 - a / a_prev, a / a_prev
        x0 = (x - (1 - a).sqrt() * eps_fn(x, torch.full((N,), taus[k]))) / a.sqrt()
        clipped.append((x0.abs() > 1).double().mean().item())
        x0 = x0.clamp(-1, 1)
        mean = a_prev.sqrt() * beta / (1 - a) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a) * x
        if k > 0:
            var = (1 - a_prev) * beta / (1 - a) if var_type == "fixedsmall" else beta
            x = mean + var.sqrt() * torch.randn(N, 1, generator=g, dtype=torch.float64)
        else:
            x = mean
    assert clipped[0] == 0 and 0.05 < max(clipped) < 0.95, clipped
    assert torch.allclose(got, x, rtol=0, atol=1e-11), (got - x).abs().max()


def test_sample_rejects_bad_arguments(diff):
    eps_fn = gaussian_eps_oracle(diff, 0.0, 1.0)
    x = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="eta"):
        ddpm.sample(diff, eps_fn, x, steps=10, eta=-0.5)
    with pytest.raises(ValueError, match="sampler"):
        ddpm.sample(diff, eps_fn, x, steps=10, sampler="euler")
    with pytest.raises(ValueError, match=f"between 1 and {T}"):
        ddpm.sample(diff, eps_fn, x, steps=T + 1)
    with pytest.raises(ValueError, match="schedule"):
        ddpm.make_diffusion("quadratic")


def test_ddpm_py_and_unet_py_alone_train_and_sample_an_unconditional_ddpm():
    # ddpm.py is a DDPM by itself. Its loss (eq. 14) of the UNet as initialised (output conv zero,
    # so eps_theta = 0) is E||eps||^2 = 1, to a few standard errors (sd of a mean of n chi^2_1 / n:
    # sqrt(2 / n)). On data that is one image the optimal eps is a known affine map of x_t (loss 0),
    # so a few hundred Adam steps must take the loss well down; then both samplers draw images.
    from unet import UNet

    torch.manual_seed(0)
    diffusion = ddpm.make_diffusion("linear", 1000)
    net = UNet(
        img_ch=1,
        ch=8,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        image_size=8,
        norm_groups=8,
    )
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    eps_fn = lambda x, t: net(x, t)
    with torch.no_grad():
        first = diffusion.loss(eps_fn, image.expand(4096, -1, -1, -1)).mean().item()
    assert abs(first - 1) < 4 * math.sqrt(2 / (4096 * 64))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        loss = diffusion.loss(eps_fn, image.expand(32, -1, -1, -1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = diffusion.loss(eps_fn, image.expand(4096, -1, -1, -1)).mean().item()
        x_T = torch.randn(4, 1, 8, 8)
        for sampler in ("ddim", "ddpm"):
            x0 = ddpm.sample(diffusion, eps_fn, x_T, steps=10, sampler=sampler)
            assert x0.shape == x_T.shape and torch.isfinite(x0).all()
    assert last < 0.5 * first
