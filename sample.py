"""Sample from a trained DiffuseVAE: z ~ p(z) -> decoder -> x_hat_0 -> DDPM refinement in --steps steps.

    python sample.py --steps 10                          # VAE samples beside their refinements (DDIM, eta 0.5)
    python sample.py --steps 111 --sampler ddpm          # ancestral sampling (DDPM Algorithm 2) on every trained t
    python sample.py --mode recon                        # test images, their VAE reconstructions, refined
    python sample.py --mode interp                       # a path in z, the DDPM noise held fixed
    python sample.py --mode arith --attr 5 --base 9      # z + (mean z of class 5 - mean z of class 9)
    python sample.py --mode control --n 50 --repeats 4   # does z decide the refined sample? class kept, distances
    python sample.py --mode degrade --n 1000             # the refiner on test images degraded in other ways

Everything needed comes from the stage-2 checkpoint (model args, EMA weights, the VAE it was trained with):
no model flags. z comes from the ex-post prior stage 1 fitted (a Gaussian mixture over the codes of the training
images, vae.py), or from N(0, I) with --prior normal. Writes a PNG grid and an .npz of the samples in [0, 1] ("vae": x_hat_0, "x0": refined).
"""
import argparse
import os

import numpy as np
import torch

import ddpm
import diffusevae as DV
import runtime
from checkpoint import CheckpointError, load
from data import FASHION_CLASSES, DataError, load_dataset, save_grid, to_model_range, to_unit_range
from unet import UNet
from vae import VAE, reparameterize, sample_prior


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/fashion/ddpm.pt", help="a stage-2 checkpoint from train.py --stage ddpm")
    p.add_argument("--mode", default="sample", choices=["sample", "recon", "interp", "arith", "control", "degrade"])
    p.add_argument("--steps", type=int, default=10, help="denoiser calls, 1..T")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--spacing", default="uniform", choices=ddpm.SPACINGS,
                   help="which timesteps the --steps calls visit: evenly spaced, or quadratic (dense near x_0)")
    p.add_argument("--eta", type=float, default=0.5,
                   help="DDIM stochasticity: sigma_t^2 = eta^2 beta-tilde_t (0 deterministic, 1 ancestral; 0.5 chosen on the "
                        "validation split, RESULTS.md)")
    p.add_argument("--var_type", default="fixedlarge", choices=["fixedlarge", "fixedsmall"],
                   help="ancestral sigma_t^2: beta_t or beta-tilde_t")
    p.add_argument("--no_clip", action="store_true",
                   help="do not clamp each predicted x_0 to [-1, 1] (clamping keeps 10-step samples from diverging)")
    p.add_argument("--raw_eps", action="store_true",
                   help="DDIM: keep the network's eps after clamping x_0 (DiffuseVAE's official code) instead of the "
                        "eps of the clamped x_0")
    p.add_argument("--t_start", default=None,
                   help="code timestep the refiner starts at, from sqrt(alpha-bar) x_hat_0 + sqrt(1 - alpha-bar) eps "
                        "(0..T-1), or 'full' for the whole chain from noise (default: the checkpoint's t_start)")
    p.add_argument("--n", type=int, default=16, help="how many samples (rows of 8 in the grid for --mode sample)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior", default="expost", choices=["expost", "normal"],
                   help="z from the ex-post Gaussian mixture stage 1 fitted (vae.py; the default when the checkpoint "
                        "has one), or from N(0, I)")
    p.add_argument("--temperature", type=float, default=1.0, help="scale of z's spread (N(0, t^2 I), or each "
                                                                  "mixture component's)")
    p.add_argument("--noise_temperature", type=float, default=1.0, help="scale of the DDPM's x_T noise")
    p.add_argument("--attr", type=int, default=None, help="--mode arith: class whose mean z is added")
    p.add_argument("--base", type=int, default=None, help="--mode arith: class whose mean z is subtracted")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance weight w >= 0 on x_hat_0 (a model trained with --cond_drop > 0; "
                        "default: the checkpoint's sample_guidance, else 0): "
                        "eps = (1 + w) eps(x_t, x_hat_0) - w eps(x_t, null)")
    p.add_argument("--repeats", type=int, default=4, help="--mode control: refinements of each z (2..64)")
    p.add_argument("--paths", type=int, default=1, help="--mode interp/arith: how many paths in z (1..256)")
    p.add_argument("--classifier", default="runs/classifier.pt",
                   help="--mode degrade: evaluate.py's classifier (its features give FID)")
    p.add_argument("--judge", default="runs/classifier_judge.pt",
                   help="--mode control: evaluate.py's judge of class agreement (trained with blurred images too)")
    p.add_argument("--data_dir", default=None, help="dataset location for --mode recon/arith/degrade")
    p.add_argument("--out", default=None, help="output path stem (default: next to the checkpoint)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    p.add_argument("--channels_last", default="auto", choices=list(runtime.AUTO_ON_OFF),
                   help="NHWC memory format for the convs (auto: runtime.py's choice for the device, as train.py)")
    args = p.parse_args(argv)
    if args.eta < 0:
        p.error(f"--eta must be >= 0 (0 = deterministic DDIM, 1 = ancestral), got {args.eta}")
    if args.n < 1 or args.batch_size < 1:
        p.error("--n and --batch_size must be at least 1")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not args.guidance >= 0:
        p.error(f"--guidance must be >= 0 (0 = no guidance), got {args.guidance}")
    if not 2 <= args.repeats <= 64:
        p.error(f"--repeats must be between 2 and 64 (refinements per z), got {args.repeats}")
    if not 1 <= args.paths <= 256:
        p.error(f"--paths must be between 1 and 256 (paths in z for --mode interp/arith), got {args.paths}")
    if args.t_start not in (None, "full"):
        try:
            args.t_start = int(args.t_start)
        except ValueError:
            p.error(f"--t_start takes a code timestep 0..T-1 or 'full', got {args.t_start!r}")
        if args.t_start < 0:
            p.error(f"--t_start must be at least 0 (a code timestep 0..T-1) or 'full', got {args.t_start}")
    if args.mode == "arith" and (args.attr is None or args.base is None):
        p.error("--mode arith needs --attr CLASS and --base CLASS (e.g. --attr 5 --base 9: sandal minus ankle boot)")
    return args


