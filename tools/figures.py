"""The pictures LESSONS.md shows, written to figures/ (generated files; --out_dir assets for the
committed copies), each in under a minute on a CPU. The first four need the data alone, no model.

    python -m tools.figures                      # noising, schedules, forward, start, steps
    # Fashion-MNIST images through q(x_t | x_0) at several code t, linear and cosine schedules
    python -m tools.figures --only noising
    # alpha-bar_t and log SNR_t of the linear and cosine schedules, t_s and the refiner's steps
    python -m tools.figures --only schedules
    # Formulation 1 vs 2 on Fashion-MNIST test images, same noise
    python -m tools.figures --only forward
    # the refiner's start at code t_s beside the full chain's starts
    python -m tools.figures --only start
    # VAE samples x_hat_0 and their refinements after 1..100 DDIM steps (needs a trained model)
    python -m tools.figures --only steps
    # the same for another stage-2 checkpoint
    python -m tools.figures --only steps --ckpt runs/form1/ddpm.pt
    # ... without clamping x_0-hat to [-1, 1] (LESSONS Exercise 5)
    python -m tools.figures --only steps --no_clip
    # FID and class kept against w
    python -m tools.figures --only guidance --results runs/cfg_sweep/results.json
    # the README's picture: 16 VAE samples over their refinements, x4
    python -m tools.figures --only samples

Where the data-only figures need an x_hat_0 they use a stand-in, x_0 averaged over 4x4 blocks and
upsampled (about as blurry as the quick start's VAE), and say so in their title. The training-loss
curves train.py writes next to its checkpoints (vae_loss.png, ddpm_loss.png) are drawn by
data.save_loss_curve.

Timesteps are code indices t = 0..T-1 (the paper's 1..T), as everywhere in the code. Images are in
[-1, 1] and shown through data.to_unit_range (clamped to [0, 1])."""

import argparse
import os
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import ddpm
import diffusevae
import runtime
import sample
import train
from data import load_dataset, save_grid, to_model_range, to_unit_range
from vae import sample_prior

matplotlib.use("Agg")  # files only, no display
OUT = "figures"
STEP_COUNTS = [1, 2, 5, 10, 25, 100]
T_S = train.CPU["t_start"]  # the default refiner's start (code t)
# the figures made from the data alone, without a checkpoint, and their files
DATA_ONLY = dict(
    noising="noising.png",
    schedules="schedules.png",
    forward="forward_form1_vs_form2.png",
    start="start.png",
)


def show(ax, x, title=None):
    """One (1, C, H, W) image in [-1, 1] on an axis, no ticks."""
    img = to_unit_range(x[0]).permute(1, 2, 0).squeeze(-1).cpu().numpy()
    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def schedules():
    """DDPM eq. 4's alpha-bar_t and the signal-to-noise ratio alpha-bar_t / (1 - alpha-bar_t) (Luo
    2022, arXiv:2208.11970, "Learning Diffusion Noise Parameters"), with the default refiner's start
    t_s and the timesteps its 10 DDIM steps visit."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    full, refiner = ddpm.ddim_timesteps(1000, 10), ddpm.ddim_timesteps(1000, 10, t_start=T_S)
    for name in ("linear", "cosine"):
        ab = ddpm.make_diffusion(name, 1000).alphas_cumprod
        log_snr = torch.log(ab / (1 - ab))
        a1.plot(torch.arange(len(ab)), ab, label=f"{name} (alpha-bar at t_s: {ab[T_S]:.3f})")
        color = a1.lines[-1].get_color()
        a2.plot(torch.arange(len(ab)), log_snr, label=name, color=color)
        a2.plot(full, log_snr[full], "o", mfc="none", ms=5, color=color)
        a2.plot(refiner, log_snr[refiner], "o", ms=3, color=color)
    for ax in (a1, a2):
        ax.axvline(T_S, color="gray", ls="--", lw=1)
        ax.set_xlabel("code t (paper t - 1)")
    a1.text(T_S + 15, 0.5, f"t_s = {T_S}: the refiner's start", fontsize=9)
    a1.set(ylabel="alpha-bar_t", title="alpha-bar_t: the share of x_0's variance kept")
    a2.set(
        ylabel="log SNR_t = log(alpha-bar_t / (1 - alpha-bar_t))",
        title="log SNR_t (dots: 10 DDIM steps from t_s; circles: from T - 1)",
    )
    a1.legend(fontsize=9), a2.legend(fontsize=9), a2.axhline(0, color="gray", lw=0.5)
    save(fig, DATA_ONLY["schedules"])


def examples(data_dir=None, k=3):
    """k Fashion-MNIST test images in [-1, 1], of different classes where the labels allow."""
    images, labels = load_dataset("fashion_mnist", data_dir, split="test")
    picks = [int((labels == c).nonzero()[0]) for c in (0, 7, 3, 8, 2) if (labels == c).any()]
    picks = (picks + [i for i in range(len(images)) if i not in picks])[:k]
    return to_model_range(images[picks])


def stand_in(x0):
    """A stand-in for the VAE's x_hat_0: x_0 averaged over 4x4 blocks, upsampled bilinearly."""
    return F.interpolate(F.avg_pool2d(x0, 4), scale_factor=4, mode="bilinear", align_corners=False)


