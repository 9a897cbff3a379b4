"""One test per erratum listed in ../shared/derivations/README.md: the corrected statement holds, the
printed one does not. Each names the document it corrects."""
import math

import pytest
import torch

import ddpm
import vae as V
from oracles import gaussian_eps_oracle
from test_ddpm import bayes_posterior_on_grid
from test_vae import SIGMA, elbo_terms, ppca  # noqa: F401  (ppca is a fixture)

T = 1000


def test_luo_forward_step_variance_is_one_minus_alpha_not_its_square_root(diff):
    # [Luo] prints q(x_t|x_{t-1}) with covariance sqrt(1 - alpha_t) I; only (1 - alpha_t) I gives eq. 4's marginal
    v_right = v_printed = 0.0
    for i in range(T):
        a = diff.alphas[i].item()
        v_right = a * v_right + (1 - a)
        v_printed = a * v_printed + math.sqrt(1 - a)
    assert v_right == pytest.approx(1 - diff.alphas_cumprod[-1].item(), rel=1e-12)
    assert v_printed > 5.0  # the printed chain is not variance preserving: far from N(0, I) at T


def test_luo_joint_uses_prior_on_x_T_only(diff):
    # [Luo] writes the prior as p(x_{1:T}); the joint is p(x_T) prod_t p(x_{t-1}|x_t). For a 2-step linear-Gaussian
    # chain whose reverse kernels are exact, only p(x_T) makes the joint integrate to one with marginal p(x_0).
    d = ddpm.GaussianDiffusion(torch.tensor([0.3, 0.5], dtype=torch.float64))
    m, s = 0.4, 0.7
    xs = torch.linspace(-7, 7, 201, dtype=torch.float64)  # Riemann sums of smooth Gaussians converge fast
    dx = (xs[1] - xs[0]).item()
    X0, X1, X2 = torch.meshgrid(xs, xs, xs, indexing="ij")
    N = torch.distributions.Normal
    ab = d.alphas_cumprod
    v = lambda i: ab[i] * s ** 2 + 1 - ab[i]               # Var q(x_t), q(x_t) = N(sqrt(ab) m, v)
    log_q = lambda x, i: N(ab[i].sqrt() * m, v(i).sqrt()).log_prob(x)
    # exact reverse kernels q(x_{t-1} | x_t) by Bayes: forward kernel times the marginal ratio
    log_k1 = N(d.alphas[1].sqrt() * X1, d.betas[1].sqrt()).log_prob(X2) + log_q(X1, 0) - log_q(X2, 1)
    log_k0 = N(d.alphas[0].sqrt() * X0, d.betas[0].sqrt()).log_prob(X1) + N(m, s).log_prob(X0) - log_q(X1, 0)
    joint_right = (log_q(X2, 1) + log_k1 + log_k0).exp()
    assert joint_right.sum().item() * dx ** 3 == pytest.approx(1.0, abs=1e-6)
    # the printed prior p(x_{1:T}) = p(x_1, x_2) = q(x_2) k1: the product double-counts and is not normalised
    joint_printed = (log_q(X2, 1) + log_k1 + log_k1 + log_k0).exp()
    assert abs(joint_printed.sum().item() * dx ** 3 - 1.0) > 0.05


def test_luo_posterior_mean_coefficient_uses_alpha_bar_prev(diff):
    # [Luo] prints sqrt(alpha_{t-1}) (1 - alpha_t) x_0; Bayes' rule gives sqrt(alpha-bar_{t-1}) (1 - alpha_t) x_0
    i, x0, x_t = 300, 0.6, 0.2
    grid_mean, _ = bayes_posterior_on_grid(diff, x0, x_t, i)
    a, ab, ab_prev, a_prev = (diff.alphas[i].item(), diff.alphas_cumprod[i].item(),
                              diff.alphas_cumprod_prev[i].item(), diff.alphas[i - 1].item())
    mu = lambda c: (math.sqrt(a) * (1 - ab_prev) * x_t + c * (1 - a) * x0) / (1 - ab)
    assert mu(math.sqrt(ab_prev)) == pytest.approx(grid_mean, rel=1e-9)
    assert abs(mu(math.sqrt(a_prev)) - grid_mean) > 1e-6  # 1000x the grid's own error