def load_models(path, device, channels_last=None):
    """Rebuild the EMA denoiser, the VAE (if any) and the diffusion process from a stage-2 checkpoint, in the
    memory format runtime.choose picks for the device (channels_last None) or the one given."""
    ck = load(path, stage="ddpm", hint="Train one with: python train.py --stage vae && python train.py --stage ddpm")
    cfg = ck["config"]
    net = UNet(**ck["model_args"])
    try:
        net.load_state_dict(ck["ema"])
        vae = None
        if "vae" in ck:
            vae = VAE(**ck["vae"]["model_args"])
            vae.load_state_dict(ck["vae"]["ema"])
            vae.prior = ck["vae"].get("prior")  # checkpoints from before the ex-post prior have none
            vae.to(device).eval()
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: its weights do not fit its model_args ({str(e)[:200]}); the file is damaged")
    diffusion = ddpm.make_diffusion(cfg["schedule"], cfg["T"]).to(device)
    if runtime.choose(device.type, channels_last=channels_last).channels_last:  # NHWC convs: bench.py "sample"
        net, vae = (m.to(memory_format=torch.channels_last) if m is not None else None for m in (net, vae))
    return net.to(device).eval(), vae, diffusion, cfg


@torch.no_grad()
def generate(net, vae, diffusion, cfg, z=None, x_hat0=None, n=None, args=None, generator=None, x_T_noise=None):
    """x_hat_0 = dec(z) (unless given) and its refinement; returns (x_hat_0 or None, x_0), both in [-1, 1]."""
    device = next(net.parameters()).device
    if x_hat0 is None and vae is not None:
        x_hat0 = vae.decode(z)
    if net.config.get("z_dim") and z is None:  # a z-conditioned refiner handed an image: its encoder mean
        z = vae.encode(x_hat0)[0]
    size = image_size(net, cfg)
    x0 = DV.refine(net, diffusion, x_hat0, form=cfg["form"], steps=args.steps, sampler=args.sampler, eta=args.eta,
                   temperature=args.noise_temperature, shape=(n, net.config["img_ch"], size, size),
                   generator=generator, var_type=args.var_type, x_T_noise=x_T_noise,
                   clip_x0=not args.no_clip, spacing=args.spacing, raw_eps=args.raw_eps,
                   t_start=start_of(args, cfg, x_hat0 is not None, diffusion), param=cfg.get("param", "eps"),
                   guidance=guidance_of(args, cfg, x_hat0), z=z if net.config.get("z_dim") else None,
                   border=cfg.get("border", 0))
    return x_hat0, x0.clamp(-1, 1)


