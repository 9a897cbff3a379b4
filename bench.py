"""Benchmark DiffuseVAE's networks: training throughput, FLOPs and fraction of peak, memory, sampling latency, and
before/after figures for the speed choices the code makes (modelled on nanoGPT's bench.py).

    python bench.py                  # everything but the diffusers comparison (~5 min on 2 idle CPU cores)
    python bench.py --quick          # fewer iterations, 100- and 1000-step sampling extrapolated (< 1 min)
    python bench.py --diffusers      # only our CIFAR-10 UNet beside diffusers' UNet2DModel (pip install diffusers)
    python bench.py --device cpu --json bench.json
    OMP_NUM_THREADS=1 python bench.py --quick      # one core

The networks are built from train.PRESETS as train.py builds them, with random weights and random inputs in [-1, 1]
(the speed depends on neither). A training step is train.py's: forward, backward, gradient clipping, AdamW; on CUDA
under bf16 autocast with TF32 and channels_last, on the CPU in fp32. FLOPs are counted by torch.utils.flop_counter
(matmuls, convolutions, attention; forward + backward; elementwise ops are not counted). Times are means after
warm-up. Benchmarks never go in tests/: their numbers belong to a machine, not to the code.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ddpm
import diffusevae as DV
from train import EMA, PRESETS, make_unet, make_vae

IMG_CH = {"fashion_mnist": 1, "cifar10": 3}  # image channels of each preset's dataset


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


def peak_memory_mib(device, reset=False):
    """Peak memory since the last reset: CUDA's allocator peak, or the process's peak RSS (ru_maxrss), which Linux
    restarts from the current RSS when 5 is written to /proc/self/clear_refs (elsewhere: the whole run's peak)."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if reset and os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def measure_peaks(device):
    """GFLOP/s of large dense kernels, the best of 5 means of 3 calls: the denominators of "% of peak"."""
    def gflops(fn, flops):
        fn()
        return flops / min(timeit(fn, 3, device, warmup=0) for _ in range(5)) / 1e9
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    if device.type == "cuda":
        a16, b16 = a.bfloat16(), b.bfloat16()
        return {"matmul tf32": gflops(lambda: a @ b, 2 * n**3),  # fp32 inputs, TF32 allowed as in train.py
                "matmul bf16": gflops(lambda: a16 @ b16, 2 * n**3)}
    x, w = torch.randn(16, 256, 16, 16), torch.randn(256, 256, 3, 3)  # oneDNN's direct conv can outrun MKL's sgemm
    return {"matmul fp32": gflops(lambda: a @ b, 2 * n**3),         # (2.2x on an AVX-512 AMD EPYC): take the larger
            "conv3x3 fp32": gflops(lambda: F.conv2d(x, w, padding=1), 2 * 16 * 256 * 256 * 9 * 16 * 16)}


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def show(title, header, rows):
    """Print a table of dicts; floats >= 100 as integers, smaller ones with 3 significant digits."""
    fmt = {float: lambda v: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}", int: lambda v: f"{v:,}"}
    cells = [header] + [[fmt.get(type(v), str)(v) for v in r.values()] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for r in cells:
        print("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))


def ab_row(what, before, after, before_ms, after_ms):
    return dict(what=what, before=before, after=after, before_ms=before_ms, after_ms=after_ms,
                speedup=before_ms / after_ms)


# ----------------------------------------------------------------------------- the networks, as train.py builds them

def build(kind, preset, device, dropout=None):
    """kind 'vae', 'unet' (conditioned on x_hat_0: DiffuseVAE) or 'ddpm' (unconditional), random weights."""
    cfg = PRESETS[preset]
    img_ch = IMG_CH[cfg["dataset"]]
    if kind == "vae":
        return make_vae(cfg, img_ch).to(device)
    return make_unet(cfg, img_ch, cond_ch=img_ch if kind == "unet" else 0, dropout=dropout).to(device)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def bench_train(kind, preset, batch, device, channels_last, iters, peak):
    """One train.py optimisation step on a fixed random batch: time, FLOPs, % of peak, peak memory."""
    peak_memory_mib(device, reset=True)
    cfg = PRESETS[preset]
    model = build(kind, preset, device).train()
    x0 = torch.rand(batch, IMG_CH[cfg["dataset"]], cfg["image_size"], cfg["image_size"], device=device) * 2 - 1
    x_hat0 = (x0 + 0.1 * torch.randn_like(x0)).clamp(-1, 1)  # stands in for the frozen VAE's dec(z): not timed
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x0, x_hat0 = (x.contiguous(memory_format=torch.channels_last) for x in (x0, x_hat0))
    diffusion = ddpm.make_diffusion(cfg["schedule"], cfg["T"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["vae_lr" if kind == "vae" else "lr"], betas=(0.9, 0.999),
                            weight_decay=0.0, fused=device.type == "cuda")

    def loss_fn():
        with autocast(device):
            if kind == "vae":
                rec, kl, _ = model(x0)
                return (kl - rec).mean() / x0[0].numel()  # the negative ELBO per dimension
            return DV.ddpm_loss(model, diffusion, x0, x_hat0, form=2)[0].mean()

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    # the counter has no formula for the CPU's fused attention kernel: count attention as its two matmuls
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss_fn().backward()
    model.zero_grad(set_to_none=True)
    sec, flops = timeit(step, iters, device, warmup=2), counter.get_total_flops()
    return dict(model=f"{kind} ({preset})", batch=batch, params=n_params(model),
                layout="channels_last" if channels_last else "contiguous", ms_per_step=1e3 * sec,
                img_per_s=batch / sec, gflop_per_step=flops / 1e9, gflop_per_s=flops / sec / 1e9,
                pct_of_peak=100 * flops / sec / 1e9 / peak, peak_mem_mib=peak_memory_mib(device))


# ----------------------------------------------------------------------------- sampling and the A/B figures

def bench_sampling(device, batch, quick, n):
    """DDIM refinement latency of the cpu-preset UNet (diffusevae.refine, Formulation 2), and A/B (a)."""
    peak_memory_mib(device, reset=True)
    cfg = PRESETS["cpu"]
    net, vae = build("unet", "cpu", device).eval(), build("vae", "cpu", device).eval()
    diffusion = ddpm.make_diffusion(cfg["schedule"], cfg["T"]).to(device)
    x_hat0 = vae.sample(batch, device=device)[0]  # made under no_grad: usable with autograd on below
    # --quick: every step is one denoiser call of the same cost, so 100 and 1000 steps are 10x and 100x 10 steps
    measured = (10,) if quick else (10, 100, 1000)
    with torch.inference_mode():
        DV.refine(net, diffusion, x_hat0, form=2, steps=10)  # warm-up
        sec = {s: timeit(lambda: DV.refine(net, diffusion, x_hat0, form=2, steps=s), 1, device, warmup=0)
               for s in measured}
    rows = []
    for s in (10, 100, 1000):
        seconds = sec.get(s, sec[10] * s / 10)
        how = "measured" if s in sec else "extrapolated linearly from 10 steps"
        rows.append(dict(steps=s, batch=batch, seconds=seconds, ms_per_image=1e3 * seconds / batch, how=how))
    mem = peak_memory_mib(device)
    x, t = torch.randn_like(x_hat0), torch.full((batch,), cfg["T"] // 2, device=device)
    modes = {"autograd on": torch.enable_grad, "no_grad (refine's own)": torch.no_grad,
             "inference_mode (sample.py)": torch.inference_mode}
    ms = {}
    for name, mode in modes.items():
        with mode():
            ms[name] = 1e3 * timeit(lambda: net(x, t, x_hat0), n(20, 3), device)
    after = "inference_mode (sample.py)"
    ab = [ab_row(f"(a) one denoiser call, batch {batch}", m, after, ms[m], ms[after]) for m in list(modes)[:2]]
    return rows, mem, ab


def bench_ema(preset, device, iters):
    """(b) train.EMA's one fused torch._foreach_lerp_ against one lerp_ per parameter tensor."""
    model, decay = build("unet", preset, device), PRESETS[preset]["ema_decay"]
    ema = EMA(model, decay)

    @torch.no_grad()
    def loop():
        for e, p in zip(ema.params, model.parameters()):
            e.lerp_(p, 1 - decay)
    return ab_row(f"(b) EMA update, {preset} UNet ({len(ema.params)} tensors, {n_params(model):,} params)",
                  "per-tensor loop", "_foreach_lerp_", 1e3 * timeit(loop, iters, device),
                  1e3 * timeit(lambda: ema.update(model, 10**9), iters, device))


def bench_attention(preset, batch, device, iters):
    """(c) forward + backward of attention at the preset's attention resolution: the explicit softmax(q k^T /
    sqrt(C)) v against F.scaled_dot_product_attention (unet.AttnBlock), q, k, v strided as in AttnBlock."""
    cfg = PRESETS[preset]
    res = cfg["attn_resolutions"][0]
    C = cfg["ch"] * cfg["ch_mult"][int(math.log2(cfg["image_size"] // res))]
    qkv = torch.randn(batch, 1, res * res, 3 * C, device=device, requires_grad=True)  # (B, 1, HW, 3C)

    def explicit(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C), dim=-1) @ v  # (B, 1, HW, HW) @ (B, 1, HW, C)
    ms = []
    for attend in (explicit, F.scaled_dot_product_attention):
        def fwd_bwd():
            with autocast(device):
                out = attend(*qkv.chunk(3, dim=-1))
            out.float().sum().backward()
        ms.append(1e3 * timeit(fwd_bwd, iters, device))
    with torch.no_grad(), autocast(device):
        err = (explicit(*qkv.chunk(3, dim=-1)) - F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))).abs().max()
    return ab_row(f"(c) attention fwd+bwd {res}x{res}, C={C}, batch {batch} (max |diff| {err.item():.0e})",
                  "explicit softmax", "SDPA", *ms)


def bench_diffusers(UNet2DModel, device, batch, iters):
    """Our canonical DDPM CIFAR-10 UNet (unconditional, dropout 0) beside diffusers' UNet2DModel, matched."""
    cfg = PRESETS["cifar10"]
    ours = build("ddpm", "cifar10", device, dropout=0.0)
    attn = [cfg["image_size"] // 2**i in cfg["attn_resolutions"] for i in range(len(cfg["ch_mult"]))]
    chans = [cfg["ch"] * m for m in cfg["ch_mult"]]
    theirs = UNet2DModel(
        sample_size=cfg["image_size"], in_channels=3, out_channels=3, block_out_channels=tuple(chans),
        layers_per_block=cfg["num_res_blocks"],  # their up blocks have layers_per_block + 1 resnets, as ours
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=chans[attn.index(True)],  # heads = channels / head dim = 1: single-head, as DDPM
        norm_num_groups=cfg["norm_groups"], norm_eps=1e-6, dropout=0.0,
        flip_sin_to_cos=False, freq_shift=1,  # our timestep embedding: sin then cos, exponents over half - 1
    ).to(device)
    x = torch.rand(batch, 3, cfg["image_size"], cfg["image_size"], device=device) * 2 - 1
    t = torch.randint(0, cfg["T"], (batch,), device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        for model in (ours, theirs):
            model.to(memory_format=torch.channels_last)
    rows = []
    for name, model, fwd in (("ours (unet.UNet)", ours, lambda: ours(x, t)),
                             ("diffusers UNet2DModel", theirs, lambda: theirs(x, t).sample)):
        def fwd_bwd():
            with autocast(device):
                out = fwd()
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        sec = timeit(fwd_bwd, iters, device, warmup=2)
        rows.append(dict(model=name, params=n_params(model), batch=batch, ms_fwd_bwd=1e3 * sec, img_per_s=batch / sec))
    return rows


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer iterations: a rough figure in under a minute")
    p.add_argument("--diffusers", action="store_true", help="only the side-by-side with diffusers' UNet2DModel")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to PATH as JSON")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available; drop the flag to use the CPU")
    if cuda:  # as train.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.diffusers:  # not a dependency of this project: imported for this option only
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise SystemExit("--diffusers compares with diffusers' UNet2DModel, which is not installed here: "
                             "pip install diffusers")

    def n(full, quick):  # iteration counts
        return quick if args.quick else full
    torch.manual_seed(0)
    t_start = time.time()

    peaks = measure_peaks(device)
    peak = peaks["matmul bf16"] if cuda else max(peaks.values())  # training runs under bf16 autocast on CUDA
    mem_kind = ("torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process (ru_maxrss, torch included), "
                + ("reset before each row" if os.path.exists("/proc/self/clear_refs") else "the whole run's peak"))
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (", --quick" if args.quick else ""))
    print("peak: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()) + f"; % of peak is of {peak:.1f}")
    out = dict(device=str(device), device_name=name, torch=torch.__version__, threads=torch.get_num_threads(),
               quick=args.quick, peaks_gflop_per_s=peaks, peak_gflop_per_s=peak, memory=mem_kind)
    cifar_batch = PRESETS["cifar10"]["batch_size"] if cuda else 8  # 8 keeps the 35.7M-parameter UNet affordable

    if args.diffusers:
        rows = out["diffusers"] = bench_diffusers(UNet2DModel, device, cifar_batch, n(10, 2))
        show("forward + backward, the DDPM CIFAR-10 UNet in a matched configuration, same batch and process",
             ["model", "params", "batch", "ms fwd+bwd", "img/s"], rows)
        diff = rows[1]["params"] - rows[0]["params"]
        print("parameter counts identical: the same modules" if diff == 0 else f"parameter difference {diff:+,}: "
              "the mapping in bench_diffusers no longer matches the preset")
        print(f"time diffusers / ours: {rows[1]['ms_fwd_bwd'] / rows[0]['ms_fwd_bwd']:.2f}")
    else:
        train, ab_d = [bench_train("vae", "cpu", PRESETS["cpu"]["batch_size"], device, cuda, n(50, 3), peak)], []
        unets = (("cpu", PRESETS["cpu"]["batch_size"], n(30, 3)), ("cifar10", cifar_batch, n(15, 2)))
        for preset, batch, iters in unets:
            by_layout = {cl: bench_train("unet", preset, batch, device, cl, iters, peak) for cl in (False, True)}
            train.append(by_layout[cuda])  # the layout train.py uses: channels_last on CUDA only
            ab_d.append(ab_row(f"(d) UNet train step, {preset} preset, batch {batch} (train.py: CUDA only)",
                               "contiguous", "channels_last", *(by_layout[cl]["ms_per_step"] for cl in (False, True))))
        show(f"training step: forward + backward + clipping + AdamW. Peak memory: {mem_kind}",
             ["model", "batch", "params", "layout", "ms/step", "img/s", "GFLOP/step", "GFLOP/s", "% peak", "peak MiB"],
             train)
        sampling, mem, ab = bench_sampling(device, 64, args.quick, n)
        show(f"DDIM refinement with the cpu-preset conditional UNet, inference_mode; peak memory {mem:.0f} MiB",
             ["steps", "batch", "s/batch", "ms/image", "how"], sampling)
        ab += [bench_ema(p, device, n(50, 5)) for p in ("cpu", "cifar10")]
        ab += [bench_attention("cpu", 64, device, n(30, 5)), bench_attention("cifar10", cifar_batch, device, n(30, 5))]
        show("A/B of the speed choices the code makes (speedup = before / after; below 1: slower on this machine)",
             ["what", "before", "after", "before ms", "after ms", "speedup"], ab + ab_d)
        out.update(train=train, sampling=dict(rows=sampling, peak_mem_mib=mem), ab=ab + ab_d)
    print(f"\ntotal {time.time() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
