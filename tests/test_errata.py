"""One test per erratum listed in ../shared/derivations/README.md: the corrected statement holds,
the printed one does not. Each names the document it corrects."""

import math

import pytest
import torch
from oracles import gaussian_eps_oracle, grid_values, linear_schedule_by_hand, log_bin_mass
from test_ddpm import bayes_posterior_on_grid
from test_vae import SIGMA, elbo_terms, ppca  # noqa: F401  (ppca is a fixture)

import ddpm

T = 1000


def test_luo_forward_step_variance_is_one_minus_alpha_not_its_square_root(diff):
    # [Luo] prints q(x_t|x_{t-1}) with covariance sqrt(1 - alpha_t) I; it is (1 - alpha_t) I =
    # beta_t I, the only choice whose steps compose to eq. 4's marginal variance 1 - alpha-bar_t.
    # q_step_sample is affine in (x_{t-1}, noise): its two coefficients, read off at (1, 0) and (0,
    # 1), are sqrt(alpha_t) and the step's sd.
    betas, ab = linear_schedule_by_hand(T)
    t, one, zero = (
        torch.arange(T),
        torch.ones(T, dtype=torch.float64),
        torch.zeros(T, dtype=torch.float64),
    )
    gain, sd = diff.q_step_sample(one, t, zero), diff.q_step_sample(zero, t, one)
    assert torch.allclose(gain, (1 - betas).sqrt(), rtol=1e-12, atol=0)
    assert torch.allclose(sd**2, betas, rtol=1e-12, atol=0)  # 1 - alpha_t, not sqrt(1 - alpha_t)
    v = v_printed = 0.0  # Var(x_t | x_0), step by step
    for i in range(T):
        v = gain[i].item() ** 2 * v + sd[i].item() ** 2
        v_printed = gain[i].item() ** 2 * v_printed + math.sqrt(1 - gain[i].item() ** 2)
        assert v == pytest.approx(1 - ab[i].item(), rel=1e-10)
    assert v_printed > 5.0  # the printed chain is not variance preserving: far from N(0, I) at T


def test_luo_joint_uses_prior_on_x_T_only():
    # [Luo] writes the joint as p(x_{1:T}) prod_t p(x_{t-1}|x_t); it is p(x_T) prod_t
    # p(x_{t-1}|x_t), and DDPM eq. 5, which vlb_terms_bpd estimates, is -E_q[log p(x_{0:T}) /
    # q(x_{1:T} | x_0)] of that joint. A 2-step chain (betas 0.3, 0.5), one 8-bit x_0, a linear
    # denoiser: -ELBO of each joint by quadrature over (x_1, x_2), in bits, against vlb_terms_bpd's
    # Monte Carlo mean over N independent draws (4 standard errors). The printed prior p(x_{1:2}) =
    # p(x_2) p(x_1|x_2) counts the kernel p(x_1|x_2) twice.
    b1, b2 = 0.3, 0.5
    a1, a2, ab1, ab2 = 1 - b1, 1 - b2, 1 - b1, (1 - b1) * (1 - b2)
    d = ddpm.GaussianDiffusion(torch.tensor([b1, b2], dtype=torch.float64))
    x0 = grid_values()[150].item()
    eps = lambda x, t: (0.4 + 0.2 * t) * x - 0.1  # any denoiser: the bound holds for each
    N = 100000
    torch.manual_seed(10)
    vlb = d.vlb_terms_bpd(
        lambda x, t: eps(x, t.double().reshape(-1, 1)),
        torch.full((N, 1), x0, dtype=torch.float64),
        var_type="fixedlarge",
    )["total"]
    mean, se = vlb.mean().item(), vlb.std().item() / math.sqrt(N)

    N_ = torch.distributions.Normal
    x1 = torch.linspace(-10, 10, 1201, dtype=torch.float64) * math.sqrt(b1) + math.sqrt(a1) * x0
    x2 = (
        torch.linspace(-10, 10, 1201, dtype=torch.float64) * math.sqrt(1 - ab2)
        + math.sqrt(ab2) * x0
    )
    X1, X2 = torch.meshgrid(x1, x2, indexing="ij")
    log_q1 = N_(math.sqrt(a1) * x0, math.sqrt(b1)).log_prob(X1)  # q(x_1 | x_0)
    log_q2 = N_(math.sqrt(a2) * X1, math.sqrt(b2)).log_prob(X2)  # q(x_2 | x_1)
    log_prior = N_(0.0, 1.0).log_prob(X2)  # p(x_2)
    mu2 = (X2 - b2 / math.sqrt(1 - ab2) * eps(X2, 1)) / math.sqrt(
        a2
    )  # DDPM eq. 11, sigma_2^2 = beta_2
    log_k2 = N_(mu2, math.sqrt(b2)).log_prob(X1)  # p(x_1 | x_2)
    mu1 = (X1 - b1 / math.sqrt(1 - ab1) * eps(X1, 0)) / math.sqrt(
        a1
    )  # the decoder's mean, its variance
    log_k1 = log_bin_mass(
        torch.tensor(x0, dtype=torch.float64),
        mu1,  # beta-tilde_2 (beta-tilde_1 = 0)
        math.sqrt((1 - ab1) * b2 / (1 - ab2)),
    )  # P(x_0 | x_1), DDPM eq. 13
    w = (log_q1 + log_q2).exp() * (x1[1] - x1[0]) * (x2[1] - x2[0])
    minus_elbo = lambda log_joint: -(w * (log_joint - log_q1 - log_q2)).sum().item() / math.log(2)
    right = minus_elbo(log_prior + log_k2 + log_k1)
    printed = minus_elbo(log_prior + log_k2 + log_k2 + log_k1)
    assert abs(mean - right) < 4 * se, (mean, right, se)
    assert abs(mean - printed) > 100 * se, (mean, printed, se)


