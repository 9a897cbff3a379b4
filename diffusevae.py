"""DiffuseVAE (Pandey et al. 2022, arXiv:2201.00308): a VAE generator, a conditional DDPM refiner.

The model p(x_0:T, y, z) = p(z) p_theta(y | z) p_phi(x_0:T | y, z) has the joint ELBO
log p(x_0, y) >= L_VAE + E_{z ~ q(z | y, x_0)}[L_DDPM]. The paper takes y = x_0, lets the DDPM see z
only through x_hat_0 = dec(z) (as extra input channels) and trains the two terms in turn: the VAE
(vae.py), then the DDPM on (x_0, x_hat_0) with the VAE frozen. Its two forward processes:
- Formulation 1: DDPM's q(x_t | x_0) (ddpm.py); only the reverse process sees x_hat_0.
- Formulation 2: q(x_t | x_0, x_hat_0) = N(sqrt(alpha-bar_t) x_0 + x_hat_0, (1 - alpha-bar_t) I), so
  x_T ~ N(x_hat_0, I): the step means m_t obey m_t - x_hat_0 = sqrt(alpha_t) (m_{t-1} - x_hat_0)
  from m_1 = sqrt(alpha_1) x_0 + x_hat_0. y_t = x_t - x_hat_0 (t >= 1), y_0 = x_0 (not the paper's
  y) is then a standard DDPM chain: the samplers and the bound run on "the chain", x_t in form 1
  and y_t in form 2.
"""

import math

import numpy as np
import torch
import torch.nn as nn

import ddpm
from runtime import CheckpointError, load_checkpoint
from unet import UNet
from vae import VAE, kl_to_prior, sample_prior

# how the refiner samples unless told (sample.py's flags, the training pictures, tools/): DDIM
STEPS, ETA = 10, 0.5
TARGETS = ("eps", "x0", "residual", "v")

# --- Formulation 2, in x space ----------------------------------------------------------------


def form2_q_step(diffusion, x_prev, t, x_hat0, noise):
    """q(x_1 | x_0, x_hat_0) = N(sqrt(1 - beta_1) x_0 + x_hat_0, beta_1 I) at code t 0, then q(x_t |
    x_{t-1}, x_hat_0) = N(sqrt(1 - beta_t) x_{t-1} + (1 - sqrt(1 - beta_t)) x_hat_0, beta_t I)."""
    sqrt_alpha = ddpm.extract(diffusion.alphas.sqrt(), t, x_prev)
    shift = torch.where(t.reshape(sqrt_alpha.shape) == 0, 1.0, 1 - sqrt_alpha)
    sqrt_beta = ddpm.extract(diffusion.betas.sqrt(), t, x_prev)
    return sqrt_alpha * x_prev + shift * x_hat0 + sqrt_beta * noise


def form2_q_sample(diffusion, x0, t, x_hat0, noise):
    """x_t ~ q(x_t | x_0, x_hat_0) = N(sqrt(alpha-bar_t) x_0 + x_hat_0, (1 - alpha-bar_t) I)."""
    return diffusion.q_sample(x0, t, noise) + x_hat0


def form2_predict_x0_from_eps(diffusion, x_t, t, x_hat0, eps):
    """x_0 = (x_t - x_hat_0 - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t): eq. 4 on y_t."""
    return diffusion.predict_x0_from_eps(x_t - x_hat0, t, eps)


def form2_q_posterior_mean_variance(diffusion, x0, x_t, t, x_hat0):
    """q(x_{t-1} | x_t, x_0, x_hat_0) for code t >= 1: mean c1 x_0 + c2 x_t + (1 - c2) x_hat_0 with
    DDPM eq. 7's c1, c2, variance beta-tilde_t. Not at code t 0: there x_0 carries no shift and
    the mean is the y-chain's x_0 (this function would return x_0 + x_hat_0)."""
    mean_y, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t - x_hat0, t)
    return mean_y + x_hat0, var, log_var


# --- the objective ----------------------------------------------------------------------------


def ddpm_loss(
    net, diffusion, x0, x_hat0=None, form=1, target="eps", cond_drop=0.0, t=None, noise=None
):
    """L_DDPM as DDPM eq. 14 trains it, per example: the squared error of the network's output given
    the chain's x_t (shifted by x_hat_0 in form 2) and x_hat_0, against training_target. x_hat_0 =
    None: the unconditional DDPM. t default ~ U{0..T-1}. Returns (loss, t)."""
    if form not in (1, 2) or (form == 2 and x_hat0 is None):
        raise ValueError(f"form must be 1, or 2 with an x_hat_0, got form={form!r}")
    if target == "residual" and x_hat0 is None:
        raise ValueError("the residual x_0 - x_hat_0 needs x_hat_0 (not --cond none)")
    t = torch.randint(0, diffusion.T, (x0.shape[0],), device=x0.device) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    cond = None if x_hat0 is None else drop_condition(x_hat0, cond_drop)
    shift = 0 if form == 1 else cond  # form 2: x_t from form2_q_sample, shifted by the condition
    x_t = diffusion.q_sample(x0, t, noise) + shift
    out = training_target(target, diffusion, x0, cond, t, noise)
    return ddpm.loss_simple(net(x_t, t, cond), out), t