def fixed_noise(x):
    """One N(0, I) draw of x's shape, the same on every run (seed 0)."""
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


def grid(rows, row_labels, col_labels, title, name):
    """A figure of images: rows[r][c] a (1, C, H, W) tensor, large enough to see a garment."""
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(1.6 * len(rows[0]), 1.7 * len(rows)))
    for r, row in enumerate(rows):
        for c, x in enumerate(row):
            show(axes[r, c], x, col_labels[c] if r == 0 else None)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=9)
    fig.suptitle(title, fontsize=9)
    save(fig, name)


def noising(data_dir=None):
    """Test images through q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I) (DDPM eq.
    4) at several code t, under the linear and the cosine schedule, with one fixed noise."""
    x0 = examples(data_dir, 2)
    ts = [0, 50, T_S, 250, 500, 750, 999]
    noise = fixed_noise(x0)
    rows, labels = [], []
    for name in ("linear", "cosine"):
        diffusion = ddpm.make_diffusion(name, 1000)
        for i in range(len(x0)):
            x = [x0[i : i + 1]]
            for t in ts:
                x.append(diffusion.q_sample(x0[i : i + 1], torch.tensor([t]), noise[i : i + 1]))
            rows.append(x), labels.append(name)
    cols = ["x_0"] + [f"t = {t}" for t in ts]
    title = "x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps at code t, one eps per image"
    grid(rows, labels, cols, title, DATA_ONLY["noising"])


def forward(data_dir=None):
    """Formulation 1 (q_sample) and 2 (form2_q_sample) with the same noise, and the y-chain identity
    between them."""
    x0 = examples(data_dir, 1)
    x_hat0 = stand_in(x0)
    diffusion, noise = ddpm.make_diffusion("linear", 1000), fixed_noise(x0)
    ts = [0, T_S, 250, 500, 750, 999]  # code indices (paper t - 1)
    rows, gap = [[x0], [x_hat0], [x0]], 0.0
    for i in ts:
        t = torch.tensor([i])
        x1 = diffusion.q_sample(x0, t, noise)  # form 1: sqrt(ab) x_0 + sqrt(1-ab) eps
        x2 = diffusevae.form2_q_sample(diffusion, x0, t, x_hat0, noise)  # the same + x_hat_0
        gap = max(gap, (x2 - x_hat0 - x1).abs().max().item())
        rows[0].append(x1), rows[1].append(x2), rows[2].append(x2 - x_hat0)
    labels = ["form 1: x_t", "form 2: x_t", "form 2: x_t - x_hat_0"]
    title = (
        "x_hat_0 a stand-in (x_0 blurred); code t, one fixed noise. Row 3 = row 1 "
        f"(max |difference| {gap:.1e}):\n"
        "form 2 is a DDPM chain on y_t = x_t - x_hat_0, and x_T ~ N(x_hat_0, I)"
    )
    grid(
        rows,
        labels,
        ["x_0 / x_hat_0 / y_0"] + [f"t = {t}" for t in ts],
        title,
        DATA_ONLY["forward"],
    )


