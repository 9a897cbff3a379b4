"""DiffuseVAE (Pandey et al., TMLR 2022): a VAE generator, a conditional DDPM refiner.

Read beside Pandey et al. 2022 ("DiffuseVAE", arXiv:2201.00308). The paper's model is
p(x_0:T, y, z) = p(z) p_theta(y | z) p_phi(x_0:T | y, z), with the joint ELBO

    log p(x_0, y) >= L_VAE + E_{z ~ q(z|y, x_0)}[L_DDPM]                               (DiffuseVAE)

With the paper's y = x_0 the left side is log p(x_0, x_0), which counts the image twice. The model this code samples
is p(x_0) = integral of p(z) p_phi(x_0 | x_hat_0 = dec(z)) dz (the decoder enters only as the map dec), and
bound_bpd computes the bound below on it, negated and in bits/dim, with p(z) the prior sample.py draws from (the VAE's
ex-post mixture by default, or N(0, I)) and L_DDPM the DDPM's ELBO given
x_hat_0 (the L_VAE reconstruction term log p_theta(y | z) trains the decoder but is no part of it):

    log p(x_0) >= E_{z ~ q(z|x_0)}[L_DDPM(x_0 | x_hat_0 = dec(z))] - KL(q(z|x_0) || p(z))

After the paper's simplifications (y = x_0; the DDPM sees z only through x_hat_0 = dec(z)) the two terms still
share the VAE: L_DDPM depends on the encoder and decoder through x_hat_0 = dec(z), z ~ q(z|x_0). The paper's
further simplification is sequential two-stage training: first maximise L_VAE alone, then freeze the VAE and
maximise E_z[L_DDPM] over the DDPM's parameters only, treating x_hat_0 as given data. `joint_loss` writes the
sum with x_hat_0 detached (the simplified objective); train.py optimises its two halves in turn.

Two ways for the DDPM to use x_hat_0 (DiffuseVAE, "Formulation 1/2"). In both the denoiser sees
x_hat_0, concatenated to x_t as extra input channels (as the paper's code does):
- Formulation 1: the standard forward process q(x_t | x_0) of ddpm.py; only the reverse process sees x_hat_0.
- Formulation 2: an x_hat_0-shifted forward process,
      q(x_1 | x_0, x_hat_0)       = N(sqrt(1 - beta_1) x_0 + x_hat_0, beta_1 I)
      q(x_t | x_{t-1}, x_hat_0)   = N(sqrt(1 - beta_t) x_{t-1} + (1 - sqrt(1 - beta_t)) x_hat_0, beta_t I),  t > 1
  whose marginal is q(x_t | x_0, x_hat_0) = N(sqrt(alpha-bar_t) x_0 + x_hat_0, (1 - alpha-bar_t) I), so
  x_T ~ N(x_hat_0, I). Equivalently y_t = x_t - x_hat_0 (t >= 1), y_0 = x_0 is a standard DDPM chain;
  the code below uses that identity for the samplers and writes the x-space formulas out for reading.
With x_hat_0 = None the same code is the unconditional DDPM baseline.
"""
import math

import torch

import ddpm
from ddpm import extract, loss_simple
from vae import kl_to_prior, reparameterize


# ----------------------------------------------------------------------------- Formulation 2, in x space

def form2_q_step(diffusion, x_prev, t, x_hat0, noise):
    """One step of the x_hat_0-shifted forward process (DiffuseVAE; code t = 0 is the paper's t = 1):
    the first step adds x_hat_0 with weight 1, later steps with weight 1 - sqrt(1 - beta_t)."""
    sqrt_alpha = extract(diffusion.alphas.sqrt(), t, x_prev)
    shift_weight = torch.where(t.reshape(sqrt_alpha.shape) == 0, torch.ones_like(sqrt_alpha), 1 - sqrt_alpha)
    return sqrt_alpha * x_prev + shift_weight * x_hat0 + extract(diffusion.betas.sqrt(), t, x_prev) * noise


def form2_q_sample(diffusion, x0, t, x_hat0, noise):
    """Closed-form marginal q(x_t | x_0, x_hat_0) = N(sqrt(alpha-bar_t) x_0 + x_hat_0, (1 - alpha-bar_t) I)."""
    return diffusion.q_sample(x0, t, noise) + x_hat0


def form2_predict_x0_from_eps(diffusion, x_t, t, x_hat0, eps):
    """x_0 = (x_t - x_hat_0 - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t): eq. 4 on y_t = x_t - x_hat_0."""
    return diffusion.predict_x0_from_eps(x_t - x_hat0, t, eps)


