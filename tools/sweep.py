"""The speed/quality sweep: FID (own-classifier features, tools/evaluate.py) against the number of
sampling steps.

    python -m tools.sweep --models form2=runs/fashion/ddpm.pt form1=runs/form1/ddpm.pt \
                                   uncond=runs/uncond/ddpm.pt \
                          --steps 10 25 100 --samplers ddim ddpm --n 1000
    python -m tools.sweep --models form2=runs/fashion/ddpm.pt --steps 10 --t_start 50 80 default \
                          --seeds 0 1 2 --samplers ddpm --extra var_type=fixedsmall --split val

For each model, sampler, step count, t_start and seed it draws N samples (the same z and seeds for
every model), scores them against a held-out Fashion-MNIST split (--split val to choose a default,
test to report it) in two feature spaces, tools/evaluate.py's features and its independently trained
judge (FID, KID; and the judge's agreement between x_hat_0 and its refinement), and adds a row to
OUT/results.json (kept between runs: a cell measured with the same models, flags, prior, split and
classifiers is not recomputed). The table gives the mean ± sd over the seeds. --extra KEY=VALUE ...
passes further keyword options of the refiner (DiffuseVAE.sample, then ddpm.sample; e.g. eta=0.5,
var_type=fixedsmall, raw_eps=True) to every cell; the other options are sample.py's defaults. An
option of one sampler only (var_type: ddpm's; raw_eps: ddim's) goes to that sampler's cells. z comes
from the VAE's ex-post prior (--prior normal: N(0, I)). The VAE alone (x_hat_0 of the first model
with a VAE, and its decodings of z ~ N(0, I) for comparison) and real held-out images of the other
split (the floor) are scored once. Every image set is scored clamped to [-1, 1]
(evaluate.extract_features), as sample.py saves it. Then it writes OUT/table.md and
OUT/fid_vs_steps.png. These FIDs are NOT comparable to published Inception FIDs (see
tools/evaluate.py). """

import argparse
import ast
import fcntl
import hashlib
import itertools
import json
import os
import time

import torch

import ddpm
import diffusevae
import sample
from tools import evaluate as E

# The keyword options of DiffuseVAE.refine and ddpm.sample that --extra may set: not the ones a
# sweep sets per cell (steps, sampler, spacing, t_start) nor those the model supplies (the chain,
# its start state and the generator). Each key of ONE_SAMPLER is an option of that sampler's loop
# only, passed to that sampler's cells only.
SWEPT = ("steps", "sampler", "spacing", "t_start")
ONE_SAMPLER = dict(var_type="ddpm", raw_eps="ddim")
EXTRA_KEYS = ("eta", "var_type", "clip_x0", "raw_eps", "shared_noise", "guidance")
DEFAULTS = dict(
    eta=sample.parse_args([]).eta
)  # sample.py's DDIM eta: a cell samples as sample.py does


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m tools.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", required=True, help="NAME=PATH of stage-2 checkpoints")
    p.add_argument("--steps", nargs="+", type=int, default=[10, 25, 100, 1000])
    p.add_argument("--samplers", nargs="+", default=["ddim", "ddpm"], choices=["ddim", "ddpm"])
    p.add_argument(
        "--spacing", default="uniform", choices=ddpm.SPACINGS, help="the steps' timesteps (ddpm.py)"
    )
    p.add_argument(
        "--prior",
        default="expost",
        choices=["expost", "normal"],
        help="where z comes from (sample.py)",
    )
    p.add_argument(
        "--t_start",
        nargs="+",
        default=["default"],
        help="refiner start code timesteps (sample.py --t_start; 'default' = the checkpoint's, "
        "T - 1 = 999 the whole chain from noise)",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="sampling seeds: the table shows mean ± sd",
    )
    p.add_argument(
        "--extra",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="more sampler options for every cell, each a Python literal else a string, "
        f"e.g. eta=0.5 raw_eps=True; keys: {', '.join(EXTRA_KEYS)}",
    )
    p.add_argument("--n", type=int, default=1000, help="samples per cell")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--classifier", default=E.FEATURES, help="FID/KID features (tools/evaluate.py)")
    p.add_argument(
        "--judge", default=E.JUDGE, help="the classifier of class agreement (tools/evaluate.py)"
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["val", "test"],
        help="the reference images: val to choose a default, test to report one (data.py)",
    )
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
    for t in args.t_start:
        if t != "default" and not t.isdigit():
            p.error(f"--t_start takes code timesteps (999: from noise) or 'default', got {t!r}")
    try:
        args.extra_options = parse_extra(args.extra)
    except ValueError as e:
        p.error(str(e))
    args.extra = " ".join(
        f"{k}={v}" for k, v in sorted(args.extra_options.items())
    )  # in the cache key: one spelling
    return args


