"""Exact denoisers for data whose diffused marginals are known in closed form: the yardsticks the
tests use.

For x_0 ~ N(m, s^2) (independent per dimension), q(x_t) = N(sqrt(ab) m, v) with v = ab s^2 + 1 - ab,
and E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) m) / v  (Gaussian conditioning), the optimal
eps-denoiser."""

import math

import torch

from diffusevae import DiffuseVAE


def gaussian_eps_oracle(diffusion, m, s):
    """The exact E[eps | x_t] for x_0 ~ N(m, s^2); t are code indices of the original process."""

    def eps_fn(x_t, t):
        ab = (
            diffusion.alphas_cumprod.to(x_t.device)[t]
            .to(x_t.dtype)
            .reshape(-1, *[1] * (x_t.dim() - 1))
        )
        v = ab * s**2 + 1 - ab
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * m) / v

    return eps_fn


def linear_schedule_by_hand(T=1000, beta_start=1e-4, beta_end=0.02):
    """(betas, alpha-bar) of the DDPM paper's linear schedule (Sec. 4), from its definition and
    nothing of ddpm.py: beta_t = beta_start + (beta_end - beta_start) (t - 1) / (T - 1) for the
    paper's t = 1..T (code index t - 1), alpha-bar_t = prod_{s <= t} (1 - beta_s). float64 tensors
    of length T."""
    betas = [beta_start + (beta_end - beta_start) * i / (T - 1) for i in range(T)]
    ab, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        ab.append(prod)
    return torch.tensor(betas, dtype=torch.float64), torch.tensor(ab, dtype=torch.float64)


def grid_values():
    """The 256 levels of 8-bit data in [-1, 1]."""
    return torch.linspace(-1, 1, 256, dtype=torch.float64)


def discrete_gaussian_probs(m, s):
    """p(k) proportional to exp(-(x_k - m)^2 / 2 s^2) on the 256-level grid."""
    logits = -((grid_values() - m) ** 2) / (2 * s**2)
    return torch.softmax(logits, 0)


def discrete_eps_oracle(diffusion, probs):
    """The exact E[eps | x_t] for 1-D x_0 on the 8-bit grid with probabilities `probs`:
    E[x_0 | x_t] is a posterior average over the 256 levels; eps follows from eq. 4."""
    xs = grid_values()
    log_p = probs.log()

    def eps_fn(x_t, t):
        ab = diffusion.alphas_cumprod[t].reshape(-1, 1)
        flat = x_t.reshape(x_t.shape[0], -1)  # (B, 1)
        log_w = log_p - (flat - ab.sqrt() * xs) ** 2 / (2 * (1 - ab))  # (B, 256)
        x0_mean = (torch.softmax(log_w, 1) * xs).sum(1, keepdim=True)
        eps = (flat - ab.sqrt() * x0_mean) / (1 - ab).sqrt()
        return eps.reshape(x_t.shape)

    return eps_fn


def log_bin_mass(x0, mean, sd):
    """log of N(mean, sd^2)'s mass on x0's bin [x0 - 1/255, x0 + 1/255] of the 8-bit grid, the edge
    bins extended to -inf and +inf (DDPM eq. 13), computed through log Phi on the side of 0 where
    the difference does not cancel."""
    hi = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), (x0 + 1 / 255 - mean) / sd)
    lo = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), (x0 - 1 / 255 - mean) / sd)
    right = hi + lo > 0  # mass = Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a, b = torch.where(right, -hi, lo), torch.where(right, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log1p(-torch.exp(torch.special.log_ndtr(a) - log_b))


def entropy_bits(probs):
    return -(probs * probs.log()).sum().item() / math.log(2)


def full(i, n=1):
    """A (n,) batch of the code timestep i."""
    return torch.full((n,), i, dtype=torch.long)


def refiner(net, diffusion, form=1, target="eps", t_start=None, cond_drop=0.0, vae=None):
    """A diffusevae.DiffuseVAE around any denoiser net(x, t, cond), trained (as its config says) on
    the code timesteps 0..t_start (default: all of them)."""
    t_start = diffusion.T - 1 if t_start is None else t_start
    config = dict(form=form, target=target, t_start=t_start, cond_drop=cond_drop)
    return DiffuseVAE(vae, net, diffusion, config)
