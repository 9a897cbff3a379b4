"""Degraded conditioning signals, for testing the refiner's robustness.

DiffuseVAE's refiner is trained to sharpen x-hat_0 = dec(z), a VAE output ([DiffuseVAE]). Here it is handed
other degradations of a real image instead (noise, blur, down-then-up sampling) and `psnr` scores the result.

Units: every image is a (B, C, H, W) float tensor in the model range [-1, 1] (data.py converts, once), and
every noise level here is in those units. A noise sigma of 0.1 in [-1, 1] is 0.05 of the [0, 1] range
(12.75 of 255); sigma 0.3 is 0.15 of [0, 1] (38.25 of 255). Blur sigmas and down-up factors are in pixels.
"""
import math
import numbers

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- the degradations

def gaussian_noise(x, sigma, generator=None):
    """y = clamp(x + sigma eps, -1, 1), eps ~ N(0, I); sigma in model units (the [-1, 1] range)."""
    if not sigma >= 0:
        raise ValueError(f"noise sigma must be >= 0 (in [-1, 1] model units), got {sigma}")
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + sigma * eps).clamp(-1, 1)


def gaussian_kernel1d(sigma, dtype=torch.float64):
    """k_i = exp(-i^2 / (2 sigma^2)) / sum_j exp(-j^2 / (2 sigma^2)), i = -r..r, r = ceil(3 sigma); sums to 1."""
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0 (in pixels), got {sigma}")
    r = math.ceil(3 * sigma)
    i = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-i ** 2 / (2 * sigma ** 2))
    return (k / k.sum()).to(dtype)                                  # (2r + 1,)


def gaussian_blur(x, sigma):
    """y = k * (k * x): the separable 2-D Gaussian k(i) k(j), one 1-D pass along H then one along W.

    The image is reflect-padded by r = ceil(3 sigma) (x_{-i} = x_i, no edge repeat), so a constant image stays
    constant and the per-image mean changes only by boundary terms of order r / H (exactly zero when the
    image is constant within r + 1 pixels of its border). Each output pixel is a convex combination of
    inputs, so [-1, 1] is kept; the final clamp only removes float rounding of the kernel's sum.
    """
    B, C, H, W = x.shape
    k = gaussian_kernel1d(sigma, x.dtype).to(x.device)
    r = (len(k) - 1) // 2
    if r >= min(H, W):
        raise ValueError(f"blur radius ceil(3 sigma) = {r} needs H and W > {r} for reflect padding, got {H}x{W}")
    k_h = k.view(1, 1, -1, 1).expand(C, 1, -1, 1)                    # (C, 1, 2r+1, 1): one filter per channel
    k_w = k.view(1, 1, 1, -1).expand(C, 1, 1, -1)                    # (C, 1, 1, 2r+1)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k_h, groups=C)   # (B, C, H+2r, W) -> (B, C, H, W)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k_w, groups=C)   # (B, C, H, W+2r) -> (B, C, H, W)
    return x.clamp(-1, 1)


def valid_factors(H, W):
    """The down-up factors for an H x W image: integers f >= 2 dividing both H and W."""
    return [f for f in range(2, min(H, W) + 1) if H % f == 0 and W % f == 0]


def down_up(x, factor):
    """y = nearest-upsample(avg-pool_f(x)): each f x f block replaced by its mean; same shape as x.

    A projection: a block-constant image is unchanged, so down_up(down_up(x)) = down_up(x), and the mean of
    the block means is the image mean. The pooling runs in float64 so both hold exactly for float32 inputs
    (f^2 copies of a float32 v sum exactly in float64, and (f^2 v) / f^2 rounds back to v).
    """
    B, C, H, W = x.shape
    valid = valid_factors(H, W)
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor not in valid:
        raise ValueError(f"down-up factor must be an integer >= 2 dividing H = {H} and W = {W}: "
                         f"one of {valid}, got {factor!r}")
    small = F.avg_pool2d(x.double(), factor)                         # (B, C, H, W) -> (B, C, H/f, W/f)
    up = small.repeat_interleave(factor, -2).repeat_interleave(factor, -1)   # -> (B, C, H, W)
    return up.to(x.dtype)


# ----------------------------------------------------------------------------- the score

def psnr(x, ref):
    """Per-image PSNR in dB for [-1, 1] images (peak-to-peak 2): 10 log10(2^2 / MSE); (B, C, H, W) -> (B,) float64.

    MSE = mean over C, H, W of (x - ref)^2, in float64; identical images give +inf.
    """
    if x.shape != ref.shape or x.dim() != 4:
        raise ValueError(f"psnr needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    mse = (x.double() - ref.double()).pow(2).mean(dim=(1, 2, 3))    # (B,)
    return 10 * torch.log10(4.0 / mse)


# ----------------------------------------------------------------------------- the table

# name -> f(x, generator); insertion order is the table's row order. Noise sigmas are in [-1, 1] units.
DEGRADATIONS = {
    "noise0.1": lambda x, generator=None: gaussian_noise(x, 0.1, generator),
    "noise0.3": lambda x, generator=None: gaussian_noise(x, 0.3, generator),
    "blur1.0": lambda x, generator=None: gaussian_blur(x, 1.0),
    "blur2.0": lambda x, generator=None: gaussian_blur(x, 2.0),
    "downup2": lambda x, generator=None: down_up(x, 2),
    "downup4": lambda x, generator=None: down_up(x, 4),
}

# name -> the label a results table prints.
LABELS = {
    "noise0.1": "noise σ=0.1 ([-1,1] units; 0.05 of [0,1])",
    "noise0.3": "noise σ=0.3 ([-1,1] units; 0.15 of [0,1])",
    "blur1.0": "blur σ=1.0 px",
    "blur2.0": "blur σ=2.0 px",
    "downup2": "down-up ×2",
    "downup4": "down-up ×4",
}


def parse_degradation(name):
    """The function f(x, generator) of the degradation called `name` (a key of DEGRADATIONS)."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}: choose one of {', '.join(DEGRADATIONS)}")
    return DEGRADATIONS[name]
