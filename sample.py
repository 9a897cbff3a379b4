"""Sample from a trained DiffuseVAE: z ~ p(z) -> x_hat_0 = dec(z) -> refined in --steps calls.

    python sample.py --steps 10                  # VAE samples beside their refinements (DDIM)
    python sample.py --steps 111 --sampler ddpm  # ancestral sampling (DDPM Algorithm 2)
    python sample.py --mode recon                # test images, their VAE reconstructions, refined
    python sample.py --mode interp               # paths in z, the sampler's draws shared along each
    python sample.py --mode arith --arith 5 9    # z + s (mean z of class 5 - mean z of class 9)

The stage-2 checkpoint holds everything (diffusevae.DiffuseVAE.from_checkpoint): no model flags.
Writes a PNG grid and an .npz of the samples in [0, 1] ("vae": x_hat_0, "x0": refined).
"""

import argparse
import os

import numpy as np
import torch

import diffusevae
import runtime
from data import DataError, load_dataset, save_grid, to_model_range, to_unit_range
from diffusevae import DiffuseVAE
from runtime import CheckpointError
from vae import sample_prior


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ckpt", default="runs/fashion/ddpm.pt", help="a checkpoint of train.py --stage ddpm"
    )
    p.add_argument("--mode", default="sample", choices=["sample", "recon", "interp", "arith"])
    p.add_argument("--steps", type=int, default=diffusevae.STEPS, help="denoiser calls")
    p.add_argument(
        "--sampler",
        default="ddim",
        choices=["ddim", "ddpm"],
        help="ddpm: ancestral, sigma^2 = beta",
    )
    p.add_argument(
        "--eta", type=float, default=diffusevae.ETA, help="DDIM: sigma^2 = eta^2 beta-tilde"
    )
    p.add_argument(
        "--t_start", type=int, default=None, help="the code timestep to start at (default: trained)"
    )
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight")
    p.add_argument(
        "--n", type=int, default=16, help="how many samples (interp/arith: points per path)"
    )
    p.add_argument("--paths", type=int, default=4, help="--mode interp/arith: how many paths in z")
    p.add_argument(
        "--arith", type=int, nargs=2, metavar=("ATTR", "BASE"), help="--mode arith: the classes"
    )
    p.add_argument(
        "--prior", default="expost", choices=["expost", "normal"], help="z's prior (vae.py)"
    )
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=None, help="the dataset, for --mode recon/arith")
    p.add_argument("--out", default=None, help="output path stem (default: next to the checkpoint)")
    args = p.parse_args(argv)
    if (
        min(args.n, args.paths, args.batch_size, args.steps) < 1
        or args.eta < 0
        or args.guidance < 0
    ):
        p.error(
            "--n, --paths, --batch_size and --steps must be at least 1, "
            "--eta and --guidance at least 0"
        )
    if args.mode == "arith" and args.arith is None:
        p.error("--mode arith needs --arith ATTR BASE (e.g. --arith 5 9: sandal minus ankle boot)")
    return args


def pairs(x_hat0, x0, k=64, width=8):
    """Grid rows of `width`: the first k VAE samples, each row followed by their refinements."""
    return [
        r
        for i in range(0, min(k, len(x0)), width)
        for r in (x_hat0[i : i + width], x0[i : i + width])
    ]


def along_paths(model, paths, generator, **options):
    """x_hat_0 and its refinement at every point of each path in z, (P, n, C, H, W) each, with every
    draw of the sampler shared by a path's points: along a path only z changes."""
    x_hat0 = torch.stack([model.vae.decode(z) for z in paths])
    x0 = [model.refine(x, generator=generator, shared_noise=True, **options) for x in x_hat0]
    return x_hat0, torch.stack(x0)


def class_mean_z(model, data_dir, label, device):
    """The mean of the encoder means of (up to 2,000) training images of one class."""
    cfg = model.config
    images, labels = load_dataset(
        cfg["dataset"], data_dir, split="train", image_size=cfg["image_size"]
    )
    if labels is None:
        raise DataError(f"dataset {cfg['dataset']} has no labels, so --mode arith has no classes")
    chosen = images[labels == label][:2000]
    if len(chosen) == 0:
        raise DataError(
            f"class {label} has no images in {cfg['dataset']} (classes 0..{int(labels.max())})"
        )
    return model.vae.encode(to_model_range(chosen).to(device))[0].mean(0)


