"""Does z decide DiffuseVAE's refined sample? Measured with the judge of tools/evaluate.py (a
classifier trained on blurred images too, so that it can name the class of a blurry x_hat_0).

    # K latents x R refinements of each
    python -m tools.control --n 200 --repeats 4 --steps 10
    # does the refinement follow a path in z?
    python -m tools.control --mode interp --n 8 --paths 50
    # z + s (mean z of class 5 - of class 9)
    python -m tools.control --mode arith --arith 5 9 --n 6 --paths 50

--mode repeats: K = --n latents z from the prior, x_hat_0 = dec(z), each refined R = --repeats times
with fresh DDPM noise. Prints the fraction of refinements the judge puts in x_hat_0's class (with
its standard error over the K latents) and the RMS pixel distance between two refinements of one z
against two refinements of different z's. --mode interp / arith: the paths of `python sample.py
--mode interp / arith` (the same seed gives the same paths), the DDPM noise held fixed along each;
prints how often the refinement has its x_hat_0's class along the paths.

Writes a PNG grid and an .npz of the images in [0, 1] ("vae": x_hat_0, "x0": refined). The judge
comes from `python -m tools.evaluate --train_classifier`."""

import argparse
import os

import torch

import diffusevae
import runtime
import sample
from data import FASHION_CLASSES, DataError
from runtime import CheckpointError
from tools import evaluate
from vae import sample_prior


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ckpt",
        default="runs/fashion/ddpm.pt",
        help="a stage-2 checkpoint from train.py --stage ddpm",
    )
    p.add_argument("--mode", default="repeats", choices=["repeats", "interp", "arith"])
    p.add_argument(
        "--n", type=int, default=50, help="--mode repeats: latents K; interp/arith: points per path"
    )
    p.add_argument(
        "--repeats", type=int, default=4, help="--mode repeats: refinements R of each z (2..64)"
    )
    p.add_argument(
        "--paths", type=int, default=4, help="--mode interp/arith: how many paths in z (1..256)"
    )
    p.add_argument(
        "--arith",
        type=int,
        nargs=2,
        metavar=("ATTR", "BASE"),
        help="--mode arith: add the mean z of class ATTR, subtract that of class BASE",
    )
    p.add_argument(
        "--judge",
        default=evaluate.JUDGE,
        help="the classifier of class agreement (tools/evaluate.py)",
    )
    add_refiner_flags(p)
    p.add_argument(
        "--prior",
        default="expost",
        choices=["expost", "normal"],
        help="z from the ex-post Gaussian mixture stage 1 fitted (vae.py), or from N(0, I)",
    )
    args = parse_refiner_args(p, argv)
    if not 2 <= args.repeats <= 64:
        p.error(f"--repeats must be between 2 and 64 (refinements per z), got {args.repeats}")
    if not 1 <= args.paths <= 256:
        p.error(
            "--paths must be between 1 and 256 (paths in z for --mode interp/arith), "
            f"got {args.paths}"
        )
    if args.mode == "arith" and args.arith is None:
        p.error("--mode arith needs --arith ATTR BASE (e.g. --arith 5 9: sandal minus ankle boot)")
    return args


def classifier_of(path, flag, device):
    """tools/evaluate.py's classifier (or judge) at `path`, or a clear error saying how to make
    it."""
    if not os.path.exists(path):
        raise ValueError(
            f"no classifier at {path}: train it with python -m tools.evaluate --train_classifier "
            f"(or pass {flag} PATH)"
        )
    return evaluate.load_classifier(path, device)[0]


def control(model, judge, K, R, generators, prior="expost", **options):
    """Does z decide the refined sample? K latents, R refinements of each (fresh DDPM noise): the
    fraction of refinements the judge puts in x_hat_0's class, and the RMS pixel distance between
    two refinements of one z against two refinements of different z's. Returns (grid rows: x_hat_0
    then its R refinements, one row per z for the first 8; arrays {"vae": (K, C, H, W), "x0": (K, R,
    C, H, W)})."""
    device = next(model.net.parameters()).device
    z_generator, generator = generators
    z = sample_prior(K, model.vae.z_dim, model.z_prior(prior), generator=z_generator, device=device)
    x_hat0 = model.vae.decode(z)
    x0 = torch.stack(
        [model.refine(x_hat0, generator=generator, **options) for _ in range(R)], 1
    )  # (K, R, C, H, W)
    same = evaluate.predict(judge, x_hat0)[:, None] == evaluate.predict(
        judge, x0.flatten(0, 1)
    ).view(K, R)
    per_z = same.double().mean(1)  # (K,): the R refinements of one z are not independent,
    agree, se = (
        per_z.mean().item(),
        per_z.std().item() / K**0.5,
    )  # so the standard error is over the K latents
    flat = x0.flatten(2)  # (K, R, D)
    rms = (
        torch.cdist(flat.transpose(0, 1), flat.transpose(0, 1)) / flat.shape[-1] ** 0.5
    )  # (R, K, K): same r
    within = torch.stack(
        [(flat[:, i] - flat[:, j]).pow(2).mean(-1).sqrt() for i in range(R) for j in range(i)]
    )
    across = rms[:, ~torch.eye(K, dtype=torch.bool, device=rms.device)]
    print(
        f"control through z: K = {K} latents x R = {R} refinements; the judge keeps x_hat_0's "
        f"class in {agree:.1%} ± {se:.1%} (chance ~10%); RMS pixel distance within one z "
        f"{within.mean():.3f}, across z's {across.mean():.3f}"
    )
    rows = [torch.cat([x_hat0[k : k + 1], x0[k]]) for k in range(min(K, 8))]
    return rows, {"vae": x_hat0, "x0": x0}


