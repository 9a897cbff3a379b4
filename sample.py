"""Sample from a trained DiffuseVAE: z ~ p(z) -> decoder -> x_hat_0 -> DDPM refinement in --steps steps.

    python sample.py --steps 10                          # VAE samples beside their refinements (DDIM, eta 0.5)
    python sample.py --steps 111 --sampler ddpm          # ancestral sampling (DDPM Algorithm 2) on every trained t
    python sample.py --mode recon                        # test images, their VAE reconstructions, refined
    python sample.py --mode interp                       # paths in z, the DDPM noise held fixed along each
    python sample.py --mode arith --arith 5 9            # z + s (mean z of class 5 - mean z of class 9)

Everything needed comes from the stage-2 checkpoint (model args, EMA weights, the VAE it was trained with and its
ex-post prior): no model flags. z comes from the ex-post prior stage 1 fitted (a Gaussian mixture over the codes
of the training images, vae.py), or from N(0, I) with --prior normal. Writes a PNG grid and an .npz of the
samples in [0, 1] ("vae": x_hat_0, "x0": refined).
"""
import argparse
import os
from dataclasses import dataclass

import numpy as np
import torch

import ddpm
import diffusevae
import runtime
from data import DataError, load_dataset, save_grid, to_model_range, to_unit_range
from runtime import CheckpointError, load_checkpoint
from unet import UNet
from vae import VAE, reparameterize, sample_prior


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/fashion/ddpm.pt", help="a stage-2 checkpoint from train.py --stage ddpm")
    p.add_argument("--mode", default="sample", choices=["sample", "recon", "interp", "arith"])
    p.add_argument("--steps", type=int, default=10, help="denoiser calls")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="ddpm: ancestral, var beta_t")
    p.add_argument("--eta", type=float, default=0.5, help="DDIM: sigma_t^2 = eta^2 beta-tilde_t (0: deterministic)")
    p.add_argument("--t_start", type=t_start_arg, default=None,
                   help="the code timestep the refiner starts at, at most the trained one, or 'full'")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight")
    p.add_argument("--n", type=int, default=16, help="how many samples (--mode interp/arith: points per path)")
    p.add_argument("--paths", type=int, default=4, help="--mode interp/arith: how many paths in z")
    p.add_argument("--arith", type=int, nargs=2, metavar=("ATTR", "BASE"),
                   help="--mode arith: add the mean z of class ATTR, subtract that of class BASE")
    p.add_argument("--prior", default="expost", choices=["expost", "normal"], help="z's prior: vae.py's ex-post mixture")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=None, help="dataset location for --mode recon/arith")
    p.add_argument("--out", default=None, help="output path stem (default: next to the checkpoint)")
    args = p.parse_args(argv)
    if min(args.n, args.paths, args.batch_size, args.steps) < 1 or args.eta < 0 or args.guidance < 0:
        p.error("--n, --paths, --batch_size and --steps must be at least 1, --eta and --guidance at least 0")
    if args.mode == "arith" and args.arith is None:
        p.error("--mode arith needs --arith ATTR BASE (e.g. --arith 5 9: sandal minus ankle boot)")
    return args


def t_start_arg(text):
    """The value of a --t_start flag: a code timestep (0, 1, ...) or 'full'."""
    if text != "full" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"takes a code timestep (0, 1, ...) or 'full', got {text!r}")
    return text if text == "full" else int(text)


@dataclass
class Refiner:
    """A stage-2 checkpoint rebuilt: the EMA denoiser, the frozen VAE it was trained with (None for the
    unconditional baseline), the diffusion process and the training configuration (train.py)."""
    net: UNet
    vae: VAE
    diffusion: ddpm.GaussianDiffusion
    cfg: dict


def load(path, device):
    """The Refiner of a stage-2 checkpoint, in the memory format runtime.choose picks for the device."""
    ck = load_checkpoint(path, stage="ddpm", hint="Train one: python train.py --stage vae && python train.py "
                                                  "--stage ddpm")
    try:
        net = UNet(**ck["model_args"])
        net.load_state_dict(ck["ema"])
        vae = VAE.from_checkpoint(ck["vae"]) if "vae" in ck else None
    except (RuntimeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit this code's models ({type(e).__name__}: {str(e)[:200]}); it is "
                              f"damaged or from another version of the code: retrain it with train.py")
    rt = runtime.choose(device.type)
    net, vae = (runtime.prepare_model(m, rt)[0].eval() if m is not None else None for m in (net, vae))
    return Refiner(net, vae, ddpm.make_diffusion(ck["config"]["schedule"], ck["config"]["T"]).to(device), ck["config"])


