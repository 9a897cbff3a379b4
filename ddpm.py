"""DDPM: the forward process, its posterior, the parameterisations, the loss, the bound, sampling.

Sources: Ho et al. 2020 ("DDPM", arXiv:2006.11239; equation numbers below), Song et al. 2021
("DDIM", arXiv:2010.02502), Nichol & Dhariwal 2021 (arXiv:2102.09672), Luo 2022 (arXiv:2208.11970).
Conventions of the whole codebase: code index t = 0..T-1 is the paper's t = 1..T (`betas[0]` is
beta_1, and `alphas_cumprod_prev[0] = 1` is alpha-bar_0); images are in [-1, 1]; schedule quantities
are float64, cast to the tensor's dtype where used. A denoiser is a function eps_fn(x_t, t) -> eps,
t a (B,) tensor of code indices."""

import math

import torch
import torch.nn as nn
from tqdm import tqdm

SCHEDULES = ("linear", "cosine")
SPACINGS = ("uniform", "quadratic")


def linear_beta_schedule(T=1000, beta_start=1e-4, beta_end=0.02):
    """DDPM §4: beta_t linear from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_beta_schedule(T=1000, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal eq. 17: alpha-bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), beta <= 0.999."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def make_diffusion(schedule="linear", T=1000):
    """The GaussianDiffusion of a named beta schedule (one of SCHEDULES)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}: choose one of {SCHEDULES}")
    betas = (linear_beta_schedule if schedule == "linear" else cosine_beta_schedule)(T)
    return GaussianDiffusion(betas)


def extract(a, t, x):
    """a[t] shaped to broadcast against x: (B,) -> (B, 1, ..., 1), in x's dtype and device."""
    return a.to(x.device)[t].to(x.dtype).reshape(t.shape[0], *([1] * (x.dim() - 1)))


def randn_like(x, generator=None, shared=False):
    """N(0, I) noise shaped like x, from `generator`; shared: one image's draw for every image."""
    shape = (1, *x.shape[1:]) if shared else x.shape
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype).expand_as(x)