def start(data_dir=None):
    """Where sampling starts: the refiner at code t_s from q(x_{t_s} | x_0 = x_hat_0) =
    N(sqrt(alpha-bar) x_hat_0, (1 - alpha-bar) I), beside the full chain's x_T ~ N(0, I) (form 1)
    and x_T ~ N(x_hat_0, I) (form 2), one fixed noise."""
    x0 = examples(data_dir, 3)
    x_hat0, diffusion = stand_in(x0), ddpm.make_diffusion("linear", 1000)
    noise = fixed_noise(x0)
    t = torch.full((len(x0),), T_S)
    at_ts = diffusion.q_sample(x_hat0, t, noise)
    columns = [x0, x_hat0, at_ts, noise, x_hat0 + noise]
    rows = [[x[i : i + 1] for x in columns] for i in range(len(x0))]
    cols = ["x_0", "x_hat_0 (stand-in)", f"start at t_s = {T_S}", "x_T, form 1", "x_T, form 2"]
    title = (
        f"the refiner starts at code t {T_S} from sqrt(alpha-bar) x_hat_0 + "
        f"sqrt(1 - alpha-bar) eps (alpha-bar = {diffusion.alphas_cumprod[T_S]:.3f});\n"
        "the full chain from x_T"
    )
    grid(rows, [""] * len(rows), cols, title, DATA_ONLY["start"])


def step_counts(cfg):
    """The STEP_COUNTS a checkpoint's refiner can take from its default start (its config's
    t_start): a DDIM run from t_start visits distinct timesteps in 0..t_start, so at most t_start +
    1 of them (T for the full chain)."""
    most = min(cfg["t_start"] + 1, cfg["T"])
    return [n for n in STEP_COUNTS if n <= most]


def steps(ckpt, clip=True):
    """The same 8 z's from the VAE's prior (the ex-post mixture the checkpoint holds, as sample.py
    draws them): x_hat_0 = dec(z), then DiffuseVAE's refinement with 1..100 DDIM (eta = 0) steps,
    those the refiner's start allows, from the same starting noise in every row."""
    if not os.path.exists(ckpt):
        print(f"skipping samples_vs_steps.png: no {ckpt} (train one: python train.py --stage ddpm)")
        return
    device = runtime.pick_device(None)
    model = sample.load_model(ckpt, device)
    if model.vae is None:
        print(
            f"skipping samples_vs_steps.png: {ckpt} is the unconditional baseline "
            "(no x_hat_0 to show)"
        )
        return
    counts = step_counts(model.config)
    if len(counts) < len(STEP_COUNTS):
        print(
            f"samples_vs_steps: {ckpt} starts its refiner at t = {model.t_start}, so at most "
            f"{max(counts)} steps; leaving out {[n for n in STEP_COUNTS if n not in counts]}"
        )
    g = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        x_hat0 = model.vae.decode(
            sample_prior(8, model.vae.z_dim, model.vae.prior, generator=g, device=device)
        )
        noise = ddpm.randn_like(x_hat0, g)  # the same starting noise for every row
        rows, labels, start = [], [], time.time()
        for n in counts:
            x0 = refine_row(model, x_hat0, noise, g, n, clip)
            rows.append(x0), labels.append(f"{n} step{'s' * (n > 1)}")
            print(f"{n:4d} steps: mean |x_0 - x_hat_0| = {(x0 - x_hat0).abs().mean().item():.3f}")
    rows, labels = [x_hat0] + rows, ["VAE x_hat_0"] + labels
    seconds = time.time() - start
    fig, axes = plt.subplots(len(rows), 8, figsize=(8, 1.05 * len(rows)))
    for r, (x, label) in enumerate(zip(rows, labels)):
        for c in range(8):
            show(axes[r, c], x[c : c + 1])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(
        f"{ckpt} (form {model.form}): the same z and starting noise in every row; DDIM eta = 0, "
        f"x_0-hat {'clipped to [-1, 1]' if clip else 'not clipped'}; {sum(counts)} denoiser calls",
        fontsize=8,
    )
    save(fig, "samples_vs_steps.png" if clip else "samples_vs_steps_noclip.png")
    print(
        f"samples_vs_steps: {sum(counts)} DDIM steps (8 samples each) "
        f"took {seconds:.1f} s on {device.type}"
    )


def refine_row(model, x_hat0, noise, generator, steps, clip=True):
    """One row of the figure: x_hat_0 refined by DDIM (eta = 0) in `steps` calls from the start the
    noise gives, each x_0-hat clipped to [-1, 1] unless clip is False (Exercise 5), the output
    clamped to [-1, 1]."""
    options = dict(noise=noise, generator=generator, steps=steps, sampler="ddim", eta=0.0)
    options |= {} if clip else dict(clip_x0=False)
    return model.refine(x_hat0, **options).clamp(-1, 1)