def form2_q_posterior_mean_variance(diffusion, x0, x_t, t, x_hat0):
    """q(x_{t-1} | x_t, x_0, x_hat_0) for t-1 >= 1 (code t >= 1): mean c1 x_0 + c2 x_t + (1 - c2) x_hat_0 with
    the usual coefficients c1, c2 of DDPM eq. 7, variance beta-tilde_t. At code t = 0 the target x_0 carries no
    shift: use the standard posterior of y = x - x_hat_0 (this is where samplers 'remove the shift')."""
    mean_y, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t - x_hat0, t)
    return mean_y + x_hat0, var, log_var


# ----------------------------------------------------------------------------- what the network predicts

PARAMETERISATIONS = ("eps", "x0", "residual", "v")


def training_target(param, diffusion, x0, x_hat0, t, noise):
    """What the network is trained to output, on the chain whose data is x_0 (x_t in form 1, y_t in form 2):
    eps (DDPM eq. 14); x0; residual = x_0 - x_hat_0 (a network that outputs 0, as ours does at initialisation, then
    returns x_hat_0 unchanged); v = sqrt(ab) eps - sqrt(1 - ab) x_0 (ddpm.predict_v).
    x_hat0 is the conditioning input the network sees: for the null input of guidance (zeros) the residual is x_0."""
    if param == "eps":
        return noise
    if param == "x0":
        return x0
    if param == "residual":
        return x0 - x_hat0
    if param == "v":
        return diffusion.predict_v(x0, t, noise)
    raise ValueError(f"unknown parameterisation {param!r}: choose one of {PARAMETERISATIONS}")


def eps_from_output(param, diffusion, out, chain_t, t, x_hat0):
    """The eps the samplers use, from the network's output for `param` at the chain's state chain_t (ddpm.py's
    conversions: eq. 4 solved for eps, or the v rotation). Inverts training_target exactly."""
    if param == "eps":
        return out
    if param == "x0":
        return diffusion.predict_eps_from_x0(chain_t, t, out)
    if param == "residual":
        return diffusion.predict_eps_from_x0(chain_t, t, x_hat0 + out)
    if param == "v":
        return diffusion.predict_eps_from_v(chain_t, t, out)
    raise ValueError(f"unknown parameterisation {param!r}: choose one of {PARAMETERISATIONS}")


def null_condition(x_hat0):
    """The fixed input that stands for 'no x_hat_0' in classifier-free guidance: zeros, mid-grey in [-1, 1]. Being 0, it
    is also no shift: Formulation 2's chain shifted by it is the unshifted, standard one."""
    return torch.zeros_like(x_hat0)


def drop_condition(x_hat0, p):
    """The denoiser's conditioning input when training for guidance: each example's x_hat_0 replaced by the null
    input with probability p (Ho & Salimans 2022), so one network learns eps(x_t, x_hat_0) and eps(x_t, null)."""
    if p == 0:
        return x_hat0
    keep = torch.rand(x_hat0.shape[0], device=x_hat0.device) >= p
    return torch.where(keep.reshape(-1, *[1] * (x_hat0.dim() - 1)), x_hat0, null_condition(x_hat0))


# ----------------------------------------------------------------------------- the training objective

def ddpm_loss(eps_model, diffusion, x0, x_hat0=None, form=1, t=None, noise=None, t_max=None, param="eps",
              cond_drop=0.0):
    """L_DDPM with dropped weights (DDPM eq. 14, Algorithm 1), per example (B,): the mean squared error of the
    network's output against training_target (for param = eps: the noise of the forward draw). The denoiser sees
    x_t and x_hat_0. t ~ U{0..t_max} (default T - 1, all of them): a refiner that always starts at t_start
    (refine) is only ever called at t <= t_start, so training it there spends every example where it is used.
    cond_drop: the probability that the denoiser sees the null input instead of x_hat_0 (drop_condition). In form 2
    such an example's chain is shifted by the null input 0, i.e. not at all: the null branch learns the unshifted
    y-chain, the standard DDPM chain of x_0, as in form 1 (chain_eps_fn). A residual is taken from the input the
    network saw."""
    if param == "residual" and x_hat0 is None:
        raise ValueError("the residual parameterisation predicts x_0 - x_hat_0: it needs x_hat_0 (not --cond none)")
    if t is None:
        t_max = diffusion.T - 1 if t_max is None else t_max
        t = torch.randint(0, t_max + 1, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0) if noise is None else noise
    if form not in (1, 2) or (form == 2 and x_hat0 is None):
        raise ValueError(f"form must be 1, or 2 with an x_hat_0 (not the unconditional baseline); got form={form!r}")
    cond = drop_condition(x_hat0, cond_drop) if x_hat0 is not None else None
    # x_t: DDPM eq. 4 in form 1, the shifted marginal form2_q_sample in form 2, shifted by what the network sees
    x_t = form2_q_sample(diffusion, x0, t, cond, noise) if form == 2 else diffusion.q_sample(x0, t, noise)
    target = training_target(param, diffusion, x0, cond, t, noise)  # residual: relative to what the network sees
    return loss_simple(eps_model(x_t, t, cond), target), t


