"""Where the code runs and what it writes: every device-dependent choice, the processes, and the
checkpoint files.

    rt = choose(pick_device(args.device, local_rank).type, args.compile, world=world)
    apply_global_flags(rt)
    opt = make_optimizer(model.parameters(), lr, rt)
    with autocast(rt):
        loss = ...

choose() is a pure function of its inputs (it never asks torch.cuda anything), so a CPU test can
check the decisions it makes for a pretend CUDA device; pick_device() holds the only torch.cuda
query. The same training step runs on the CPU with each choice forced (bf16 autocast, channels_last,
compile) and gives the same loss to a tolerance stated in tests/test_runtime.py.

A checkpoint is a plain dict (nanoGPT's layout plus what a diffusion model needs), one file per
stage:
    stage        "vae" or "ddpm"
    model_args   constructor arguments of the network (plain data): VAE(**model_args) or
                 UNet(**model_args)
    config       the training configuration (train.py's preset with its overrides, plus form, cond,
                 seed)
    model, ema   state dicts of the raw (uncompiled, unwrapped) model and of its EMA
    optimizer    the optimiser state;  step: optimisation steps done;  history: [(step, loss), ...]
    prior        (vae stage) the ex-post mixture fitted after the last step (vae.fit_expost_prior)
    vae          (ddpm stage with a VAE condition) {"model_args", "ema", "prior"} of the frozen VAE
                 it was trained on, so sample.py needs this one file only
It is written atomically (save_atomic) and read with torch.load(weights_only=True): a file from a
stranger cannot run code.
"""

import contextlib
import os
import signal
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

# channels_last (NHWC) convs on the CPU (tools/bench.py times both layouts)
CPU_CHANNELS_LAST = True
# cuBLAS's two reproducible workspace settings (CUDA Toolkit docs, cuBLAS "Results
# reproducibility"): with neither in CUBLAS_WORKSPACE_CONFIG,
# torch.use_deterministic_algorithms(True) makes PyTorch raise at the first cuBLAS call.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
# train.py's --channels_last and --bf16 -> choose()'s channels_last and bf16 arguments (None: the
# device's choice)
AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


@dataclass(frozen=True)
class Runtime:
    """The decisions for one process. amp_dtype is the autocast dtype (None: plain fp32)."""

    device: torch.device
    amp_dtype: torch.dtype = None
    tf32: bool = False
    channels_last: bool = False
    fused_adamw: bool = False
    compile: bool = False
    ddp_backend: str = "gloo"
    world: int = 1

    def describe(self):
        """One header line, e.g. 'device cpu | dtype fp32 | amp off | channels_last on | compile off
        | threads 2 | world 1'."""
        on = lambda b: "on" if b else "off"
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "off")
        parts = [f"device {self.device}", "dtype fp32", f"amp {amp}"]
        if self.device.type == "cuda":
            parts.append(f"tf32 {on(self.tf32)}")
        parts += [
            f"channels_last {on(self.channels_last)}",
            f"compile {on(self.compile)}",
            f"threads {torch.get_num_threads()}",
            f"world {self.world}",
        ]
        return " | ".join(parts)


def choose(device_type, compile_flag=False, channels_last=None, world=1, bf16=None):
    """The speed choices for a device ("cuda", "cpu", or a torch.device such as pick_device's
    cuda:local_rank); pure: the same inputs give the same Runtime, and nothing asks torch.cuda
    whether a GPU is there.

    CUDA: bf16 autocast (tensor cores; bf16 has fp32's exponent range, so no loss scaling), TF32 for
    the fp32 ops left, channels_last (the layout tensor-core convs want), the fused AdamW kernel,
    NCCL for DDP. CPU: fp32 and gloo; channels_last as asked, else CPU_CHANNELS_LAST. compile
    follows the flag on both, and bf16 (autocast) when given overrides the device's choice."""
    kind = device_type.type if isinstance(device_type, torch.device) else device_type
    device = torch.device(device_type) if kind in ("cuda", "cpu") else None
    if kind == "cuda":
        return Runtime(
            device,
            amp_dtype=None if bf16 is False else torch.bfloat16,
            tf32=True,
            channels_last=True,
            fused_adamw=True,
            compile=bool(compile_flag),
            ddp_backend="nccl",
            world=world,
        )
    if kind == "cpu":
        # fp32 unless asked: bf16 is fast only on a CPU with bf16 matrix units (cpu_has_amx)
        return Runtime(
            device,
            amp_dtype=torch.bfloat16 if bf16 else None,
            tf32=False,
            channels_last=CPU_CHANNELS_LAST if channels_last is None else bool(channels_last),
            fused_adamw=False,
            compile=bool(compile_flag),
            ddp_backend="gloo",
            world=world,
        )
    raise ValueError(f"device type must be 'cuda' or 'cpu', got {device_type!r}")