def test_luo_posterior_mean_coefficient_uses_alpha_bar_prev(diff):
    # [Luo] prints sqrt(alpha_{t-1}) (1 - alpha_t) x_0; Bayes' rule gives sqrt(alpha-bar_{t-1}) (1 -
    # alpha_t) x_0. q_posterior_mean_variance against the corrected formula (alpha, alpha-bar from
    # the schedule's definition) and Bayes' rule on a grid; the printed coefficient is 1000x the
    # grid's own error away.
    i, x0, x_t = 300, 0.6, 0.2
    betas, ab = linear_schedule_by_hand(T)
    a, ab_t, ab_prev, a_prev = (
        1 - betas[i].item(),
        ab[i].item(),
        ab[i - 1].item(),
        1 - betas[i - 1].item(),
    )
    mu = lambda c: (math.sqrt(a) * (1 - ab_prev) * x_t + c * (1 - a) * x0) / (1 - ab_t)
    f64 = lambda v: torch.tensor([v], dtype=torch.float64)
    mean = diff.q_posterior_mean_variance(f64(x0), f64(x_t), torch.tensor([i]))[0].item()
    grid_mean, _ = bayes_posterior_on_grid(diff, x0, x_t, i)
    assert mean == pytest.approx(mu(math.sqrt(ab_prev)), rel=1e-12)
    assert mean == pytest.approx(grid_mean, rel=1e-9)
    assert abs(mu(math.sqrt(a_prev)) - mean) > 1e-6


def test_diffusevae_elbo_terms_need_a_log(ppca):  # noqa: F811
    # [DiffuseVAE] prints E[p(y|z)] - KL; with the log, the ELBO equals log p(x) at the exact
    # posterior (PPCA)
    mu, logvar = ppca["post_mu"], ppca["post_logvar"]
    N = 100000
    with_log, rec, kl = elbo_terms(
        ppca, mu, logvar, N, seed=7
    )  # with_log = -vae.negative_elbo = rec - kl
    assert torch.allclose(
        with_log, rec - kl, rtol=1e-12, atol=1e-12
    )  # the terms the printed form exponentiates
    without_log = rec.exp() - kl
    se = with_log.std().item() / math.sqrt(N)
    assert abs(with_log.mean().item() - ppca["log_px"]) < 4 * se
    assert abs(without_log.mean().item() - ppca["log_px"]) > 1.0