def image_size(net, cfg):
    """The side of the images a checkpoint makes: its network's plus the frame it leaves to the data
    (train.py --border; 0 in checkpoints from before the option)."""
    return net.config["image_size"] + 2 * cfg.get("border", 0)


def guidance_of(args, cfg, x_hat0):
    """The guidance weight w: --guidance, else the checkpoint's sample_guidance (train.py), else 0 (none); 0 for the
    unconditional model, which has no x_hat_0 to guide by."""
    w = (cfg.get("sample_guidance") or 0.0) if args.guidance is None else args.guidance
    return 0.0 if x_hat0 is None else w


def start_of(args, cfg, conditional, diffusion):
    """The refiner's t_start: --t_start, else the checkpoint's (diffusevae.sample_start); None (the full chain from
    noise) for 'full' and for the unconditional model (conditional False: no x_hat_0). Every sampler of a checkpoint gets its start here, so this is
    where a start outside the timesteps the denoiser was trained on (train.py --t_start) is refused."""
    t_start = DV.sample_start(cfg) if args.t_start is None else args.t_start
    trained = cfg["t_start"]
    if conditional and trained != "full" and (t_start in (None, "full") or t_start > trained):
        raise ValueError(f"--t_start {t_start}: this refiner was trained on the code timesteps 0..{trained} only; "
                         f"start it at {trained} or below (or train one with --t_start full)")
    if t_start in (None, "full") or not conditional or t_start >= diffusion.T - 1:
        return None
    return t_start


def reconstruct(vae, x, generator):
    """dec(z), z ~ q(z|x): the VAE's reconstruction of images x as the refiner saw them in training (train.py)."""
    mu, logvar = vae.encode(x)
    return vae.decode(reparameterize(mu, logvar, ddpm.randn_like(mu, generator)))


def class_mean_z(vae, cfg, args, device, label):
    images, labels = load_dataset(cfg["dataset"], args.data_dir, split="train", image_size=vae.config["image_size"])
    if labels is None:
        raise DataError(f"dataset {cfg['dataset']} has no labels, so --mode arith has no classes to average")
    sel = images[labels == label][:2000]
    if len(sel) == 0:
        raise DataError(f"class {label} has no images in {cfg['dataset']} (classes are 0..{int(labels.max())})")
    return vae.encode(to_model_range(sel).to(device))[0].mean(0)


