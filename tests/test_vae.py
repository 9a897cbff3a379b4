"""The VAE statements: reparameterisation, analytic KL, and log p(x) = ELBO + KL(q || p(z|x)) >=
ELBO, proved on probabilistic PCA where log p(x) and the posterior are exact."""

import math

import pytest
import torch

import vae as V

D, K, SIGMA = 6, 3, 0.4  # data dims, latent dims, observation noise of the linear-Gaussian model


@pytest.fixture(scope="module")
def ppca():
    """p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I) with orthogonal columns of W, so p(z|x) is
    diagonal."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=torch.float64))
    W = U * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(D, generator=g, dtype=torch.float64) * 2
    C = W @ W.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
    log_px = torch.distributions.MultivariateNormal(b, C).log_prob(x).item()
    # exact posterior: N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I (diagonal here)
    M = W.T @ W + SIGMA**2 * torch.eye(K, dtype=torch.float64)
    post_mu = torch.linalg.solve(M, W.T @ (x - b))
    post_var = torch.diagonal(SIGMA**2 * torch.linalg.inv(M))
    return dict(W=W, b=b, x=x, log_px=log_px, post_mu=post_mu, post_logvar=post_var.log())


def elbo_terms(ppca, mu, logvar, n, seed):
    """One-sample ELBO estimates with vae.py's functions, per draw: (elbo, rec, kl) with elbo =
    -negative_elbo and its two terms rec = log p(x|z), kl = KL(q(z|x) || N(0, I))."""
    z = V.reparameterize(
        mu.expand(n, K),
        logvar.expand(n, K),
        torch.randn(n, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
    )
    mean_x = z @ ppca["W"].T + ppca["b"]
    x, obs_logvar = ppca["x"].expand(n, D), math.log(SIGMA**2)
    elbo = -V.negative_elbo(x, mean_x, obs_logvar, mu.expand(n, K), logvar.expand(n, K))
    rec = V.gaussian_log_likelihood(x, mean_x, obs_logvar)
    kl = V.kl_standard_normal(mu.expand(n, K), logvar.expand(n, K))
    return elbo, rec, kl


def test_reparameterised_draws_have_the_encoder_mean_and_variance():
    N = 100000
    mu, logvar = torch.tensor([0.5, -2.0]), torch.tensor([0.0, math.log(0.09)])
    z = V.reparameterize(mu.expand(N, 2), logvar.expand(N, 2))
    sd = logvar.mul(0.5).exp()
    assert ((z.mean(0) - mu).abs() < 4 * sd / math.sqrt(N)).all()
    assert ((z.std(0) - sd).abs() < 4 * sd / math.sqrt(2 * N)).all()


def test_analytic_kl_equals_monte_carlo_estimate():
    g = torch.Generator().manual_seed(1)
    mu, logvar = (
        torch.randn(1, 5, generator=g, dtype=torch.float64),
        torch.randn(1, 5, generator=g, dtype=torch.float64),
    )
    N = 200000
    z = V.reparameterize(
        mu.expand(N, 5), logvar.expand(N, 5), torch.randn(N, 5, generator=g, dtype=torch.float64)
    )
    q = torch.distributions.Normal(mu, logvar.mul(0.5).exp())
    log_ratio = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(1)
    kl = V.kl_standard_normal(mu, logvar).item()
    assert abs(log_ratio.mean().item() - kl) < 4 * log_ratio.std().item() / math.sqrt(N)


def test_gaussian_likelihood_matches_its_density():
    g = torch.Generator().manual_seed(2)
    x, mean = (
        torch.randn(4, 3, 2, generator=g, dtype=torch.float64),
        torch.randn(4, 3, 2, generator=g, dtype=torch.float64),
    )
    ref = torch.distributions.Normal(mean, math.exp(0.5 * -1.3)).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(V.gaussian_log_likelihood(x, mean, -1.3), ref, rtol=1e-12)


def test_elbo_equals_log_px_at_the_exact_posterior_for_every_draw(ppca):
    # at q = p(z|x), log p(x|z) + log p(z) - log q(z|x) = log p(x) for every z, so one draw is
    # already exact
    mu, logvar = ppca["post_mu"], ppca["post_logvar"]
    z = V.reparameterize(mu.expand(50, K), logvar.expand(50, K))
    log_joint = V.gaussian_log_likelihood(
        ppca["x"].expand(50, D), z @ ppca["W"].T + ppca["b"], math.log(SIGMA**2)
    ) + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    log_q = torch.distributions.Normal(mu, logvar.mul(0.5).exp()).log_prob(z).sum(1)
    assert torch.allclose(
        log_joint - log_q, torch.full((50,), ppca["log_px"], dtype=torch.float64), rtol=1e-12
    )
    # and the ELBO of vae.py (analytic KL) averages to log p(x)
    N = 100000
    est, _, _ = elbo_terms(ppca, mu, logvar, N, seed=3)
    assert abs(est.mean().item() - ppca["log_px"]) < 4 * est.std().item() / math.sqrt(N)


def test_elbo_gap_is_the_kl_to_the_true_posterior(ppca):
    # log p(x) - ELBO(q) = KL(q || p(z|x)) >= 0 for any Gaussian q
    mu = ppca["post_mu"] + torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    logvar = ppca["post_logvar"] + torch.tensor([0.4, -0.6, 0.1], dtype=torch.float64)
    N = 200000
    est, _, _ = elbo_terms(ppca, mu, logvar, N, seed=4)
    q = torch.distributions.Normal(mu, logvar.mul(0.5).exp())
    post = torch.distributions.Normal(ppca["post_mu"], ppca["post_logvar"].mul(0.5).exp())
    gap = torch.distributions.kl_divergence(q, post).sum().item()
    assert gap > 0.1
    assert abs((ppca["log_px"] - est.mean().item()) - gap) < 4 * est.std().item() / math.sqrt(N)
    assert est.mean().item() < ppca["log_px"]


def test_vae_network_shapes_and_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = V.VAE(img_ch=1, image_size=32, ch=32, z_dim=8)
    x = torch.rand(16, 1, 32, 32) * 2 - 1
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (16, 8)
    assert model.decode(mu).shape == x.shape
    loss = model(x)
    assert loss.shape == (16,)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = model(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    # the config is plain data that rebuilds the model
    clone = V.VAE(**model.config)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.decode(mu.detach()), model.decode(mu.detach()))


def test_negative_elbo_is_the_analytic_kl_minus_the_gaussian_log_likelihood():
    # -ELBO = KL(N(mu, e^logvar) || N(0, I)) - log N(x; x_hat, e^obs_logvar I) per example, both
    # terms from torch.distributions (the KL in closed form, the likelihood as a density), nothing
    # of vae.py
    g = torch.Generator().manual_seed(5)
    x, x_hat = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    mu, logvar = (
        torch.randn(4, 5, generator=g, dtype=torch.float64),
        torch.randn(4, 5, generator=g, dtype=torch.float64),
    )
    obs_logvar = -0.7
    N_ = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(N_(mu, logvar.mul(0.5).exp()), N_(0.0, 1.0)).sum(1)
    log_lik = N_(x_hat, math.exp(0.5 * obs_logvar)).log_prob(x).flatten(1).sum(1)
    got = V.negative_elbo(x, x_hat, obs_logvar, mu, logvar)
    assert got.shape == (4,)
    assert torch.allclose(got, kl - log_lik, rtol=1e-12, atol=0)


def test_vae_forward_is_the_one_sample_negative_elbo_per_dimension():
    # the stage-1 loss of each image: -ELBO of the one draw z = mu + sigma eps it decodes, divided
    # by C*S*S
    torch.manual_seed(0)
    model = V.VAE(img_ch=2, image_size=16, ch=16, z_dim=4).double()
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64) * 2 - 1
    torch.manual_seed(1)
    got = model(x)
    torch.manual_seed(1)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        x_hat = model.decode(mu + logvar.mul(0.5).exp() * torch.randn_like(mu))  # the same eps draw
        N_ = torch.distributions.Normal
        kl = torch.distributions.kl_divergence(N_(mu, logvar.mul(0.5).exp()), N_(0.0, 1.0)).sum(1)
        log_lik = N_(x_hat, model.obs_logvar.mul(0.5).exp()).log_prob(x).flatten(1).sum(1)
    assert got.shape == (3,)
    assert torch.allclose(got.detach(), (kl - log_lik) / (2 * 16 * 16), rtol=1e-10, atol=0)


@pytest.mark.parametrize("stage", ["vae", "ddpm"])
def test_vae_from_checkpoint_round_trip_gives_the_same_frozen_model_and_prior(tmp_path, stage):
    # a stage-1 checkpoint (model_args, ema, prior at the top) or a stage-2 one's "vae" entry,
    # through the file
    import runtime

    torch.manual_seed(0)
    model = V.VAE(img_ch=1, image_size=16, ch=16, z_dim=4).eval()
    images = torch.randint(
        0, 256, (40, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    prior, log_lik = V.fit_expost_prior(
        model, images, k=3, batch_size=16, generator=torch.Generator().manual_seed(2)
    )
    assert (
        math.isfinite(log_lik) and prior["weights"].shape == (3,) and prior["means"].shape == (3, 4)
    )
    entry = dict(model_args=model.config, ema=model.state_dict(), prior=prior)
    ck = (
        dict(stage="vae", **entry)
        if stage == "vae"
        else dict(stage="ddpm", model_args={}, vae=entry)
    )
    runtime.save_atomic(ck, str(tmp_path / f"{stage}.pt"))
    loaded = runtime.load_checkpoint(str(tmp_path / f"{stage}.pt"), stage=stage)
    vae = V.VAE.from_checkpoint(loaded if stage == "vae" else loaded["vae"])
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.config == model.config
    assert all(torch.equal(vae.prior[k], prior[k]) for k in ("weights", "means", "covs"))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(vae.encode(x), model.encode(x)))
    model.prior = prior
    z = V.sample_prior(5, vae.z_dim, vae.prior, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the same mixture draw z decodes to the same x_hat_0
        assert torch.equal(vae.decode(z), model.decode(z))


def test_vae_rejects_image_sizes_it_cannot_downsample():
    with pytest.raises(ValueError, match="divisible by 8"):
        V.VAE(image_size=30)


# ----------------------------------------------------------- the ex-post prior (a Gaussian mixture)


def known_mixture():
    """Three well-separated 2-D Gaussians with unequal weights and full covariances, float64."""
    return dict(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        means=torch.tensor([[0.0, 0.0], [6.0, 1.0], [-3.0, 7.0]], dtype=torch.float64),
        covs=torch.tensor(
            [[[1.0, 0.6], [0.6, 2.0]], [[0.5, -0.2], [-0.2, 0.3]], [[2.0, 0.0], [0.0, 0.4]]],
            dtype=torch.float64,
        ),
    )


def test_mixture_log_density_is_log_sum_of_weighted_gaussian_densities():
    p = known_mixture()
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    comps = [
        torch.distributions.MultivariateNormal(m, c).log_prob(z) + w.log()
        for w, m, c in zip(p["weights"], p["means"], p["covs"])
    ]
    assert torch.allclose(
        V.gmm_log_prob(z, p), torch.logsumexp(torch.stack(comps), 0), rtol=1e-12, atol=1e-12
    )


def test_sampled_codes_have_the_mixture_mean_and_covariance():
    p, n = known_mixture(), 200_000
    z = V.sample_prior(n, 2, p, generator=torch.Generator().manual_seed(1)).double()
    w, m, S = p["weights"], p["means"], p["covs"]
    mean = (w[:, None] * m).sum(0)  # E z = sum_k w_k m_k
    cov = (w[:, None, None] * (S + m[:, :, None] * m[:, None, :])).sum(0) - torch.outer(mean, mean)
    d = z - mean
    prods = d[:, :, None] * d[:, None, :]  # (n, 2, 2): E = cov
    assert ((z.mean(0) - mean).abs() <= 4 * z.std(0) / math.sqrt(n)).all()
    assert ((prods.mean(0) - cov).abs() <= 4 * prods.std(0) / math.sqrt(n)).all()


def test_em_recovers_a_known_mixture_within_standard_errors():
    p, n = known_mixture(), 30_000
    z = V.sample_prior(n, 2, p, generator=torch.Generator().manual_seed(2)).double()
    fit, _ = V.fit_gmm(z, k=3, generator=torch.Generator().manual_seed(3))
    order = torch.cdist(p["means"], fit["means"]).argmin(1)  # match components by their means
    assert sorted(order.tolist()) == [0, 1, 2]
    w = p["weights"]
    assert ((fit["weights"][order] - w).abs() <= 4 * (w * (1 - w) / n).sqrt()).all()
    mean_se = (torch.diagonal(p["covs"], dim1=1, dim2=2) / (n * w[:, None])).sqrt()
    assert ((fit["means"][order] - p["means"]).abs() <= 4 * mean_se).all()
    # a covariance entry of a Gaussian has variance (S_ij^2 + S_ii S_jj) / n_k
    S = p["covs"]
    diag = torch.diagonal(S, dim1=1, dim2=2)
    cov_se = ((S**2 + diag[:, :, None] * diag[:, None, :]) / (n * w[:, None, None])).sqrt()
    assert ((fit["covs"][order] - S).abs() <= 4 * cov_se).all()


def test_em_never_lowers_the_log_likelihood():
    p = known_mixture()
    z = V.sample_prior(3000, 2, p, generator=torch.Generator().manual_seed(4)).double()
    _, history = V.fit_gmm(z, k=5, iters=60, tol=-1.0, generator=torch.Generator().manual_seed(5))
    steps = torch.tensor(history).diff()
    assert len(history) == 61 and (steps >= -1e-12).all() and history[-1] > history[0] + 0.1
    assert (
        abs(
            history[-1]
            - V.gmm_log_prob(
                z,
                V.fit_gmm(z, k=5, iters=60, tol=-1.0, generator=torch.Generator().manual_seed(5))[
                    0
                ],
            )
            .mean()
            .item()
        )
        < 1e-12
    )


def test_kl_to_a_mixture_is_estimated_without_bias_and_to_n01_in_closed_form():
    # KL(N(mu, diag s^2) || N(m, S)) = 1/2 [tr(S^-1 diag s^2) + (m - mu)^T S^-1 (m - mu) - d + log
    # det S - sum log s^2]: a one-component "mixture" has that closed form, which the mean of the
    # one-draw estimates must reach within a few standard errors; against N(0, I) (prior None) the
    # closed form itself is returned.
    g = torch.Generator().manual_seed(0)
    d, N = 3, 200_000
    mu, logvar = (
        torch.tensor([[0.3, -0.5, 1.0]], dtype=torch.float64),
        torch.tensor([[-0.4, 0.2, -1.0]], dtype=torch.float64),
    )
    L = torch.tensor([[1.2, 0, 0], [0.3, 0.8, 0], [-0.2, 0.1, 0.6]], dtype=torch.float64)
    m, S = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64), L @ L.T
    prior = dict(weights=torch.ones(1, dtype=torch.float64), means=m[None], covs=S[None])
    S_inv, diff = torch.linalg.inv(S), m - mu[0]
    exact = 0.5 * (
        torch.trace(S_inv @ torch.diag(logvar[0].exp()))
        + diff @ S_inv @ diff
        - d
        + torch.logdet(S)
        - logvar.sum()
    )
    z = V.reparameterize(
        mu.expand(N, d), logvar.expand(N, d), torch.randn(N, d, generator=g, dtype=torch.float64)
    )
    est = V.kl_to_prior(mu.expand(N, d), logvar.expand(N, d), z, prior)
    assert abs(est.mean() - exact) < 4 * est.std() / N**0.5
    closed = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
    assert torch.allclose(V.kl_to_prior(mu, logvar, z[:1]), closed.reshape(1), rtol=1e-14)
