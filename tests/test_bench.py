"""tools/bench.py's code, not its numbers (those belong to a machine): the README's commands parse,
the stage-2 step it times is train.train_step and computes its loss (written out here) by every
path, and its rows set each path's time against the first's; the alternatives to the core's layers
it patches in (the transposed up-conv, the in-place ResBlocks) compute what the core's layers do;
the convolution FLOPs it reads off the profiler are torch's own count; and the diffusers comparison
runs every model on the same batch with its input and weights in the row's memory format. Tiny
networks keep it to a few seconds."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracles import linear_schedule_by_hand
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

import runtime
import train
import unet
import vae as vae_module
from tools import bench

CPU = torch.device("cpu")
TINY = dict(
    ch=8,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    norm_groups=8,
    image_size=16,
    batch_size=4,
    vae_ch=8,
    z_dim=8,
)
# The paths differ only in memory layout, in how the upsampling convs are computed and in whether
# the ResBlocks add in place, which reorder the convolutions' sums: float32 rounding (unit roundoff
# 6e-8) through a few dozen layers, far below 1e-5 relative.
RTOL = 1e-5


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bench.PRESETS, "cpu", dict(bench.PRESETS["cpu"], **TINY))
    monkeypatch.setitem(
        bench.PRESETS, "cifar10", dict(bench.PRESETS["cifar10"], **dict(TINY, attn_resolutions=[8]))
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--quick"],
        ["--diffusers"],
        ["--only", "stage2", "sample"],
        ["--quick", "--iters", "1"],
        ["--device", "cpu", "--json", "bench.json"],
        ["--diffusers", "--iters", "2", "--rounds", "10"],
    ],
)
def test_readme_commands_parse(argv):
    args = bench.parse_args(argv)
    assert set(args.only) <= set(bench.SECTIONS)
    assert ("diffusers" in args.only) == (
        "--diffusers" in argv
    )  # diffusers runs only when asked for
    assert args.rounds == (int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else None)


@pytest.mark.parametrize(
    "argv",
    [["--only", "bogus"], ["--iters", "0"], ["--rounds", "0"], ["--diffusers", "--only", "unet"]],
)
def test_bad_flags_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_every_stage2_path_trains_the_same_model(tiny, monkeypatch):
    """Each path's step is train.train_step, seeded as train.py seeds a step, so every path draws
    the same batch, z, t and noise: the same losses step after step, in every layout and code path;
    and every step runs the frozen VAE's encoder (train.py encodes each batch: VAE.reconstruct)."""
    calls, steps = [], []
    encode, train_step = vae_module.VAE.encode, train.train_step
    monkeypatch.setattr(
        vae_module.VAE, "encode", lambda self, x: calls.append(1) or encode(self, x)
    )
    monkeypatch.setattr(train, "train_step", lambda run: steps.append(run.step) or train_step(run))
    losses = {}
    for name, flags in bench.STEP_PATHS.items():
        step = bench.stage2_step("cpu", 4, CPU, *flags)
        calls.clear(), steps.clear()
        losses[name] = torch.stack([step() for _ in range(3)])
        assert len(calls) == 3 and steps == [0, 1, 2], name
    before = losses[next(iter(bench.STEP_PATHS))]
    assert torch.isfinite(before).all()
    for name, loss in losses.items():
        torch.testing.assert_close(loss, before, rtol=RTOL, atol=0, msg=name)


def without_zero_layers(monkeypatch):
    """bench.build with the layers DDPM's init zeroes (the UNet's output conv, each ResBlock's
    second conv, each attention's projection) Xavier-initialised: a zero output conv would make the
    UNet output exactly 0 whatever its input, in any precision."""
    build = bench.build

    def build_without_zero_layers(*args, **kwargs):
        net = build(*args, **kwargs)
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
                torch.nn.init.xavier_uniform_(m.weight)
        return net

    monkeypatch.setattr(bench, "build", build_without_zero_layers)