def main(argv=None):
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    try:
        net, vae, diffusion, cfg = load_models(args.ckpt, device, runtime.AUTO_ON_OFF[args.channels_last])
        if args.steps > diffusion.T:
            raise ValueError(f"--steps {args.steps} is more than the T = {diffusion.T} steps the model was trained with")
        if (args.guidance or 0) > 0 and not cfg.get("cond_drop", 0) > 0:
            raise ValueError(f"--guidance needs a model trained with --cond_drop > 0 (it learns eps without x_hat_0 "
                             f"too); {args.ckpt} was trained without")
        if vae is None and args.mode != "sample":
            raise ValueError(f"--mode {args.mode} needs a VAE, but {args.ckpt} is the unconditional baseline")
        out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", f"{args.mode}_{args.sampler}{args.steps}")
        try:
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        except OSError as e:
            raise PermissionError(f"cannot write to {os.path.dirname(out)} ({e.strerror}): choose another --out")
        with torch.inference_mode():  # sampling never needs autograd: no graph, less memory
            rows, arrays = run_mode(args, net, vae, diffusion, cfg, device)
    except (CheckpointError, DataError, ValueError, PermissionError) as e:
        raise SystemExit(f"error: {e}")
    np.savez(f"{out}.npz", **{k: to_unit_range(v).cpu().numpy().astype(np.float32) for k, v in arrays.items()})
    save_grid(torch.cat(rows), f"{out}.png", nrow=8 if args.mode in ("sample", "degrade") else rows[0].shape[0])
    print(f"wrote {out}.png and {out}.npz ({', '.join(f'{k}: {tuple(v.shape)}' for k, v in arrays.items())})")