def test_su_sampling_pseudocode_scales_eps_by_beta_squared_over_beta_bar(diff):
    # [Su] 8.2 prints mu = (x_t - (beta_t / bar-beta_t) eps) / alpha_t in his letters (his beta_t =
    # sqrt(DDPM beta_t), bar-beta_t = sqrt(1 - alpha-bar_t), alpha_t = sqrt(DDPM alpha_t)); the
    # right factor is beta_t^2 / bar-beta_t
    g = torch.Generator().manual_seed(8)
    x_t, eps = (
        torch.randn(64, generator=g, dtype=torch.float64),
        torch.randn(64, generator=g, dtype=torch.float64),
    )
    t = torch.full((64,), 400, dtype=torch.long)
    su_beta, su_bar_beta, su_alpha = (
        diff.betas[400].sqrt(),
        diff.sqrt_one_minus_alphas_cumprod[400],
        diff.alphas[400].sqrt(),
    )
    true_mean = diff.q_posterior_mean_variance(diff.predict_x0_from_eps(x_t, t, eps), x_t, t)[0]
    corrected = (x_t - su_beta**2 / su_bar_beta * eps) / su_alpha
    printed = (x_t - su_beta / su_bar_beta * eps) / su_alpha
    assert torch.allclose(corrected, true_mean, rtol=0, atol=1e-12)
    assert (printed - true_mean).abs().max() > 0.1


def test_su_eq77_optimal_mean_adds_beta_squared_times_the_score(diff):
    # [Su] (77) prints mu* = (x_t - beta_t^2 / bar-beta_t * score) / alpha_t; with the exact score
    # of Gaussian data the optimal mean E[x_{t-1} | x_t] is (x_t + beta_t^2 score) / alpha_t (his
    # letters)
    m, s, i = 0.3, 0.5, 250
    x_t = torch.linspace(-2, 2, 41, dtype=torch.float64)
    t = torch.full((41,), i, dtype=torch.long)
    score = diff.score_from_eps(t, gaussian_eps_oracle(diff, m, s)(x_t, t))
    # E[x_{t-1} | x_t] for Gaussian data by Gaussian conditioning: x_{t-1} ~ N(sqrt(ab') m, v'), x_t
    # = sqrt(a) x_{t-1} + ...
    a, b, ab_prev = diff.alphas[i], diff.betas[i], diff.alphas_cumprod_prev[i]
    v_prev = ab_prev * s**2 + 1 - ab_prev
    v_t = a * v_prev + b
    optimal = ab_prev.sqrt() * m + a.sqrt() * v_prev / v_t * (x_t - a.sqrt() * ab_prev.sqrt() * m)
    su_beta2, su_alpha, su_bar_beta = b, a.sqrt(), diff.sqrt_one_minus_alphas_cumprod[i]
    corrected = (x_t + su_beta2 * score) / su_alpha
    printed = (x_t - su_beta2 / su_bar_beta * score) / su_alpha
    assert torch.allclose(corrected, optimal, rtol=1e-12, atol=1e-12)
    assert (printed - optimal).abs().max() > 1e-3


def test_su_integral_63_is_minus_0_01_so_alpha_bar_T_is_e_minus_5(diff):
    # [Su] (63) prints int_0^1 log(1 - 0.02 tau) d tau = -1; it is about -0.01007 (closed form
    # below). It is what log(alpha-bar_T) / T approaches for [Su]'s schedule beta_t = 0.02 t / T (t
    # = 1..T), which ddpm.linear_beta_schedule gives with beta_start = 0.02 / T: log alpha-bar_T =
    # sum_t log(1 - 0.02 t / T) is T times a right Riemann sum of the integral, and for the monotone
    # integrand f the sum differs from T times the integral by at most |f(1) - f(0)| = -log 0.98.
    closed = (
        -(0.98 * math.log(0.98)) / 0.02 - 1
    )  # [-(1 - 0.02 tau) log(1 - 0.02 tau) / 0.02 - tau]_0^1
    assert closed == pytest.approx(-0.01007, abs=1e-5)
    su = ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(T, beta_start=0.02 / T, beta_end=0.02))
    assert torch.allclose(
        su.betas, 0.02 * torch.arange(1, T + 1, dtype=torch.float64) / T, rtol=1e-12, atol=0
    )
    log_ab_T = su.alphas_cumprod[-1].log().item()
    assert abs(log_ab_T - T * closed) <= -math.log(0.98), (log_ab_T, T * closed)
    assert abs(log_ab_T - T * -1.0) > 900  # the printed -1 would make alpha-bar_T = e^-1000
    # so [Su]'s alpha-bar_T (the square root of DDPM's) is about e^{T/2 * -0.01007} = e^-5.03, not
    # e^-500; the DDPM schedule (beta from 1e-4) gives sqrt(alpha-bar_T) = sqrt(4.04e-5) = e^-5.06
    assert math.log(diff.alphas_cumprod[-1].sqrt().item()) == pytest.approx(-5.06, abs=0.01)
