"""runtime.py: the CUDA decisions checked on a pretend device, each speed choice forced on the CPU
gives the training step's loss to a tolerance that follows from the arithmetic it changes, and the
process helpers (any_rank, check_replicas, wrap_ddp, catch_signals) do what train.py relies on. Its
checkpoint files: tests/test_errors.py."""

import contextlib
import dataclasses
import io
import json
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import ddpm
import diffusevae as DV
import runtime as R
import train
from unet import UNet

FP32_U = 2.0**-24  # fp32 unit roundoff: 24 significant bits
BF16_U = 2.0**-8  # bf16 unit roundoff: 8 significant bits (7 stored + the implicit one)


# ----------------------------------------------------------------------------- the decisions


def test_cuda_decisions_for_a_pretend_device():
    rt = R.choose("cuda")
    assert rt.device == torch.device("cuda")
    assert rt.amp_dtype is torch.bfloat16 and rt.tf32 and rt.channels_last and rt.fused_adamw
    assert rt.ddp_backend == "nccl" and not rt.compile
    assert R.choose("cuda", compile_flag=True).compile
    assert R.choose(torch.device("cuda", 3), world=4).device == torch.device(
        "cuda", 3
    )  # pick_device's index kept


def test_cpu_decisions():
    rt = R.choose("cpu")
    assert rt.device == torch.device("cpu")
    assert rt.amp_dtype is None and not rt.tf32 and not rt.fused_adamw and rt.ddp_backend == "gloo"
    assert rt.channels_last == R.CPU_CHANNELS_LAST and not rt.compile
    assert (
        R.choose("cpu", channels_last=True).channels_last
        and not R.choose("cpu", channels_last=False).channels_last
    )
    assert R.choose("cpu", compile_flag=True).compile


def test_the_bf16_flag_overrides_the_devices_choice():
    # train.py --bf16 auto|on|off -> choose(bf16=None|True|False): auto keeps CUDA's bf16 and the
    # CPU's fp32
    assert [R.choose("cpu", bf16=R.AUTO_ON_OFF[f]).amp_dtype for f in ("auto", "on", "off")] == [
        None,
        torch.bfloat16,
        None,
    ]
    assert [R.choose("cuda", bf16=R.AUTO_ON_OFF[f]).amp_dtype for f in ("auto", "on", "off")] == [
        torch.bfloat16,
        torch.bfloat16,
        None,
    ]
    assert "amp bf16" in R.choose("cpu", bf16=True).describe()


def test_bf16_on_a_cpu_without_amx_warns(monkeypatch):
    monkeypatch.setattr(R, "cpu_has_amx", lambda: False)
    warning = R.slow_bf16_warning(R.choose("cpu", bf16=True))
    assert "no AMX" in warning and "drop --bf16 on" in warning
    assert (
        R.slow_bf16_warning(R.choose("cpu")) is None
        and R.slow_bf16_warning(R.choose("cuda")) is None
    )
    monkeypatch.setattr(R, "cpu_has_amx", lambda: True)
    assert R.slow_bf16_warning(R.choose("cpu", bf16=True)) is None


def test_choose_decides_for_cuda_without_asking_torch_cuda_and_rejects_other_devices(monkeypatch):
    # choose's docstring: it never asks torch.cuda anything (so the CUDA decisions can be made, and
    # tested, where no GPU is), and it accepts only "cuda" and "cpu". Every torch.cuda query a
    # device check could use fails here; the expected Runtime is the docstring's list: bf16
    # autocast, TF32, channels_last, fused AdamW, NCCL.
    for query in (
        "is_available",
        "device_count",
        "current_device",
        "get_device_properties",
        "get_device_capability",
        "is_bf16_supported",
    ):
        monkeypatch.setattr(
            torch.cuda,
            query,
            lambda *a, q=query, **k: pytest.fail(f"choose() called torch.cuda.{q}"),
        )
    assert R.choose("cuda", True, world=2) == R.Runtime(
        torch.device("cuda"),
        amp_dtype=torch.bfloat16,
        tf32=True,
        channels_last=True,
        fused_adamw=True,
        compile=True,
        ddp_backend="nccl",
        world=2,
    )
    assert R.choose(torch.device("cuda", 1)).device == torch.device("cuda", 1)
    for other in ("mps", "xla", torch.device("meta")):
        with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
            R.choose(other)


def test_describe_is_one_header_line():
    line = R.choose("cpu", compile_flag=True, channels_last=True, world=2).describe()
    assert "\n" not in line
    for part in (
        "device cpu",
        "dtype fp32",
        "amp off",
        "channels_last on",
        "compile on",
        f"threads {torch.get_num_threads()}",
        "world 2",
    ):
        assert part in line, (part, line)
    assert "amp bf16" in R.choose("cuda").describe()


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available.*drop the flag"):
        R.pick_device("cuda")
    assert R.pick_device(None) == torch.device("cpu") and R.pick_device("cpu") == torch.device(
        "cpu"
    )
    with pytest.raises(SystemExit, match="cuda or cpu"):
        R.pick_device("tpu")
    # a pretend GPU: cuda:local_rank, without touching a device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: pytest.fail("pick_device touched a device")
    )
    assert R.pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert R.pick_device(None, local_rank=2) == torch.device("cuda", 2)
    assert R.pick_device("cpu") == torch.device("cpu")


