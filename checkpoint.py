"""Checkpoints: one file per stage, written atomically, read without running code, rebuilt without flags.

A checkpoint is a plain dict (nanoGPT's layout plus what a diffusion model needs):
    stage        "vae" or "ddpm"
    model_args   constructor arguments of the network (plain data): VAE(**model_args) or UNet(**model_args)
    config       the training configuration (plain data: ints, floats, strings, lists)
    model, ema   state dicts of the raw (uncompiled, unwrapped) model and of its EMA
    optimizer    the optimiser state;  step: optimisation steps done;  history: [(step, loss), ...]
    vae          (ddpm stage with a VAE condition) {"model_args", "ema"} of the frozen VAE it was trained on,
                 so sample.py needs this one file only
Loading uses torch.load(weights_only=True): a checkpoint from a stranger cannot run code.
"""
import os
import tempfile

import torch


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or not the kind that was asked for. The message says what to do."""


def save_atomic(obj, path):
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a crash at any moment
    leaves either the old checkpoint or the new one, never a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    except OSError as e:
        raise CheckpointError(f"cannot write a checkpoint in {directory}: {e.strerror}. "
                              f"Choose a writable --out_dir.") from None
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


def load(path, stage=None, hint=""):
    """Load a checkpoint safely and check its stage. `hint` says how to make the missing file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}. {hint}".strip())
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code: all end here
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}). "
                              f"It may be truncated or corrupt; use another checkpoint or retrain.") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (no 'stage'/'model_args').")
    if stage is not None and ckpt["stage"] != stage:
        raise CheckpointError(f"{path} is a stage '{ckpt['stage']}' checkpoint, but a stage '{stage}' checkpoint "
                              f"is needed here. {hint}".strip())
    return ckpt
