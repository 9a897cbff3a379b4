"""Sample from a trained DiffuseVAE: z ~ p(z) -> x_hat_0 = dec(z) -> refined in --steps calls.

    python sample.py --steps 10                  # VAE samples beside their refinements (DDIM)
    python sample.py --steps 111 --sampler ddpm  # ancestral (DDPM Alg. 2) on all t_s + 1 = 111 t
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--ckpt", default="runs/fashion/ddpm.pt", help="a checkpoint of train.py --stage ddpm")
    add("--mode", default="sample", choices=["sample", "recon", "interp", "arith"])
    add("--steps", type=int, default=diffusevae.STEPS, help="denoiser calls")
    add("--sampler", default="ddim", choices=["ddim", "ddpm"], help="ddpm: ancestral, beta_t")
    add("--eta", type=float, default=diffusevae.ETA, help="DDIM: sigma^2 = eta^2 beta-tilde")
    add("--t_start", type=int, default=None, help="the code t to start at (default: trained)")
    add("--guidance", type=float, default=0.0, help="classifier-free guidance weight")
    add("--n", type=int, default=16, help="how many samples (interp/arith: points per path)")
    add("--paths", type=int, default=4, help="--mode interp/arith: how many paths in z")
    add("--arith", type=int, nargs=2, metavar=("ATTR", "BASE"), help="--mode arith's classes")
    add("--prior", default="expost", choices=["expost", "normal"], help="z's prior (vae.py)")
    add("--batch_size", type=int, default=256)
    add("--seed", type=int, default=0)
    add("--data_dir", default=None, help="the dataset, for --mode recon/arith")
    add("--out", default=None, help="output path stem (default: next to the checkpoint)")
    args = p.parse_args(argv)
    if min(args.n, args.paths, args.batch_size, args.steps) < 1 or min(args.eta, args.guidance) < 0:
        p.error(
            "--n, --paths, --batch_size, --steps must be at least 1; --eta, --guidance at least 0"
        )
    if args.mode == "arith" and args.arith is None:
        p.error("--mode arith needs --arith ATTR BASE (e.g. --arith 5 9: sandal minus ankle boot)")
    return args


def pairs(x_hat0, x0, k=64, width=8):
    """Grid rows of `width`: the first k VAE samples, each row followed by their refinements."""
    rows = []
    for i in range(0, min(k, len(x0)), width):
        rows += [x_hat0[i : i + width], x0[i : i + width]]
    return rows


def along_paths(model, paths, generator, **options):
    """x_hat_0 and its refinement at every point of each path in z, (P, n, C, H, W) each, with every
    draw of the sampler shared by a path's points: along a path only z changes."""
    x_hat0 = torch.stack([model.vae.decode(z) for z in paths])
    x0 = [model.refine(x, generator=generator, shared_noise=True, **options) for x in x_hat0]
    return x_hat0, torch.stack(x0)


def class_mean_z(model, data_dir, label, device):
    """The mean of the encoder means of (up to 2,000) training images of one class."""
    name, size = model.config["dataset"], model.config["image_size"]
    images, labels = load_dataset(name, data_dir, split="train", image_size=size)
    if labels is None:
        raise DataError(f"dataset {name} has no labels, so --mode arith has no classes")
    chosen = images[labels == label][:2000]
    if len(chosen) == 0:
        raise DataError(f"class {label} has no images in {name} (classes 0..{int(labels.max())})")
    return model.vae.encode(to_model_range(chosen).to(device))[0].mean(0)


def paths_in_z(model, args, generator, device):
    """The paths of --mode interp (straight, z0 -> z1, --n points) or arith (z + s (mean z of class
    ATTR - mean z of class BASE), s = 0..1.5); args: mode, n, paths, prior, arith, data_dir."""
    prior = model.z_prior(args.prior)
    draw_z = lambda: sample_prior(1, model.vae.z_dim, prior, generator=generator, device=device)
    w = torch.linspace(0, 1, args.n, device=device).unsqueeze(1)
    if args.mode == "interp":
        ends = [(draw_z(), draw_z()) for _ in range(args.paths)]
        return [(1 - w) * z0 + w * z1 for z0, z1 in ends]
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
        raise ValueError(f"--mode {args.mode} needs a VAE: {args.ckpt} is the unconditional model")
    if args.mode == "recon":
        name, size = model.config["dataset"], model.config["image_size"]
        images, _ = load_dataset(name, args.data_dir, split="test", image_size=size)
        x = to_model_range(images[: args.n]).to(device)
        x_hat0, x0 = model.reconstruct(x, (g_z, g), **options)
        return [x, x_hat0, x0], len(x), {"data": x, "vae": x_hat0, "x0": x0}
    x_hat0, x0 = along_paths(model, paths_in_z(model, args, g_z, device), g, **options)
    rows = [r for p in range(args.paths) for r in (x_hat0[p], x0[p])]
    return rows, args.n, {"vae": x_hat0, "x0": x0}


def write(out, rows, width, arrays):
    """The grid `rows` (of `width` images) to OUT.png and `arrays` in [0, 1] to OUT.npz."""
    np.savez(f"{out}.npz", **{k: to_unit_range(v).cpu().float().numpy() for k, v in arrays.items()})
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
    name = f"{args.mode}_{args.sampler}{args.steps}"
    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", name)
    out = out.removesuffix(".png").removesuffix(".npz")  # the stem of both files written
    try:
        model = load_model(args.ckpt, device)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with torch.inference_mode():
            rows, width, arrays = run_mode(args, model, device)
    except OSError as e:
        where = os.path.dirname(out)
        raise SystemExit(f"error: cannot write to {where} ({e.strerror}): choose another --out")
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    write(out, rows, width, arrays)


if __name__ == "__main__":
    main()