def run_mode(args, net, vae, diffusion, cfg, device):
    """Returns (grid rows, arrays to save) for the chosen mode."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    size, img_ch = image_size(net, cfg), net.config["img_ch"]
    z_dim = vae.z_dim if vae is not None else 0
    prior = vae.prior if vae is not None and args.prior == "expost" else None

    def draw_z(n):
        return sample_prior(n, z_dim, prior, args.temperature, g, device)
    if args.mode == "sample":
        vae_out, refined = [], []
        for start in range(0, args.n, args.batch_size):
            b = min(args.batch_size, args.n - start)
            z = draw_z(b) if vae is not None else None
            x_hat0, x0 = generate(net, vae, diffusion, cfg, z=z, n=b, args=args, generator=g)
            refined.append(x0)
            vae_out.append(x_hat0 if x_hat0 is not None else x0)
        x0, x_hat0 = torch.cat(refined), torch.cat(vae_out)
        if vae is None:
            return [x0[:64]], {"x0": x0}
        # interleave rows of 8: VAE samples, then their refinements
        k = min(args.n, 64)
        pairs = [t for i in range(0, k, 8) for t in (x_hat0[i:i + 8], x0[i:i + 8])]
        return pairs, {"vae": x_hat0, "x0": x0}
    if args.mode == "recon":
        images, _ = load_dataset(cfg["dataset"], args.data_dir, split="test", image_size=size)
        x = to_model_range(images[: args.n]).to(device)
        x_hat0 = reconstruct(vae, x, g)
        _, x0 = generate(net, vae, diffusion, cfg, x_hat0=x_hat0, n=len(x), args=args, generator=g)
        return [x, x_hat0, x0], {"data": x, "vae": x_hat0, "x0": x0}
    if args.mode == "interp":  # --paths straight paths z0 -> z1 of --n points, the DDPM noise fixed along each
        w = torch.linspace(0, 1, args.n, device=device).unsqueeze(1)
        paths = [(1 - w) * z0 + w * z1 for z0, z1 in ((draw_z(1), draw_z(1)) for _ in range(args.paths))]
        x_hat0, x0 = along_paths(args, net, vae, diffusion, cfg, paths, g)
        report_path_classes(args, x_hat0, x0, device)
        return [r for p in range(args.paths) for r in (x_hat0[p], x0[p])], {"vae": x_hat0, "x0": x0}
    if args.mode == "control":
        return control(args, net, vae, diffusion, cfg, device, draw_z, g)
    if args.mode == "degrade":
        return degrade_table(args, net, vae, diffusion, cfg, device, g)
    # arith: z + s (mean z of class attr - mean z of class base), s = 0 .. 1.5, with the DDPM noise held fixed
    direction = class_mean_z(vae, cfg, args, device, args.attr) - class_mean_z(vae, cfg, args, device, args.base)
    s = torch.linspace(0, 1.5, args.n, device=device).unsqueeze(1)
    x_hat0, x0 = along_paths(args, net, vae, diffusion, cfg, [draw_z(1) + s * direction for _ in range(args.paths)], g)
    report_path_classes(args, x_hat0, x0, device, attr=args.attr)
    return [r for p in range(args.paths) for r in (x_hat0[p], x0[p])], {"vae": x_hat0, "x0": x0}


def along_paths(args, net, vae, diffusion, cfg, paths, g):
    """x_hat_0 and its refinement at every point of each path in z, (P, n, C, H, W) each; one DDPM noise per
    path, shared by its points, so that what changes along a path is z alone."""
    size, img_ch = image_size(net, cfg), net.config["img_ch"]
    out = []
    for z in paths:
        noise = torch.randn(1, img_ch, size, size, generator=g, device=z.device).expand(len(z), -1, -1, -1)
        out.append(generate(net, vae, diffusion, cfg, z=z, n=len(z), args=args, generator=g, x_T_noise=noise))
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def report_path_classes(args, x_hat0, x0, device, attr=None):
    """Does the refined sample follow the z edit? The judge's class of x_hat_0 and of its refinement at every point
    of every path (path_agreement), printed with the first paths' classes."""
    if not os.path.exists(args.judge):
        print(f"(no judge at {args.judge}, so no class measurement: python evaluate.py --train_classifier makes it)")
        return
    import evaluate as E
    judge = classifier_of(args.judge, "--judge", device)
    P, n = x_hat0.shape[:2]
    c_vae, c_ref = (E.predict(judge, x.flatten(0, 1)).view(P, n).cpu() for x in (x_hat0, x0))
    for p in range(min(P, 4)):
        for name, c in (("x_hat_0", c_vae[p]), ("refined", c_ref[p])):
            print(f"path {p} {name}: " + " ".join(FASHION_CLASSES[k][:7] for k in c.tolist()))
    r = path_agreement(c_vae, c_ref, attr)
    line = (f"{P} paths x {n} points: the refinement has its x_hat_0's class at {r['points']:.1%} of the points, "
            f"at the last point of a path {r['last']:.1%}")
    if attr is not None:
        line += (f"; in class {attr} ({FASHION_CLASSES[attr]}) at the first point: x_hat_0 {r['attr_first_vae']:.1%}, "
                 f"refined {r['attr_first_ref']:.1%}; at the last: x_hat_0 {r['attr_last_vae']:.1%}, "
                 f"refined {r['attr_last_ref']:.1%}")
    print(line)


def path_agreement(c_vae, c_ref, attr=None):
    """Fractions from the (P, n) classes of x_hat_0 and of its refinement along P paths: points where the two agree,
    last points where they agree, and (latent arithmetic) first and last points in the class `attr`."""
    frac = lambda b: b.double().mean().item()
    r = {"points": frac(c_vae == c_ref), "last": frac(c_vae[:, -1] == c_ref[:, -1])}
    if attr is not None:
        r.update(attr_first_vae=frac(c_vae[:, 0] == attr), attr_first_ref=frac(c_ref[:, 0] == attr),
                 attr_last_vae=frac(c_vae[:, -1] == attr), attr_last_ref=frac(c_ref[:, -1] == attr))
    return r


def classifier_of(path, flag, device):
    """evaluate.py's classifier (or judge) at `path`, or a clear error saying how to make it."""
    import evaluate as E
    if not os.path.exists(path):
        raise ValueError(f"no classifier at {path}: train it with python evaluate.py --train_classifier "
                         f"(or pass {flag} PATH)")
    return E.load_classifier(path, device)[0]