def paths_in_z(model, args, generator, device):
    """The paths of --mode interp (straight, z0 -> z1, --n points) or arith (z + s (mean z of class
    ATTR - mean z of class BASE), s = 0..1.5); args: mode, n, paths, prior, arith, data_dir."""
    prior = model.z_prior(args.prior)
    draw_z = lambda: sample_prior(1, model.vae.z_dim, prior, generator=generator, device=device)
    w = torch.linspace(0, 1, args.n, device=device).unsqueeze(1)
    if args.mode == "interp":
        return [
            (1 - w) * z0 + w * z1 for z0, z1 in ((draw_z(), draw_z()) for _ in range(args.paths))
        ]
    attr, base = (class_mean_z(model, args.data_dir, c, device) for c in args.arith)
    return [draw_z() + 1.5 * w * (attr - base) for _ in range(args.paths)]


def run_mode(args, model, device):
    """(grid rows, grid width, arrays to save) of the chosen mode."""
    g_z, g = diffusevae.generators(args.seed, device)
    options = dict(steps=args.steps, sampler=args.sampler, eta=args.eta, t_start=args.t_start)
    options["guidance"] = args.guidance
    if args.mode == "sample":
        batches = []
        for i in range(0, args.n, args.batch_size):
            b = min(args.batch_size, args.n - i)
            batches.append(model.sample(b, (g_z, g), args.prior, **options))
        x0 = torch.cat([b[1] for b in batches])
        if model.vae is None:
            return [x0[:64]], 8, {"x0": x0}
        x_hat0 = torch.cat([b[0] for b in batches])
        return pairs(x_hat0, x0), 8, {"vae": x_hat0, "x0": x0}
    if model.vae is None:
        raise ValueError(
            f"--mode {args.mode} needs a VAE, but {args.ckpt} is the unconditional baseline"
        )
    if args.mode == "recon":
        cfg = model.config
        images, _ = load_dataset(
            cfg["dataset"], args.data_dir, split="test", image_size=cfg["image_size"]
        )
        x = to_model_range(images[: args.n]).to(device)
        x_hat0 = model.vae.reconstruct(x, g_z)[0]
        x0 = model.refine(x_hat0, generator=g, **options)
        return [x, x_hat0, x0], len(x), {"data": x, "vae": x_hat0, "x0": x0}
    x_hat0, x0 = along_paths(model, paths_in_z(model, args, g_z, device), g, **options)
    return (
        [r for p in range(args.paths) for r in (x_hat0[p], x0[p])],
        args.n,
        {"vae": x_hat0, "x0": x0},
    )


def write(out, rows, width, arrays):
    """The grid `rows` (of `width` images) to OUT.png and `arrays` in [0, 1] to OUT.npz."""
    np.savez(
        f"{out}.npz",
        **{k: to_unit_range(v).cpu().numpy().astype(np.float32) for k, v in arrays.items()},
    )
    save_grid(torch.cat(rows), f"{out}.png", nrow=width)
    shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in arrays.items())
    print(f"wrote {out}.png and {out}.npz ({shapes})")


def load_model(path, device):
    """The checkpoint's DiffuseVAE on `device`, in the memory layout runtime.choose picks for it."""
    model = DiffuseVAE.from_checkpoint(path).to(device)
    if runtime.choose(device.type).channels_last:
        model.to(memory_format=torch.channels_last)  # NHWC: the convs' fastest layout
    return model


def main(argv=None):
    args = parse_args(argv)
    device = runtime.pick_device(None)
    out = args.out or os.path.join(
        os.path.dirname(args.ckpt) or ".", f"{args.mode}_{args.sampler}{args.steps}"
    )
    try:
        model = load_model(args.ckpt, device)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with torch.inference_mode():
            rows, width, arrays = run_mode(args, model, device)
    except OSError as e:
        raise SystemExit(
            f"error: cannot write to {os.path.dirname(out)} ({e.strerror}): choose another --out"
        )
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    write(out, rows, width, arrays)


if __name__ == "__main__":
    main()