def start_of(cfg, t_start=None):
    """The refiner's start: t_start, else the checkpoint's (train.py's t_start); None means the whole chain from
    noise. Every sampler of a checkpoint gets its start here, so this is where a start outside the timesteps the
    denoiser was trained on is refused."""
    trained = cfg["t_start"]
    if cfg["cond"] == "none" and t_start not in (None, "full", cfg["T"] - 1):
        raise ValueError(f"--t_start {t_start}: the unconditional model has no x_hat_0 to start from, so it samples "
                         f"the whole chain from noise: drop --t_start")
    t_start = trained if t_start is None else t_start
    if cfg["cond"] == "none" or t_start == "full":
        if trained != "full":
            raise ValueError(f"this refiner was trained on the code timesteps 0..{trained} only, so it cannot "
                             f"start from noise: give --t_start {trained} or below")
        return None
    if not 0 <= t_start <= (cfg["T"] - 1 if trained == "full" else trained):
        raise ValueError(f"--t_start {t_start}: this refiner was trained on the code timesteps 0..{trained}; "
                         f"start it there or below (or train one with --set t_start=full)")
    return None if t_start == cfg["T"] - 1 else t_start


@torch.no_grad()
def refine(m, x_hat0, generator=None, noise=None, t_start=None, guidance=0.0, n=None, **sampler):
    """x_hat_0 (None: the unconditional model, n samples) refined by the checkpoint's model with the options of
    diffusevae.refine, started where start_of says; returns x_0 in [-1, 1]."""
    if guidance > 0 and not m.cfg["cond_drop"] > 0:
        raise ValueError("guidance needs a model trained with cond_drop > 0 (it learns eps without x_hat_0 too)")
    if noise is None and x_hat0 is None:
        size, ch = m.cfg["image_size"], m.net.config["img_ch"]
        noise = torch.randn(n, ch, size, size, generator=generator, device=next(m.net.parameters()).device)
    x0 = diffusevae.refine(m.net, m.diffusion, x_hat0, form=m.cfg["form"], param=m.cfg["param"],
                           t_start=start_of(m.cfg, t_start), guidance=guidance, noise=noise, generator=generator,
                           **sampler)
    return x0.clamp(-1, 1)


def prior_of(vae, prior):
    """The mixture z is drawn from for --prior: the VAE's ex-post prior ("expost"), or None for N(0, I) ("normal")."""
    if prior == "normal":
        return None
    if vae.prior is None:
        raise ValueError("this checkpoint's VAE has no ex-post prior (its stage 1 stopped early): use --prior normal")
    return vae.prior


def reconstruct(vae, x, generator):
    """dec(z), z ~ q(z|x): the VAE's reconstruction of images x as the refiner saw them in training (train.py)."""
    mu, logvar = vae.encode(x)
    return vae.decode(reparameterize(mu, logvar, ddpm.randn_like(mu, generator)))


def generators(seed, device="cpu"):
    """Two independent random streams of one seed (numpy's SeedSequence): z's, then the sampler's noise. With z
    drawn from its own stream, one --seed gives the same z, so the same x_hat_0, whatever the sampler flags."""
    states = np.random.SeedSequence(seed).generate_state(2, np.uint64) >> np.uint64(1)
    return tuple(torch.Generator(device=device).manual_seed(int(s)) for s in states)


