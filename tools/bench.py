"""Benchmark DiffuseVAE's networks: training throughput, FLOPs and fraction of peak, memory,
sampling throughput and latency, and A/B figures for speed choices (modelled on nanoGPT's bench.py).

    python -m tools.bench                        # every section but the diffusers comparison
    # fewer iterations, 250 sampled images, 100/1000 steps extrapolated
    python -m tools.bench --quick
    # some sections: stage2 stage1 unet sample ab diffusers, or all
    python -m tools.bench --only stage2 sample
    # only our CIFAR-10 UNet beside diffusers' UNet2DModel (diffusers)
    python -m tools.bench --diffusers
    # the same, finer interleaved: steadier on a noisy machine
    python -m tools.bench --diffusers --iters 2 --rounds 10
    python -m tools.bench --quick --iters 1      # a smoke run: one timed iteration of everything
    python -m tools.bench --device cpu --json bench.json
    OMP_NUM_THREADS=1 python -m tools.bench --quick      # one core

Paths. Every network runs by the paths of STEP_PATHS: its memory layout (contiguous or
channels_last), and two alternatives to the core's code patched into a model instance (code_path):
every upsampling conv (nearest x2 then a 3x3 conv) computed as one stride-2 transposed conv
(TransposedUpConv), and the UNet's ResBlocks adding in place with SiLU in place when no graph is
recorded (InPlaceResBlock), both defined here. The path "channels_last" is train.py's and
sample.py's on the CPU (the core's code in runtime.CPU_CHANNELS_LAST's layout). In every A/B the
"before" is the first path (contiguous).

Sections. stage2: train.train_step of stage 2 end to end (the batch, x_hat_0 from the frozen VAE's
encoder and decoder, L_DDPM, backward, clipping, AdamW, EMA) by every path, both networks in the
path's layout and code. stage1: train.train_step of stage 1 (the VAE's negative ELBO) by the paths
without ResBlocks. unet: the UNet's step with x_hat_0 given by every path, its share of the conv
peak, and the convolution shapes that take its time (torch.profiler). sample: 10-step refinement of
1000 images by every path, and the latency of 10, 100 and 1000 steps. ab: the EMA and attention
kernels. diffusers: our CIFAR-10 UNet beside diffusers' UNet2DModel.

The networks are built from train.PRESETS as train.py builds them, with random weights, and the
training steps draw their batches from random uint8 images held in memory as train.py holds its
dataset (the speed depends on neither); reading the dataset from disk is not timed. On CUDA the
steps run under runtime.py's bf16 autocast with TF32; on the CPU in fp32, and on a CPU with AMX
stage2, stage1 and unet add train.py's path under bf16 autocast (train.py --bf16 on; with_bf16), its
% of peak taken of the bf16 peaks measured there. FLOPs are counted by torch.utils.flop_counter
(matmuls, convolutions, attention; forward + backward; elementwise ops are not counted). Jobs
running beside the bench move its figures within one run, so every A/B is measured in the same run,
interleaved (before, after, before, after, ...), each variant's figure the mean of its fastest
round: compare ratios across machines; absolute figures are labelled with the matmul and conv peaks
measured at the start. Benchmarks never go in tests/: their numbers belong to a machine
(tests/test_bench.py only checks that the code runs and measures the same step)."""

import argparse
import copy
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import ddpm
import diffusevae as DV
import runtime
import train
import unet
from data import to_model_range
from train import EMA, PRESETS
from vae import VAE, sample_prior