def test_bf16_rows_are_train_pys_path_under_autocast_where_the_cpu_has_amx(tiny, monkeypatch):
    """with_bf16 adds the default's step (the last path, train.py's: runtime.py's CPU layout, the
    core's layers) under bf16 autocast (train.py --bf16 on) only on a CPU with AMX; that step draws
    the same batch, z, t and noise as the fp32 one, so its loss differs only by bf16 rounding: a
    relative 2^-8 per rounding, and 5 of them (test_runtime's bound) before the first update. After
    the first AdamW step the weights differ too, so only the first loss is held to it. train.py
    decodes x_hat_0 outside autocast, so only the denoiser's output carries the rounding: its
    zero-initialised layers are made nonzero (without_zero_layers), else that output is exactly
    0."""
    without_zero_layers(monkeypatch)
    base = bench.CODE_PATH
    assert list(bench.STEP_PATHS)[-1] == base and bench.STEP_PATHS[base] == (
        runtime.CPU_CHANNELS_LAST,
        False,
        False,
    )
    monkeypatch.setattr(bench.runtime, "cpu_has_amx", lambda: False)
    assert bench.with_bf16(bench.STEP_PATHS, CPU) is bench.STEP_PATHS
    monkeypatch.setattr(bench.runtime, "cpu_has_amx", lambda: True)
    variants = bench.with_bf16(bench.STEP_PATHS, CPU, base=base)
    assert list(variants) == [*bench.STEP_PATHS, base + bench.BF16]
    assert variants[base + bench.BF16] == bench.STEP_PATHS[base] + (True,)
    assert (
        list(bench.with_bf16(bench.STEP_PATHS, CPU))[-1] == list(bench.STEP_PATHS)[-1] + bench.BF16
    )
    assert (
        bench.with_bf16(bench.STEP_PATHS, torch.device("cuda")) is bench.STEP_PATHS
    )  # bf16 everywhere there
    fp32, bf16 = (
        bench.stage2_step("cpu", 4, CPU, *variants[name]) for name in (base, base + bench.BF16)
    )
    first = fp32(), bf16()
    assert first[0] != first[1] and abs(first[1] / first[0] - 1) < 5 * 2.0**-8, first
    rows = bench.bench_stage2("cpu", CPU, iters=1, rounds=1, variants=variants)
    assert rows[-1]["after"] == base + bench.BF16 and 0 < rows[-1]["speedup"] < float("inf")


def stage2_first_loss_by_hand():
    """train.py's stage-2 loss at step 0 on bench's random weights and images, written out: the
    weights and images as make_run seeds them (seed 0: the VAE, the UNet, then the uint8 images),
    then under step_seed(0, 0, 0) the batch indices, z = mu + sigma eps_z (reparameterisation),
    x_hat_0 = dec(z), t ~ U{0..t_start}, eps ~ N(0, I) in that order (train.py's), and form 2 with
    the residual target: x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps + x_hat_0 and loss = mean((x_0 -
    x_hat_0) - net(x_t, t, x_hat_0))^2 over the batch and pixels."""
    cfg = bench.PRESETS["cpu"]
    assert (
        cfg["target"] == "residual" and cfg["schedule"] == "linear" and cfg["T"] == 1000
    )  # what is written here
    assert cfg["cond_drop"] == 0 and cfg["dropout"] == 0
    torch.manual_seed(0)
    vae = bench.build("vae", "cpu", CPU).eval()
    unet_ = bench.build("unet", "cpu", CPU).train()
    images = bench.random_shard(cfg, bench.SHARD_IMAGES)
    B = TINY["batch_size"]
    with torch.no_grad():
        torch.manual_seed(train.step_seed(0, 0, 0))
        x0 = images[torch.randint(0, len(images), (B,))].float() / 127.5 - 1
        mu, logvar = vae.encode(x0)
        x_hat0 = vae.decode(mu + (0.5 * logvar).exp() * torch.randn(mu.shape))
        t = torch.randint(0, cfg["t_start"] + 1, (B,))
        noise = torch.randn(x0.shape)
        a = linear_schedule_by_hand(1000)[1][t].float().reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise + x_hat0
        return ((x0 - x_hat0) - unet_(x_t, t, x_hat0)).pow(2).mean()