def test_apply_global_flags(monkeypatch):
    # torch.backends.cuda.matmul serves allow_tf32 through __getattr__/__setattr__, with no instance
    # attribute: pytest's monkeypatch records it as absent and its undo calls delattr, which fails.
    # So the two flags are saved and restored here.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        R.apply_global_flags(R.choose("cpu"))
        assert (
            not torch.backends.cuda.matmul.allow_tf32
            and not torch.backends.cudnn.allow_tf32
            and bound == []
        )
        R.apply_global_flags(R.choose(torch.device("cuda", 1)))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert bound == [torch.device("cuda", 1)]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_make_optimizer():
    p = [nn.Parameter(torch.zeros(3))]
    opt = R.make_optimizer(p, 1e-3, R.choose("cpu"))
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and g["lr"] == 1e-3 and g["betas"] == (0.9, 0.999)
    assert g["weight_decay"] == 0.0 and not g["fused"]


def tiny_unet(ch_mult=(1, 2)):
    """A tiny UNet (colour, 8x8). DDPM's init zeroes each residual block's last conv and the output
    conv, so eps_theta starts at 0 and no layer but the last gets a gradient: Xavier-init them too,
    so the loss and its step depend on every layer."""
    torch.manual_seed(0)
    net = UNet(
        img_ch=3,
        cond_ch=0,
        ch=8,
        ch_mult=ch_mult,
        num_res_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        image_size=8,
        norm_groups=4,
    )
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any():
            nn.init.xavier_uniform_(m.weight)
    return net


def train_step(rt, ch_mult=(1, 2)):
    """train.py's step on a fixed batch, t and noise: L_simple forward, backward, clip, AdamW (lr
    1e-3, the cpu preset's), then the loss of a second forward. -> (loss before, loss after, what
    the model looked like)."""
    raw, model = train.on_device(tiny_unet(ch_mult), rt)
    opt = R.make_optimizer(raw.parameters(), 1e-3, rt)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1  # images in [-1, 1]
    noise, t = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    x0, noise = (
        x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x
        for x in (x0, noise)
    )
    diffusion = ddpm.make_diffusion("linear", 1000)
    seen = {}

    def eps_model(x, t, cond):
        out = model(x, t, cond)
        seen.update(
            dtype=out.dtype,
            nhwc=out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous(),
        )
        return out

    losses = []
    for i in range(2):
        with R.autocast(rt):
            loss = DV.ddpm_loss(eps_model, diffusion, x0, t=t, noise=noise)[0].mean()
        losses.append(loss.item())
        if i == 0:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            opt.step()
    return losses, seen, raw, model


def rel_err(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference():
    """fp32, contiguous, eager: the step every forced choice is compared with."""
    return train_step(R.choose("cpu", channels_last=False))[0]


def test_reference_step_moves_the_loss(reference):
    # The step changes the loss by far more than any tolerance below: a forced choice that skipped
    # or broke the update could not pass.
    before, after = reference
    assert abs(after - before) / before > 5 * 2e-2, reference


def test_channels_last_gives_the_same_loss(reference):
    # Same math in another memory order: only the fp32 summation order of the convs changes.
    # Tolerance ~170 fp32 roundoffs (1e-5 relative); measured: identical here.
    losses, seen, raw, _ = train_step(R.choose("cpu", channels_last=True))
    assert seen["nhwc"] and raw.down[0].conv1.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    assert rel_err(losses, reference) < 1e-5, (losses, reference)


def test_bf16_autocast_gives_the_same_loss_to_bf16_precision(reference):
    # Forced on the CPU (train.py does so only with --bf16 on). Under autocast each conv, linear and
    # norm rounds its result (and a conv its input and weights) to bf16's 8 significant bits: a
    # relative error of at most u = 2^-8 ~ 3.9e-3 per rounding. Products are accumulated in fp32 and
    # the loss (noise - eps) is taken in fp32; GroupNorm re-normalises after every conv, so the
    # errors add over the layers rather than compound. We allow 5u ~ 2e-2: a handful of roundings
    # that do not cancel, without counting on the averaging over the 1,536 predicted numbers (the
    # measured error is ~6e-4). The second loss also sees the AdamW step, whose first update is lr *
    # sign(g) on every weight; only gradients near 0 can flip sign in bf16.
    rt = dataclasses.replace(R.choose("cpu", channels_last=False), amp_dtype=torch.bfloat16)
    losses, seen, _, _ = train_step(rt)
    assert seen["dtype"] is torch.bfloat16  # autocast was really on
    assert losses != reference  # ... and changed the arithmetic
    assert rel_err(losses, reference) < 5 * BF16_U, (losses, reference)


def test_compile_gives_the_same_loss(reference):
    # Inductor fuses the elementwise ops and may reorder fp32 sums: the same 1e-5 relative as
    # channels_last (measured: bit-identical before the step, ~1e-7 after). One UNet level (ch_mult
    # (1,)) to keep the compile short; its eager fp32 step is the reference.
    eager, _, _, _ = train_step(R.choose("cpu", channels_last=False), ch_mult=(1,))
    losses, _, raw, model = train_step(
        R.choose("cpu", compile_flag=True, channels_last=False), ch_mult=(1,)
    )
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule) and model._orig_mod is raw
    assert rel_err(losses, eager) < 1e-5, (losses, eager)