def guidance_points(results):
    """(w, FID, agreement) per guidance weight w of tools/sweep.py rows whose --extra set one
    ("--guidance W"), sorted by w; seeds of one w are averaged."""
    by_w = {}
    for r in results:
        flags = r.get("extra", "").split()
        if "agree" in r and "--guidance" in flags:
            w = float(flags[flags.index("--guidance") + 1])
            by_w.setdefault(w, []).append((r["fid"], r["agree"]))
    return [(w, *np.mean(by_w[w], axis=0)) for w in sorted(by_w)]


def guidance(results_path):
    """Classifier-free guidance on x_hat_0 (LESSONS Lesson 14): FID and the judge's class agreement
    against w."""
    import json

    points = guidance_points(json.load(open(results_path)))
    if not points:
        raise SystemExit(
            f"error: {results_path} has no rows made with --extra='--guidance W' "
            f"(see python -m tools.sweep)"
        )
    w, fid, agree = np.array(points).T
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(w, fid, "o-", color="C0")
    ax.set(
        xlabel="guidance weight w",
        ylabel="FID (own classifier)",
        title="guidance on x_hat_0, 10 DDIM steps",
    )
    ax2 = ax.twinx()
    ax2.plot(w, 100 * agree, "s--", color="C1")
    ax2.set_ylabel("class kept (%)", color="C1")
    save(fig, "guidance.png")


def samples(ckpt, n=16, scale=4):
    """The README's picture: the first n samples of `python sample.py --steps 10` (seed 0), rows of
    8 VAE samples x_hat_0 over their refinements, each pixel drawn as a scale x scale block (nearest
    neighbour) so that a garment's detail is visible."""
    model, batch_size = (
        sample.load_model(ckpt, torch.device("cpu")),
        sample.parse_args([]).batch_size,
    )
    generators = diffusevae.generators(0)
    with torch.inference_mode():
        batches = [
            model.sample(min(batch_size, n - i), generators, steps=10, sampler="ddim", eta=0.5)
            for i in range(0, n, batch_size)
        ]
    x_hat0, x0 = (torch.cat([b[k] for b in batches]) for k in (0, 1))
    grid = (
        torch.cat(sample.pairs(x_hat0, x0))
        .repeat_interleave(scale, -2)
        .repeat_interleave(scale, -1)
    )
    os.makedirs(OUT, exist_ok=True)
    save_grid(grid, os.path.join(OUT, "samples.png"), nrow=8, pad=2 * scale)
    print(f"wrote {os.path.join(OUT, 'samples.png')}")


def save(fig, name):
    os.makedirs(OUT, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, name), dpi=120)
    plt.close(fig)
    print(f"wrote {os.path.join(OUT, name)}")


# ----------------------------------------------------------------------------- the CLI


def parse_args(argv=None):
    """The CLI's options (argv: a list of strings, default sys.argv[1:]); argparse exits on a bad
    command."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=[*DATA_ONLY, "steps", "guidance", "samples"],
        default=[*DATA_ONLY, "steps"],
    )
    p.add_argument("--out_dir", default=OUT, help="where the PNGs go (assets: the committed ones)")
    p.add_argument("--data_dir", default=None, help="Fashion-MNIST's IDX files (default: Debian's)")
    p.add_argument(
        "--ckpt",
        default="runs/fashion/ddpm.pt",
        help="stage-2 checkpoint for --only steps, samples",
    )
    p.add_argument(
        "--no_clip", action="store_true", help="--only steps without clamping x_0-hat (Exercise 5)"
    )
    p.add_argument(
        "--results",
        default=None,
        help="--only guidance: a results.json of python -m tools.sweep with guidance rows",
    )
    a = p.parse_args(argv)
    if "guidance" in a.only and not a.results:
        p.error(
            "--only guidance needs --results PATH (a results.json of python -m tools.sweep "
            "made with --extra guidance=W)"
        )
    return a


def main(argv=None):
    global OUT
    a = parse_args(argv)
    OUT = a.out_dir
    torch.manual_seed(0)
    make = {
        "noising": lambda: noising(a.data_dir),
        "schedules": schedules,
        "forward": lambda: forward(a.data_dir),
        "start": lambda: start(a.data_dir),
        "steps": lambda: steps(a.ckpt, clip=not a.no_clip),
        "guidance": lambda: guidance(a.results),
        "samples": lambda: samples(a.ckpt),
    }
    for name in a.only:
        make[name]()


if __name__ == "__main__":
    main()
