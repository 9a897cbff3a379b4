"""The speed/quality sweep: FID (own-classifier features, evaluate.py) against the number of sampling steps.

    python sweep.py --models form2=runs/fashion/ddpm.pt form1=runs/form1/ddpm.pt uncond=runs/uncond/ddpm.pt \
                    --steps 10 25 100 --samplers ddim ddpm --n 1000

For each model, sampler and step count it draws N samples (the same z and seeds for every model), scores them
against the Fashion-MNIST test set, and adds a row to OUT/results.json (kept between runs: finished cells are
not recomputed). z comes from the VAE's ex-post prior (--prior normal: N(0, I)). The VAE alone (x_hat_0 of the first
model with a VAE, and its decodings of z ~ N(0, I) for comparison) and real training images (the floor) are
scored once. Then it writes OUT/table.md and OUT/fid_vs_steps.png. These FIDs are NOT comparable to published
Inception FIDs (see evaluate.py).
"""
import argparse
import json
import os
import time

import torch

import evaluate as E
from ddpm import SPACINGS
from sample import generate, load_models, parse_args as sample_options
from vae import sample_prior


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="NAME=PATH of stage-2 checkpoints")
    p.add_argument("--steps", nargs="+", type=int, default=[10, 25, 100, 1000])
    p.add_argument("--samplers", nargs="+", default=["ddim", "ddpm"], choices=["ddim", "ddpm"])
    p.add_argument("--spacing", default="uniform", choices=SPACINGS, help="the steps' timesteps (sample.py)")
    p.add_argument("--prior", default="expost", choices=["expost", "normal"], help="where z comes from (sample.py)")
    p.add_argument("--n", type=int, default=1000, help="samples per cell")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--classifier", default="runs/classifier.pt")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args(argv)
    models = {}
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--models takes NAME=PATH pairs, got {item!r}")
        models[name] = path
    args.models = models
    return args


@torch.no_grad()
def draw(net, vae, diffusion, cfg, n, batch_size, steps, sampler, prior="expost", spacing="uniform"):
    """n samples with fixed seeds per batch, so every model sees the same z and the same x_T noise."""
    opts = sample_options(["--steps", str(steps), "--sampler", sampler, "--spacing", spacing])  # the rest: sample.py's
    p_z = vae.prior if vae is not None and prior == "expost" else None
    outs, vae_outs = [], []
    for i, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        g = torch.Generator().manual_seed(1000 + i)
        z = sample_prior(b, vae.z_dim, p_z, generator=g) if vae is not None else None
        x_hat0, x0 = generate(net, vae, diffusion, cfg, z=z, n=b, args=opts, generator=g)
        outs.append(x0)
        vae_outs.append(x_hat0)
    return torch.cat(outs), (torch.cat(vae_outs) if vae is not None else None)


def score(classifier, x, ref):
    feats = E.extract_features(classifier, x)
    fid = E.fid_from_features(feats, ref)
    kid_mean, kid_std = E.kid(feats, ref, subset_size=min(1000, len(feats)))
    return dict(fid=fid, kid=kid_mean, kid_std=kid_std)


def main(argv=None):
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else []
    done = {(r["model"], r["sampler"], r["steps"], r["n"], spacing_of(r)) for r in results}

    def record(row):
        results.append(row)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)  # a crash never loses finished cells
        print(json.dumps(row), flush=True)

    classifier, acc = E.load_or_train_classifier(args.classifier, args.data_dir)
    ref = E.extract_features(classifier, E._load_real("test", args.data_dir)[0])
    if ("data", "-", 0, args.n, "-") not in done:
        real = E._load_real("train", args.data_dir)[0][: args.n]
        record(dict(model="data", sampler="-", steps=0, n=args.n, spacing="-", seconds=0.0,
                    **score(classifier, real, ref)))
    for name, ckpt in args.models.items():
        net, vae, diffusion, cfg = load_models(ckpt, torch.device("cpu"))
        for sampler in args.samplers:
            for steps in args.steps:
                if (name, sampler, steps, args.n, args.spacing) in done:
                    continue
                t0 = time.time()
                x0, x_hat0 = draw(net, vae, diffusion, cfg, args.n, args.batch_size, steps, sampler, args.prior,
                                  args.spacing)
                record(dict(model=name, sampler=sampler, steps=steps, n=args.n, spacing=args.spacing,
                            seconds=round(time.time() - t0, 1), **score(classifier, x0, ref)))
                if vae is not None and ("vae", "-", 0, args.n, "-") not in done:
                    record(dict(model="vae", sampler="-", steps=0, n=args.n, spacing="-", seconds=0.0,
                                **score(classifier, x_hat0, ref)))
                    done.add(("vae", "-", 0, args.n, "-"))
                if vae is not None and vae.prior is not None and ("vae_normal", "-", 0, args.n, "-") not in done:
                    x_hat0 = torch.cat([vae.decode(z) for z in torch.randn(args.n, vae.z_dim,  # the prior it replaces
                                        generator=torch.Generator().manual_seed(1000)).split(args.batch_size)])
                    record(dict(model="vae_normal", sampler="-", steps=0, n=args.n, spacing="-", seconds=0.0,
                                **score(classifier, x_hat0, ref)))
                    done.add(("vae_normal", "-", 0, args.n, "-"))
    write_table_and_plot(results, args, acc)


def spacing_of(row):
    """A row's timestep spacing: "-" for the rows that sample no chain; rows written before --spacing were uniform."""
    return row.get("spacing", "-" if row["model"] in FIXED_ROWS else "uniform")


FIXED_ROWS = {"vae": ("VAE alone", "--"), "vae_normal": ("VAE alone, z ~ N(0, I)", "-."),
              "data": ("data alone (floor)", ":")}


def write_table_and_plot(results, args, acc):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results if r["n"] == args.n and spacing_of(r) in (args.spacing, "-")]
    fixed = {r["model"]: r for r in rows if r["model"] in FIXED_ROWS}
    lines = [f"FID / KID in the feature space of our own Fashion-MNIST classifier (test accuracy {acc:.2%}), "
             f"{args.n} samples vs the 10,000 test images, {args.spacing} timestep spacing. "
             f"NOT comparable to published Inception FIDs.", "",
             "| model | sampler | " + " | ".join(f"{s} steps" for s in args.steps) + " |",
             "|---|---|" + "---|" * len(args.steps)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in args.models:
        for sampler in args.samplers:
            cells = {r["steps"]: r for r in rows if r["model"] == name and r["sampler"] == sampler}
            lines.append(f"| {name} | {sampler} | " + " | ".join(
                f"{cells[s]['fid']:.1f} ({cells[s]['seconds']:.0f} s)" if s in cells else "-" for s in args.steps) + " |")
            pts = sorted((s, cells[s]["fid"]) for s in args.steps if s in cells)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{name} {sampler}")
    for name, (label, style) in FIXED_ROWS.items():
        if name in fixed:
            lines.append(f"| {label} | - | " + " | ".join(f"{fixed[name]['fid']:.1f}" for _ in args.steps) + " |")
            ax.axhline(fixed[name]["fid"], linestyle=style, color="gray", label=label)
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("sampling steps"), ax.set_ylabel("FID (own features)")
    ax.legend(fontsize=7), ax.set_title(f"FID vs steps, N = {args.n}, {args.spacing} spacing")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fid_vs_steps.png"), dpi=110)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
