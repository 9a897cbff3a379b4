"""Train DiffuseVAE in two stages (Pandey et al. 2022, arXiv:2201.00308): the VAE, then the refiner.

    python train.py --stage vae               # stage 1: the VAE, maximising the ELBO (vae.py)
    python train.py --stage ddpm              # stage 2: the refiner on (x_0, x_hat_0), VAE frozen
    python train.py --stage ddpm --cond none  # the unconditional DDPM, the same UNet and budget
    python train.py --stage ddpm --set t_start=50 lr=2e-3      # any key of the preset, checked
    torchrun --nproc_per_node=4 train.py --stage ddpm          # several GPUs (or CPU processes)

Each stage writes one checkpoint (runtime.py) and, every sample_every steps, a sample grid and a
loss curve next to it. A step's randomness is a function of (seed, rank, step), so --resume
continues exactly, with the saved configuration. Ctrl-C and SIGTERM save before exiting.
"""

import argparse
import ast
import copy
import math
import os
import signal
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import ddpm
import diffusevae
import runtime
from data import DATASETS, DataError, load_dataset, save_grid, save_loss_curve, to_model_range
from runtime import CheckpointError, load_checkpoint, save_atomic
from unet import UNet, check_config
from vae import VAE, fit_expost_prior, sample_prior

