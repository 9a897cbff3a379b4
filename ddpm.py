"""DDPM: the forward process, its posterior, the three parameterisations, the losses and the samplers.

Read beside Ho et al. 2020 ("DDPM", arXiv:2006.11239; equation numbers below), Song et al. 2021 ("DDIM",
arXiv:2010.02502), Luo 2022 ("Understanding Diffusion Models: A Unified Perspective", arXiv:2208.11970) and
Su Jianlin 2022 ("DDPM = autoregressive VAE", spaces.ac.cn/archives/9152).

Conventions, fixed once for the whole codebase:
- Code index t = 0..T-1 stands for the paper's t = 1..T. So `betas[0]` is the paper's beta_1, and
  `alphas_cumprod_prev[0] = 1` is the paper's alpha-bar_0 (no noise at all).
- Images are in [-1, 1] inside all diffusion code (data.py converts, once).
- Every schedule quantity is computed once in float64 and cast to the tensor's dtype when used.
- A denoiser is any function eps_fn(x_t, t) -> eps predicting the noise; t is a (B,) long tensor of
  code indices of the *original* T-step process.
"""
import math

import torch
import torch.nn as nn
from tqdm import tqdm


# ----------------------------------------------------------------------------- noise schedules

def linear_beta_schedule(T=1000, beta_start=1e-4, beta_end=0.02):
    """DDPM Sec. 4: beta_t linear from 1e-4 to 0.02 over T = 1000 steps (alpha-bar_T ~= 4.04e-5)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_beta_schedule(T=1000, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021 eq. 17: alpha-bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas clipped at 0.999."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


SCHEDULES = ("linear", "cosine")


def make_beta_schedule(name, T=1000):
    """betas of the schedule called `name` ("linear": DDPM sec. 4; "cosine": Nichol & Dhariwal eq. 17)."""
    if name == "linear":
        return linear_beta_schedule(T)
    if name == "cosine":
        return cosine_beta_schedule(T)
    raise ValueError(f"unknown noise schedule {name!r}: choose one of {SCHEDULES}")


def make_diffusion(schedule="linear", T=1000):
    """The GaussianDiffusion of the named beta schedule: what a checkpoint's config (schedule, T) describes."""
    return GaussianDiffusion(make_beta_schedule(schedule, T))