def path_agreement(c_vae, c_ref, attr=None):
    """Fractions from the (P, n) classes of x_hat_0 and of its refinement along P paths: points
    where the two agree, last points where they agree, and (latent arithmetic) first and last points
    in the class `attr`."""
    frac = lambda b: b.double().mean().item()
    r = {"points": frac(c_vae == c_ref), "last": frac(c_vae[:, -1] == c_ref[:, -1])}
    if attr is not None:
        r.update(
            attr_first_vae=frac(c_vae[:, 0] == attr),
            attr_first_ref=frac(c_ref[:, 0] == attr),
            attr_last_vae=frac(c_vae[:, -1] == attr),
            attr_last_ref=frac(c_ref[:, -1] == attr),
        )
    return r


def report_path_classes(judge, x_hat0, x0, attr=None):
    """Does the refined sample follow the z edit? The judge's class of x_hat_0 and of its refinement
    at every point of every path ((P, n, C, H, W) each), printed with the first paths' classes;
    returns path_agreement's dict."""
    P, n = x_hat0.shape[:2]
    c_vae, c_ref = (evaluate.predict(judge, x.flatten(0, 1)).view(P, n).cpu() for x in (x_hat0, x0))
    for p in range(min(P, 4)):
        for name, c in (("x_hat_0", c_vae[p]), ("refined", c_ref[p])):
            print(f"path {p} {name}: " + " ".join(FASHION_CLASSES[k][:7] for k in c.tolist()))
    r = path_agreement(c_vae, c_ref, attr)
    line = (
        f"{P} paths x {n} points: the refinement has its x_hat_0's class at {r['points']:.1%} "
        f"of the points, at the last point of a path {r['last']:.1%}"
    )
    if attr is not None:
        line += (
            f"; in class {attr} ({FASHION_CLASSES[attr]}) at the first point: "
            f"x_hat_0 {r['attr_first_vae']:.1%}, "
            f"refined {r['attr_first_ref']:.1%}; at the last: x_hat_0 {r['attr_last_vae']:.1%}, "
            f"refined {r['attr_last_ref']:.1%}"
        )
    print(line)
    return r


def add_refiner_flags(p):
    """The flags of how a tool runs the refiner (10 DDIM steps, eta 0.5, from the checkpoint's
    t_start, as sample.py), its seed, data and output."""
    p.add_argument("--steps", type=int, default=diffusevae.STEPS, help="DDIM denoiser calls")
    p.add_argument(
        "--eta",
        type=float,
        default=diffusevae.ETA,
        help="DDIM: sigma_t^2 = eta^2 beta-tilde_t (0: deterministic)",
    )
    p.add_argument(
        "--t_start",
        type=int,
        default=None,
        help="the code timestep the refiner starts at, at most the trained one (default: the "
        "checkpoint's t_start; T - 1 = 999: the whole chain from noise)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data_dir", default=None, help="dataset location (default: data.py's for the dataset)"
    )
    p.add_argument("--out", default=None, help="output path stem (default: next to the checkpoint)")


def parse_refiner_args(p, argv):
    """p's arguments, with add_refiner_flags' and --n checked."""
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.eta < 0:
        p.error("--n and --steps must be at least 1, --eta at least 0")
    return args


def output_stem(ckpt, out, name):
    """Where a tool writes OUT.png and OUT.npz: --out, else NAME next to the checkpoint; its folder
    is made."""
    out = out or os.path.join(os.path.dirname(ckpt) or ".", name)
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    except OSError as e:
        raise SystemExit(
            f"error: cannot write to {os.path.dirname(out)} ({e.strerror}): choose another --out"
        )
    return out


def run(args, model, device):
    """Returns (grid rows, grid width, arrays to save) for the chosen mode."""
    if model.vae is None:
        raise ValueError(
            f"{args.ckpt} is the unconditional baseline: it has no z to measure the control of"
        )
    judge = classifier_of(args.judge, "--judge", device)
    g_z, g = diffusevae.generators(
        args.seed, device
    )  # z's stream and the sampler's, as sample.py draws them
    options = dict(t_start=args.t_start, steps=args.steps, sampler="ddim", eta=args.eta)
    if args.mode == "repeats":
        rows, arrays = control(model, judge, args.n, args.repeats, (g_z, g), args.prior, **options)
        return rows, args.repeats + 1, arrays
    paths = sample.paths_in_z(model, args, g_z, device)
    x_hat0, x0 = sample.along_paths(model, paths, g, **options)
    report_path_classes(judge, x_hat0, x0, attr=args.arith[0] if args.mode == "arith" else None)
    return (
        [r for p in range(args.paths) for r in (x_hat0[p], x0[p])],
        args.n,
        {"vae": x_hat0, "x0": x0},
    )


def main(argv=None):
    args = parse_args(argv)
    device = runtime.pick_device(None)
    out = output_stem(args.ckpt, args.out, f"control_{args.mode}_ddim{args.steps}")
    try:
        model = sample.load_model(args.ckpt, device)
        with torch.inference_mode():
            rows, width, arrays = run(args, model, device)
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    sample.write(out, rows, width, arrays)


if __name__ == "__main__":
    main()