IMG_CH = {"fashion_mnist": 1, "cifar10": 3}  # image channels of each preset's dataset
SECTIONS = ("stage2", "stage1", "unet", "sample", "ab", "diffusers")
DEFAULT_SECTIONS = SECTIONS[:-1]  # diffusers is not a dependency: asked for by name only
CL = torch.channels_last
SHARD_IMAGES = 512  # the random training images a stage-1 or stage-2 step draws its batch from


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer iterations: a rough figure in a minute or two"
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS + ("all",),
        default=None,
        metavar="SECTION",
        help=f"run these sections: {', '.join(SECTIONS)}, or all (default: all but diffusers)",
    )
    p.add_argument(
        "--diffusers",
        action="store_true",
        help="only the side-by-side with diffusers' UNet2DModel (the same as --only diffusers)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="every timed loop runs this many iterations, in one "
        "round unless --rounds (a smoke run; rough figures)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds of every A/B race (default 3; --quick 2; --iters 1): each figure "
        "is its fastest round's mean, so more rounds of fewer --iters steady an A/B on a noisy "
        "machine",
    )
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    p.add_argument(
        "--json", default=None, metavar="PATH", help="also write the results to PATH as JSON"
    )
    args = p.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        p.error("--iters must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.diffusers and args.only:
        p.error("--diffusers is --only diffusers: give one of the two")
    args.only = (
        ("diffusers",)
        if args.diffusers
        else DEFAULT_SECTIONS
        if not args.only
        else SECTIONS
        if "all" in args.only
        else tuple(args.only)
    )
    return args


# ----------------------------------------------------------------------------- measuring


def timeit(fn, iters, device, warmup=1):
    """Mean seconds per call of fn() over `iters` calls, after `warmup` untimed calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def race(fns, iters, rounds, device, warmup=1):
    """Seconds per call of each fn in the dict, timed in interleaved rounds (A, B, ..., A, B, ...)
    so that load which comes and goes during the run hits every variant alike; each fn's figure is
    the mean of its fastest round (of `iters` calls): the least disturbed measurement of the same
    work."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {k: math.inf for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], timeit(fn, iters, device, warmup=0))
    return best


def peak_memory_mib(device, reset=False):
    """Peak memory since the last reset: CUDA's allocator peak, or the process's peak RSS
    (ru_maxrss), which Linux restarts from the current RSS when 5 is written to
    /proc/self/clear_refs (elsewhere: the whole run's peak)."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if reset and os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        2**20 if sys.platform == "darwin" else 2**10
    )


def measure_peaks(device):
    """GFLOP/s of large dense kernels, the best of 5 means of 3 calls: the denominators of "% of
    peak"."""

    def gflops(fn, flops):
        fn()
        return flops / min(timeit(fn, 3, device, warmup=0) for _ in range(5)) / 1e9

    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    if device.type == "cuda":
        a16, b16 = a.bfloat16(), b.bfloat16()
        return {
            "matmul tf32": gflops(
                lambda: a @ b, 2 * n**3
            ),  # fp32 inputs, TF32 allowed as in train.py
            "matmul bf16": gflops(lambda: a16 @ b16, 2 * n**3),
        }
    x, w = (
        torch.randn(16, 256, 16, 16),
        torch.randn(256, 256, 3, 3),
    )  # oneDNN's direct conv can outrun MKL's sgemm:
    conv_flops = 2 * 16 * 256 * 256 * 9 * 16 * 16  # the larger of the two is the peak
    peaks = {
        "matmul fp32": gflops(lambda: a @ b, 2 * n**3),
        "conv3x3 fp32": gflops(lambda: F.conv2d(x, w, padding=1), conv_flops),
    }
    if runtime.cpu_has_amx():  # the denominators of the "bf16 autocast" rows (with_bf16)
        a16, b16, x16, w16 = a.bfloat16(), b.bfloat16(), x.bfloat16(), w.bfloat16()
        peaks.update(
            {
                "matmul bf16": gflops(lambda: a16 @ b16, 2 * n**3),
                "conv3x3 bf16": gflops(lambda: F.conv2d(x16, w16, padding=1), conv_flops),
            }
        )
    return peaks


def commit():
    """The repository's short commit hash, '+dirty' when tracked files differ from it; 'unknown'
    outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--"], cwd=here, capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")


def show(title, header, rows):
    """Print a table of dicts; floats >= 100 as integers, smaller ones with 3 significant digits."""
    fmt = {float: lambda v: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}", int: lambda v: f"{v:,}"}
    cells = [header] + [[fmt.get(type(v), str)(v) for v in r.values()] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for r in cells:
        print("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))


def ab_row(what, before, after, before_ms, after_ms, batch=None):
    """One before/after figure; speedup = before / after. With `batch`, also the images/s of
    each."""
    row = dict(
        what=what,
        before=before,
        after=after,
        before_ms=before_ms,
        after_ms=after_ms,
        speedup=before_ms / after_ms,
    )
    if batch is not None:
        row.update(before_img_s=1e3 * batch / before_ms, after_img_s=1e3 * batch / after_ms)
    return row


AB_HEADER = ["what", "before", "after", "before ms", "after ms", "speedup"]
AB_IMG_HEADER = AB_HEADER + ["before img/s", "after img/s"]


# ------------------------------------------------------------ the networks, as train.py builds them


def build(kind, preset, device, dropout=None):
    """kind 'vae', 'unet' (conditioned on x_hat_0: DiffuseVAE) or 'ddpm' (unconditional), random
    weights, built with the preset's settings as train.start builds them."""
    cfg = PRESETS[preset]
    img_ch = IMG_CH[cfg["dataset"]]
    if kind == "vae":
        return VAE(
            img_ch=img_ch, image_size=cfg["image_size"], ch=cfg["vae_ch"], z_dim=cfg["z_dim"]
        ).to(device)
    return unet.UNet(
        img_ch=img_ch,
        cond_ch=img_ch if kind == "unet" else 0,
        ch=cfg["ch"],
        ch_mult=cfg["ch_mult"],
        num_res_blocks=cfg["num_res_blocks"],
        attn_resolutions=cfg["attn_resolutions"],
        dropout=cfg["dropout"] if dropout is None else dropout,
        image_size=cfg["image_size"],
        norm_groups=cfg["norm_groups"],
    ).to(device)


class InPlaceResBlock(unet.ResBlock):
    """unet.ResBlock adding in place where nothing reads the old values: into the conv outputs (a
    conv's backward needs its input, not its output); SiLU overwrites GroupNorm's output only when
    no graph is recorded."""

    def forward(self, x, temb):
        silu_in_place = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=silu_in_place))
        h.add_(self.temb_proj(F.silu(temb))[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=silu_in_place)))
        return self.attn(h.add_(self.skip(x)))


def four_taps(w, dim):
    """The taps (w_2, w_1 + w_2, w_0 + w_1, w_0) along `dim` of a kernel with taps (w_0, w_1, w_2)
    along it."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


class TransposedUpConv(nn.Conv2d):
    """A 3x3 conv (stride 1, padding 1) of the nearest-neighbour x2 upsampled input, (B, C_in, H, W)
    -> (B, C_out, 2H, 2W), computed as the same linear map in one stride-2 transposed conv. Along
    each axis, output 2i sees the upsampled rows 2i - 1, 2i, 2i + 1, i.e. x[i - 1], x[i], x[i]: taps
    w_0 on x[i - 1], w_1 + w_2 on x[i]; output 2i + 1 sees x[i], x[i], x[i + 1]: w_0 + w_1 on x[i],
    w_2 on x[i + 1]. A transposed conv with stride 2, padding 1 and kernel k sends x[i] to output 2i
    + j - 1 with tap k_j, so k = (w_2, w_1 + w_2, w_0 + w_1, w_0) (four_taps). 16 multiply-adds per
    input pixel and channel pair where upsampling then a 3x3 conv does 36. The parameters are the
    3x3 conv's."""

    def forward(self, x):
        k = four_taps(four_taps(self.weight, 2), 3)  # (C_out, C_in, 4, 4)
        return F.conv_transpose2d(
            x, k.transpose(0, 1), self.bias, stride=2, padding=1
        )  # wants (C_in, C_out, 4, 4)