def control(args, net, vae, diffusion, cfg, device, draw_z, g):
    """Does z decide the refined sample? For K = --n latents and R = --repeats refinements of each (fresh DDPM noise):
    the fraction of refinements the classifier puts in x_hat_0's class, and the RMS pixel distance between two
    refinements of one z against two refinements of different z's. Grid: one row per z, x_hat_0 then its R."""
    import evaluate as E
    judge = classifier_of(args.judge, "--judge", device)
    K, R = args.n, args.repeats
    z = draw_z(K)
    x_hat0 = vae.decode(z)
    x0 = torch.stack([generate(net, vae, diffusion, cfg, x_hat0=x_hat0, n=K, args=args, generator=g)[1]
                      for _ in range(R)], 1)                                       # (K, R, C, H, W)
    same = (E.predict(judge, x_hat0)[:, None] == E.predict(judge, x0.flatten(0, 1)).view(K, R)).double()
    per_z = same.mean(1)                                          # (K,): the R refinements of one z are not independent
    agree, se = per_z.mean().item(), per_z.std().item() / K ** 0.5  # so the standard error is over the K latents
    flat = x0.flatten(2)                                                            # (K, R, D)
    rms = torch.cdist(flat.transpose(0, 1), flat.transpose(0, 1)) / flat.shape[-1] ** 0.5  # (R, K, K): same r
    within = torch.stack([(flat[:, i] - flat[:, j]).pow(2).mean(-1).sqrt() for i in range(R) for j in range(i)])
    across = rms[:, ~torch.eye(K, dtype=torch.bool, device=rms.device)]
    print(f"control through z: K = {K} latents x R = {R} refinements; the judge keeps x_hat_0's class in "
          f"{agree:.1%} ± {se:.1%} (chance ~10%); RMS pixel distance within one z {within.mean():.3f}, "
          f"across z's {across.mean():.3f}")
    rows = [torch.cat([x_hat0[k:k + 1], x0[k]]) for k in range(min(K, 8))]
    return rows, {"vae": x_hat0, "x0": x0}


def degrade_table(args, net, vae, diffusion, cfg, device, g):
    """The refiner handed test images degraded in ways it never saw (degrade.py), and the VAE's own reconstructions
    for reference: FID and PSNR of each input and of its refinement against the clean test images. Prints a table;
    grid: clean, then degraded and refined rows for each kind (8 images)."""
    import degrade as D
    import evaluate as E
    classifier = classifier_of(args.classifier, "--classifier", device)
    images, _ = load_dataset(cfg["dataset"], args.data_dir, split="test", image_size=image_size(net, cfg))
    x = to_model_range(images[: args.n]).to(device)
    ref = E.extract_features(classifier, to_model_range(images).to(device))
    inputs = {"vae recon": reconstruct(vae, x, g)}
    inputs.update({name: f(x, generator=g) for name, f in D.DEGRADATIONS.items()})
    lines = [f"| input (N = {len(x)}) | FID in | FID refined | PSNR in (dB) | PSNR refined (dB) |", "|---|---|---|---|---|"]
    rows, arrays = [x[:8]], {"data": x}
    for name, x_in in inputs.items():
        x0 = generate(net, vae, diffusion, cfg, x_hat0=x_in, n=len(x), args=args, generator=g)[1]
        fid_in, fid_out = (E.fid_from_features(E.extract_features(classifier, a), ref) for a in (x_in, x0))
        lines.append(f"| {D.LABELS.get(name, name)} | {fid_in:.1f} | {fid_out:.1f} | {D.psnr(x_in, x).mean():.2f} | "
                     f"{D.psnr(x0, x).mean():.2f} |")
        rows += [x_in[:8], x0[:8]]
        arrays[name.replace(" ", "_") + "_in"], arrays[name.replace(" ", "_") + "_refined"] = x_in, x0
    print("\n".join(lines))
    return rows, arrays


if __name__ == "__main__":
    main()