def joint_loss(vae, net, diffusion, x0, form=1):
    """-L_VAE + the L_simple surrogate of -L_DDPM, per dimension, x_hat_0 = dec(z), z ~ q(z | x_0),
    detached: the second term's gradient does not reach the VAE (the two-stage training)."""
    l_vae = vae(x0).mean()
    with torch.no_grad():
        x_hat0 = vae.reconstruct(x0)[0]
    l_ddpm = ddpm_loss(net, diffusion, x0, x_hat0, form)[0].mean()
    return l_vae + l_ddpm, l_vae, l_ddpm


def generators(seed, device="cpu"):
    """Two independent streams of one seed (numpy's SeedSequence): z's, then the sampler's noise,
    so one seed gives the same z whatever the sampler's options. (>> 1: a seed below 2^63.)"""
    states = np.random.SeedSequence(seed).generate_state(2, np.uint64) >> np.uint64(1)
    return tuple(torch.Generator(device=device).manual_seed(int(s)) for s in states)


# --- the model --------------------------------------------------------------------------------


class DiffuseVAE(nn.Module):
    """A trained DiffuseVAE as a stage-2 checkpoint holds it: the frozen VAE (None: the
    unconditional DDPM), the denoiser, the diffusion and the training configuration (form, target,
    t_start, cond_drop). Its methods are how every caller samples, refines and bounds."""

    def __init__(self, vae, net, diffusion, config):
        super().__init__()
        self.vae, self.net, self.diffusion, self.config = vae, net, diffusion, config
        self.form, self.target = config["form"], config["target"]
        self.t_start = config["t_start"]  # the top of the trained range, where sampling starts

    @classmethod
    def from_checkpoint(cls, path):
        """The model of a stage-2 checkpoint: its EMA denoiser and its frozen VAE, on the CPU."""
        hint = "Train one: python train.py --stage vae && python train.py --stage ddpm"
        ck = load_checkpoint(path, stage="ddpm", hint=hint)
        try:
            net = UNet(**ck["model_args"])
            net.load_state_dict(ck["ema"])
            vae = VAE.from_checkpoint(ck["vae"]) if "vae" in ck else None
            diffusion = ddpm.make_diffusion(ck["config"]["schedule"], ck["config"]["T"])
            model = cls(vae, net, diffusion, ck["config"])
        except (RuntimeError, TypeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"{path} does not fit this code's models ({type(e).__name__}: {str(e)[:200]}); "
                f"it is damaged or from another version of the code: retrain it with train.py"
            ) from None
        return model.eval().requires_grad_(False)

    def eps_fn(self, x_hat0, guidance=0.0):
        """eps_theta(y, t) on the chain, as ddpm.py's samplers call it: the network sees y (form 1)
        or y + x_hat_0 (form 2). Guidance w: (1 + w) eps(y, x_hat_0) - w eps(y, null)."""
        if self.form == 2 and x_hat0 is None:
            raise ValueError("form 2 shifts the chain by x_hat_0: it needs one")
        if guidance < 0 or (guidance > 0 and not self.config["cond_drop"] > 0):
            raise ValueError(f"guidance must be >= 0 (and > 0 needs cond_drop), got {guidance}")

        def eps(y, t, cond=x_hat0):
            out = self.net(y + cond if self.form == 2 else y, t, cond)
            return eps_from_output(self.target, self.diffusion, out, y, t, cond)

        if guidance == 0:
            return eps
        null = null_condition(x_hat0)
        return lambda y, t: (1 + guidance) * eps(y, t, x_hat0) - guidance * eps(y, t, null)

    def start(self, x_hat0, t_start, noise):
        """The chain's state at code t_start: x_T ~ N(0, I) at the top (y_T in form 2), the paper's.
        An addition, the truncated start q(chain_{t_s} | x_0 = x_hat_0) (SDEdit, Meng et al. 2022,
        2108.01073) below the top: x_hat_0 already holds the garment, so a few steps from t_s do."""
        top = self.diffusion.T - 1
        if x_hat0 is None and t_start != top:
            raise ValueError(f"--t_start {t_start}: a truncated start needs x_hat_0 to start from")
        if not 0 <= t_start <= self.t_start:
            raise ValueError(
                f"--t_start {t_start}: this refiner was trained on the code timesteps "
                f"0..{self.t_start}; start it there or below"
            )
        if t_start == top:
            return noise
        t = torch.full((noise.shape[0],), t_start, device=noise.device, dtype=torch.long)
        return self.diffusion.q_sample(x_hat0, t, noise)

    def refine(
        self, x_hat0, steps=STEPS, sampler="ddim", eta=ETA, t_start=None, guidance=0, **options
    ):
        """x_0 from x_hat_0 in `steps` calls, started at t_start (default: the trained one), each
        x_0-hat clipped to [-1, 1] (clip_x0). options: `noise`, the start's (the unconditional model
        needs it), and ddpm.sample's generator, shared_noise, spacing, var_type, raw_eps."""
        noise, generator = options.pop("noise", None), options.get("generator")
        if noise is None and x_hat0 is None:
            raise ValueError("the unconditional model samples from noise of its shape: pass noise")
        shared = options.get("shared_noise", False)
        noise = ddpm.randn_like(x_hat0, generator, shared) if noise is None else noise
        t_start = self.t_start if t_start is None else t_start
        start = self.start(x_hat0, t_start, noise)
        options = dict(clip_x0=True) | options | (dict(eta=eta) if sampler == "ddim" else {})
        eps_fn = self.eps_fn(x_hat0, guidance)
        options |= dict(sampler=sampler, t_start=t_start)
        return ddpm.sample(self.diffusion, eps_fn, start, steps, **options)

    def sample(self, n, generators=(None, None), prior="expost", **refine_options):
        """n samples (x_hat_0, x_0): z from the prior (z_prior), x_hat_0 = dec(z), refined.
        generators: z's, then the sampler's (generators()). The unconditional model: (None, x_0)."""
        device, (z_generator, generator) = next(self.net.parameters()).device, generators
        if self.vae is None:
            size, img_ch = self.net.config["image_size"], self.net.config["img_ch"]
            noise = torch.randn(n, img_ch, size, size, generator=generator, device=device)
            return None, self.refine(None, noise=noise, generator=generator, **refine_options)
        prior = self.z_prior(prior)
        z = sample_prior(n, self.vae.z_dim, prior, generator=z_generator, device=device)
        x_hat0 = self.vae.decode(z)
        return x_hat0, self.refine(x_hat0, generator=generator, **refine_options)

    def reconstruct(self, x, generators=(None, None), **refine_options):
        """Images x through the model: x_hat_0 = dec(z), z ~ q(z|x) (as in training), and its
        refinement; (x_hat_0, x_0). generators: z's, then the sampler's."""
        x_hat0 = self.vae.reconstruct(x, generators[0])[0]
        return x_hat0, self.refine(x_hat0, generator=generators[1], **refine_options)

    def z_prior(self, prior):
        """The mixture z is drawn from: the VAE's ex-post prior ("expost"), or None: N(0, I)."""
        if prior == "normal":
            return None
        if self.vae.prior is None:
            raise ValueError("this checkpoint's VAE has no ex-post prior: use --prior normal")
        return self.vae.prior

    @torch.no_grad()
    def bound_bpd(self, x0, prior="expost", var_type="fixedsmall", progress=False):
        """-log p(x_0) <= E_{z ~ q(z|x_0)}[L_DDPM(x_0 | dec(z))] + KL(q(z|x_0) || p(z)) in bits/dim,
        one z per image, p(z) the prior z is sampled from, the chain started as refine starts it.
        An addition: the likelihood of the model sample.py draws from. Returns dict(total, ddpm,
        kl_z), each (B,)."""
        bits = x0[0].numel() * math.log(2.0)
        x_hat0, kl_z = None, torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        if self.vae is not None:
            x_hat0, (mu, logvar, z) = self.vae.reconstruct(x0)
            kl_z = kl_to_prior(mu, logvar, z, self.z_prior(prior)) / bits
        top = self.t_start == self.diffusion.T - 1
        start = dict(t_start=None if top else self.t_start, start_mean=None if top else x_hat0)
        terms = self.diffusion.vlb_terms_bpd(self.eps_fn(x_hat0), x0, var_type, progress, **start)
        return dict(total=terms["total"] + kl_z, ddpm=terms["total"], kl_z=kl_z)