@torch.no_grad()
def condition_from_vae(vae, x0):
    """x_hat_0 = dec(z), z ~ q(z|x_0): the stage-2 training condition from the frozen VAE (DiffuseVAE)."""
    return vae.decode(reparameterize(*vae.encode(x0)))


def joint_loss(vae, eps_model, diffusion, x0, form=1):
    """-(L_VAE + L_DDPM) of DiffuseVAE, per dimension, with L_DDPM replaced by its L_simple surrogate.
    Gradients reach the VAE only through L_VAE: the two-stage simplification trains L_VAE first, then this
    function's second term with the VAE frozen (x_hat_0 = dec(z) of its own draw z ~ q(z|x_0), no gradient),
    which is what train.py does."""
    l_vae = vae(x0).mean()
    l_ddpm = ddpm_loss(eps_model, diffusion, x0, condition_from_vae(vae, x0), form)[0].mean()
    return l_vae + l_ddpm, l_vae, l_ddpm


def chain_eps_fn(eps_model, x_hat0, form, diffusion=None, param="eps", guidance=0.0):
    """eps_theta as ddpm.py's samplers and bound call it, eps_fn(x, t), on a standard DDPM chain.
    Form 1 (and the unconditional baseline, x_hat_0 = None): the chain is x_t itself.
    Form 2: the chain is y_t = x_t - x_hat_0 (a standard DDPM chain with y_0 = x_0), so eps_fn(y, t) =
    eps_theta(y + x_hat_0, t, x_hat_0). A network trained for another `param` is converted (eps_from_output;
    `diffusion` is then the original T-step process, whose code indices t the samplers pass).
    guidance w > 0 (classifier-free guidance on x_hat_0, for a network trained with cond_drop > 0):
    eps = (1 + w) eps(chain_t, x_hat_0) - w eps(chain_t, null). The null branch sees the chain unshifted in both
    forms (form 2 shifts by the condition, and the null input is 0), so it is the unconditional eps of the standard
    chain y_t and the guided eps is that of the sharpened p(y_t | x_hat_0) p(x_hat_0 | y_t)^w."""
    if form not in (1, 2) or (form == 2 and x_hat0 is None):
        raise ValueError(f"form must be 1, or 2 with an x_hat_0; got form={form!r}")
    if guidance < 0 or (guidance > 0 and x_hat0 is None):
        raise ValueError(f"guidance must be >= 0 and needs an x_hat_0 to guide by, got {guidance}")

    def eps_given(x, t, cond):
        x_in = x + cond if form == 2 else x  # form 2: the chain shifted by the condition the network sees
        return eps_from_output(param, diffusion, eps_model(x_in, t, cond), x, t, cond)  # residual: cond + out, as in training
    if guidance == 0:
        return lambda x, t: eps_given(x, t, x_hat0)
    null = null_condition(x_hat0)
    return lambda x, t: (1 + guidance) * eps_given(x, t, x_hat0) - guidance * eps_given(x, t, null)


@torch.no_grad()
def bound_bpd(eps_model, diffusion, x0, vae=None, form=1, var_type="fixedsmall", progress=False, param="eps",
              t_start=None, prior="expost"):
    """An upper bound on -log p(x_0) in bits/dim (x_0 on the 8-bit grid), one z draw per image (DiffuseVAE):

        -log p(x_0) <= E_{z ~ q(z|x_0)}[ -log p_phi(x_0 | x_hat_0 = dec(z)) ] + KL(q(z|x_0) || p(z))
                    <= E_z[ L_DDPM(x_0 | x_hat_0) ]                        + KL(q(z|x_0) || p(z))

    p(z) is the prior sample.py draws z from: the VAE's ex-post mixture (prior "expost", the default; the KL by
    vae.kl_to_prior's one-draw estimate at the decoded z) or N(0, I) (prior "normal", the KL in closed form).

    with L_DDPM the full DDPM bound of ddpm.vlb_terms_bpd. In form 2 the bound is that of the y-chain
    (y_t = x_t - x_hat_0, y_0 = x_0): each KL is between two Gaussians shifted alike, so it is unchanged.
    With vae=None it is the unconditional DDPM's bound. t_start: the bound of the refiner started there (refine),
    whose chain starts from truncated_start's law and runs on the timesteps 0..t_start only (ddpm.vlb_terms_bpd).
    Returns dict(total, ddpm, kl_z), each (B,) bits/dim."""
    if vae is None:
        x_hat0, kl_z = None, torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    else:
        if prior == "expost" and vae.prior is None:
            raise ValueError("this VAE has no ex-post prior (its stage 1 did not finish): bound with prior='normal'")
        mu, logvar = vae.encode(x0)
        z = reparameterize(mu, logvar)
        x_hat0 = vae.decode(z)
        kl_z = kl_to_prior(mu, logvar, z, vae.prior if prior == "expost" else None) / (x0[0].numel() * math.log(2.0))
    if t_start is not None and x_hat0 is None:
        raise ValueError("a truncated start (t_start) needs x_hat_0 to start from: the unconditional model has none")
    eps_fn = chain_eps_fn(eps_model, x_hat0, form, diffusion, param)
    ddpm_bpd = diffusion.vlb_terms_bpd(eps_fn, x0, var_type=var_type, progress=progress, t_start=t_start,
                                       start_mean=x_hat0 if t_start is not None else None)["total"]
    return dict(total=ddpm_bpd + kl_z, ddpm=ddpm_bpd, kl_z=kl_z)