def samples(m, n, generators, prior="expost", batch_size=256, **options):
    """n samples in batches: z from the prior, x_hat_0 = dec(z) and its refinement; returns (x_hat_0 or None, x_0).
    generators: (z's, the sampler noise's), as `generators` makes them."""
    z_generator, generator = generators
    vae_out, refined = [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x_hat0 = None
        if m.vae is not None:
            z = sample_prior(b, m.vae.z_dim, prior_of(m.vae, prior), generator=z_generator,
                             device=next(m.net.parameters()).device)
            x_hat0 = m.vae.decode(z)
            vae_out.append(x_hat0)
        refined.append(refine(m, x_hat0, generator, n=b, **options))
    return (torch.cat(vae_out) if vae_out else None), torch.cat(refined)


def pairs(x_hat0, x0, k=64, width=8):
    """Grid rows of `width`: the first k VAE samples, each row followed by their refinements."""
    return [r for i in range(0, min(k, len(x0)), width) for r in (x_hat0[i:i + width], x0[i:i + width])]


def along_paths(m, paths, generator, **options):
    """x_hat_0 and its refinement at every point of each path in z, (P, n, C, H, W) each; every draw of the sampler
    (the start and each step's noise) is shared by the points of a path, so that what changes along it is z alone."""
    out = []
    for z in paths:
        x_hat0 = m.vae.decode(z)
        noise = ddpm.randn_like(x_hat0, generator, shared=True)
        out.append((x_hat0, refine(m, x_hat0, generator, noise=noise, shared_noise=True, **options)))
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def class_mean_z(vae, cfg, data_dir, label, device):
    """The mean of the encoder means of (up to 2,000) training images of one class."""
    images, labels = load_dataset(cfg["dataset"], data_dir, split="train", image_size=cfg["image_size"])
    if labels is None:
        raise DataError(f"dataset {cfg['dataset']} has no labels, so --mode arith has no classes to average")
    sel = images[labels == label][:2000]
    if len(sel) == 0:
        raise DataError(f"class {label} has no images in {cfg['dataset']} (classes are 0..{int(labels.max())})")
    return vae.encode(to_model_range(sel).to(device))[0].mean(0)


def paths_in_z(m, args, generator, device):
    """The paths of --mode interp / arith (args: mode, n, paths, prior, arith, data_dir): straight paths z0 -> z1 of
    --n points, or z + s (mean z of class ATTR - mean z of class BASE), s = 0 .. 1.5."""
    draw_z = lambda k: sample_prior(k, m.vae.z_dim, prior_of(m.vae, args.prior), generator=generator, device=device)
    w = torch.linspace(0, 1, args.n, device=device).unsqueeze(1)
    if args.mode == "interp":
        return [(1 - w) * z0 + w * z1 for z0, z1 in ((draw_z(1), draw_z(1)) for _ in range(args.paths))]
    attr, base = (class_mean_z(m.vae, m.cfg, args.data_dir, c, device) for c in args.arith)
    return [draw_z(1) + 1.5 * w * (attr - base) for _ in range(args.paths)]


def run_mode(args, m, device):
    """Returns (grid rows, grid width, arrays to save) for the chosen mode."""
    g_z, g = generators(args.seed, device)
    options = dict(t_start=args.t_start, guidance=args.guidance, steps=args.steps, sampler=args.sampler, eta=args.eta)
    if args.mode == "sample":
        x_hat0, x0 = samples(m, args.n, (g_z, g), args.prior, args.batch_size, **options)
        if x_hat0 is None:
            return [x0[:64]], 8, {"x0": x0}
        return pairs(x_hat0, x0), 8, {"vae": x_hat0, "x0": x0}
    if m.vae is None:
        raise ValueError(f"--mode {args.mode} needs a VAE, but {args.ckpt} is the unconditional baseline")
    if args.mode == "recon":
        images, _ = load_dataset(m.cfg["dataset"], args.data_dir, split="test", image_size=m.cfg["image_size"])
        x = to_model_range(images[: args.n]).to(device)
        x_hat0 = reconstruct(m.vae, x, g_z)
        x0 = refine(m, x_hat0, g, **options)
        return [x, x_hat0, x0], len(x), {"data": x, "vae": x_hat0, "x0": x0}
    x_hat0, x0 = along_paths(m, paths_in_z(m, args, g_z, device), g, **options)
    return [r for p in range(args.paths) for r in (x_hat0[p], x0[p])], args.n, {"vae": x_hat0, "x0": x0}


def write(out, rows, width, arrays):
    """The grid `rows` (of `width` images) to OUT.png and `arrays` in [0, 1] to OUT.npz."""
    np.savez(f"{out}.npz", **{k: to_unit_range(v).cpu().numpy().astype(np.float32) for k, v in arrays.items()})
    save_grid(torch.cat(rows), f"{out}.png", nrow=width)
    print(f"wrote {out}.png and {out}.npz ({', '.join(f'{k}: {tuple(v.shape)}' for k, v in arrays.items())})")


def main(argv=None):
    args = parse_args(argv)
    device = runtime.pick_device(None)
    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", f"{args.mode}_{args.sampler}{args.steps}")
    try:
        m = load(args.ckpt, device)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with torch.inference_mode():  # sampling never needs autograd: no graph, less memory
            rows, width, arrays = run_mode(args, m, device)
    except OSError as e:
        raise SystemExit(f"error: cannot write to {os.path.dirname(out)} ({e.strerror}): choose another --out")
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    write(out, rows, width, arrays)


if __name__ == "__main__":
    main()