def parse_extra(pairs):
    """{KEY: value} of --extra's KEY=VALUE pairs: each value a Python literal (ast.literal_eval),
    else the string."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in EXTRA_KEYS:
            raise ValueError(
                f"--extra takes KEY=VALUE with KEY one of {', '.join(EXTRA_KEYS)}, got {pair!r}"
                + (
                    " (the sweep's own flags set steps, sampler(s), spacing and t_start)"
                    if key in SWEPT
                    else ""
                )
            )
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


def start_arg(t_start):
    """A --t_start word as DiffuseVAE.refine takes it: None for 'default' (the checkpoint's), else
    the int."""
    return None if t_start == "default" else int(t_start)


@torch.no_grad()
def draw(
    model,
    n,
    batch_size,
    steps,
    sampler,
    prior="expost",
    spacing="uniform",
    t_start="default",
    seed=0,
    extra=None,
):
    """n samples of the DiffuseVAE model, (x_0, x_hat_0 or None): each batch from
    diffusevae.generators of (seed, batch), so every model sees the same z and the same starting
    noise. `extra` ({KEY: value}, parse_extra) adds options or overrides DEFAULTS (an option of
    ONE_SAMPLER only where that sampler runs); the options given nowhere are those of
    DiffuseVAE.refine and ddpm.sample."""
    options = dict(
        DEFAULTS,
        **(extra or {}),
        steps=steps,
        sampler=sampler,
        spacing=spacing,
        t_start=start_arg(t_start),
    )
    options = {k: v for k, v in options.items() if ONE_SAMPLER.get(k, sampler) == sampler}
    outs, vae_outs = [], []
    for i, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        generators = diffusevae.generators(1000 + 7919 * seed + i)
        x_hat0, x0 = model.sample(b, generators, prior, **options)
        outs.append(x0)
        vae_outs.append(x_hat0)
    return torch.cat(outs), (torch.cat(vae_outs) if model.vae is not None else None)


def score(spaces, x, x_hat0=None, judge=None):
    """FID and KID of images x in each feature space {suffix: (classifier, reference features)}
    (suffix "" for tools/evaluate.py's features, "_judge" for the judge's), and, given x_hat_0 and
    the judge, the fraction of refinements the judge puts in x_hat_0's class."""
    row = {}
    for suffix, (classifier, ref) in spaces.items():
        feats = E.extract_features(classifier, x)
        kid_mean, kid_std = E.kid(feats, ref, subset_size=min(1000, len(feats)))
        row.update(
            {
                f"fid{suffix}": E.fid_from_features(feats, ref),
                f"kid{suffix}": kid_mean,
                f"kid_std{suffix}": kid_std,
            }
        )
    if x_hat0 is not None:
        row["agree"] = E.class_agreement(judge, x_hat0, x)[0]
    return row


def file_hash(path):
    """The first 16 hex digits of a file's SHA-1: a cell is tied to the exact checkpoint and
    classifiers it used."""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


def key_of(row):
    """What a row measured: finished cells with the same key are not recomputed."""
    return tuple(
        str(row.get(k, ""))
        for k in (
            "model",
            "ckpt",
            "sampler",
            "steps",
            "n",
            "batch_size",
            "spacing",
            "t_start",
            "extra",
            "seed",
            "prior",
            "split",
            "classifiers",
        )
    )


def read_results(path):
    """The rows of a results.json, [] if there is none yet."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def check_starts(models, t_starts):
    """Every model can be started at every --t_start: the refusal of DiffuseVAE.start, before
    anything is sampled (asked of a one-number stand-in for x_hat_0 and the noise)."""
    for name, ckpt in models.items():
        model = sample.load_model(ckpt, torch.device("cpu"))
        probe = torch.zeros(1)
        for t in t_starts:
            t_start = model.t_start if start_arg(t) is None else start_arg(t)
            try:
                model.start(None if model.vae is None else probe, t_start, probe)
            except ValueError as e:
                raise SystemExit(f"error: --models {name}={ckpt}: {e}")


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    check_starts(args.models, args.t_start)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = read_results(path)
    done = {key_of(r) for r in results}

    def record(row):
        with open(
            path + ".lock", "w"
        ) as lock:  # sweeps sharing --out add their rows in turn, none overwritten
            fcntl.flock(lock, fcntl.LOCK_EX)
            results[:] = read_results(path) + [row]
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)  # a crash never loses finished cells
        done.add(key_of(row))
        print(json.dumps(row), flush=True)

    classifier, acc = E.load_or_train_classifier(args.classifier, args.data_dir, role=E.FEATURES)
    judge = E.load_or_train_classifier(args.judge, args.data_dir, role=E.JUDGE)[0]
    real = E._load_real(args.split, args.data_dir)[0]
    spaces = {
        "": (classifier, E.extract_features(classifier, real)),
        "_judge": (judge, E.extract_features(judge, real)),
    }
    common = dict(
        n=args.n,
        batch_size=args.batch_size,
        prior=args.prior,
        split=args.split,
        classifiers=f"{file_hash(args.classifier)}/{file_hash(args.judge)}",
    )

    def fixed(name, seed, ckpt=""):
        return dict(common, model=name, ckpt=ckpt, sampler="-", steps=0, spacing="-", seed=seed)

    if key_of(fixed("data", 0)) not in done:  # the floor: held-out images of the other split
        floor = E._load_real("test" if args.split == "val" else "val", args.data_dir)[0][: args.n]
        record(dict(fixed("data", 0), seconds=0.0, **score(spaces, floor)))
    vae_ckpt = None
    for name, ckpt in args.models.items():
        model = sample.load_model(ckpt, torch.device("cpu"))
        vae = model.vae
        ckpt_hash = file_hash(ckpt)
        vae_ckpt = vae_ckpt or (ckpt_hash if vae is not None else None)
        for sampler, steps, t_start, seed in itertools.product(
            args.samplers, args.steps, args.t_start, args.seeds
        ):
            cell = dict(
                common,
                model=name,
                ckpt=ckpt_hash,
                sampler=sampler,
                steps=steps,
                spacing=args.spacing,
                t_start=t_start,
                extra=args.extra,
                seed=seed,
            )
            if key_of(cell) in done:
                continue
            t0 = time.time()
            x0, x_hat0 = draw(
                model,
                args.n,
                args.batch_size,
                steps,
                sampler,
                args.prior,
                args.spacing,
                t_start,
                seed,
                args.extra_options,
            )
            record(
                dict(cell, seconds=round(time.time() - t0, 1), **score(spaces, x0, x_hat0, judge))
            )
            if vae is not None and key_of(fixed("vae", seed, vae_ckpt)) not in done:
                record(dict(fixed("vae", seed, vae_ckpt), seconds=0.0, **score(spaces, x_hat0)))
            if (
                vae is not None
                and vae.prior is not None
                and key_of(fixed("vae_normal", seed, vae_ckpt)) not in done
            ):
                x_hat0 = torch.cat(
                    [
                        vae.decode(z)
                        for z in torch.randn(
                            args.n,
                            vae.z_dim,  # the prior it replaces
                            generator=torch.Generator().manual_seed(1000 + seed),
                        ).split(args.batch_size)
                    ]
                )
                record(
                    dict(fixed("vae_normal", seed, vae_ckpt), seconds=0.0, **score(spaces, x_hat0))
                )
    write_table_and_plot(results, args, acc, common)


FIXED_ROWS = {
    "vae": ("VAE alone", "--"),
    "vae_normal": ("VAE alone, z ~ N(0, I)", "-."),
    "data": ("held-out data (floor)", ":"),
}


def mean_sd(values):
    """'m' for one value, 'm ± sd' (sample standard deviation over the seeds) for several."""
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.1f}" if len(t) == 1 else f"{t.mean():.1f} ± {t.std():.1f}"


def write_table_and_plot(results, args, acc, common):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = set(args.seeds)
    rows = [
        r
        for r in results
        if all(r.get(k) == v for k, v in common.items())
        and r["spacing"] in (args.spacing, "-")
        and r["seed"] in seeds
        and r.get("extra", "") in (args.extra, "")
    ]
    lines = [
        "FID in two feature spaces: tools/evaluate.py's classifier "
        f"(test accuracy {acc:.2%}) / its independent "
        f"judge, {args.n} samples vs the {args.split} split, {args.spacing} timestep spacing, "
        f"z from the {args.prior} prior, seeds {sorted(seeds)} (mean ± sd), "
        f"extra sampler options: {args.extra or 'none'}. "
        "Each cell: FID / FID (judge) [class agreement x_hat_0 vs refinement, by the judge] "
        "(seconds per seed); "
        "KID in results.json. NOT comparable to published Inception FIDs.",
        "",
        "| model | sampler | t_start | " + " | ".join(f"{s} steps" for s in args.steps) + " |",
        "|---|---|---|" + "---|" * len(args.steps),
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sampler, t_start in itertools.product(args.models, args.samplers, args.t_start):
        cells = {}
        for r in rows:
            if (r["model"], r["sampler"], r.get("t_start"), r.get("extra")) == (
                name,
                sampler,
                t_start,
                args.extra,
            ):
                cells.setdefault(r["steps"], []).append(r)
        if not cells:
            continue

        def cell(rs):
            agree = (
                f" [{100 * sum(r['agree'] for r in rs) / len(rs):.1f}%]" if "agree" in rs[0] else ""
            )
            return (
                f"{mean_sd([r['fid'] for r in rs])} / "
                f"{mean_sd([r['fid_judge'] for r in rs])}{agree} "
                f"({sum(r['seconds'] for r in rs) / len(rs):.0f} s)"
            )

        lines.append(
            f"| {name} | {sampler} | {t_start} | "
            + " | ".join(cell(cells[s]) if s in cells else "-" for s in args.steps)
            + " |"
        )
        pts = sorted(
            (s, sum(r["fid"] for r in cells[s]) / len(cells[s])) for s in args.steps if s in cells
        )
        ax.plot(*zip(*pts), marker="o", label=f"{name} {sampler} t_start={t_start}")
    for name, (label, style) in FIXED_ROWS.items():
        rs = [r for r in rows if r["model"] == name]
        if rs:
            both = f"{mean_sd([r['fid'] for r in rs])} / {mean_sd([r['fid_judge'] for r in rs])}"
            lines.append(f"| {label} | - | - | " + " | ".join(both for _ in args.steps) + " |")
            ax.axhline(
                sum(r["fid"] for r in rs) / len(rs), linestyle=style, color="gray", label=label
            )
    (
        ax.set_xscale("log"),
        ax.set_yscale("log"),
        ax.set_xlabel("sampling steps"),
        ax.set_ylabel("FID (own features)"),
    )
    (
        ax.legend(fontsize=7),
        ax.set_title(f"FID vs steps, N = {args.n}, {args.spacing} spacing, {args.split} split"),
    )
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fid_vs_steps.png"), dpi=110)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
