"""bench.py's code, not its numbers (those belong to a machine): the README's commands parse, the stage-2 step it
times is train.py's for both paths (the same z, t and noise: the same loss) and measures a finite speed, the
convolution FLOPs it reads off the profiler are torch's own count, and the diffusers comparison puts both models in
the same memory format. Tiny networks keep it to a few seconds."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

import bench
import vae as vae_module
from unet import UpsampleConv

CPU = torch.device("cpu")
TINY = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], norm_groups=8, image_size=16,
            batch_size=4, vae_ch=8, z_dim=8)
# The paths differ only in where (mu, logvar) come from, in memory layout and in how UpsampleConv is computed, which
# reorder the convolutions' sums:
# float32 rounding (unit roundoff 6e-8) through a few dozen layers, far below 1e-5 relative.
RTOL = 1e-5


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bench.PRESETS, "cpu", dict(bench.PRESETS["cpu"], **TINY))
    monkeypatch.setitem(bench.PRESETS, "cifar10", dict(bench.PRESETS["cifar10"], **dict(TINY, attn_resolutions=[8])))


@pytest.mark.parametrize("argv", [[], ["--quick"], ["--diffusers"], ["--only", "stage2", "sample"],
                                  ["--quick", "--iters", "1"], ["--device", "cpu", "--json", "bench.json"],
                                  ["--diffusers", "--iters", "2", "--rounds", "10"]])
def test_readme_commands_parse(argv):
    args = bench.parse_args(argv)
    assert set(args.only) <= set(bench.SECTIONS)
    assert ("diffusers" in args.only) == ("--diffusers" in argv)  # diffusers runs only when asked for
    assert args.rounds == (int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else None)


@pytest.mark.parametrize("argv", [["--only", "bogus"], ["--iters", "0"], ["--rounds", "0"],
                                  ["--diffusers", "--only", "unet"]])
def test_bad_flags_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_cached_and_encoder_paths_train_the_same_model(tiny, monkeypatch):
    """Seeded as train.py seeds a step, the cached codes and the encoder on every batch draw the same z, t and noise:
    the same losses step after step, in every layout; and the cached step never runs the encoder. --border 2 trains
    another model (on the 12x12 content, not the 16x16 image): its loss is that of the content."""
    calls = []
    encode = vae_module.VAE.encode
    monkeypatch.setattr(vae_module.VAE, "encode", lambda self, x: calls.append(1) or encode(self, x))
    losses = {}
    for name, flags in bench.STAGE2_VARIANTS.items():
        step = bench.stage2_step("cpu", 4, CPU, *flags)
        calls.clear()
        losses[name] = torch.stack([step() for _ in range(3)])
        assert len(calls) == (0 if flags[0] else 3), name  # cached: the decoder only
    before = losses[next(iter(bench.STAGE2_VARIANTS))]
    assert torch.isfinite(before).all()
    for name, loss in losses.items():
        if bench.STAGE2_VARIANTS[name][5]:  # --border
            assert torch.isfinite(loss).all() and not torch.allclose(loss, before, rtol=1e-3), name
        else:
            torch.testing.assert_close(loss, before, rtol=RTOL, atol=0, msg=name)


def test_bf16_rows_are_train_pys_path_under_autocast_where_the_cpu_has_amx(tiny, monkeypatch):
    """with_bf16 adds the default's step under bf16 autocast (train.py --bf16 on) only on a CPU with AMX; that step
    draws the same z, t and noise as the fp32 one, so its loss differs only by bf16 rounding: a relative 2^-8 per
    rounding, and 5 of them (test_runtime's bound) before the first update. After the first AdamW step the weights
    differ too, so only the first loss is held to it."""
    monkeypatch.setattr(bench.runtime, "cpu_has_amx", lambda: False)
    assert bench.with_bf16(bench.STAGE2_VARIANTS, CPU) is bench.STAGE2_VARIANTS
    monkeypatch.setattr(bench.runtime, "cpu_has_amx", lambda: True)
    base = "cached, channels_last, transposed, in place"
    variants = bench.with_bf16(bench.STAGE2_VARIANTS, CPU, base=base)
    assert list(variants) == [*bench.STAGE2_VARIANTS, base + bench.BF16]
    assert variants[base + bench.BF16] == bench.STAGE2_VARIANTS[base] + (True,)
    assert list(bench.with_bf16(bench.STEP_PATHS, CPU))[-1] == list(bench.STEP_PATHS)[-1] + bench.BF16
    assert bench.with_bf16(bench.STEP_PATHS, torch.device("cuda")) is bench.STEP_PATHS  # bf16 everywhere there
    fp32, bf16 = (bench.stage2_step("cpu", 4, CPU, *variants[name]) for name in (base, base + bench.BF16))
    first = fp32(), bf16()
    assert first[0] != first[1] and abs(first[1] / first[0] - 1) < 5 * 2.0 ** -8, first
    rows = bench.bench_stage2("cpu", CPU, iters=1, rounds=1, variants=variants)
    assert rows[-1]["after"] == base + bench.BF16 and 0 < rows[-1]["speedup"] < float("inf")


def test_stage2_bench_gives_a_finite_speed_for_both_paths(tiny):
    rows = bench.bench_stage2("cpu", CPU, iters=1, rounds=1)
    assert [r["after"] for r in rows] == list(bench.STAGE2_VARIANTS)[1:]
    for r in rows:
        assert r["before"] == next(iter(bench.STAGE2_VARIANTS)) and r["what"].endswith("batch 4")
        for key in ("before_img_s", "after_img_s", "speedup"):
            assert 0 < r[key] < float("inf"), (key, r)


def test_conv_flops_read_off_the_profiler_match_the_flop_counter():
    """2 B C_out H_out W_out (C_in / groups) k^2 per forward conv, one such conv per gradient asked for in backward
    (a stride-2 conv whose input needs no gradient, as the UNet's first conv; a grouped conv whose weight needs none),
    equal to torch's FlopCounterMode. (Its weight-gradient formula ignores groups: the UNet has no grouped conv.)"""
    x = torch.randn(2, 6, 9, 9)
    w1, w2 = torch.randn(8, 6, 3, 3, requires_grad=True), torch.randn(4, 4, 1, 1)
    w3 = torch.randn(4, 3, 4, 4, requires_grad=True)  # a transposed conv's weight: (C_in, C_out, k, k)

    def step():
        h = F.conv2d(x, w1, stride=2, padding=1)   # (2, 6, 9, 9) -> (2, 8, 5, 5)
        h = F.conv2d(h, w2, groups=2)              # (2, 8, 5, 5) -> (2, 4, 5, 5), grouped 1x1
        return F.conv_transpose2d(h, w3, stride=2, padding=1).sum()  # (2, 4, 5, 5) -> (2, 3, 10, 10), UpsampleConv's
    with FlopCounterMode(display=False) as counter:
        step().backward()
    with profile(record_shapes=True) as prof:
        step().backward()
    events = [e for e in prof.events() if e.name in ("aten::convolution", "aten::convolution_backward")]
    assert len(events) == 6
    found = [bench.conv_flops(e.name, e.input_shapes, e.concrete_inputs) for e in events]
    assert sum(f for _, f in found) == counter.get_total_flops()
    assert {label for label, _ in found} == {"3x3/2 6->8 @9x9", "1x1/1 8->4 @5x5", "4x4/2 transposed 4->3 @5x5"}


def test_the_transposed_up_conv_path_does_16_of_the_36_multiply_adds_of_each_upsampling(tiny):
    """bench's fast_up flag reaches every UpsampleConv, and torch's FLOP count sees the saving: per upsampling conv
    and pass (forward, input gradient, weight gradient) 2 B C_in C_out H W (36 - 16) FLOPs fewer, H x W its input."""
    flops = {}
    for fast in (False, True):
        _, loss_fn, model = bench.train_step("unet", "cpu", 4, CPU, channels_last=False, fast_up=fast)
        ups = [m for m in model.modules() if isinstance(m, UpsampleConv)]
        assert len(ups) == 1 and ups[0].fast == fast  # TINY: two levels, one upsampling
        flops[fast] = bench.count_flops(loss_fn, model)
    B, C, H = 4, TINY["ch"] * TINY["ch_mult"][1], TINY["image_size"] // 2
    assert flops[False] - flops[True] == 3 * 2 * B * C * C * H * H * (36 - 16)


class FakeUNet2DModel(torch.nn.Module):
    """Stands in for diffusers' UNet2DModel (not a requirement): our own unconditional UNet behind its interface,
    recording the memory format of its input and weights at every call."""
    seen = set()

    def __init__(self, **config):
        super().__init__()
        self.net = bench.build("ddpm", "cifar10", CPU, dropout=0.0)

    def forward(self, x, t):
        cl = torch.channels_last
        FakeUNet2DModel.seen.add((x.is_contiguous(memory_format=cl) and not x.is_contiguous(),
                                  self.net.conv_in.weight.is_contiguous(memory_format=cl)))
        return SimpleNamespace(sample=self.net(x, t))


def test_diffusers_rows_put_both_models_in_the_same_memory_format(tiny):
    FakeUNet2DModel.seen.clear()
    rows = bench.bench_diffusers(FakeUNet2DModel, CPU, batch=2, iters=1, rounds=1)
    models = ("ours (unet.UNet)", "ours, nearest+conv upsampling", "diffusers UNet2DModel")
    assert {(r["model"], r["layout"]) for r in rows} == {(m, lay) for m in models for lay in ("contiguous", "channels_last")}
    assert FakeUNet2DModel.seen == {(False, False), (True, True)}  # input and weights alike, in each layout
    assert len({r["params"] for r in rows}) == 1
    assert all(0 < r["img_per_s"] < float("inf") for r in rows)