class GaussianDiffusion(nn.Module):
    """The forward process q of a beta schedule and what follows from it, under improved-diffusion's
    buffer names. `timestep_map[i]` is the original code index of step i (respace_to)."""

    def __init__(self, betas, timestep_map=None):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D sequence in (0, 1]")
        self.T = len(betas)
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, 0)  # alpha-bar_t
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = betas * (1 - ab_prev) / (1 - ab)  # beta-tilde_t
        buffers = dict(betas=betas, alphas=alphas, alphas_cumprod=ab, alphas_cumprod_prev=ab_prev)
        buffers.update(sqrt_alphas_cumprod=ab.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - ab).sqrt())
        buffers.update(sqrt_recip_alphas_cumprod=ab.rsqrt())
        buffers.update(sqrt_recipm1_alphas_cumprod=(1 / ab - 1).sqrt(), posterior_variance=post_var)
        log_var = torch.cat([post_var[1:2], post_var[1:]]).log()  # paper t 1: log 0, use t 2's
        buffers.update(posterior_log_variance_clipped=log_var)
        buffers.update(posterior_mean_coef1=betas * ab_prev.sqrt() / (1 - ab))
        buffers.update(posterior_mean_coef2=(1 - ab_prev) * alphas.sqrt() / (1 - ab))
        t_map = torch.arange(self.T) if timestep_map is None else torch.as_tensor(timestep_map)
        for name, value in dict(buffers, timestep_map=t_map).items():
            self.register_buffer(name, value, persistent=False)

    def at(self, t, x, *names):
        """The buffers `names` at code t, each shaped to broadcast against x."""
        return [extract(getattr(self, name), t, x) for name in names]

    # --- the forward process and its posterior ------------------------------------------------

    def q_step_sample(self, x_prev, t, noise):
        """q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)   (DDPM eq. 2)."""
        alpha, beta = self.at(t, x_prev, "alphas", "betas")
        return alpha.sqrt() * x_prev + beta.sqrt() * noise

    def q_mean_variance(self, x0, t):
        """q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I)   (DDPM eq. 4)."""
        sqrt_ab, ab = self.at(t, x0, "sqrt_alphas_cumprod", "alphas_cumprod")
        return sqrt_ab * x0, 1 - ab

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps, a draw from eq. 4."""
        a, b = self.at(t, x0, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        return a * x0 + b * noise

    def q_posterior_mean_variance(self, x0, x_t, t):
        """q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta-tilde_t I)   (DDPM eq. 6-7): (mean,
        variance, clipped log variance)."""
        names = "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance"
        c1, c2, var = self.at(t, x_t, *names)
        return c1 * x0 + c2 * x_t, var, self.at(t, x_t, "posterior_log_variance_clipped")[0]

    # --- x_0, eps, v and the score: one quantity in four forms --------------------------------

    def predict_x0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)   (eq. 4 solved for x_0)."""
        a, b = self.at(t, x_t, "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")
        return a * x_t - b * eps

    def predict_eps_from_x0(self, x_t, t, x0):
        """eps = (x_t - sqrt(alpha-bar_t) x_0) / sqrt(1 - alpha-bar_t)   (eq. 4 solved for eps)."""
        a, b = self.at(t, x_t, "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")
        return (a * x_t - x0) / b

    def predict_v(self, x0, t, eps):
        """v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x_0   (Salimans & Ho 2022)."""
        a, b = self.at(t, x0, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        return a * eps - b * x0

    def predict_x0_from_v(self, x_t, t, v):
        """x_0 = sqrt(alpha-bar_t) x_t - sqrt(1 - alpha-bar_t) v."""
        a, b = self.at(t, x_t, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        return a * x_t - b * v

    def predict_eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - alpha-bar_t) x_t + sqrt(alpha-bar_t) v."""
        a, b = self.at(t, x_t, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        return b * x_t + a * v

    def score_from_eps(self, t, eps):
        """Tweedie: grad log q(x_t) = -E[eps | x_t] / sqrt(1 - alpha-bar_t)   (Luo 2022)."""
        return -eps / self.at(t, eps, "sqrt_one_minus_alphas_cumprod")[0]

    def p_mean_from_eps(self, x_t, t, eps):
        """mu_theta = (x_t - beta_t / sqrt(1 - alpha-bar_t) eps) / sqrt(alpha_t)   (DDPM eq. 11)."""
        beta, alpha, b = self.at(t, x_t, "betas", "alphas", "sqrt_one_minus_alphas_cumprod")
        return (x_t - beta / b * eps) / alpha.sqrt()

    def model_log_variance(self, t, x, var_type):
        """log sigma_t^2 of p_theta(x_{t-1} | x_t) (DDPM §3.2): "fixedsmall" beta-tilde_t,
        "fixedlarge" beta_t (beta-tilde_2 at code t 0, as improved-diffusion)."""
        if var_type == "fixedsmall":
            return self.at(t, x, "posterior_log_variance_clipped")[0]
        if var_type == "fixedlarge":
            return extract(torch.cat([self.posterior_variance[1:2], self.betas[1:]]).log(), t, x)
        raise ValueError(f"unknown var_type {var_type!r}: choose 'fixedlarge' or 'fixedsmall'")

    # --- the loss and the bound ---------------------------------------------------------------

    def loss(self, eps_fn, x0, t=None, noise=None):
        """L_simple (DDPM eq. 14, Algorithm 1) per example: ||eps - eps_theta(x_t, t)||^2 with
        t ~ U{0..T-1}, eps ~ N(0, I) and x_t their draw from eq. 4."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        return loss_simple(eps_fn(self.q_sample(x0, t, noise), t), noise)

    def vlb_weight(self, t, var_type="fixedsmall"):
        """The weight beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha-bar_t)) that makes ||eps -
        eps_theta||^2 the term L_{t-1} (DDPM eq. 12), (B,) float64."""
        x = torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
        b, a, ab = (extract(v, t, x) for v in (self.betas, self.alphas, self.alphas_cumprod))
        return b**2 / (2 * self.model_log_variance(t, x, var_type).exp() * a * (1 - ab))

    def vlb_terms_bpd(
        self, eps_fn, x0, var_type="fixedsmall", progress=False, t_start=None, start_mean=None
    ):
        """The variational bound L = L_T + sum_{t>1} L_{t-1} + L_0 (DDPM eq. 5, 13) per image in
        bits/dim, one x_t draw per term. With t_start the chain starts there from q(x_{t_s} | x_0 =
        start_mean). Returns dict(total, prior, terms), terms (B, t_s + 1)."""
        B, to_bpd = x0.shape[0], 1.0 / (x0[0].numel() * math.log(2.0))
        last = self.T - 1 if t_start is None else int(t_start)
        terms = []
        for i in tqdm(range(last + 1), disable=not progress, desc="vlb"):
            t = torch.full((B,), i, device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, t, torch.randn_like(x0))
            mean = self.p_mean_from_eps(x_t, t, eps_fn(x_t, self.timestep_map.to(x0.device)[t]))
            log_var = self.model_log_variance(t, x_t, var_type)
            if i == 0:  # L_0 = -log p_theta(x_0 | x_1), the discretised decoder
                term = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
            else:  # L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))
                true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
                term = normal_kl(true_mean, true_log_var, mean, log_var)
            terms.append(term.flatten(1).sum(1) * to_bpd)
        terms = torch.stack(terms, dim=1)
        t_last = torch.full((B,), last, device=x0.device)
        mean_T, var_T = self.q_mean_variance(x0, t_last)
        if start_mean is None:  # p(x_T) = N(0, I)
            prior = normal_kl(mean_T, var_T.log(), torch.zeros_like(x0), torch.zeros_like(x0))
        else:  # p(x_{t_s}) = q(x_{t_s} | x_0 = start_mean)
            start_mean_T = self.q_mean_variance(start_mean, t_last)[0]
            prior = normal_kl(mean_T, var_T.log(), start_mean_T, var_T.log())
        prior = prior.flatten(1).sum(1) * to_bpd
        return dict(total=terms.sum(1) + prior, prior=prior, terms=terms)

    # --- samplers ------------------------------------------------------------------------------

    def respace_to(self, taus):
        """The same process seen at the code indices `taus` only: betas'_i = 1 - alpha-bar_{tau_i} /
        alpha-bar_{tau_{i-1}}, so alpha-bar' equals alpha-bar there (improved-diffusion's
        respacing)."""
        ab = self.alphas_cumprod.cpu()[taus]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        taus = self.timestep_map.cpu()[taus]
        return GaussianDiffusion(1 - ab / ab_prev, timestep_map=taus).to(self.betas.device)

    def steps(self, x):
        """(i, t) from the last step to the first, t the (B,) code indices of step i."""
        for i in reversed(range(self.T)):
            yield i, torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)

    @torch.no_grad()
    def p_sample_loop(
        self, eps_fn, x, var_type="fixedlarge", clip_x0=False, generator=None, shared_noise=False
    ):
        """Ancestral sampling, DDPM Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, no noise at
        the last step. clip_x0: the mean is mu-tilde(x_t, clip(x_0-hat)) (the same when nothing is
        clipped)."""
        for i, t in self.steps(x):
            eps = eps_fn(x, self.timestep_map.to(x.device)[t])
            if clip_x0:
                x0 = self.predict_x0_from_eps(x, t, eps).clamp(-1, 1)
                mean = self.q_posterior_mean_variance(x0, x, t)[0]
            else:
                mean = self.p_mean_from_eps(x, t, eps)
            sigma = (0.5 * self.model_log_variance(t, x, var_type)).exp()
            x = mean + sigma * randn_like(x, generator, shared_noise) if i > 0 else mean
        return x

    @torch.no_grad()
    def ddim_sample_loop(
        self, eps_fn, x, eta=0.0, clip_x0=False, generator=None, shared_noise=False, raw_eps=False
    ):
        """DDIM (Song et al. 2021, eq. 12 and 16):
        x_{t-1} = sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1} - sigma_t^2) eps + sigma_t z,
        sigma_t^2 = eta^2 beta-tilde_t. clip_x0 clamps x0_hat to [-1, 1] and recomputes eps from it,
        unless raw_eps (DiffuseVAE's official code keeps the network's eps)."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        for i, t in self.steps(x):
            eps = eps_fn(x, self.timestep_map.to(x.device)[t])
            x0 = self.predict_x0_from_eps(x, t, eps)
            if clip_x0:
                x0 = x0.clamp(-1, 1)
                eps = eps if raw_eps else self.predict_eps_from_x0(x, t, x0)
            ab_prev = extract(self.alphas_cumprod_prev, t, x)
            sigma2 = eta**2 * extract(self.posterior_variance, t, x)
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma2).clamp(min=0).sqrt() * eps
            if i > 0 and eta > 0:
                x = x + sigma2.sqrt() * randn_like(x, generator, shared_noise)
        return x


def ddim_timesteps(T, steps, spacing="uniform", t_start=None):
    """`steps` code indices 0 = tau_1 < ... < tau_S = t_start (default T - 1) (DDIM Appendix D.2):
    uniform, tau_i ~ t_start (i - 1) / (S - 1), or quadratic, ~ t_start ((i - 1) / (S - 1))^2, moved
    up to one past its predecessor where rounding makes two collide."""
    t_start = T - 1 if t_start is None else int(t_start)
    if not 0 <= t_start <= T - 1:
        raise ValueError(f"--t_start must be between 0 and T - 1 = {T - 1}, got {t_start}")
    if not 1 <= steps <= t_start + 1:
        bounds = f"between 1 and {t_start + 1} (the timesteps 0..{t_start})"
        raise ValueError(f"--steps must be {bounds}, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: choose one of {SPACINGS}")
    if steps == 1:
        return torch.tensor([t_start])
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    taus = (t_start * (u if spacing == "uniform" else u**2)).round().long()
    for i in range(1, steps):
        taus[i] = max(taus[i], taus[i - 1] + 1)
    return taus


def sample(
    diffusion, eps_fn, x, steps=None, t_start=None, spacing="uniform", sampler="ddim", **options
):
    """x_0 from x, the state at code t_start (default T - 1: x_T), in `steps` denoiser calls
    on ddim_timesteps: sampler "ddim" (options eta, clip_x0, raw_eps) or "ddpm" (var_type, clip_x0),
    both with generator and shared_noise."""
    last = diffusion.T - 1 if t_start is None else t_start
    taus = ddim_timesteps(diffusion.T, last + 1 if steps is None else steps, spacing, last)
    process = diffusion if len(taus) == diffusion.T else diffusion.respace_to(taus)
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {sampler!r}: choose 'ddim' or 'ddpm'")
    loop = process.ddim_sample_loop if sampler == "ddim" else process.p_sample_loop
    return loop(eps_fn, x, **options)


# --- Gaussian helpers -------------------------------------------------------------------------


def loss_simple(eps_pred, noise):
    """||eps - eps_theta||^2 averaged over dimensions, (B,): eq. 14, eq. 12's weights dropped."""
    return (noise - eps_pred).pow(2).flatten(1).mean(1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    var_ratio, mean_term = torch.exp(logvar1 - logvar2), (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    return 0.5 * (logvar2 - logvar1 + var_ratio + mean_term - 1.0)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x_0 | x_1) on the 256-level grid of [-1, 1] (DDPM eq. 13): the Gaussian's mass on
    [x - 1/255, x + 1/255], the edge bins extended to -inf and +inf. Elementwise."""
    cdf = lambda v: 0.5 * (1.0 + torch.erf(torch.exp(-log_scale) * (v - mean) / math.sqrt(2.0)))
    cdf_plus, cdf_minus = cdf(x + 1.0 / 255), cdf(x - 1.0 / 255)
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_1m_cdf_minus = (1.0 - cdf_minus).clamp(min=1e-12).log()
    log_bin = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_1m_cdf_minus, log_bin))