def extract(a, t, x):
    """a[t] reshaped to broadcast against x: (B,) -> (B, 1, ..., 1), in x's dtype and device."""
    out = a.to(x.device)[t].to(x.dtype)
    return out.reshape(t.shape[0], *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------- the diffusion process

class GaussianDiffusion(nn.Module):
    """The DDPM forward process q and everything derived from it, for a given beta schedule.

    Buffers use the names of openai/improved-diffusion, which every later codebase reuses. It is an
    nn.Module only so that `.to(device)` moves the (float64, non-persistent) buffers.
    `timestep_map[i]` is the original code index of step i (the identity unless `respace` made this).
    """

    def __init__(self, betas, timestep_map=None):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D sequence in (0, 1]")
        self.T = len(betas)
        alphas = 1.0 - betas                                        # alpha_t = 1 - beta_t
        alphas_cumprod = torch.cumprod(alphas, 0)                   # alpha-bar_t = prod_{s<=t} alpha_s
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t I)   (DDPM eq. 6-7)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=alphas_cumprod.rsqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
            posterior_variance=posterior_variance,
            # beta-tilde_1 = 0, so the log is clipped to beta-tilde_2 at the first step (as improved-diffusion)
            posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
            timestep_map=torch.arange(self.T) if timestep_map is None else torch.as_tensor(timestep_map),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    # --- forward process ------------------------------------------------------------------------

    def q_step_sample(self, x_prev, t, noise):
        """One forward step q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)   (DDPM eq. 2)."""
        return extract(self.alphas.sqrt(), t, x_prev) * x_prev + extract(self.betas.sqrt(), t, x_prev) * noise

    def q_mean_variance(self, x0, t):
        """Closed-form marginal q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I)   (DDPM eq. 4)."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0, extract(1 - self.alphas_cumprod, t, x0)

    def q_sample(self, x0, t, noise):
        """Reparameterised draw from eq. 4: x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps."""
        return (extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Posterior q(x_{t-1} | x_t, x_0) = N(mu-tilde_t, beta-tilde_t I)   (DDPM eq. 6-7).

        mu-tilde_t = [sqrt(alpha-bar_{t-1}) beta_t x_0 + sqrt(alpha_t)(1 - alpha-bar_{t-1}) x_t] / (1 - alpha-bar_t)
        beta-tilde_t = (1 - alpha-bar_{t-1}) beta_t / (1 - alpha-bar_t)
        Returns (mean, variance, log_variance_clipped).
        """
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return (mean, extract(self.posterior_variance, t, x_t),
                extract(self.posterior_log_variance_clipped, t, x_t))

    # --- the three parameterisations: x_0, eps and score are the same thing ------------------------

    def predict_x0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)   (eq. 4 solved for x_0; DDPM eq. 15)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_x0(self, x_t, t, x0):
        """eps = (x_t - sqrt(alpha-bar_t) x_0) / sqrt(1 - alpha-bar_t)   (eq. 4 solved for eps)."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def predict_v(self, x0, t, eps):
        """v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x_0 (Salimans & Ho 2022, "v-prediction"): the velocity of
        x_t = cos(phi) x_0 + sin(phi) eps along phi, with cos(phi) = sqrt(alpha-bar_t)."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * eps - extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def predict_x0_from_v(self, x_t, t, v):
        """x_0 = sqrt(alpha-bar_t) x_t - sqrt(1 - alpha-bar_t) v (a rotation back by phi)."""
        return extract(self.sqrt_alphas_cumprod, t, x_t) * x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def predict_eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - alpha-bar_t) x_t + sqrt(alpha-bar_t) v."""
        return extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + extract(self.sqrt_alphas_cumprod, t, x_t) * v

    def score_from_eps(self, t, eps):
        """Tweedie's formula (Luo 2022, "Three Equivalent Interpretations"): grad_x log q(x_t) = -E[eps | x_t] / sqrt(1 - alpha-bar_t)."""
        return -eps / extract(self.sqrt_one_minus_alphas_cumprod, t, eps)

    def p_mean_from_eps(self, x_t, t, eps):
        """Reverse mean in the eps form (DDPM eq. 11):
        mu_theta = (x_t - beta_t / sqrt(1 - alpha-bar_t) eps) / sqrt(alpha_t).
        Identical to mu-tilde_t(x_t, predict_x0_from_eps(x_t, t, eps)); a test checks it."""
        coef = extract(self.betas / self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return (x_t - coef * eps) / extract(self.alphas.sqrt(), t, x_t)

    def model_log_variance(self, t, x, var_type):
        """log sigma_t^2 of p_theta(x_{t-1} | x_t): 'fixedlarge' sigma^2 = beta_t, 'fixedsmall' beta-tilde_t
        (DDPM Sec. 3.2: the optimal sigma^2 for data N(0, I) and for a single data point; Su 2022 states both and
        defers their derivation; LESSONS.md Lesson 7 writes it out). As improved-diffusion, 'fixedlarge'
        uses beta-tilde_2 at the first step so that the decoder L_0 has a sensible scale."""
        if var_type == "fixedsmall":
            return extract(self.posterior_log_variance_clipped, t, x)
        if var_type == "fixedlarge":
            return extract(torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]])), t, x)
        raise ValueError(f"unknown var_type {var_type!r}: choose 'fixedlarge' (beta_t) or 'fixedsmall' (beta-tilde_t)")

    # --- losses -------------------------------------------------------------------------------------

    def vlb_weight(self, t, var_type="fixedsmall"):
        """The weight that turns ||eps - eps_theta||^2 into L_{t-1} (DDPM eq. 12):
        beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha-bar_t)). Returns (B,) in float64."""
        x = torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)  # only sets shape and dtype
        b, a, ab = (extract(v, t, x) for v in (self.betas, self.alphas, self.alphas_cumprod))
        return b ** 2 / (2 * self.model_log_variance(t, x, var_type).exp() * a * (1 - ab))

    def vlb_terms_bpd(self, eps_fn, x0, var_type="fixedsmall", progress=False, t_start=None, start_mean=None):
        """The full variational bound of DDPM eq. 5, per image, in bits per dimension (x_0 on the 8-bit grid):

            L = L_T + sum_{t>1} L_{t-1} + L_0
            L_T     = KL(q(x_T | x_0) || N(0, I))
            L_{t-1} = E_q KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))       (one x_t draw per t)
            L_0     = -log p_theta(x_0 | x_1), the discretised Gaussian decoder   (DDPM eq. 13)

        A chain started at the code timestep t_start from p(x_{t_s}) = N(sqrt(alpha-bar_{t_s}) start_mean,
        (1 - alpha-bar_{t_s}) I) (a truncated refiner, diffusevae.truncated_start) has the same bound with T replaced
        by t_s: its prior term is KL(q(x_{t_s} | x_0) || p(x_{t_s})) = alpha-bar/(2 (1 - alpha-bar)) ||x_0 - start_mean||^2.
        Returns dict(total, prior, terms) with terms (B, t_s + 1) (t_s = T - 1 by default) and the others (B,),
        all in bits/dim.
        """
        B, D = x0.shape[0], x0[0].numel()
        to_bpd = 1.0 / (D * math.log(2.0))
        last = self.T - 1 if t_start is None else int(t_start)
        terms = []
        for i in tqdm(range(last + 1), disable=not progress, desc="vlb"):
            t = torch.full((B,), i, device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, t, torch.randn_like(x0))
            eps = eps_fn(x_t, self.timestep_map.to(x0.device)[t])
            mean = self.p_mean_from_eps(x_t, t, eps)
            log_var = self.model_log_variance(t, x_t, var_type)
            if i == 0:
                nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
                terms.append(nll.flatten(1).sum(1) * to_bpd)
            else:
                true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
                kl = normal_kl(true_mean, true_log_var, mean, log_var)
                terms.append(kl.flatten(1).sum(1) * to_bpd)
        terms = torch.stack(terms, dim=1)
        t_last = torch.full((B,), last, device=x0.device, dtype=torch.long)
        mean_T, var_T = self.q_mean_variance(x0, t_last)
        if start_mean is None:  # p(x_T) = N(0, I)
            prior = normal_kl(mean_T, var_T.log(), torch.zeros_like(x0), torch.zeros_like(x0))
        else:  # p(x_{t_s}) = q(x_{t_s} | x_0 = start_mean)
            prior = normal_kl(mean_T, var_T.log(), self.q_mean_variance(start_mean, t_last)[0], var_T.log())
        prior = prior.flatten(1).sum(1) * to_bpd
        return dict(total=terms.sum(1) + prior, prior=prior, terms=terms)

    # --- samplers ------------------------------------------------------------------------------------

    def respace_to(self, taus):
        """The same process seen only at the code indices `taus` (improved-diffusion's respacing):
        betas'_i = 1 - alpha-bar_{tau_i} / alpha-bar_{tau_{i-1}}, so alpha-bar' on the subsequence equals the
        original alpha-bar there. Ancestral sampling of the result is DDPM sampling with fewer steps."""
        ab = self.alphas_cumprod.cpu()[taus]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return GaussianDiffusion(1 - ab / ab_prev, timestep_map=self.timestep_map.cpu()[taus]).to(self.betas.device)

    @torch.no_grad()
    def p_sample_loop(self, eps_fn, x_T, var_type="fixedlarge", clip_x0=False, generator=None, progress=False,
                      shared_noise=False):
        """Ancestral sampling, DDPM Algorithm 2: for t = T..1,
        x_{t-1} = (x_t - beta_t / sqrt(1 - alpha-bar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z,
        z ~ N(0, I) except at the last step (t = 1) where no noise is added.
        With clip_x0 the mean is mu-tilde(x_t, clip(x_0-hat)) instead: the same when nothing is clipped.
        shared_noise: every image of the batch gets the same z at each step (randn_like)."""
        x = x_T
        for i in tqdm(reversed(range(self.T)), total=self.T, disable=not progress, desc="ddpm"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            eps = eps_fn(x, self.timestep_map.to(x.device)[t])
            if clip_x0:
                x0 = self.predict_x0_from_eps(x, t, eps).clamp(-1, 1)
                mean = self.q_posterior_mean_variance(x0, x, t)[0]
            else:
                mean = self.p_mean_from_eps(x, t, eps)
            if i > 0:
                sigma = (0.5 * self.model_log_variance(t, x, var_type)).exp()
                x = mean + sigma * randn_like(x, generator, shared_noise)
            else:
                x = mean
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, eps_fn, x_T, eta=0.0, clip_x0=False, generator=None, progress=False, raw_eps=False,
                         shared_noise=False):
        """DDIM sampling (Song et al. 2021, eq. 12) over this process's steps (use `respace` for fewer):

            x_{t-1} = sqrt(alpha-bar_{t-1}) x0_hat + sqrt(1 - alpha-bar_{t-1} - sigma_t^2) eps + sigma_t z,
            sigma_t^2 = eta^2 beta-tilde_t   (DDIM eq. 16)

        eta = 0 is deterministic; eta = 1 is ancestral sampling with sigma_t^2 = beta-tilde_t. At the last step
        alpha-bar_0 = 1 so sigma = 0 and the output is x0_hat: no noise on the last step.
        clip_x0 clamps x0_hat to [-1, 1] and, unless raw_eps, recomputes eps from it so that the update stays on
        the line through x_t that eq. 12 assumes; raw_eps keeps the network's eps (DiffuseVAE's official code).
        shared_noise: every image of the batch gets the same z at each step (randn_like)."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        x = x_T
        for i in tqdm(reversed(range(self.T)), total=self.T, disable=not progress, desc="ddim"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            eps = eps_fn(x, self.timestep_map.to(x.device)[t])
            x0 = self.predict_x0_from_eps(x, t, eps)
            if clip_x0:
                x0 = x0.clamp(-1, 1)
                if not raw_eps:
                    eps = self.predict_eps_from_x0(x, t, x0)
            ab_prev = extract(self.alphas_cumprod_prev, t, x)
            sigma2 = eta ** 2 * extract(self.posterior_variance, t, x)
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma2).clamp(min=0).sqrt() * eps
            if i > 0 and eta > 0:
                x = x + sigma2.sqrt() * randn_like(x, generator, shared_noise)
        return x


SPACINGS = ("uniform", "quadratic")


def ddim_timesteps(T, steps, spacing="uniform", t_start=None):
    """`steps` code indices tau_1 < ... < tau_S in 0..t_start, always including 0 and t_start (default T - 1, so
    x_T ~ N(0, I) is where the sampler starts; a smaller t_start is the truncated start of `sample`), and the last
    step reaches x_0. DDIM Appendix D.2 names two choices, written here with t_start = T - 1:
      uniform:   tau_i evenly spaced, tau_i ~ (T - 1) i / (S - 1);
      quadratic: tau_i ~ (T - 1) (i / (S - 1))^2, dense at small t: with 10 steps the call before the last one
                 (code t 0) is at code t 12 instead of 111; the first steps are long.
    Rounding can make neighbouring quadratic indices collide when S is large; each is then moved up to one past
    its predecessor, which keeps tau_S = t_start and gives 0..t_start when S = t_start + 1."""
    t_start = T - 1 if t_start is None else int(t_start)
    if not 0 <= t_start <= T - 1:
        raise ValueError(f"--t_start must be between 0 and T - 1 = {T - 1} (code indices), got {t_start}")
    if not 1 <= steps <= t_start + 1:
        raise ValueError(f"--steps must be between 1 and {t_start + 1} (the timesteps 0..{t_start}), got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: choose one of {SPACINGS}")
    if steps == 1:
        return torch.tensor([t_start])
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    taus = (t_start * (u if spacing == "uniform" else u ** 2)).round().long()
    for i in range(1, steps):
        taus[i] = max(taus[i], taus[i - 1] + 1)
    assert taus[-1] == t_start and len(torch.unique(taus)) == steps
    return taus


def sample(diffusion, eps_fn, x_T, steps=None, sampler="ddim", eta=0.0, var_type="fixedlarge",
           clip_x0=False, generator=None, progress=False, spacing="uniform", t_start=None, raw_eps=False,
           shared_noise=False):
    """Draw x_0 with `steps` denoiser calls at the `spacing` of ddim_timesteps: sampler 'ddim' (eta) or
    'ddpm' (ancestral, var_type). `x_T` is the state at the first timestep visited: x_T in the usual full chain,
    or x_{t_start} for a truncated start (SDEdit, Meng et al. 2022): the chain then runs on 0..t_start only.
    `raw_eps` (DDIM with clip_x0): keep the network's eps after clipping x_0-hat, as DiffuseVAE's official code does,
    instead of the eps consistent with the clipped x_0-hat. `shared_noise`: one sampler noise per step for the
    whole batch (a path in z, whose points should differ by z alone)."""
    last = diffusion.T - 1 if t_start is None else int(t_start)
    steps = last + 1 if steps is None else steps
    taus = ddim_timesteps(diffusion.T, steps, spacing, t_start)
    d = diffusion if len(taus) == diffusion.T else diffusion.respace_to(taus)
    if sampler == "ddim":
        return d.ddim_sample_loop(eps_fn, x_T, eta=eta, clip_x0=clip_x0, generator=generator, progress=progress,
                                  raw_eps=raw_eps, shared_noise=shared_noise)
    if sampler == "ddpm":
        return d.p_sample_loop(eps_fn, x_T, var_type=var_type, clip_x0=clip_x0, generator=generator, progress=progress,
                               shared_noise=shared_noise)
    raise ValueError(f"unknown sampler {sampler!r}: choose 'ddim' or 'ddpm'")


def randn_like(x, generator=None, shared=False):
    """z ~ N(0, I) shaped like x, from `generator` when given (torch.randn_like takes none); shared: one draw of
    one image's shape, the same for every image of the batch."""
    shape = (1, *x.shape[1:]) if shared else x.shape
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype).expand_as(x)


# ----------------------------------------------------------------------------- Gaussian helpers

def loss_simple(eps_pred, noise):
    """L_simple (DDPM eq. 14): ||eps - eps_theta(sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps, t)||^2,
    averaged over dimensions, one value per example (B,): the weights of eq. 12 are dropped."""
    return (noise - eps_pred).pow(2).flatten(1).mean(1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise (the KL of two Gaussians)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def standard_normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, for the discretised decoder of DDPM eq. 13."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x_0 | x_1) for x_0 on the 256-level grid of [-1, 1] (DDPM eq. 13): the Gaussian's mass on the bin
    [x - 1/255, x + 1/255], with the edge bins extended to -inf and +inf. Elementwise."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (x - mean + 1.0 / 255))
    cdf_minus = standard_normal_cdf(inv_std * (x - mean - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))
