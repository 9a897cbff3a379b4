"""Train DiffuseVAE in two stages (Pandey et al. 2022, arXiv:2201.00308: the joint ELBO splits into L_VAE + L_DDPM, trained in turn).

    python train.py --stage vae                       # stage 1: the VAE, maximising the ELBO (vae.py)
    python train.py --stage ddpm                      # stage 2: the DDPM refiner on (x_0, x_hat_0), VAE frozen
    python train.py --stage ddpm --cond none          # the unconditional DDPM baseline, same UNet and budget
    python train.py --stage ddpm --set t_start=50 lr=2e-3    # any key of the preset, checked against it
    torchrun --nproc_per_node=4 train.py --stage ddpm   # several GPUs (or CPU processes): DistributedDataParallel

Each stage writes one checkpoint (runtime.py describes it) and, periodically, a sample grid and a loss curve next
to it. --resume continues exactly: every step's randomness is a function of (seed, rank, step), so a resumed run
draws the same batches, timesteps and noise as an uninterrupted one. Ctrl-C / SIGTERM save before exiting.
"""
import argparse
import ast
import copy
import math
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import ddpm
import diffusevae
import runtime
import sample
from data import DATASETS, DataError, load_dataset, save_grid, save_loss_curve, to_model_range
from runtime import CheckpointError, load_checkpoint, save_atomic
from unet import UNet
from vae import VAE, fit_expost_prior

# ----------------------------------------------------------------------------- presets
# "cpu" (default): both stages and sampling in well under an hour on a 2-core CPU. Its refiner departs from the
# derivations' objective (eps on every t, sampled from x_T): it predicts the residual x_0 - x_hat_0 on t in 0..t_start
# only, where sampling starts. "cifar10" / "celeba64": the DiffuseVAE paper's settings (its official configs), GPUs.
CPU = dict(dataset="fashion_mnist", image_size=32, subset=0, batch_size=64, lr=1e-3, vae_lr=2e-3, warmup=100,
           vae_steps=1500, ddpm_steps=1000, ema_decay=0.995, vae_ch=32, z_dim=32, prior_k=10,
           ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0, norm_groups=8,
           schedule="linear", T=1000, param="residual", t_start=110, cond_drop=0.0,
           log_every=50, sample_every=500, ckpt_every=250)
PAPER = dict(CPU, param="eps", t_start="full")  # the cpu model on the derivations' objective: eps on every t
CIFAR10 = dict(CPU, dataset="cifar10", batch_size=128, lr=2e-4, vae_lr=1e-4, warmup=5000, vae_steps=200_000,
               ddpm_steps=800_000, ema_decay=0.9999, vae_ch=64, z_dim=128, ch=128, ch_mult=[1, 2, 2, 2],
               num_res_blocks=2, attn_resolutions=[16], dropout=0.3, norm_groups=32, param="eps", t_start="full",
               sample_every=10_000, ckpt_every=5000)