# ----------------------------------------------------------------------------- sampling

def truncated_start(diffusion, x_hat0, t_start, noise):
    """The state a truncated refiner starts from: the forward marginal at t_start of a chain whose data is x_hat_0,

        chain_{t_s} = sqrt(alpha-bar_{t_s}) x_hat_0 + sqrt(1 - alpha-bar_{t_s}) eps          (DDPM eq. 4 at x_0 = x_hat_0)

    the SDEdit start (Meng et al. 2022; Chung et al. 2022 bound its error). The chain is x_t itself in form 1 and
    y_t = x_t - x_hat_0 in form 2 (whose y_0 is x_0): in both it is q(chain_{t_s} | x_0) with x_0 replaced by x_hat_0,
    so it is exact when x_hat_0 = x_0 and off by sqrt(alpha-bar_{t_s}) (x_hat_0 - x_0) in the mean otherwise."""
    t = torch.full((x_hat0.shape[0],), int(t_start), device=x_hat0.device, dtype=torch.long)
    return diffusion.q_sample(x_hat0, t, noise)


@torch.no_grad()
def refine(eps_model, diffusion, x_hat0, form=1, param="eps", t_start=None, guidance=0.0, noise=None, generator=None,
           **sampler):
    """DiffuseVAE's refiner: x_hat_0 -> x_0, by ddpm.sample with the keyword options `sampler` (steps, sampler,
    eta, var_type, spacing, clip_x0 (here on by default), raw_eps, progress).

    Form 1: x_T ~ N(0, I) and every step conditions on x_hat_0.
    Form 2: x_T ~ N(x_hat_0, I); the chain runs on y_t = x_t - x_hat_0, which is the standard DDPM chain, so the
    sampler of ddpm.py applies with eps_fn(y, t) = eps_theta(y + x_hat_0, t, x_hat_0); its output is y_0 = x_0,
    i.e. the shift is removed at the end.
    t_start (a code index < T - 1): start the chain at `truncated_start` instead of pure noise and spend the
    steps on the timesteps 0..t_start: x_hat_0 is already close to x_0, so the large-noise steps, where a few-step
    sampler of an under-trained denoiser errs most, are skipped.
    x_hat_0 = None with form 1 samples the unconditional baseline from `noise`, which then sets the shape.
    `noise` fixes the starting noise (interpolation holds it fixed along a path); default: a draw from `generator`.
    Clipping each predicted x_0 to [-1, 1] (in form 2 the y-chain's x_0 is the data x_0 too) matters with few
    steps: x_0-hat = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t) divides the eps error by
    sqrt(alpha-bar_T) ~ 0.006 at the first step, and unclipped that error can carry through to the sample.
    `param`: what the network predicts (training_target); `guidance`: the weight w of chain_eps_fn."""
    if noise is None:
        if x_hat0 is None:
            raise ValueError("the unconditional model has no x_hat_0 to shape its sample: pass noise of that shape")
        noise = ddpm.randn_like(x_hat0, generator)
    eps_fn = chain_eps_fn(eps_model, x_hat0, form, diffusion, param, guidance)
    if t_start is None:
        start = noise  # x_T in form 1; y_T = x_T - x_hat_0 with x_T ~ N(x_hat_0, I) in form 2
    elif x_hat0 is None:
        raise ValueError("a truncated start (t_start) needs x_hat_0 to start from: the unconditional model has none")
    else:
        start = truncated_start(diffusion, x_hat0, t_start, noise)
    return ddpm.sample(diffusion, eps_fn, start, t_start=t_start, generator=generator, **{"clip_x0": True, **sampler})