# "cpu": 2 CPU cores, the refiner predicting x_0 - x_hat_0 on the code t it starts from, 0..t_start.
# "paper": it on the paper's objective, eps on every t. "cifar10", "celeba64": the paper's settings.
CPU = (
    dict(dataset="fashion_mnist", image_size=32, subset=0, batch_size=64)  # data
    | dict(lr=1e-3, vae_lr=2e-3, warmup=100, ema_decay=0.995)  # AdamW and the EMA
    | dict(vae_steps=1500, ddpm_steps=1000)  # each stage's steps
    | dict(vae_ch=32, z_dim=32, prior_k=10)  # the VAE and its ex-post prior's components
    | dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)  # UNet
    | dict(norm_groups=8, schedule="linear", T=1000)
    | dict(target="residual", t_start=110, cond_drop=0.0)  # the refiner's target, range, dropout
    | dict(log_every=50, sample_every=500, ckpt_every=250)
)
PAPER = CPU | dict(target="eps", t_start=999)
CIFAR10 = (
    CPU
    | dict(dataset="cifar10", batch_size=128, sample_every=10_000, ckpt_every=5000)
    | dict(lr=2e-4, vae_lr=1e-4, warmup=5000, ema_decay=0.9999)
    | dict(vae_steps=200_000, ddpm_steps=800_000, vae_ch=64, z_dim=128)
    | dict(ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16], dropout=0.3)
    | dict(norm_groups=32, target="eps", t_start=999)
)
CELEBA64 = CIFAR10 | dict(dataset="folder", image_size=64, batch_size=64, z_dim=256)
CELEBA64 |= dict(ch_mult=[1, 2, 2, 2, 4], dropout=0.1)
PRESETS = dict(cpu=CPU, paper=PAPER, cifar10=CIFAR10, celeba64=CELEBA64)
RUN_FLAGS = dict(preset="cpu", form=2, cond="vae", seed=0)  # the defaults --resume checks
UNET_KEYS = "ch ch_mult num_res_blocks attn_resolutions dropout image_size norm_groups".split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add, on_off = p.add_argument, list(runtime.AUTO_ON_OFF)
    add("--stage", required=True, choices=["vae", "ddpm"])
    add("--preset", default=None, choices=sorted(PRESETS), help="default: cpu")
    add("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="lr=2e-3 ch=16")
    add("--form", type=int, default=None, choices=[1, 2], help="DiffuseVAE's formulation (2)")
    add("--cond", default=None, choices=["vae", "none"], help="none: the unconditional DDPM")
    add("--out_dir", default="runs/fashion", help="where the checkpoint and pictures go")
    add("--vae_ckpt", default=None, help="stage 2's frozen VAE (default: OUT_DIR/vae.pt)")
    add("--data_dir", default=None, help="the dataset's folder (default: data.py's)")
    add("--steps", type=int, default=None, help="optimisation steps (default: the preset's)")
    add("--seed", type=int, default=None, help="default: 0")
    add("--resume", action="store_true", help="continue OUT_DIR's run of this stage exactly")
    add("--device", default=None, help="cuda | cpu (default: cuda when present)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--channels_last", default="auto", choices=on_off, help="NHWC convs (auto: on)")
    add("--bf16", default="auto", choices=on_off, help="bf16 autocast (auto: on CUDA)")
    add("--deterministic", action="store_true", help="deterministic kernels only")
    args = p.parse_args(argv)
    args.given = {k for k in RUN_FLAGS if getattr(args, k) is not None}  # what --resume checks
    vars(args).update({k: v for k, v in RUN_FLAGS.items() if k not in args.given})
    args.ckpt = os.path.join(args.out_dir, f"{args.stage}.pt")
    args.vae_ckpt = args.vae_ckpt or os.path.join(args.out_dir, "vae.pt")
    try:
        cfg = make_config(PRESETS[args.preset], args.set, args.stage, args.steps)
    except ValueError as e:
        p.error(str(e))
    cfg |= dict(form=args.form, cond=args.cond, seed=args.seed)
    if args.cond == "none":  # the baseline: no shift, nothing to drop, the full chain, no residual
        target = "eps" if cfg["target"] == "residual" else cfg["target"]
        cfg |= dict(form=1, cond_drop=0.0, t_start=cfg["T"] - 1, target=target)
    return args, cfg


def make_config(preset, overrides, stage, steps=None):
    """The preset with --set's KEY=VALUE pairs (each a Python literal, else a string, of the preset
    key's type), every key's range checked."""
    cfg = dict(preset)
    for pair in overrides:
        key, _, text = pair.partition("=")
        if key not in cfg:
            keys = ", ".join(sorted(cfg))
            raise ValueError(f"--set {pair}: no key {key!r} in the preset; its keys are {keys}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        value = float(value) if isinstance(cfg[key], float) and isinstance(value, int) else value
        if type(value) is not type(cfg[key]):
            like = f"a {type(cfg[key]).__name__} like {cfg[key]!r}"
            raise ValueError(f"--set {pair}: {key} takes {like}")
        cfg[key] = value
    cfg["steps"] = cfg[f"{stage}_steps"] if steps is None else steps
    cfg["peak_lr"] = cfg["vae_lr" if stage == "vae" else "lr"]
    ints = {k: v for k, v in cfg.items() if type(v) is int and k not in ("subset", "t_start")}
    small = [k for k, v in ints.items() if v < 1]
    rules = [
        (not small, f"{', '.join(small)}: every count, size and interval is at least 1"),
        (cfg["subset"] >= 0, "subset (0: every image) is at least 0"),
        (min(cfg["lr"], cfg["vae_lr"]) > 0, "lr and vae_lr are positive"),
        (0 <= cfg["ema_decay"] < 1, "ema_decay is in [0, 1) (the EMA's weight on itself)"),
        (cfg["vae_ch"] % 8 == 0 < cfg["vae_ch"], "vae_ch is a positive multiple of 8 (GroupNorm)"),
        (cfg["image_size"] % 8 == 0, "image_size is a multiple of 8 (the VAE halves it thrice)"),
        (cfg["dataset"] in DATASETS, f"dataset is one of {DATASETS}"),
        (cfg["schedule"] in ddpm.SCHEDULES, f"schedule is one of {ddpm.SCHEDULES}"),
        (0 <= cfg["t_start"] < cfg["T"], "t_start is a code timestep 0..T-1 (T-1: the full chain)"),
        (0 <= cfg["cond_drop"] < 1, "cond_drop (the fraction without x_hat_0) is in [0, 1)"),
        (cfg["target"] in diffusevae.TARGETS, f"target is one of {diffusevae.TARGETS}"),
    ]
    broken = [rule for ok, rule in rules if not ok]
    try:
        check_config(img_ch=1, cond_ch=0, **{k: cfg[k] for k in UNET_KEYS})
    except ValueError as e:
        broken.append(str(e))
    if broken:
        raise ValueError(f"invalid configuration: {'; '.join(broken)} (got {cfg})")
    return cfg


def resumed_config(args, cfg):
    """The configuration --resume continues: the saved one, with --steps when given. A flag or --set
    value that differs from the saved run is refused, each named."""
    saved = load_checkpoint(args.ckpt, args.stage, "Drop --resume to start a new run.")["config"]
    if set(cfg) - set(saved):
        missing = ", ".join(sorted(set(cfg) - set(saved)))
        raise CheckpointError(f"{args.ckpt}'s configuration has no {missing}: use a new --out_dir")
    given = {pair.partition("=")[0] for pair in args.set} | (args.given - {"preset"})
    given |= set(PRESETS[args.preset]) if "preset" in args.given else set()
    given -= {"steps"}  # --steps may train further
    differ = [f"{k}={cfg[k]!r} (saved: {saved[k]!r})" for k in sorted(given) if cfg[k] != saved[k]]
    if differ:
        raise ValueError(
            f"--resume continues the run saved in {args.ckpt}, but the flags ask for "
            f"{'; '.join(differ)}. Drop those flags to continue it as saved, or start a new run "
            f"with another --out_dir"
        )
    return dict({k: saved[k] for k in cfg}, steps=args.steps or saved["steps"])


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta each step: self.model averages the last ~1 / (1 - d)
    steps' weights (Polyak averaging); sampling uses it, checkpoints save it as "ema"."""

    def __init__(self, model, decay):
        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(list(self.model.parameters()), params, 1 - self.decay)
        for b, mb in zip(self.model.buffers(), model.buffers()):
            b.copy_(mb)


@dataclass
class Run:
    """One stage in one process. `model` is what a checkpoint saves, `wrapped` what the loop calls
    (the same weights, compiled and/or in DDP); `vae` is stage 2's frozen VAE (None: baseline)."""

    args: argparse.Namespace
    cfg: dict
    rt: runtime.Runtime
    rank: int = 0
    images: torch.Tensor = None
    shard: torch.Tensor = None
    vae: VAE = None
    diffusion: ddpm.GaussianDiffusion = None
    model: torch.nn.Module = None
    wrapped: torch.nn.Module = None
    ema: EMA = None
    opt: torch.optim.Optimizer = None
    step: int = 0
    history: list = field(default_factory=list)


def main(argv=None):
    args, cfg = parse_args(argv)
    try:
        cfg = resumed_config(args, cfg) if args.resume else cfg
        run = Run(args, cfg, *runtime.setup_processes(args))
        start(run)
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    stop = runtime.catch_signals()  # Ctrl-C / SIGTERM: finish the step, save, exit 128 + signal
    train_loop(run, stop)
    finish(run, stop)
    if stop["signal"]:
        raise SystemExit(128 + stop["signal"])


def on_device(model, rt):
    """(the model on rt's device and in its layout, what the loop calls: compiled if asked)."""
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)  # NHWC: the convs' fastest layout
    return model, torch.compile(model) if rt.compile else model


def start(run):
    """This process's images, the models (the same initial weights on every rank) and the training
    state, fresh or the checkpoint's. A new run never overwrites a checkpoint."""
    args, cfg, rt = run.args, run.cfg, run.rt
    if cfg["batch_size"] % rt.world:
        raise ValueError(f"batch_size {cfg['batch_size']} must divide among {rt.world} processes")
    if run.rank == 0 and not args.resume and os.path.exists(args.ckpt):
        raise ValueError(f"{args.ckpt} exists: pass --resume to continue it, or another --out_dir")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write to {args.out_dir} ({e.strerror}); choose another --out_dir")
    size = cfg["image_size"]
    images, _ = load_dataset(cfg["dataset"], args.data_dir, split="train", image_size=size)
    run.images = images[: cfg["subset"] or len(images)]
    run.shard = run.images[run.rank :: rt.world]  # each process trains on its own slice
    if len(run.shard) < cfg["batch_size"] // rt.world:
        raise ValueError(f"{len(run.shard)} images per process, under a batch: lower batch_size")
    torch.manual_seed(cfg["seed"])
    img_ch = images.shape[1]
    if args.stage == "vae":
        model = VAE(img_ch=img_ch, image_size=size, ch=cfg["vae_ch"], z_dim=cfg["z_dim"])
    else:
        if cfg["cond"] == "vae":
            run.vae = on_device(frozen_vae(args.vae_ckpt, img_ch, cfg), rt)[0]
        unet_args = {k: cfg[k] for k in UNET_KEYS}
        model = UNet(img_ch=img_ch, cond_ch=img_ch if run.vae else 0, **unet_args)
        run.diffusion = ddpm.make_diffusion(cfg["schedule"], cfg["T"]).to(rt.device)
    run.model, run.wrapped = on_device(model, rt)
    run.ema = EMA(run.model, cfg["ema_decay"])
    run.opt = runtime.make_optimizer(run.model.parameters(), cfg["peak_lr"], rt)
    if args.resume:
        resume(run)
    run.wrapped = runtime.wrap_ddp(run.wrapped, rt)


def frozen_vae(path, img_ch, cfg):
    """Stage 1's EMA VAE with its ex-post prior, checked against the dataset."""
    hint = "Train the VAE first: python train.py --stage vae (or pass --vae_ckpt PATH)."
    vae = VAE.from_checkpoint(load_checkpoint(path, "vae", hint))
    if vae.prior is None:
        out_dir = os.path.dirname(path) or "."
        raise CheckpointError(
            f"{path} has no ex-post prior (stage 1 did not finish). Finish it "
            f"first: python train.py --stage vae --resume --out_dir {out_dir}"
        )
    made, has = (vae.config["img_ch"], vae.config["image_size"]), (img_ch, cfg["image_size"])
    if made != has:
        raise CheckpointError(
            f"the VAE in {path} makes {made[0]}x{made[1]} images, but "
            f"{cfg['dataset']} has {has[0]}x{has[1]}"
        )
    return vae


def resume(run):
    """Everything the checkpoint holds back into the run, after checking its VAE is this one."""
    path = run.args.ckpt
    ck = load_checkpoint(path, stage=run.args.stage, hint="Drop --resume to start a new run.")
    vae = run.vae.state_dict().items() if run.vae is not None else []
    if any(not torch.equal(v.cpu(), ck["vae"]["ema"][k]) for k, v in vae):
        raise ValueError(
            f"{path} was trained with another VAE than {run.args.vae_ckpt}: pass "
            f"that one with --vae_ckpt, or start a new run with another --out_dir"
        )
    run.model.load_state_dict(ck["model"])
    run.ema.model.load_state_dict(ck["ema"])
    run.opt.load_state_dict(ck["optimizer"])
    run.step, run.history = ck["step"], [tuple(h) for h in ck["history"]]


def step_seed(seed, rank, step):
    """A step's seed: numpy's SeedSequence hashes (seed, rank, step) into independent streams."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def train_step(run):
    """One step on a fresh batch: the negative ELBO (stage 1) or L_DDPM (stage 2), backward,
    gradient clipping, AdamW, EMA. Returns the batch's mean loss."""
    cfg, rt = run.cfg, run.rt
    torch.manual_seed(step_seed(cfg["seed"], run.rank, run.step))  # batch, z, t, noise, dropout
    idx = torch.randint(0, len(run.shard), (cfg["batch_size"] // rt.world,))
    x0 = to_model_range(run.shard[idx]).to(rt.device)
    x0 = x0.contiguous(memory_format=torch.channels_last) if rt.channels_last else x0
    for group in run.opt.param_groups:  # linear warm-up, a function of the step
        group["lr"] = cfg["peak_lr"] * min(1.0, (run.step + 1) / cfg["warmup"])
    if run.args.stage == "vae":
        with runtime.autocast(rt):
            loss = run.wrapped(x0).mean()
    else:
        with torch.no_grad():  # x_hat_0 = dec(z), z ~ q(z|x_0), in fp32 as sampling decodes it
            x_hat0 = run.vae.reconstruct(x0)[0] if run.vae is not None else None
        t = torch.randint(0, cfg["t_start"] + 1, (len(x0),), device=rt.device)  # where it starts
        options = dict(form=cfg["form"], target=cfg["target"], cond_drop=cfg["cond_drop"], t=t)
        with runtime.autocast(rt):
            loss = diffusevae.ddpm_loss(run.wrapped, run.diffusion, x0, x_hat0, **options)[0].mean()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), 1.0)
    run.opt.step()
    run.ema.update(run.model)
    run.step += 1
    return loss


def train_loop(run, stop):
    """Steps until cfg["steps"] or a signal: the mean loss every log_every steps, a checkpoint every
    ckpt_every, pictures every sample_every."""
    cfg, master, every, window = run.cfg, run.rank == 0, run.cfg["log_every"], []
    bar = tqdm(total=cfg["steps"], initial=run.step, disable=not master, desc=run.args.stage)
    run.wrapped.train()
    while run.step < cfg["steps"]:
        window.append(train_step(run).detach())
        step = run.step
        if step % every == 0 or step == cfg["steps"]:
            mean_loss, window = torch.stack(window).mean().item(), []
            if not math.isfinite(mean_loss):
                raise SystemExit(
                    f"error: loss is {mean_loss} at step {step}; stopping. The last good "
                    f"checkpoint {run.args.ckpt} is kept; lower lr (--set lr=...) or check data."
                )
            run.history.append((step, mean_loss))
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            bar.update(every if step % every == 0 else step % every)
        if run.rt.world > 1 and runtime.any_rank(stop["signal"] is not None, run.rt):
            stop["signal"] = stop["signal"] or signal.SIGTERM  # every rank stops at this step
        if step % cfg["ckpt_every"] == 0 or step == cfg["steps"] or stop["signal"]:
            check_finite(run)  # on every rank: the replicas are equal, so they all stop here
            if master:
                save_checkpoint(run)
        if master and (step % cfg["sample_every"] == 0 or step == cfg["steps"]):
            write_pictures(run)
        if stop["signal"]:
            if master:
                bar.write(f"stopped by signal {stop['signal']}, step {step}; saved {run.args.ckpt}")
            break
    bar.close()


def check_finite(run):
    """Stops the run, before it saves over the last good checkpoint, if a weight is not finite."""
    bad = [n for n, p in run.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise SystemExit(
            f"error: weights became non-finite ({bad[0]}...) at step {run.step}; "
            f"the last good checkpoint {run.args.ckpt} is kept"
        )


def save_checkpoint(run, prior=None):
    """The run's one checkpoint (runtime.save_atomic); stage 2's holds its frozen VAE, stage 1's
    last one the ex-post prior."""
    cpu = lambda module: {k: v.cpu() for k, v in module.state_dict().items()}
    config = dict(run.cfg, world=run.rt.world)
    ck = dict(stage=run.args.stage, model_args=run.model.config, config=config)
    ck.update(model=cpu(run.model), ema=cpu(run.ema.model), optimizer=run.opt.state_dict())
    ck.update(step=run.step, history=run.history, prior=prior)
    if run.vae is not None:
        ck["vae"] = dict(model_args=run.vae.config, ema=cpu(run.vae), prior=run.vae.prior)
    save_atomic(ck, run.args.ckpt)


def finish(run, stop):
    """After the last step rank 0 writes the final checkpoint; stage 1 first fits the ex-post prior
    (vae.py), a Gaussian mixture over z ~ q(z|x) of the EMA encoder, which sampling draws z from."""
    if run.rank == 0 and run.step >= run.cfg["steps"] and not stop["signal"]:
        prior = None
        if run.args.stage == "vae":
            k, g = run.cfg["prior_k"], torch.Generator().manual_seed(0)
            prior, log_lik = fit_expost_prior(run.ema.model, run.images, k=k, generator=g)
            print(
                f"ex-post prior: {k} Gaussians fitted to {len(run.images)} codes z ~ q(z|x), "
                f"log-likelihood {log_lik:.3f} nats per latent dimension",
                flush=True,
            )
        save_checkpoint(run, prior)
    if run.rt.world > 1:
        runtime.check_replicas(run.model, run.rt, run.rank)


@torch.no_grad()
def write_pictures(run, n=16):
    """Next to the checkpoint: samples of the EMA model (rows of 8: VAE samples, then in stage 2
    their refinements, as sample.py draws them) and the loss curve."""
    cfg, device, base = run.cfg, run.rt.device, os.path.splitext(run.args.ckpt)[0]
    if run.args.stage == "vae":
        g = torch.Generator(device).manual_seed(0)
        rows = [run.ema.model.decode(sample_prior(n, cfg["z_dim"], generator=g, device=device))]
    else:
        model = diffusevae.DiffuseVAE(run.vae, run.ema.model, run.diffusion, cfg)
        steps = min(diffusevae.STEPS, cfg["t_start"] + 1)
        x_hat0, x0 = model.sample(n, diffusevae.generators(0, device), steps=steps)
        rows = [x0] if x_hat0 is None else [x_hat0[:8], x0[:8], x_hat0[8:], x0[8:]]
    save_grid(torch.cat(rows), f"{base}_samples.png", nrow=8)
    if run.history:
        save_loss_curve(run.history, f"{base}_loss.png", f"{run.args.stage} loss")


if __name__ == "__main__":
    main()