def cpu_has_amx():
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), the matrix units that make
    oneDNN's bf16 convs and matmuls faster than fp32 instead of many times slower (torch's cpuinfo
    check, a private function)."""
    return torch.cpu._is_amx_tile_supported()


def slow_bf16_warning(rt):
    """A warning when bf16 autocast was asked for on a CPU without AMX, else None."""
    if rt.device.type == "cpu" and rt.amp_dtype is not None and not cpu_has_amx():
        return (
            "warning: --bf16 on, but this CPU has no AMX: its bf16 convs run many times slower "
            "than fp32; drop --bf16 on"
        )
    return None


def pick_device(flag, local_rank=0):
    """--device flag ("cuda" | "cpu" | None: CUDA when present) -> torch.device; cuda:local_rank
    under torchrun. The only torch.cuda query in the codebase's device logic lives here."""
    if flag is not None and flag != "cpu" and not flag.startswith("cuda"):
        raise SystemExit(f"--device must be cuda or cpu, got {flag!r}")
    available = torch.cuda.is_available()
    use_cuda = available if flag is None else flag.startswith("cuda")
    if use_cuda and not available:
        raise SystemExit(
            "--device cuda was asked for but CUDA is not available; drop the flag to use the CPU"
        )
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def apply_global_flags(rt):
    """Process-wide switches: bind this process to its GPU, TF32 matmuls/convs (~free speed on
    Ampere+). Nothing happens on the CPU."""
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)  # NCCL and bare .cuda() calls use this process's GPU
    if rt.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def deterministic(rt):
    """train.py --deterministic: deterministic kernels only
    (torch.use_deterministic_algorithms(True)). On CUDA, cuBLAS also needs CUBLAS_WORKSPACE_CONFIG
    set to one of CUBLAS_DETERMINISTIC; this sets the first unless the user set the variable
    already. Call it before anything runs on the GPU (setup_processes: before apply_global_flags),
    since cuBLAS reads the variable when it first starts on a device."""
    if rt.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC[0])
    torch.use_deterministic_algorithms(True)


def autocast(rt):
    """The forward pass's mixed-precision context: bf16 autocast, or nothing."""
    if rt.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype)


def make_optimizer(params, lr, rt):
    """AdamW as DDPM trains it (betas 0.9, 0.999; no weight decay); the fused kernel on CUDA."""
    return torch.optim.AdamW(
        params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=rt.fused_adamw
    )


def setup_processes(args):
    """train.py's flags --device, --compile, --channels_last, --bf16, --deterministic -> (rt, rank):
    one process per device under torchrun (NCCL on GPU, gloo on CPU), a plain process otherwise,
    every speed choice from choose(). Rank 0 prints the choices."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    rt = choose(
        device, args.compile, AUTO_ON_OFF[args.channels_last], world, AUTO_ON_OFF[args.bf16]
    )
    if args.deterministic:
        deterministic(
            rt
        )  # before apply_global_flags binds the GPU: cuBLAS's setting must come first
    apply_global_flags(rt)
    if world > 1:
        dist.init_process_group(rt.ddp_backend)
    if rank == 0:
        print(rt.describe(), flush=True)
        warning = slow_bf16_warning(rt)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    return rt, rank


# ----------------------------------------------------------------------------- checkpoint files


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or not the kind that was asked for. The message says
    what to do."""


def save_atomic(obj, path):
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a crash at
    any moment leaves either the old checkpoint or the new one, never a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    except OSError as e:
        raise CheckpointError(
            f"cannot write a checkpoint in {directory}: {e.strerror}. Choose a writable --out_dir."
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, stage=None, hint=""):
    """Load a checkpoint safely and check its stage. `hint` says how to make the missing file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}. {hint}".strip())
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code: all end here
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}). "
            f"It may be truncated or corrupt; use another checkpoint or retrain."
        ) from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(
            f"{path} is not a checkpoint written by train.py (no 'stage'/'model_args')."
        )
    if stage is not None and ckpt["stage"] != stage:
        raise CheckpointError(
            f"{path} is a stage '{ckpt['stage']}' checkpoint, but a stage '{stage}' checkpoint "
            f"is needed here. {hint}".strip()
        )
    return ckpt


def check_replicas(model, rt, rank):
    """DDP keeps the replicas in lock-step: check it once, exactly, against rank 0's weights, then
    end the group."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    differ = torch.tensor([0.0 if torch.equal(ref, flat) else 1.0], device=rt.device)
    dist.all_reduce(differ)
    if rank == 0:
        print(
            f"ranks {'DIFFER' if differ.item() else 'agree'}: "
            f"weights {'not ' if differ.item() else ''}identical "
            f"on {rt.world} processes",
            flush=True,
        )
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


def any_rank(flag, rt):
    """Whether `flag` is true on any of the processes (an all-reduce: every rank calls it at the
    same point)."""
    t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_ddp(model, rt):
    """The model wrapped in DistributedDataParallel when there are several processes (gradients
    all-reduced)."""
    if rt.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
    )


def catch_signals():
    """Ctrl-C / SIGTERM set stop["signal"] instead of killing the process, so the caller can save
    first."""
    stop = {"signal": None}
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda caught, frame: stop.update(signal=caught))
    return stop
