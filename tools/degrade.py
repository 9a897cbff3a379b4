"""Degraded conditioning signals, for testing the refiner's robustness.

DiffuseVAE's refiner is trained to sharpen x-hat_0 = dec(z), a VAE output (Pandey et al. 2022,
arXiv:2201.00308). Here it is handed other degradations of a real image instead (noise, blur,
down-then-up sampling) and `psnr` scores the result.

    # FID and PSNR of each degraded input and of its refinement
    python -m tools.degrade --n 500 --steps 10

The table also has the VAE's own reconstructions, the input the refiner was trained on. FID uses the
classifier of `python -m tools.evaluate --train_classifier` (--classifier); the reference is the
whole test set. Writes a PNG grid (clean images, then the input and refined rows of each kind) and
an .npz of every input and refinement in [0, 1].

Units: every image is a (B, C, H, W) float tensor in the model range [-1, 1] (data.py converts,
once), and every noise level here is in those units. A noise sigma of 0.1 in [-1, 1] is 0.05 of the
[0, 1] range (12.75 of 255); sigma 0.3 is 0.15 of [0, 1] (38.25 of 255). Blur sigmas and down-up
factors are in pixels."""

import argparse
import numbers

import torch
import torch.nn.functional as F

import runtime
import sample
from data import DataError, load_dataset, to_model_range
from runtime import CheckpointError
from tools import evaluate
from tools.control import add_refiner_flags, classifier_of, output_stem, parse_refiner_args

# defined beside the judge, which trains on blurred copies; gaussian_kernel1d is part of this
# module's interface
from tools.evaluate import gaussian_blur, gaussian_kernel1d  # noqa: F401

# ----------------------------------------------------------------------------- the degradations


def gaussian_noise(x, sigma, generator=None):
    """y = clamp(x + sigma eps, -1, 1), eps ~ N(0, I); sigma in model units (the [-1, 1] range)."""
    if not sigma >= 0:
        raise ValueError(f"noise sigma must be >= 0 (in [-1, 1] model units), got {sigma}")
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + sigma * eps).clamp(-1, 1)


def valid_factors(H, W):
    """The down-up factors for an H x W image: integers f >= 2 dividing both H and W."""
    return [f for f in range(2, min(H, W) + 1) if H % f == 0 and W % f == 0]


def down_up(x, factor):
    """y = nearest-upsample(avg-pool_f(x)): each f x f block replaced by its mean; same shape as x.

    A projection: a block-constant image is unchanged, so down_up(down_up(x)) = down_up(x), and the
    mean of the block means is the image mean. The pooling runs in float64 so both hold exactly for
    float32 inputs (f^2 copies of a float32 v sum exactly in float64, and (f^2 v) / f^2 rounds back
    to v)."""
    B, C, H, W = x.shape
    valid = valid_factors(H, W)
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor not in valid:
        raise ValueError(
            f"down-up factor must be an integer >= 2 dividing H = {H} and W = {W}: "
            f"one of {valid}, got {factor!r}"
        )
    small = F.avg_pool2d(x.double(), factor)  # (B, C, H, W) -> (B, C, H/f, W/f)
    up = small.repeat_interleave(factor, -2).repeat_interleave(factor, -1)  # -> (B, C, H, W)
    return up.to(x.dtype)


# ----------------------------------------------------------------------------- the score


def psnr(x, ref):
    """Per-image PSNR in dB for [-1, 1] images (peak-to-peak 2): 10 log10(2^2 / MSE); (B, C, H, W)
    -> (B,) float64.

    MSE = mean over C, H, W of (x - ref)^2, in float64; identical images give +inf.
    """
    if x.shape != ref.shape or x.dim() != 4:
        raise ValueError(
            "psnr needs two (B, C, H, W) tensors of one shape, "
            f"got {tuple(x.shape)} and {tuple(ref.shape)}"
        )
    mse = (x.double() - ref.double()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return 10 * torch.log10(4.0 / mse)


# ----------------------------------------------------------------------------- the table

# name -> f(x, generator); insertion order is the table's row order. Noise sigmas are in [-1, 1]
# units.
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


def degrade_table(model, classifier, x, ref, generator, **options):
    """The refiner handed the images x degraded in ways it never saw (DEGRADATIONS), and their VAE
    reconstructions for reference: FID (against the features `ref` of the clean test set) and mean
    PSNR (against x) of each input and of its refinement. Returns (the markdown table's lines, grid
    rows: x, then each input and its refinement (8 images each), arrays {"data", NAME_in,
    NAME_refined})."""
    inputs = {"vae recon": model.vae.reconstruct(x, generator)[0]}
    inputs.update({name: f(x, generator=generator) for name, f in DEGRADATIONS.items()})
    lines = [
        f"| input (N = {len(x)}) | FID in | FID refined | PSNR in (dB) | PSNR refined (dB) |",
        "|---|---|---|---|---|",
    ]
    rows, arrays = [x[:8]], {"data": x}
    for name, x_in in inputs.items():
        x0 = model.refine(x_in, generator=generator, **options)
        fid_in, fid_out = (
            evaluate.fid_from_features(evaluate.extract_features(classifier, a), ref)
            for a in (x_in, x0)
        )
        lines.append(
            f"| {LABELS.get(name, name)} | {fid_in:.1f} | {fid_out:.1f} | "
            f"{psnr(x_in, x).mean():.2f} | {psnr(x0, x).mean():.2f} |"
        )
        rows += [x_in[:8], x0[:8]]
        key = name.replace(" ", "_")
        arrays[key + "_in"], arrays[key + "_refined"] = x_in, x0
    return lines, rows, arrays


# ----------------------------------------------------------------------------- the CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ckpt",
        default="runs/fashion/ddpm.pt",
        help="a stage-2 checkpoint from train.py --stage ddpm",
    )
    p.add_argument("--n", type=int, default=500, help="how many test images")
    p.add_argument(
        "--classifier", default=evaluate.FEATURES, help="the FID features (tools/evaluate.py)"
    )
    add_refiner_flags(p)
    return parse_refiner_args(p, argv)


def main(argv=None):
    args = parse_args(argv)
    device = runtime.pick_device(None)
    out = output_stem(args.ckpt, args.out, f"degrade_ddim{args.steps}")
    try:
        model = sample.load_model(args.ckpt, device)
        if model.vae is None:
            raise ValueError(f"{args.ckpt} is the unconditional baseline: it refines no input")
        classifier = classifier_of(args.classifier, "--classifier", device)
        cfg = model.config
        images, _ = load_dataset(
            cfg["dataset"], args.data_dir, split="test", image_size=cfg["image_size"]
        )
        g = torch.Generator(device=device).manual_seed(args.seed)
        with torch.inference_mode():
            ref = evaluate.extract_features(classifier, to_model_range(images).to(device))
            lines, rows, arrays = degrade_table(
                model,
                classifier,
                to_model_range(images[: args.n]).to(device),
                ref,
                g,
                t_start=args.t_start,
                steps=args.steps,
                sampler="ddim",
                eta=args.eta,
            )
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print("\n".join(lines))
    sample.write(out, rows, 8, arrays)


if __name__ == "__main__":
    main()