def test_stage2_speedups_are_before_over_after_and_each_path_computes_train_pys_loss(
    tiny, monkeypatch
):
    """bench_stage2's rows: before = the first path, after = each other, ms = 1e3 s, speedup =
    before / after, img/s = batch / s, with the seconds race() gives (replaced here by known ones);
    and the step each path hands to race computes, at its first call, train.py's stage-2 loss
    written out by hand (RTOL: the paths reorder float32 sums). DDPM's init zeroes the UNet's output
    conv, which would make that loss |x_0 - x_hat_0|^2 whatever x_t, t and the noise: the zeroed
    weights are Xavier-initialised here (in bench and by hand alike)."""
    without_zero_layers(monkeypatch)
    seconds = {name: 0.01 * (k + 2) for k, name in enumerate(bench.STEP_PATHS)}
    first_loss = {}

    def fake_race(fns, iters, rounds, device, warmup=1):
        assert list(fns) == list(bench.STEP_PATHS)
        first_loss.update({name: fn().item() for name, fn in fns.items()})
        return dict(seconds)

    monkeypatch.setattr(bench, "race", fake_race)
    rows = bench.bench_stage2("cpu", CPU, iters=1, rounds=1)
    before, *afters = bench.STEP_PATHS
    batch = TINY["batch_size"]
    assert [r["after"] for r in rows] == afters
    for r in rows:
        s0, s1 = seconds[before], seconds[r["after"]]
        assert r["before"] == before and r["what"].endswith(f"batch {batch}")
        assert r["before_ms"] == pytest.approx(1e3 * s0) and r["after_ms"] == pytest.approx(
            1e3 * s1
        )
        assert r["speedup"] == pytest.approx(s0 / s1)
        assert r["before_img_s"] == pytest.approx(batch / s0) and r["after_img_s"] == pytest.approx(
            batch / s1
        )
    by_hand = stage2_first_loss_by_hand().item()
    for name in bench.STEP_PATHS:
        assert first_loss[name] == pytest.approx(by_hand, rel=RTOL), name


def test_conv_flops_read_off_the_profiler_match_the_flop_counter():
    """2 B C_out H_out W_out (C_in / groups) k^2 per forward conv, one such conv per gradient asked
    for in backward (a stride-2 conv whose input needs no gradient, as the UNet's first conv; a
    grouped conv whose weight needs none), equal to torch's FlopCounterMode. (Its weight-gradient
    formula ignores groups: the UNet has no grouped conv.)"""
    x = torch.randn(2, 6, 9, 9)
    w1, w2 = torch.randn(8, 6, 3, 3, requires_grad=True), torch.randn(4, 4, 1, 1)
    w3 = torch.randn(
        4, 3, 4, 4, requires_grad=True
    )  # a transposed conv's weight: (C_in, C_out, k, k)

    def step():
        h = F.conv2d(x, w1, stride=2, padding=1)  # (2, 6, 9, 9) -> (2, 8, 5, 5)
        h = F.conv2d(h, w2, groups=2)  # (2, 8, 5, 5) -> (2, 4, 5, 5), grouped 1x1
        return F.conv_transpose2d(
            h, w3, stride=2, padding=1
        ).sum()  # (2, 4, 5, 5) -> (2, 3, 10, 10), TransposedUpConv

    with FlopCounterMode(display=False) as counter:
        step().backward()
    with profile(record_shapes=True) as prof:
        step().backward()
    events = [
        e for e in prof.events() if e.name in ("aten::convolution", "aten::convolution_backward")
    ]
    assert len(events) == 6
    found = [bench.conv_flops(e.name, e.input_shapes, e.concrete_inputs) for e in events]
    assert sum(f for _, f in found) == counter.get_total_flops()
    assert {label for label, _ in found} == {
        "3x3/2 6->8 @9x9",
        "1x1/1 8->4 @5x5",
        "4x4/2 transposed 4->3 @5x5",
    }


def test_the_transposed_up_conv_path_does_16_of_the_36_multiply_adds_of_each_upsampling(tiny):
    """bench's fast_up flag reaches every Upsample, and torch's FLOP count sees the saving: per
    upsampling conv and pass (forward, input gradient, weight gradient) 2 B C_in C_out H W (36 - 16)
    FLOPs fewer, H x W its input."""
    flops = {}
    for fast in (False, True):
        _, loss_fn, model = bench.train_step(
            "unet", "cpu", 4, CPU, channels_last=False, fast_up=fast
        )
        ups = [m for m in model.modules() if isinstance(m, unet.Upsample)]
        assert (
            len(ups) == 1 and isinstance(ups[0], bench.TransposedUpsample) == fast
        )  # TINY: one upsampling
        flops[fast] = bench.count_flops(loss_fn, model)
    B, C, H = 4, TINY["ch"] * TINY["ch_mult"][1], TINY["image_size"] // 2
    assert flops[False] - flops[True] == 3 * 2 * B * C * C * H * H * (36 - 16)


_build = (
    bench.build
)  # bench_diffusers' own models are wrapped by the test below; the fake's inner UNet is not