CELEBA64 = dict(CIFAR10, dataset="folder", image_size=64, batch_size=64, z_dim=256, ch_mult=[1, 2, 2, 2, 4], dropout=0.1)
PRESETS = dict(cpu=CPU, paper=PAPER, cifar10=CIFAR10, celeba64=CELEBA64)
RUN_FLAGS = dict(preset="cpu", form=2, cond="vae", seed=0)  # the flags of a run that --resume takes from its checkpoint
UNET_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "image_size", "norm_groups")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["vae", "ddpm"])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: cpu")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="e.g. lr=2e-3 ch=16")
    p.add_argument("--form", type=int, default=None, choices=[1, 2], help="DiffuseVAE formulation (default 2)")
    p.add_argument("--cond", default=None, choices=["vae", "none"], help="none: the unconditional DDPM baseline")
    p.add_argument("--out_dir", default="runs/fashion", help="where the checkpoint, grids and curves go")
    p.add_argument("--vae_ckpt", default=None, help="stage 2's frozen VAE (default: OUT_DIR/vae.pt)")
    p.add_argument("--data_dir", default=None, help="dataset location (default: data.py's for the dataset)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="default: 0")
    p.add_argument("--resume", action="store_true", help="continue OUT_DIR's checkpoint of this stage exactly, "
                   "with its saved configuration")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels_last", default="auto", choices=list(runtime.AUTO_ON_OFF), help="NHWC convs")
    p.add_argument("--bf16", default="auto", choices=list(runtime.AUTO_ON_OFF), help="bf16 autocast (auto: CUDA)")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels only (runtime.deterministic)")
    args = p.parse_args(argv)
    args.given = {k for k, v in RUN_FLAGS.items() if getattr(args, k) is not None}  # what --resume must check
    for key, default in RUN_FLAGS.items():
        setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
    try:
        cfg = make_config(PRESETS[args.preset], args.set, args.cond, args.stage, args.steps)
    except ValueError as e:
        p.error(str(e))
    cfg.update(form=1 if args.cond == "none" else args.form, cond=args.cond, seed=args.seed)  # baseline: no shift
    args.ckpt = os.path.join(args.out_dir, f"{args.stage}.pt")
    args.vae_ckpt = args.vae_ckpt or os.path.join(args.out_dir, "vae.pt")
    return args, cfg


def make_config(preset, overrides, cond, stage, steps=None):
    """The preset with --set's KEY=VALUE pairs (each a Python literal, else a string, of the preset key's type), and
    for --cond none the baseline's settings: the same network and budget, nothing that needs x_hat_0."""
    cfg = dict(preset)
    for pair in overrides:
        key, _, text = pair.partition("=")
        if key not in cfg:
            raise ValueError(f"--set {pair}: no key {key!r} in the preset; its keys are {', '.join(sorted(cfg))}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        value = float(value) if isinstance(cfg[key], float) and isinstance(value, int) else value
        if not (type(value) is type(cfg[key]) or key == "t_start" and (value == "full" or type(value) is int)):
            like = "an int or 'full'" if key == "t_start" else f"a {type(cfg[key]).__name__} like {cfg[key]!r}"
            raise ValueError(f"--set {pair}: {key} takes {like}")
        cfg[key] = value
    if cond == "none":
        cfg.update(t_start="full", cond_drop=0.0, param="eps" if cfg["param"] == "residual" else cfg["param"])
    cfg.update(steps=cfg[f"{stage}_steps"] if steps is None else steps,
               peak_lr=cfg["vae_lr" if stage == "vae" else "lr"])
    counts = ("steps", "batch_size", "warmup", "vae_steps", "ddpm_steps", "z_dim", "prior_k", "T", "log_every",
              "sample_every", "ckpt_every")
    broken = [rule for ok, rule in [
        (min(cfg[k] for k in counts) >= 1, f"{', '.join(counts)} are at least 1"),
        (cfg["subset"] >= 0, "subset (0: every image) is at least 0"),
        (min(cfg["lr"], cfg["vae_lr"]) > 0, "lr and vae_lr are positive"),
        (0 <= cfg["ema_decay"] < 1, "ema_decay is in [0, 1) (the EMA keeps that fraction of itself at each step)"),
        (cfg["vae_ch"] >= 8 and cfg["vae_ch"] % 8 == 0, "vae_ch is a positive multiple of 8 (the VAE's GroupNorm)"),
        (cfg["image_size"] % 8 == 0, "image_size is a multiple of 8 (the VAE halves it three times)"),
        (cfg["dataset"] in DATASETS, f"dataset is one of {DATASETS}"),
        (cfg["schedule"] in ddpm.SCHEDULES, f"schedule is one of {ddpm.SCHEDULES}"),
        (cfg["t_start"] == "full" or 0 <= cfg["t_start"] < cfg["T"], "t_start is 0..T-1 or 'full'"),
        (0 <= cfg["cond_drop"] < 1, "cond_drop (the fraction of examples trained without x_hat_0) is in [0, 1)"),
        (cfg["param"] in diffusevae.PARAMETERISATIONS, f"param is one of {diffusevae.PARAMETERISATIONS}")] if not ok]
    try:  # the stage-2 network's shape, checked by the UNet itself (on the meta device: no memory is allocated)
        with torch.device("meta"):
            UNet(**{k: cfg[k] for k in UNET_KEYS})
    except ValueError as e:
        broken.append(str(e))
    if broken:
        raise ValueError(f"invalid configuration: {'; '.join(broken)} (got {cfg})")
    return cfg


# ----------------------------------------------------------------------------- one run

class EMA:
    """Exponential moving average of the weights (Polyak averaging), with the configured decay d at every step
    and no warm-up: theta_ema <- d theta_ema + (1 - d) theta, so theta_ema averages the last ~1 / (1 - d) steps.
    self.model is a copy of the model that holds the averages: what sampling uses and checkpoints save as "ema"."""

    def __init__(self, model, decay):
        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - self.decay)
        for b, mb in zip(self.model.buffers(), model.buffers()):
            b.copy_(mb)


@dataclass
class Run:
    """One stage in one process: flags, configuration, device choices, rank, the training images and this process's
    slice, in stage 2 the frozen VAE (None for the baseline) and the diffusion; then what a checkpoint saves: the raw
    model (`model` is what the loop calls, compiled and/or DDP-wrapped), its EMA, the optimizer, the step, the losses."""
    args: argparse.Namespace
    cfg: dict
    rt: runtime.Runtime
    rank: int = 0
    images: torch.Tensor = None
    shard: torch.Tensor = None
    vae: VAE = None
    diffusion: ddpm.GaussianDiffusion = None
    raw: torch.nn.Module = None
    model: torch.nn.Module = None
    ema: EMA = None
    opt: torch.optim.Optimizer = None
    step: int = 0
    history: list = field(default_factory=list)


def main(argv=None):
    args, cfg = parse_args(argv)
    try:
        cfg = resumed_config(args, cfg) if args.resume else cfg
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    run = Run(args, cfg, *runtime.setup_processes(args))
    try:
        start(run)
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    stop = runtime.catch_signals()  # Ctrl-C / SIGTERM: finish the step, save, exit 128 + signal
    train_loop(run, stop)
    finish(run, stop)
    if stop["signal"]:
        raise SystemExit(128 + stop["signal"])


def start(run):
    """This process's images, the models (identical initial weights on every rank), the training state: fresh, or
    with --resume the checkpoint's. A new run never overwrites a checkpoint."""
    args, cfg, rt = run.args, run.cfg, run.rt
    if cfg["batch_size"] % rt.world:
        raise ValueError(f"batch_size {cfg['batch_size']} must be divisible by the {rt.world} processes")
    if run.rank == 0:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot write to {args.out_dir} ({e.strerror}); choose a writable --out_dir")
        if not args.resume and os.path.exists(args.ckpt):
            raise ValueError(f"{args.ckpt} exists. Pass --resume to continue it, or another --out_dir for a new run "
                             f"(train.py never overwrites a trained model).")
    images, _ = load_dataset(cfg["dataset"], args.data_dir, split="train", image_size=cfg["image_size"])
    run.images = images[: cfg["subset"] or len(images)]
    run.shard = run.images[run.rank::rt.world]  # each process trains on its own slice
    if len(run.shard) < cfg["batch_size"] // rt.world:
        raise ValueError(f"only {len(run.shard)} images per process for a per-process batch of "
                         f"{cfg['batch_size'] // rt.world}: lower batch_size")
    torch.manual_seed(cfg["seed"])
    if args.stage == "vae":
        model = VAE(img_ch=images.shape[1], image_size=cfg["image_size"], ch=cfg["vae_ch"], z_dim=cfg["z_dim"])
    else:
        if cfg["cond"] == "vae":  # stage 1's EMA VAE, frozen, with its ex-post prior
            hint = "Train the VAE first: python train.py --stage vae (or pass --vae_ckpt PATH)."
            run.vae = runtime.prepare_model(VAE.from_checkpoint(load_checkpoint(args.vae_ckpt, "vae", hint)), rt)[0]
            if run.vae.prior is None:
                raise CheckpointError(f"{args.vae_ckpt} has no ex-post prior: its stage 1 stopped before the last step, "
                                      f"where the prior that sampling draws z from is fitted. Finish it first: "
                                      f"python train.py --stage vae --resume --out_dir {os.path.dirname(args.vae_ckpt) or '.'}")
            if run.vae.config["img_ch"] != images.shape[1] or run.vae.config["image_size"] != cfg["image_size"]:
                raise CheckpointError(f"the VAE in {args.vae_ckpt} makes {run.vae.config['img_ch']}x"
                                      f"{run.vae.config['image_size']} images, but dataset {cfg['dataset']} has "
                                      f"{images.shape[1]}x{cfg['image_size']}")
        model = UNet(img_ch=images.shape[1], cond_ch=images.shape[1] if run.vae else 0,
                     **{k: cfg[k] for k in UNET_KEYS})
        run.diffusion = ddpm.make_diffusion(cfg["schedule"], cfg["T"]).to(rt.device)
    run.raw, run.model = runtime.prepare_model(model, rt)  # checkpoints save raw: no compile or DDP prefix in keys
    run.ema, run.opt = EMA(run.raw, cfg["ema_decay"]), runtime.make_optimizer(run.raw.parameters(), cfg["peak_lr"], rt)
    if args.resume:
        resume(run)
    run.model = runtime.wrap_ddp(run.model, rt)


def resumed_config(args, cfg):
    """The configuration a --resume continues: the one its checkpoint saved (preset, --set, form, cond, seed), with
    --steps when given, to train further. A flag or --set value given that differs from the saved run is refused,
    each named, so a resumed run is the run that was saved."""
    saved = load_checkpoint(args.ckpt, stage=args.stage, hint="Drop --resume to start a new run.")["config"]
    if set(cfg) - set(saved):
        raise CheckpointError(f"{args.ckpt} was written by an older version of train.py (its configuration has no "
                              f"{', '.join(sorted(set(cfg) - set(saved)))}): start a new run with another --out_dir")
    given = {pair.partition("=")[0] for pair in args.set} | (args.given - {"preset"})
    given |= set(PRESETS[args.preset]) if "preset" in args.given else set()
    differ = [f"{k}={cfg[k]!r} (saved: {saved[k]!r})" for k in sorted(given - {"steps"}) if cfg[k] != saved[k]]
    if differ:
        raise ValueError(f"--resume continues the run saved in {args.ckpt}, but the flags ask for {'; '.join(differ)}."
                         f" Drop those flags to continue it as saved, or start a new run with another --out_dir")
    return dict({k: saved[k] for k in cfg}, steps=saved["steps"] if args.steps is None else args.steps)


def resume(run):
    """Everything a checkpoint holds back into the run, after checking it is this run's."""
    path = run.args.ckpt
    ck = load_checkpoint(path, stage=run.args.stage, hint="Drop --resume to start a new run.")
    if ck["model_args"] != run.raw.config:
        raise ValueError(f"{path} holds a model with {ck['model_args']}, but this run builds {run.raw.config}: "
                         f"resume with the same --preset and --set")
    if run.vae is not None and any(not torch.equal(v.cpu(), ck["vae"]["ema"][k])
                                   for k, v in run.vae.state_dict().items()):
        raise ValueError(f"the VAE in {run.args.vae_ckpt} is not the one {path} was trained with; pass the "
                         f"original with --vae_ckpt, or start a new run with another --out_dir")
    run.raw.load_state_dict(ck["model"])
    run.ema.model.load_state_dict(ck["ema"])
    run.opt.load_state_dict(ck["optimizer"])
    run.step, run.history = ck["step"], [tuple(h) for h in ck["history"]]


# ----------------------------------------------------------------------------- the loop

def step_seed(seed, rank, step):
    """The seed of one rank's step: numpy's SeedSequence hashes (seed, rank, step) into independent streams, so no
    rank or step repeats another's draws, and resuming at a step draws what an uninterrupted run drew there."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def train_step(run):
    """One optimisation step on a fresh batch: the negative ELBO (stage 1) or L_DDPM (stage 2), backward,
    gradient clipping, AdamW, EMA. Returns the batch's mean loss."""
    cfg = run.cfg
    torch.manual_seed(step_seed(cfg["seed"], run.rank, run.step))  # one stream: batch, z, t, noise, dropout
    idx = torch.randint(0, len(run.shard), (cfg["batch_size"] // run.rt.world,))
    x0 = runtime.prepare_batch(to_model_range(run.shard[idx]), run.rt)
    for group in run.opt.param_groups:  # linear warm-up, a function of the step: exact on resume
        group["lr"] = cfg["peak_lr"] * min(1.0, (run.step + 1) / cfg["warmup"])
    if run.args.stage == "vae":
        with runtime.autocast(run.rt):
            loss = run.model(x0).mean()  # through the DDP/compile wrapper, so gradients are all-reduced
    else:
        # x_hat_0 = dec(z) outside autocast, in fp32 as sampling decodes it; only the denoiser runs under autocast
        x_hat0 = diffusevae.condition_from_vae(run.vae, x0) if run.vae is not None else None
        with runtime.autocast(run.rt):
            loss = diffusevae.ddpm_loss(run.model, run.diffusion, x0, x_hat0, form=cfg["form"],
                                        t_max=None if cfg["t_start"] == "full" else cfg["t_start"],
                                        param=cfg["param"], cond_drop=cfg["cond_drop"])[0].mean()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.opt.step()
    run.ema.update(run.raw)
    run.step += 1
    return loss


def train_loop(run, stop):
    """Steps until cfg["steps"] or a signal: the mean loss on the tqdm bar every log_every steps, a checkpoint every
    ckpt_every, pictures every sample_every."""
    cfg, master, every = run.cfg, run.rank == 0, run.cfg["log_every"]
    window = []  # the losses since the last log
    bar = tqdm(total=cfg["steps"], initial=run.step, disable=not master, desc=run.args.stage, dynamic_ncols=True)
    run.model.train()
    while run.step < cfg["steps"]:
        window.append(train_step(run).detach())
        step = run.step
        if step % every == 0 or step == cfg["steps"]:
            mean_loss, window = torch.stack(window).mean().item(), []
            if not math.isfinite(mean_loss):
                raise SystemExit(f"error: loss is {mean_loss} at step {step}; stopping. The last good checkpoint "
                                 f"{run.args.ckpt} is kept; lower lr (--set lr=...) or check the data.")
            run.history.append((step, mean_loss))
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            bar.update(every if step % every == 0 else step % every)
        if run.rt.world > 1 and runtime.any_rank(stop["signal"] is not None, run.rt):  # all stop at one step
            stop["signal"] = stop["signal"] or signal.SIGTERM
        if step % cfg["ckpt_every"] == 0 or step == cfg["steps"] or stop["signal"]:
            check_finite(run)  # on every rank: DDP keeps the replicas equal, so all of them stop here together
            if master:
                save_checkpoint(run)
        if master and (step % cfg["sample_every"] == 0 or step == cfg["steps"]):
            write_pictures(run)
        if stop["signal"]:
            if master:
                bar.write(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved to {run.args.ckpt}")
            break
    bar.close()


# ----------------------------------------------------------------------------- saving and finishing

def check_finite(run):
    """Stops the run, before anything is saved over the last good checkpoint, when a weight is not finite."""
    bad = [n for n, p in run.raw.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise SystemExit(f"error: weights became non-finite ({bad[0]}...) at step {run.step}; "
                         f"the last good checkpoint {run.args.ckpt} is kept")


def save_checkpoint(run, prior=None):
    """Rank 0 writes the run's one checkpoint (runtime.save_atomic). Stage 2 stores the frozen VAE it trained with;
    stage 1's last checkpoint stores the ex-post prior."""
    cpu = lambda module: {k: v.cpu() for k, v in module.state_dict().items()}
    ck = dict(stage=run.args.stage, model_args=run.raw.config, model=cpu(run.raw), ema=cpu(run.ema.model),
              config=dict(run.cfg, world=run.rt.world),
              optimizer=run.opt.state_dict(), step=run.step, history=run.history, prior=prior)
    if run.vae is not None:
        ck["vae"] = dict(model_args=run.vae.config, ema=cpu(run.vae), prior=run.vae.prior)
    save_atomic(ck, run.args.ckpt)


def finish(run, stop):
    """After the last step rank 0 writes the final checkpoint; stage 1 first fits the ex-post prior, a Gaussian
    mixture over z ~ q(z|x) of the EMA encoder, from which sampling draws z instead of N(0, I) (vae.py)."""
    if run.rank == 0 and run.step >= run.cfg["steps"] and not stop["signal"]:  # also refreshes a finished run
        prior = None
        if run.args.stage == "vae":
            t0, k = time.time(), run.cfg["prior_k"]
            prior, log_lik = fit_expost_prior(run.ema.model, run.images, k=k, generator=torch.Generator().manual_seed(0))
            print(f"ex-post prior: {k}-component Gaussian mixture fitted to {len(run.images)} codes z ~ q(z|x), "
                  f"log-likelihood {log_lik:.3f} nats per latent dimension ({time.time() - t0:.0f} s)", flush=True)
        save_checkpoint(run, prior)
    if run.rt.world > 1:
        runtime.check_replicas(run.raw, run.rt, run.rank)


@torch.no_grad()
def write_pictures(run, n=16):
    """A sample grid from the EMA weights (rows of 8: VAE samples, then their refinements) and the loss curve,
    next to the checkpoint."""
    cfg, device, model = run.cfg, run.rt.device, run.ema.model
    base = os.path.splitext(run.args.ckpt)[0]
    if run.args.stage == "vae":
        rows = [model.sample(n, generator=torch.Generator(device=device).manual_seed(0), device=device)[0]]
    else:
        m = sample.Refiner(model, run.vae, run.diffusion, cfg)
        x_hat0, x0 = sample.samples(
            m, n, sample.generators(0, device), steps=min(10, cfg["T"] if cfg["t_start"] == "full" else cfg["t_start"] + 1))
        rows = [x0] if x_hat0 is None else sample.pairs(x_hat0, x0)
    save_grid(torch.cat(rows), f"{base}_samples.png", nrow=8)
    if run.history:
        save_loss_curve(run.history, f"{base}_loss.png", f"{run.args.stage} loss")


if __name__ == "__main__":
    main()