def test_on_device_runs_the_layers_as_written():
    """The code that runs is the code in unet.py and vae.py: train.on_device moves and lays out the
    model, it never changes a layer's class, so every module of the prepared model has the type it
    was built with."""
    import copy

    from vae import VAE

    for model in (tiny_unet(), VAE(img_ch=3, image_size=16, ch=8, z_dim=4)):
        types = [type(m) for m in model.modules()]
        for device in ("cpu",):
            raw, _ = train.on_device(copy.deepcopy(model), R.choose(device))
            assert [type(m) for m in raw.modules()] == types
    assert "upsampling" not in R.choose("cpu").describe()


def test_on_device_keeps_the_plain_model_for_checkpoints():
    # train.py saves raw.state_dict(): the compiled wrapper's keys carry `_orig_mod.` and would not
    # load into a plain UNet (sample.py rebuilds one from the checkpoint).
    raw, model = train.on_device(tiny_unet(), R.choose("cpu", compile_flag=True))
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule) and model._orig_mod is raw
    assert all(k.startswith("_orig_mod.") for k in model.state_dict())
    assert not any(k.startswith("_orig_mod.") for k in raw.state_dict())
    tiny_unet().load_state_dict(raw.state_dict())
    raw, model = train.on_device(tiny_unet(), R.choose("cpu", compile_flag=False))
    assert model is raw


# ---------------------------------------------------------------------------- processes (gloo, CPU)


def _two_ranks(rank, out_dir, differ):
    """One of two gloo processes: any_rank's all-reduce, wrap_ddp, then check_replicas on a Linear
    layer whose weights are rank 0's, or (differ) one ulp off in one bias on rank 1. Writes what it
    saw to out_dir/rank.json."""
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=2
    )
    rt = R.choose("cpu", world=2)
    seen = dict(
        none=R.any_rank(False, rt), rank1=R.any_rank(rank == 1, rt), all=R.any_rank(True, rt)
    )
    torch.manual_seed(0)
    seen["ddp"] = isinstance(R.wrap_ddp(nn.Linear(3, 2), rt), nn.parallel.DistributedDataParallel)
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    if differ and rank == 1:
        with torch.no_grad():
            net.bias[0] = torch.nextafter(net.bias[0], torch.tensor(1.0))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        R.check_replicas(net, rt, rank)
    seen.update(printed=printed.getvalue(), group_ended=not dist.is_initialized())
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(seen, f)
    os._exit(
        0
    )  # what is under test is done; the interpreter's teardown of torch's gloo threads is not


@pytest.mark.parametrize("differ", [False, True], ids=["same weights", "one ulp apart"])
def test_two_gloo_ranks_agree_only_when_their_weights_are_identical(tmp_path, differ):
    # train.py's end-of-run check under torchrun: exact, so one ulp in one weight on one rank is
    # reported; any_rank (how all ranks stop at the same step on a signal) is true on every rank
    # when true on one
    mp.spawn(_two_ranks, args=(str(tmp_path), differ), nprocs=2, join=True)
    seen = [json.load(open(tmp_path / f"{r}.json")) for r in (0, 1)]
    for s in seen:
        assert s["none"] is False and s["rank1"] is True and s["all"] is True
        assert s["ddp"] and s["group_ended"]
    expected = (
        "ranks DIFFER: weights not identical on 2 processes"
        if differ
        else "ranks agree: weights identical on 2 processes"
    )
    assert seen[0]["printed"].strip() == expected and seen[1]["printed"] == ""  # rank 0 reports


def test_wrap_ddp_leaves_a_single_process_model_alone():
    net = nn.Linear(3, 2)
    assert R.wrap_ddp(net, R.choose("cpu")) is net


def test_catch_signals_records_the_signal_instead_of_stopping():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = R.catch_signals()
        assert stop["signal"] is None
        for signum in (signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), signum)
            assert stop["signal"] == signum
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