class FakeUNet2DModel(torch.nn.Module):
    """Stands in for diffusers' UNet2DModel (not a requirement): our own unconditional UNet behind
    its interface, recording the configuration it is built with and what each call sees."""

    configs, calls = [], []

    def __init__(self, **config):
        super().__init__()
        FakeUNet2DModel.configs.append(config)
        self.net = _build("ddpm", "cifar10", CPU, dropout=0.0)

    def forward(self, x, t):
        FakeUNet2DModel.calls.append(("diffusers", *what_a_call_sees(self, x)))
        return SimpleNamespace(sample=self.net(x, t))


def what_a_call_sees(model, x):
    """(the input's layout, its 4-D weights' layout, whether each Upsample is a TransposedUpsample,
    the input's values). A layout is 'channels_last' when every 4-D tensor is NHWC and one is not
    also NCHW (a 1x1 kernel is both), else 'contiguous' when every one is NCHW, else 'mixed'."""

    def layout_of(tensors):
        if all(w.is_contiguous(memory_format=torch.channels_last) for w in tensors) and not all(
            w.is_contiguous() for w in tensors
        ):
            return "channels_last"
        return "contiguous" if all(w.is_contiguous() for w in tensors) else "mixed"

    weights = [p for p in model.parameters() if p.dim() == 4]
    fast = frozenset(
        isinstance(m, bench.TransposedUpsample)
        for m in model.modules()
        if isinstance(m, unet.Upsample)
    )
    return layout_of([x]), layout_of(weights), fast, x.detach().contiguous().clone()


def test_diffusers_rows_run_each_model_on_the_same_batch_with_input_and_weights_in_the_rows_layout(
    tiny, monkeypatch
):
    """bench_diffusers: each of the three models runs in both layouts with its input and every conv
    weight in that layout (a model in one format and its batch in another would time a layout
    conversion), all on the same batch; ours with the core's nearest + conv, its copy with the
    transposed up-conv; diffusers' model built to our preset's architecture (TINY: two levels of 8
    and 16 channels, attention at the 8x8 level only, one head of 16 channels)."""
    FakeUNet2DModel.configs.clear()
    FakeUNet2DModel.calls.clear()

    def build(*args, **kwargs):  # bench's own UNet, recording each call (a deepcopy keeps the hook)
        model = _build(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda m, inputs: FakeUNet2DModel.calls.append(
                ("ours", *what_a_call_sees(m, inputs[0]))
            )
        )
        return model

    monkeypatch.setattr(bench, "build", build)
    rows = bench.bench_diffusers(FakeUNet2DModel, CPU, batch=2, iters=1, rounds=1)
    models = ("ours (unet.UNet)", "ours, transposed up-conv", "diffusers UNet2DModel")
    assert {(r["model"], r["layout"]) for r in rows} == {
        (m, lay) for m in models for lay in ("contiguous", "channels_last")
    }
    seen = {
        (who, x_layout, w_layout, fast)
        for who, x_layout, w_layout, fast, _ in FakeUNet2DModel.calls
    }
    assert seen == {
        (who, lay, lay, fast)
        for lay in ("contiguous", "channels_last")
        for who, fast in (
            ("ours", frozenset({False})),
            ("ours", frozenset({True})),
            ("diffusers", frozenset({False})),
        )
    }, seen
    x = FakeUNet2DModel.calls[0][-1]
    assert all(torch.equal(call[-1], x) for call in FakeUNet2DModel.calls)
    [config] = FakeUNet2DModel.configs
    assert (config["sample_size"], config["block_out_channels"], config["layers_per_block"]) == (
        16,
        (8, 16),
        1,
    )
    assert config["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D")
    assert config["up_block_types"] == ("AttnUpBlock2D", "UpBlock2D")
    assert config["attention_head_dim"] == 16 and config["norm_num_groups"] == 8