def test_diffusevae_elbo_terms_need_a_log(ppca):  # noqa: F811
    # [DiffuseVAE] prints E[p(y|z)] - KL; with the log, the ELBO equals log p(x) at the exact posterior (PPCA)
    mu, logvar = ppca["post_mu"], ppca["post_logvar"]
    N = 100000
    rec, kl = elbo_terms(ppca, mu, logvar, N, seed=7)
    with_log = rec - kl
    without_log = rec.exp() - kl
    se = with_log.std().item() / math.sqrt(N)
    assert abs(with_log.mean().item() - ppca["log_px"]) < 4 * se
    assert abs(without_log.mean().item() - ppca["log_px"]) > 1.0


def test_su_sampling_pseudocode_scales_eps_by_beta_squared_over_beta_bar(diff):
    # [Su] 8.2 prints mu = (x_t - (beta_t / bar-beta_t) eps) / alpha_t in his letters (his beta_t = sqrt(DDPM beta_t),
    # bar-beta_t = sqrt(1 - alpha-bar_t), alpha_t = sqrt(DDPM alpha_t)); the right factor is beta_t^2 / bar-beta_t
    g = torch.Generator().manual_seed(8)
    x_t, eps = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    t = torch.full((64,), 400, dtype=torch.long)
    su_beta, su_bar_beta, su_alpha = (diff.betas[400].sqrt(), diff.sqrt_one_minus_alphas_cumprod[400],
                                      diff.alphas[400].sqrt())
    true_mean = diff.q_posterior_mean_variance(diff.predict_x0_from_eps(x_t, t, eps), x_t, t)[0]
    corrected = (x_t - su_beta ** 2 / su_bar_beta * eps) / su_alpha
    printed = (x_t - su_beta / su_bar_beta * eps) / su_alpha
    assert torch.allclose(corrected, true_mean, rtol=0, atol=1e-12)
    assert (printed - true_mean).abs().max() > 0.1


def test_su_eq77_optimal_mean_adds_beta_squared_times_the_score(diff):
    # [Su] (77) prints mu* = (x_t - beta_t^2 / bar-beta_t * score) / alpha_t; with the exact score of Gaussian data
    # the optimal mean E[x_{t-1} | x_t] is (x_t + beta_t^2 score) / alpha_t (his letters)
    m, s, i = 0.3, 0.5, 250
    x_t = torch.linspace(-2, 2, 41, dtype=torch.float64)
    t = torch.full((41,), i, dtype=torch.long)
    score = diff.score_from_eps(t, gaussian_eps_oracle(diff, m, s)(x_t, t))
    # E[x_{t-1} | x_t] for Gaussian data by Gaussian conditioning: x_{t-1} ~ N(sqrt(ab') m, v'), x_t = sqrt(a) x_{t-1} + ...
    a, b, ab_prev = diff.alphas[i], diff.betas[i], diff.alphas_cumprod_prev[i]
    v_prev = ab_prev * s ** 2 + 1 - ab_prev
    v_t = a * v_prev + b
    optimal = ab_prev.sqrt() * m + a.sqrt() * v_prev / v_t * (x_t - a.sqrt() * ab_prev.sqrt() * m)
    su_beta2, su_alpha, su_bar_beta = b, a.sqrt(), diff.sqrt_one_minus_alphas_cumprod[i]
    corrected = (x_t + su_beta2 * score) / su_alpha
    printed = (x_t - su_beta2 / su_bar_beta * score) / su_alpha
    assert torch.allclose(corrected, optimal, rtol=1e-12, atol=1e-12)
    assert (printed - optimal).abs().max() > 1e-3


def test_su_integral_63_is_minus_0_01_so_alpha_bar_T_is_e_minus_5(diff):
    # [Su] (63) prints int_0^1 log(1 - 0.02 tau) d tau = -1; it is about -0.01007
    tau = torch.linspace(0, 1, 1_000_001, dtype=torch.float64)
    integral = torch.trapezoid(torch.log1p(-0.02 * tau), tau).item()
    closed = -(0.98 * math.log(0.98)) / 0.02 - 1  # [-(1 - 0.02 tau) log(1 - 0.02 tau) / 0.02 - tau]_0^1
    assert integral == pytest.approx(closed, rel=1e-9)
    assert integral == pytest.approx(-0.01007, abs=1e-5)
    # so [Su]'s alpha-bar_T (the square root of DDPM's) is about e^{T/2 * -0.01} = e^-5, not e^-500,
    # and for the DDPM linear schedule sqrt(alpha-bar_T) = sqrt(4.04e-5) = e^-5.06
    assert math.exp(T / 2 * integral) == pytest.approx(math.exp(-5.03), rel=1e-2)
    assert math.log(diff.alphas_cumprod[-1].sqrt().item()) == pytest.approx(-5.06, abs=0.01)