class TransposedUpsample(unet.Upsample):
    """unet.Upsample with its conv a TransposedUpConv, which upsamples itself."""

    def forward(self, x, temb=None):
        return self.conv(x)


def _is_3x3_same(conv):
    """Whether conv is the plain 3x3 conv TransposedUpConv computes: stride 1, zero padding 1, no
    dilation, no groups."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def transpose_upsampling(model):
    """The model, in place, with every nearest x2 upsampling followed by a 3x3 conv computed as one
    TransposedUpConv: unet.Upsample, and each nn.Upsample + Conv2d pair of an nn.Sequential (the
    VAE's decoder). The same map, the same parameters and state_dict keys. A measured alternative to
    the core's code, never what train.py runs."""
    for m in list(model.modules()):
        if type(m) is unet.Upsample and _is_3x3_same(m.conv):
            m.__class__, m.conv.__class__ = TransposedUpsample, TransposedUpConv
        if isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                up = m[i]
                nearest_x2 = (
                    isinstance(up, nn.Upsample) and up.mode == "nearest" and up.scale_factor == 2
                )
                if nearest_x2 and _is_3x3_same(m[i + 1]):
                    m[i], m[i + 1].__class__ = nn.Identity(), TransposedUpConv
    return model


def code_path(model, fast_up=False, in_place=False):
    """The model (in place) with its upsampling convs as TransposedUpConvs (fast_up: the UNet's
    Upsamples, and in the VAE's decoder each nn.Upsample + Conv2d pair) and its ResBlocks as
    InPlaceResBlocks (in_place); the same parameters and state_dict keys. Both False: the core's
    code, unchanged."""
    if fast_up:
        transpose_upsampling(model)
    for m in list(model.modules()):
        if in_place and type(m) is unet.ResBlock:
            m.__class__ = InPlaceResBlock
    return model


# the paths of a training step: name -> (channels_last, upsampling as TransposedUpConv,
# InPlaceResBlocks); the first is every A/B's "before", CODE_PATH train.py's and sample.py's
# (runtime.CPU_CHANNELS_LAST; CUDA takes it too)
STEP_PATHS = {
    "contiguous": (False, False, False),
    "channels_last, transposed up-conv": (True, True, False),
    "channels_last, transposed, in place": (True, True, True),
    "channels_last": (True, False, False),
}
CODE_PATH = "channels_last"
VAE_PATHS = {
    p: flags for p, flags in STEP_PATHS.items() if not flags[2]
}  # the VAE has no ResBlocks
BF16 = ", bf16 autocast"  # the name's suffix of a path run under train.py --bf16 on


def with_bf16(paths, device, base=None):
    """paths, plus the path `base` (default: the last, train.py's) under bf16 autocast where that is
    a choice worth measuring: on a CPU with AMX. On CUDA every path runs under bf16 already; on a
    CPU without AMX bf16 convs are many times slower than fp32 (runtime.slow_bf16_warning)."""
    if device.type != "cpu" or not runtime.cpu_has_amx():
        return paths
    base = base or list(paths)[-1]
    return dict(paths, **{base + BF16: paths[base] + (True,)})


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def layout(channels_last):
    return "channels_last" if channels_last else "contiguous"


def random_images(cfg, batch, device):
    s = cfg["image_size"]
    return (
        torch.rand(batch, IMG_CH[cfg["dataset"]], s, s, device=device) * 2 - 1
    )  # (B, C, S, S) in [-1, 1]


def random_shard(cfg, n):
    """n random uint8 images (n, C, S, S) on the CPU: what train.py holds of its dataset and draws
    batches from."""
    s = cfg["image_size"]
    return torch.randint(0, 256, (n, IMG_CH[cfg["dataset"]], s, s), dtype=torch.uint8)


def runtime_of(device, channels_last, bf16=False):
    """runtime.choose's decisions for the device, in the given memory format; bf16: autocast on the
    CPU too (train.py --bf16 on)."""
    return dataclasses.replace(
        runtime.choose(device, bf16=bf16 or None), channels_last=channels_last
    )


def autocast(device, bf16=False):
    """runtime.py's autocast for the device: bf16 on CUDA, nothing on the CPU unless bf16 (train.py
    --bf16 on)."""
    return runtime.autocast(runtime.choose(device.type, bf16=bf16 or None))


def make_run(
    stage, preset, batch, device, channels_last, fast_up=False, in_place=False, bf16=False, seed=0
):
    """A train.Run of stage 'vae' or 'ddpm' (DiffuseVAE, form 2) as train.start sets it up, on
    random weights and random_shard's images, by one path: the networks in the path's memory format
    and code (code_path), the stage-2 VAE frozen. torch is seeded with `seed` first, so every path
    gets the same weights and images."""
    cfg = dict(
        PRESETS[preset],
        batch_size=batch,
        peak_lr=PRESETS[preset]["vae_lr" if stage == "vae" else "lr"],
        seed=seed,
        form=2,
        cond="vae",
    )
    rt = runtime_of(device, channels_last, bf16)
    torch.manual_seed(seed)
    run = train.Run(argparse.Namespace(stage=stage), cfg, rt)
    model = code_path(build("vae", preset, device), fast_up)
    if stage == "ddpm":
        run.vae = train.on_device(model.eval().requires_grad_(False), rt)[0]
        model = code_path(build("unet", preset, device), fast_up, in_place)
        run.diffusion = ddpm.make_diffusion(cfg["schedule"], cfg["T"]).to(device)
    run.images = run.shard = random_shard(cfg, max(SHARD_IMAGES, batch))
    run.model, run.wrapped = train.on_device(model, rt)
    run.ema, run.opt = (
        EMA(run.model, cfg["ema_decay"]),
        runtime.make_optimizer(run.model.parameters(), cfg["peak_lr"], rt),
    )
    return run


def optimise(model, opt, ema, loss):
    """The end of train.train_step: backward, gradient clipping, AdamW, EMA."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema.update(model)


# ----------------------------------------------------------------------------- training steps


def train_step(
    kind, preset, batch, device, channels_last, fast_up=False, in_place=False, bf16=False
):
    """The optimisation step of the VAE (kind 'vae': train.train_step of stage 1) or of the UNet
    alone (kind 'unet': x_hat_0 given, a fixed random batch; the rest as train.train_step of stage
    2) -> (step, loss_fn, model); step() runs forward, backward, clipping, AdamW and the EMA update,
    loss_fn() the forward on a batch of the step's shape; bf16: the forward under bf16 autocast on
    the CPU too (train.py --bf16 on)."""
    if kind == "vae":
        run = make_run("vae", preset, batch, device, channels_last, fast_up, bf16=bf16)
        x0 = to_model_range(run.shard[:batch]).to(
            run.rt.device
        )  # as train.train_step lays out a batch
        x0 = x0.contiguous(memory_format=CL) if run.rt.channels_last else x0

        def vae_loss():
            with runtime.autocast(run.rt):
                return run.wrapped(x0).mean()

        return lambda: train.train_step(run), vae_loss, run.model
    cfg = PRESETS[preset]
    model = code_path(build(kind, preset, device).train(), fast_up, in_place)
    x0 = random_images(cfg, batch, device)
    x_hat0 = (x0 + 0.1 * torch.randn_like(x0)).clamp(
        -1, 1
    )  # stands in for the frozen VAE's dec(z): not timed
    if channels_last:
        model.to(memory_format=CL)
        x0, x_hat0 = (x.contiguous(memory_format=CL) for x in (x0, x_hat0))
    diffusion = ddpm.make_diffusion(cfg["schedule"], cfg["T"]).to(device)
    opt = runtime.make_optimizer(model.parameters(), cfg["lr"], runtime.choose(device.type))
    ema = EMA(model, cfg["ema_decay"])

    def loss_fn():  # t ~ U{0..t_start}, as train.train_step draws it
        t = torch.randint(0, cfg["t_start"] + 1, (batch,), device=device)
        with autocast(device, bf16):
            return DV.ddpm_loss(model, diffusion, x0, x_hat0, form=2, target=cfg["target"], t=t)[
                0
            ].mean()

    return lambda: optimise(model, opt, ema, loss_fn()), loss_fn, model


def count_flops(loss_fn, model):
    """FLOPs of one forward + backward; the counter has no formula for the CPU's fused attention
    kernel, so attention is counted as its two matmuls."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss_fn().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_train(kind, preset, batch, device, iters, rounds, peak, paths=STEP_PATHS, bf16_peak=None):
    """The training step by each path (STEP_PATHS), interleaved: time, FLOPs (each path's own: the
    transposed up-conv does fewer), % of peak (a bf16 path's of bf16_peak), peak memory. -> (a row
    per path, the A/B rows of the first against the rest)."""
    steps = {name: train_step(kind, preset, batch, device, *flags) for name, flags in paths.items()}
    flops = {name: count_flops(*s[1:]) for name, s in steps.items()}
    mem = {}
    for name, (step, _, _) in steps.items():  # the warm-up, and each path's memory in a steady step
        peak_memory_mib(device, reset=True)
        step(), step()
        mem[name] = peak_memory_mib(device)
    sec = race({name: s[0] for name, s in steps.items()}, iters, rounds, device, warmup=0)
    peak_of = {p: bf16_peak if p.endswith(BF16) and bf16_peak else peak for p in steps}
    rows = [
        dict(
            model=f"{kind} ({preset})",
            batch=batch,
            params=n_params(steps[p][2]),
            path=p,
            ms_per_step=1e3 * sec[p],
            img_per_s=batch / sec[p],
            gflop_per_step=flops[p] / 1e9,
            gflop_per_s=flops[p] / sec[p] / 1e9,
            pct_of_peak=100 * flops[p] / sec[p] / 1e9 / peak_of[p],
            peak_mem_mib=mem[p],
        )
        for p in steps
    ]
    name = "VAE (stage 1)" if kind == "vae" else "UNet"
    before, *afters = steps
    abs_ = [
        ab_row(
            f"{name} train step, {preset} preset, batch {batch}",
            before,
            after,
            1e3 * sec[before],
            1e3 * sec[after],
            batch,
        )
        for after in afters
    ]
    return rows, abs_


TRAIN_HEADER = [
    "model",
    "batch",
    "params",
    "path",
    "ms/step",
    "img/s",
    "GFLOP/step",
    "GFLOP/s",
    "% peak",
    "peak MiB",
]


# ----------------------------------------------------------------------------- stage 2 end to end


def stage2_step(
    preset, batch, device, channels_last=False, fast_up=False, in_place=False, bf16=False, seed=0
):
    """train.train_step of stage 2 on make_run's Run by one path, as step() -> the loss: the batch,
    x_hat_0 from the frozen VAE's encoder and decoder (VAE.reconstruct), L_DDPM (form 2, t <= the
    preset's t_start), backward, clipping, AdamW, EMA. Each step seeds torch as train.py does
    (step_seed), so every path draws the same batch, z, t and noise and trains the same model."""
    run = make_run("ddpm", preset, batch, device, channels_last, fast_up, in_place, bf16, seed)
    return lambda: train.train_step(run).detach()


def bench_stage2(preset, device, iters, rounds, variants=STEP_PATHS):
    """Stage 2 end to end, each path against the first (contiguous): A/B rows."""
    batch = PRESETS[preset]["batch_size"]
    steps = {name: stage2_step(preset, batch, device, *flags) for name, flags in variants.items()}
    sec = race(
        steps, iters, rounds, device, warmup=2
    )  # as bench_train: AdamW's state, oneDNN's primitives
    before, *afters = steps
    return [
        ab_row(
            f"stage-2 step, {preset} preset, batch {batch}",
            before,
            after,
            1e3 * sec[before],
            1e3 * sec[after],
            batch,
        )
        for after in afters
    ]


# ----------------------------------------------------------------------- where the UNet's time goes


def conv_flops(op, shapes, args):
    """(shape label, FLOPs) of one convolution from the profiler's recorded input shapes and
    arguments: a forward conv is 2 B C_out H_out W_out (C_in / groups) k_h k_w FLOPs; its backward
    is one such conv for the input's gradient and one for the weight's (each when asked for: the
    first conv's input needs none)."""
    if (
        op == "aten::convolution"
    ):  # (input, weight, bias, stride, padding, dilation, transposed, out_padding, groups)
        (B, c_in, H, W), (c_out, c_g, kh, kw) = shapes[0], shapes[1]
        stride, pad, dil, transposed = args[3], args[4], args[5], args[6]
        h_out = (H + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
        w_out = (W + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
        convs = 1
    # convolution_backward(grad_out, input, weight, bias_sizes, stride, padding, dilation,
    # transposed, ...,
    else:
        (B, c_out, h_out, w_out), (_, c_in, H, W), (_, c_g, kh, kw) = shapes[:3]  # output_mask)
        stride, transposed, mask = args[4], args[7], args[10]
        convs = int(mask[0]) + int(mask[1])
    if (
        transposed
    ):  # weight (C_in, C_out / groups, k, k): every input pixel meets every tap and output channel
        label = f"{kh}x{kw}/{stride[0]} transposed {c_in}->{c_g} @{H}x{W}"
        return label, 2 * B * c_in * H * W * c_g * kh * kw * convs
    label = f"{kh}x{kw}/{stride[0]} {c_in}->{c_out} @{H}x{W}"
    return label, 2 * B * c_out * h_out * w_out * c_g * kh * kw * convs


def conv_profile(step, device, conv_peak, steps=3, top=8):
    """torch.profiler (record_shapes) over `steps` training steps: every aten::convolution (forward)
    and aten::convolution_backward, grouped by shape -> (the `top` rows by time, a summary dict)."""
    step()  # warm-up: oneDNN primitives are made on first use
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_ms = 1e3 * (time.perf_counter() - t0) / steps
    groups = defaultdict(lambda: [0, 0.0, 0.0])  # (shape, pass) -> [calls, microseconds, FLOPs]
    for e in prof.events():
        if e.name in ("aten::convolution", "aten::convolution_backward"):
            label, flops = conv_flops(e.name, e.input_shapes, e.concrete_inputs)
            g = groups[label, "fwd" if e.name == "aten::convolution" else "bwd"]
            g[0] += 1
            g[1] += e.device_time_total if device.type == "cuda" else e.cpu_time_total
            g[2] += flops
    rows = [
        {
            "shape": shape,
            "pass": p,
            "calls": calls // steps,
            "ms_per_step": us / 1e3 / steps,
            "gflop_per_s": flops / us / 1e3,
            "pct_of_conv_peak": 100 * flops / us / 1e3 / conv_peak,
        }
        for (shape, p), (calls, us, flops) in groups.items()
    ]
    rows.sort(key=lambda r: -r["ms_per_step"])
    conv_ms = sum(r["ms_per_step"] for r in rows)
    conv_flops_per_step = sum(f for _, _, f in groups.values()) / steps
    summary = dict(
        profiled_step_ms=step_ms,
        conv_ms=conv_ms,
        conv_share_of_step=conv_ms / step_ms,
        conv_gflop_per_s=conv_flops_per_step / conv_ms / 1e6,
        conv_pct_of_conv_peak=100 * conv_flops_per_step / conv_ms / 1e6 / conv_peak,
    )
    return rows[:top], summary


# ----------------------------------------------------------------------------- sampling


def refiner(vae, net, diffusion, **config):
    """The DiffuseVAE of the cpu preset (form 2) of these networks, `config` overriding the preset's
    keys: its refine (of a given x_hat_0) is what bench times."""
    config = dict(PRESETS["cpu"], form=2, cond="vae", seed=0, **config)
    return DV.DiffuseVAE(vae, net, diffusion, config)


def bench_sampling_ab(device, n_images, batch, paths=STEP_PATHS):
    """10-step refinement (DiffuseVAE.refine, form 2, DDIM eta 0, from the cpu preset's t_start) of
    n_images in batches, the same UNet and inputs by each path (STEP_PATHS; the last is
    sample.py's), the batches interleaved: A/B rows in images/s."""
    cfg = PRESETS["cpu"]
    torch.manual_seed(0)
    net, vae = build("unet", "cpu", device).eval(), build("vae", "cpu", device).eval()
    diffusion = ddpm.make_diffusion(cfg["schedule"], cfg["T"]).to(device)
    with torch.no_grad():
        x_hat0 = vae.decode(sample_prior(batch, vae.z_dim, device=device))
    models = {
        p: refiner(
            vae,
            code_path(
                copy.deepcopy(net).to(memory_format=CL if cl else torch.contiguous_format),
                fast,
                in_place,
            ),
            diffusion,
        )
        for p, (cl, fast, in_place) in paths.items()
    }
    inputs = {
        p: x_hat0.contiguous(memory_format=CL) if cl else x_hat0 for p, (cl, _, _) in paths.items()
    }

    def refine(p, steps=10):
        return lambda: models[p].refine(inputs[p], steps=steps, sampler="ddim", eta=0.0)

    with torch.inference_mode():
        for p in models:
            refine(p, steps=1)()  # warm-up at the batch's shapes
        sec = race({p: refine(p) for p in models}, 1, max(1, n_images // batch), device, warmup=0)
    before, *afters = paths
    return [
        ab_row(
            f"10-step refinement, {max(1, n_images // batch) * batch} images in batches of {batch}",
            before,
            after,
            1e3 * sec[before],
            1e3 * sec[after],
            batch,
        )
        for after in afters
    ]


def bench_sampling(device, batch, quick, n, channels_last):
    """DDIM refinement latency (eta 0) of the cpu-preset UNet (DiffuseVAE.refine, Formulation 2, eps
    from the whole chain, so that 1000 steps can be taken) in sample.py's memory format, and A/B
    (a)."""
    peak_memory_mib(device, reset=True)
    cfg = PRESETS["cpu"]
    net, vae = build("unet", "cpu", device).eval(), build("vae", "cpu", device).eval()
    if channels_last:
        net, vae = net.to(memory_format=CL), vae.to(memory_format=CL)
    diffusion = ddpm.make_diffusion(cfg["schedule"], cfg["T"]).to(device)
    with torch.no_grad():  # made under no_grad: usable with autograd on below
        x_hat0 = vae.decode(sample_prior(batch, vae.z_dim, device=device))
    # eps from x_T: the whole chain (1000 steps need every timestep), not the preset's truncated
    # residual refiner
    model = refiner(vae, net, diffusion, target="eps", t_start=cfg["T"] - 1)
    # --quick: every step is one denoiser call of the same cost, so 100 and 1000 steps are 10x and
    # 100x 10 steps
    measured = (10,) if quick else (10, 100, 1000)
    with torch.inference_mode():
        model.refine(x_hat0, steps=10, sampler="ddim", eta=0.0)  # warm-up
        sec = {
            s: timeit(
                lambda: model.refine(x_hat0, steps=s, sampler="ddim", eta=0.0), 1, device, warmup=0
            )
            for s in measured
        }
    rows = []
    for s in (10, 100, 1000):
        seconds = sec.get(s, sec[10] * s / 10)
        how = "measured" if s in sec else "extrapolated linearly from 10 steps"
        rows.append(
            dict(steps=s, batch=batch, seconds=seconds, ms_per_image=1e3 * seconds / batch, how=how)
        )
    mem = peak_memory_mib(device)
    x, t = torch.randn_like(x_hat0), torch.full((batch,), cfg["T"] // 2, device=device)
    modes = {
        "autograd on": torch.enable_grad,
        "no_grad (refine's own)": torch.no_grad,
        "inference_mode (sample.py)": torch.inference_mode,
    }
    ms = {}
    for name, mode in modes.items():
        with mode():
            ms[name] = 1e3 * timeit(lambda: net(x, t, x_hat0), n(20, 3), device)
    after = "inference_mode (sample.py)"
    ab = [
        ab_row(f"(a) one denoiser call, batch {batch}", m, after, ms[m], ms[after])
        for m in list(modes)[:2]
    ]
    return rows, mem, ab


# ----------------------------------------------------------------------------- kernels


def bench_ema(preset, device, iters):
    """(b) train.EMA's one fused torch._foreach_lerp_ against one lerp_ per parameter tensor."""
    model, decay = build("unet", preset, device), PRESETS[preset]["ema_decay"]
    ema = EMA(model, decay)

    @torch.no_grad()
    def loop():
        for e, p in zip(ema.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)

    n_tensors = len(list(model.parameters()))
    return ab_row(
        f"(b) EMA update, {preset} UNet ({n_tensors} tensors, {n_params(model):,} params)",
        "per-tensor loop",
        "_foreach_lerp_",
        1e3 * timeit(loop, iters, device),
        1e3 * timeit(lambda: ema.update(model), iters, device),
    )


def bench_attention(preset, batch, device, iters):
    """(c) forward + backward of attention at the preset's attention resolution: the explicit
    softmax(q k^T / sqrt(C)) v against F.scaled_dot_product_attention (unet.AttnBlock), q, k, v
    strided as in AttnBlock."""
    cfg = PRESETS[preset]
    res = cfg["attn_resolutions"][0]
    C = cfg["ch"] * cfg["ch_mult"][int(math.log2(cfg["image_size"] // res))]
    qkv = torch.randn(
        batch, 1, res * res, 3 * C, device=device, requires_grad=True
    )  # (B, 1, HW, 3C)

    def explicit(q, k, v):
        return (
            torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C), dim=-1) @ v
        )  # (B, 1, HW, HW) @ (B, 1, HW, C)

    ms = []
    for attend in (explicit, F.scaled_dot_product_attention):

        def fwd_bwd():
            with autocast(device):
                out = attend(*qkv.chunk(3, dim=-1))
            out.float().sum().backward()

        ms.append(1e3 * timeit(fwd_bwd, iters, device))
    with torch.no_grad(), autocast(device):
        err = (
            (
                explicit(*qkv.chunk(3, dim=-1))
                - F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))
            )
            .abs()
            .max()
        )
    return ab_row(
        f"(c) attention fwd+bwd {res}x{res}, C={C}, batch {batch} (max |diff| {err.item():.0e})",
        "explicit softmax",
        "SDPA",
        *ms,
    )


# ----------------------------------------------------------------------------- diffusers


def bench_diffusers(UNet2DModel, device, batch, iters, rounds):
    """Our canonical DDPM CIFAR-10 UNet (unconditional, dropout 0) beside diffusers' UNet2DModel,
    matched, both in the same memory format (rows per layout), interleaved in one process on the
    same batch; ours (nearest x2 then a 3x3 conv in each Upsample, as diffusers' Upsample2D) also
    with its upsampling as TransposedUpConvs (code_path)."""
    cfg = PRESETS["cifar10"]
    ours = build("ddpm", "cifar10", device, dropout=0.0)
    ours_transposed = code_path(copy.deepcopy(ours), fast_up=True)
    attn = [
        cfg["image_size"] // 2**i in cfg["attn_resolutions"] for i in range(len(cfg["ch_mult"]))
    ]
    chans = [cfg["ch"] * m for m in cfg["ch_mult"]]
    theirs = UNet2DModel(
        sample_size=cfg["image_size"],
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(chans),
        layers_per_block=cfg[
            "num_res_blocks"
        ],  # their up blocks have layers_per_block + 1 resnets, as ours
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=chans[
            attn.index(True)
        ],  # heads = channels / head dim = 1: single-head, as DDPM
        norm_num_groups=cfg["norm_groups"],
        norm_eps=1e-6,
        dropout=0.0,
        flip_sin_to_cos=False,
        freq_shift=1,  # our timestep embedding: sin then cos, exponents over half - 1
    ).to(device)
    x = random_images(cfg, batch, device)
    t = torch.randint(0, cfg["T"], (batch,), device=device)
    fns, params = {}, {}
    for cl in (False, True):
        xl = x.contiguous(memory_format=CL) if cl else x
        for name, model, output in (
            ("ours (unet.UNet)", ours, lambda out: out),
            ("ours, transposed up-conv", ours_transposed, lambda out: out),
            ("diffusers UNet2DModel", theirs, lambda out: out.sample),
        ):
            m = copy.deepcopy(model).to(memory_format=CL) if cl else model

            def fwd_bwd(m=m, xl=xl, output=output):
                with autocast(device):
                    out = output(m(xl, t))
                out.float().square().mean().backward()
                m.zero_grad(set_to_none=True)

            fns[name, cl], params[name] = fwd_bwd, n_params(model)
    sec = race(fns, iters, rounds, device, warmup=2)
    return [
        dict(
            model=name,
            layout=layout(cl),
            params=params[name],
            batch=batch,
            ms_fwd_bwd=1e3 * s,
            img_per_s=batch / s,
        )
        for (name, cl), s in sec.items()
    ]


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    cuda = device.type == "cuda"
    rt = runtime.choose(
        device, compile_flag=False
    )  # train.py's choices here; bench rows name their own layout
    runtime.apply_global_flags(rt)
    if "diffusers" in args.only:  # not a dependency of this project: imported for this section only
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise SystemExit(
                "--diffusers compares with diffusers' UNet2DModel, which is not installed here: "
                "pip install diffusers"
            )

    def n(full, quick):  # iteration counts
        return args.iters or (quick if args.quick else full)

    rounds = args.rounds or (1 if args.iters else 2 if args.quick else 3)
    rough = args.quick or args.iters
    torch.manual_seed(0)
    t_start = time.time()

    peaks = measure_peaks(device)
    peak = (
        peaks["matmul bf16"] if cuda else max(v for k, v in peaks.items() if "fp32" in k)
    )  # bf16 autocast on CUDA
    bf16_peak = (
        None if cuda else max((v for k, v in peaks.items() if "bf16" in k), default=None)
    )  # AMX CPUs
    conv_peak = peaks.get("conv3x3 fp32", peak)
    mem_kind = (
        "torch.cuda.max_memory_allocated"
        if cuda
        else "peak RSS of the process (ru_maxrss, torch included), "
        + (
            "reset before each row"
            if os.path.exists("/proc/self/clear_refs")
            else "the whole run's peak"
        )
    )
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    version = commit()
    header = (
        f"{rt.describe()} | commit {version} | torch {torch.__version__}"  # the first line printed
    )
    print(header)
    print(
        "measured peaks: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
        + f"; % of peak is of {peak:.1f}"
        + (f" ({name})" if cuda else "")
        + (f" ({bf16_peak:.1f} for the bf16 autocast rows: this CPU has AMX)" if bf16_peak else "")
        + ("; --quick" if args.quick else "")
        + (f"; --iters {args.iters}" if args.iters else "")
    )
    tag = (
        "[" + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + " GFLOP/s]"
    )  # labels absolute figures
    out = dict(
        header=header,
        commit=version,
        runtime=rt.describe(),
        device=str(device),
        device_name=name,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        quick=args.quick,
        iters=args.iters,
        rounds=rounds,
        sections=list(args.only),
        peaks_gflop_per_s=peaks,
        peak_gflop_per_s=peak,
        memory=mem_kind,
    )
    cifar_batch = (
        PRESETS["cifar10"]["batch_size"] if cuda else 8
    )  # 8 keeps the 35.7M-parameter UNet affordable
    ab_note = "speedup = before / after; below 1: slower on this machine"

    if "stage2" in args.only:
        rows = out["stage2"] = bench_stage2(
            "cpu", device, n(5, 2), rounds, with_bf16(STEP_PATHS, device)
        )
        show(
            "stage-2 step end to end, train.train_step (x_hat_0 from the frozen VAE + L_DDPM + "
            f"backward + clip + AdamW + EMA); {ab_note} {tag}",
            AB_IMG_HEADER,
            rows,
        )
    if "stage1" in args.only:
        rows, ab = bench_train(
            "vae",
            "cpu",
            PRESETS["cpu"]["batch_size"],
            device,
            n(15, 3),
            rounds,
            peak,
            with_bf16(VAE_PATHS, device),
            bf16_peak,
        )
        out["stage1"] = dict(rows=rows, ab=ab)
        show(
            "stage-1 (VAE) training step, train.train_step: forward + backward + clip + AdamW + "
            f"EMA. Peak memory: {mem_kind} {tag}",
            TRAIN_HEADER,
            rows,
        )
        show(f"stage-1 A/B ({ab_note})", AB_IMG_HEADER, ab)
    if "unet" in args.only:
        rows, abs_ = [], []
        for preset, batch, iters in (
            ("cpu", PRESETS["cpu"]["batch_size"], n(8, 2)),
            ("cifar10", cifar_batch, n(4, 1)),
        ):
            r, ab = bench_train(
                "unet",
                preset,
                batch,
                device,
                iters,
                rounds,
                peak,
                with_bf16(STEP_PATHS, device),
                bf16_peak,
            )
            rows += r
            abs_ += ab
        show(
            "UNet training step (x_hat_0 given): forward + backward + clip + AdamW + EMA. "
            f"Peak memory: {mem_kind} {tag}",
            TRAIN_HEADER,
            rows,
        )
        show(f"UNet A/B ({ab_note})", AB_IMG_HEADER, abs_)
        cfg = PRESETS["cpu"]
        step = train_step("unet", "cpu", cfg["batch_size"], device, rt.channels_last)[0]
        convs, summary = conv_profile(step, device, conv_peak, steps=n(3, 2))
        path = next(
            p
            for p, (cl, fast, in_place) in STEP_PATHS.items()
            if cl == rt.channels_last and not fast and not in_place
        )
        mine = next(r for r in rows if r["model"] == "unet (cpu)" and r["path"] == path)
        print(
            f"\nUNet step (cpu preset, batch {cfg['batch_size']}, {path}, train.py's path): "
            f"{mine['gflop_per_s']:.0f} GFLOP/s = "
            f"{100 * mine['gflop_per_s'] / conv_peak:.0f}% of the conv peak "
            f"{conv_peak:.0f}; under the profiler the convolutions take "
            f"{summary['conv_ms']:.0f} of "
            f"{summary['profiled_step_ms']:.0f} ms "
            f"({100 * summary['conv_share_of_step']:.0f}%), at "
            f"{summary['conv_gflop_per_s']:.0f} GFLOP/s = "
            f"{summary['conv_pct_of_conv_peak']:.0f}% of the conv peak"
        )
        show(
            "the convolutions that take the UNet step's time (k x k / stride, C_in -> C_out @ "
            f"input H x W; bwd = grad of input + weight) {tag}",
            ["shape", "pass", "calls", "ms/step", "GFLOP/s", "% conv peak"],
            convs,
        )
        out["unet"] = dict(
            rows=rows,
            ab=abs_,
            conv_profile=dict(summary, layout=layout(rt.channels_last), top=convs),
        )
    if "sample" in args.only:
        n_images, batch = (125, 125) if args.iters else (250, 125) if args.quick else (1000, 250)
        ab = bench_sampling_ab(device, n_images, batch)
        show(
            "10-step sampling throughput: DiffuseVAE.refine, cpu preset, inference_mode; "
            f"{ab_note} {tag}",
            AB_IMG_HEADER,
            ab,
        )
        sampling, mem, ab_a = bench_sampling(device, 64, rough, n, rt.channels_last)
        show(
            "DDIM refinement latency, cpu-preset UNet, batch 64, "
            f"{layout(rt.channels_last)}, inference_mode; "
            f"peak memory {mem:.0f} MiB {tag}",
            ["steps", "batch", "s/batch", "ms/image", "how"],
            sampling,
        )
        show(f"A/B ({ab_note})", AB_HEADER, ab_a)
        out["sampling"] = dict(ab=ab, rows=sampling, peak_mem_mib=mem, ab_autograd=ab_a)
    if "ab" in args.only:
        ab = [bench_ema(p, device, n(50, 5)) for p in ("cpu", "cifar10")]
        ab += [
            bench_attention("cpu", 64, device, n(30, 5)),
            bench_attention("cifar10", cifar_batch, device, n(30, 5)),
        ]
        show(f"A/B of kernels the code chooses ({ab_note}) {tag}", AB_HEADER, ab)
        out["ab"] = ab
    if "diffusers" in args.only:
        rows = out["diffusers"] = bench_diffusers(UNet2DModel, device, cifar_batch, n(5, 2), rounds)
        show(
            "forward + backward, the DDPM CIFAR-10 UNet in a matched configuration, same batch, "
            f"process and memory format {tag}",
            ["model", "layout", "params", "batch", "ms fwd+bwd", "img/s"],
            rows,
        )
        ours, theirs = rows[0]["params"], rows[2]["params"]
        print(
            "parameter counts identical: the same modules"
            if ours == theirs
            else f"parameter difference "
            f"{theirs - ours:+,}: the mapping in bench_diffusers no longer matches the preset"
        )
        by = {(r["model"], r["layout"]): r["ms_fwd_bwd"] for r in rows}
        for name in ("ours (unet.UNet)", "ours, transposed up-conv"):
            print(
                f"img/s {name} / diffusers: "
                + ", ".join(
                    f"{lay} {by['diffusers UNet2DModel', lay] / by[name, lay]:.2f}"
                    for lay in ("contiguous", "channels_last")
                )
            )
    print(f"\ntotal {time.time() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