def random_weights(model):
    """Every parameter redrawn at random (the zero-initialised convs too), so each path's every
    layer matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_code_paths_keep_the_parameters_and_compute_the_core_models_function(tiny):
    """code_path patches every upsampling of the UNet and of the VAE's decoder (3 up blocks) and
    every ResBlock, keeping the state_dict; the in-place ResBlocks compute the same values in the
    same order as the core's (outputs and every gradient bit for bit, with and without a graph), and
    the transposed up-convs the same function (float64)."""
    import copy

    net = random_weights(bench.build("unet", "cpu", CPU)).double()
    vae = random_weights(bench.build("vae", "cpu", CPU)).double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    t, cond = torch.tensor([0, 500, 999]), torch.randn_like(x)
    g = torch.randn_like(x)
    in_place = bench.code_path(copy.deepcopy(net), in_place=True)
    assert (
        sum(isinstance(m, bench.InPlaceResBlock) for m in in_place.modules())
        == sum(isinstance(m, unet.ResBlock) for m in net.modules())
        > 0
    )
    for m in (net, in_place):
        (m(x, t, cond) * g).sum().backward()
    with torch.inference_mode():
        assert torch.equal(net(x, t, cond), in_place(x, t, cond))
    for (name, p), q in zip(net.named_parameters(), in_place.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for model, fn in (
        (net, lambda m: m(x, t, cond)),
        (
            vae,
            lambda m: m.decode(
                torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            ),
        ),
    ):
        fast = bench.code_path(copy.deepcopy(model), fast_up=True)
        assert fast.state_dict().keys() == model.state_dict().keys()
        assert sum(isinstance(m, bench.TransposedUpConv) for m in fast.modules()) == (
            1 if model is net else 3
        )
        assert not any(isinstance(m, torch.nn.Upsample) for m in fast.modules())
        with torch.no_grad():
            expected, out = fn(model), fn(fast)
        assert torch.allclose(out, expected, rtol=0, atol=1e-12 * expected.abs().max().item())


def test_in_place_resblock_gradients():
    """The adds into the conv outputs are in place under autograd too: torch.autograd.gradcheck
    compares the analytic gradients with central differences in float64."""
    torch.manual_seed(0)
    block = bench.InPlaceResBlock(4, 6, temb_ch=8, dropout=0.0, groups=2).double()
    with torch.no_grad():
        block.conv2.weight.normal_(0, 0.2)  # zero-initialised: give its gradient path a slope
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    temb = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x, temb), eps=1e-6, atol=1e-7)


def test_transposed_up_conv_is_nearest_x2_then_3x3_conv_values_and_gradients():
    """The reference upsamples by repeating every pixel into a 2x2 block, then convolves: the
    layer's definition, in float64, values and gradients."""
    torch.manual_seed(0)
    layer = bench.TransposedUpConv(5, 4, 3, 1, 1).double()
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (3, 5, 12, 14)
    expected = F.conv2d(up, layer.weight, layer.bias, padding=1)  # (3, 4, 12, 14)
    out = layer(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, rtol=0, atol=1e-13 * expected.abs().max().item())
    g = torch.randn_like(expected)
    got = torch.autograd.grad(out, (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(expected, (x, layer.weight, layer.bias), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-13 * b.abs().max().item())


def test_transpose_upsampling_folds_every_upsampling_into_the_same_function():
    """transpose_upsampling folds every nearest x2 + 3x3 conv (the UNet's Upsamples, the VAE
    decoder's three blocks) into a TransposedUpConv. The folded model has the same state_dict and
    computes what the model as written computes, to fp32 rounding."""
    import copy

    from vae import VAE

    net = unet.UNet(
        img_ch=3,
        ch=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
        image_size=8,
        norm_groups=4,
    )
    vae = VAE(img_ch=3, image_size=16, ch=8, z_dim=4)
    x, t, z = torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.randn(2, 4)
    for model, fn, n_up in ((net, lambda m: m(x, t), 1), (vae, lambda m: m.decode(z), 3)):
        raw = bench.transpose_upsampling(copy.deepcopy(model))
        assert sum(type(m) is bench.TransposedUpConv for m in raw.modules()) == n_up
        assert not any(isinstance(m, nn.Upsample) for m in raw.modules())
        assert all(
            torch.equal(a, b)
            for a, b in zip(raw.state_dict().values(), model.state_dict().values())
        )
        assert raw.state_dict().keys() == model.state_dict().keys()
        with torch.no_grad():
            expected, out = fn(model), fn(raw)
        assert torch.allclose(out, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(
    "conv",
    [
        dict(groups=2),
        dict(dilation=2, padding=2),
        dict(padding_mode="reflect"),
        dict(stride=2),
        dict(padding=0),
    ],
)
def test_transpose_upsampling_leaves_every_conv_it_does_not_compute_exactly(conv):
    """TransposedUpConv is a plain 3x3 conv (stride 1, zero padding 1, no dilation, no groups) of
    the upsampled input: an upsampling followed by any other conv is left as written, so the model
    computes what it did."""
    torch.manual_seed(0)
    kw = dict(dict(stride=1, padding=1), **conv)
    model = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(4, 4, 3, **kw))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = model(x)
        folded = bench.transpose_upsampling(model)
        assert type(folded[1]) is nn.Conv2d and isinstance(folded[0], nn.Upsample)
        assert torch.equal(folded(x), expected)