# --- what the network predicts (an addition: the paper's network predicts eps) ----------------


def training_target(target, diffusion, x0, x_hat0, t, noise):
    """The network's target on the chain whose data is x_0: eps (DDPM eq. 14), x_0, the residual
    x_0 - x_hat_0, or v (ddpm.predict_v)."""
    if target == "eps":
        return noise
    if target == "x0":
        return x0
    if target == "residual":
        return x0 - x_hat0
    if target == "v":
        return diffusion.predict_v(x0, t, noise)
    raise ValueError(f"unknown parameterisation {target!r}: choose one of {TARGETS}")


def eps_from_output(target, diffusion, out, y, t, x_hat0):
    """The eps the samplers use from the network's output at the chain's state y: training_target
    inverted by eq. 4 solved for eps, or by the v rotation."""
    if target == "eps":
        return out
    if target == "v":
        return diffusion.predict_eps_from_v(y, t, out)
    return diffusion.predict_eps_from_x0(y, t, out + x_hat0 if target == "residual" else out)


# --- classifier-free guidance on x_hat_0 (an addition: Ho & Salimans 2022, 2207.12598) -------


def null_condition(x_hat0):
    """The input that stands for 'no x_hat_0': zeros, mid-grey. In form 2 it shifts by nothing."""
    return torch.zeros_like(x_hat0)


def drop_condition(x_hat0, p):
    """x_hat_0 with each example replaced by the null input with probability p."""
    if p == 0:
        return x_hat0
    keep = torch.rand(x_hat0.shape[0], device=x_hat0.device) >= p
    return torch.where(keep.reshape(-1, *[1] * (x_hat0.dim() - 1)), x_hat0, null_condition(x_hat0))
