"""bench.py's code, not its numbers (those belong to a machine): the README's commands parse, the stage-2 step it
times computes train.py's loss (written out here) in every variant and its rows set each variant's time against the
first's, the convolution FLOPs it reads off the profiler are torch's own count, and the diffusers comparison runs
every model on the same batch with its input and weights in the row's memory format. Tiny networks keep it to a few
seconds."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

import bench
import vae as vae_module
from oracles import linear_schedule_by_hand
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


def stage2_first_loss_by_hand(border):
    """train.py's stage-2 loss at step 0 on bench's fixed batch, written out: the weights and batch as seeded by
    stage2_step (seed 0), then under step_seed(0, 0, 0) z = mu + sigma eps_z (reparameterisation), x_hat_0 = dec(z),
    t ~ U{0..t_start}, eps ~ N(0, I) in that order (train.py's), the content without the `border` frame, and
    form 2 with the residual target: x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps + x_hat_0 and
    loss = mean((x_0 - x_hat_0) - net(x_t, t, x_hat_0))^2 over the batch and pixels."""
    cfg = dict(bench.PRESETS["cpu"], border=border)
    assert cfg["param"] == "residual" and cfg["schedule"] == "linear" and cfg["T"] == 1000  # what is written here
    torch.manual_seed(0)
    vae = bench.make_vae(cfg, 1).eval()
    unet = bench.make_unet(cfg, 1, cond_ch=1).train()
    x0 = bench.random_images(cfg, TINY["batch_size"], CPU)
    with torch.no_grad():
        mu, logvar = vae.encode(x0)
        torch.manual_seed(bench.step_seed(0, 0, 0))
        x_hat0 = vae.decode(mu + (0.5 * logvar).exp() * torch.randn(mu.shape))
        crop = (lambda x: x[..., border:-border, border:-border]) if border else (lambda x: x)
        x0, x_hat0 = crop(x0), crop(x_hat0)
        t = torch.randint(0, cfg["t_start"] + 1, (x0.shape[0],))
        noise = torch.randn(x0.shape)
        a = linear_schedule_by_hand(1000)[1][t].float().reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise + x_hat0
        return ((x0 - x_hat0) - unet(x_t, t, x_hat0)).pow(2).mean()


def test_stage2_speedups_are_before_over_after_and_each_variant_computes_train_pys_loss(tiny, monkeypatch):
    """bench_stage2's rows: before = the first variant, after = each other, ms = 1e3 s, speedup = before / after,
    img/s = batch / s, with the seconds race() gives (replaced here by known ones); and the step each variant hands
    to race computes, at its first call, train.py's stage-2 loss written out by hand (RTOL: the variants reorder
    float32 sums). DDPM's init zeroes the UNet's output conv, which would make that loss |x_0 - x_hat_0|^2 whatever
    x_t, t and the noise: the zeroed weights are Xavier-initialised here (in bench and by hand alike)."""
    make_unet = bench.make_unet

    def make_unet_without_zero_layers(*args, **kwargs):
        net = make_unet(*args, **kwargs)
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
                torch.nn.init.xavier_uniform_(m.weight)
        return net
    monkeypatch.setattr(bench, "make_unet", make_unet_without_zero_layers)
    seconds = {name: 0.01 * (k + 2) for k, name in enumerate(bench.STAGE2_VARIANTS)}
    first_loss = {}

    def fake_race(fns, iters, rounds, device, warmup=1):
        assert list(fns) == list(bench.STAGE2_VARIANTS)
        first_loss.update({name: fn().item() for name, fn in fns.items()})
        return dict(seconds)
    monkeypatch.setattr(bench, "race", fake_race)
    rows = bench.bench_stage2("cpu", CPU, iters=1, rounds=1)
    before, *afters = bench.STAGE2_VARIANTS
    batch = TINY["batch_size"]
    assert [r["after"] for r in rows] == afters
    for r in rows:
        s0, s1 = seconds[before], seconds[r["after"]]
        assert r["before"] == before and r["what"].endswith(f"batch {batch}")
        assert r["before_ms"] == pytest.approx(1e3 * s0) and r["after_ms"] == pytest.approx(1e3 * s1)
        assert r["speedup"] == pytest.approx(s0 / s1)
        assert r["before_img_s"] == pytest.approx(batch / s0) and r["after_img_s"] == pytest.approx(batch / s1)
    by_hand = {border: stage2_first_loss_by_hand(border).item() for border in (0, 2)}
    for name, flags in bench.STAGE2_VARIANTS.items():
        assert first_loss[name] == pytest.approx(by_hand[flags[5]], rel=RTOL), name
    assert abs(by_hand[2] / by_hand[0] - 1) > 1e-3  # the border variant trains another model: its loss differs


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


_build = bench.build  # bench_diffusers' own models are wrapped by the test below; the fake's inner UNet is not


class FakeUNet2DModel(torch.nn.Module):
    """Stands in for diffusers' UNet2DModel (not a requirement): our own unconditional UNet behind its interface,
    recording the configuration it is built with and what each call sees."""
    configs, calls = [], []

    def __init__(self, **config):
        super().__init__()
        FakeUNet2DModel.configs.append(config)
        self.net = _build("ddpm", "cifar10", CPU, dropout=0.0)

    def forward(self, x, t):
        FakeUNet2DModel.calls.append(("diffusers", *what_a_call_sees(self, x)))
        return SimpleNamespace(sample=self.net(x, t))


def what_a_call_sees(model, x):
    """(the input's layout, its 4-D weights' layout, the UpsampleConvs' fast flags, the input's values). A layout is
    'channels_last' when every 4-D tensor is NHWC and one is not also NCHW (a 1x1 kernel is both), else
    'contiguous' when every one is NCHW, else 'mixed'."""
    def layout_of(tensors):
        if all(w.is_contiguous(memory_format=torch.channels_last) for w in tensors) and \
                not all(w.is_contiguous() for w in tensors):
            return "channels_last"
        return "contiguous" if all(w.is_contiguous() for w in tensors) else "mixed"
    weights = [p for p in model.parameters() if p.dim() == 4]
    fast = frozenset(m.fast for m in model.modules() if isinstance(m, UpsampleConv))
    return layout_of([x]), layout_of(weights), fast, x.detach().contiguous().clone()


def test_diffusers_rows_run_each_model_on_the_same_batch_with_input_and_weights_in_the_rows_layout(tiny, monkeypatch):
    """bench_diffusers: each of the three models runs in both layouts with its input and every conv weight in that
    layout (a model in one format and its batch in another would time a layout conversion), all on the same batch;
    ours with the transposed up-conv, its copy with nearest + conv; diffusers' model built to our preset's
    architecture (TINY: two levels of 8 and 16 channels, attention at the 8x8 level only, one head of 16 channels)."""
    FakeUNet2DModel.configs.clear()
    FakeUNet2DModel.calls.clear()

    def build(*args, **kwargs):  # bench's own UNet, recording each call (a deepcopy keeps the hook)
        model = _build(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: FakeUNet2DModel.calls.append(
            ("ours", *what_a_call_sees(m, inputs[0]))))
        return model
    monkeypatch.setattr(bench, "build", build)
    rows = bench.bench_diffusers(FakeUNet2DModel, CPU, batch=2, iters=1, rounds=1)
    models = ("ours (unet.UNet)", "ours, nearest+conv upsampling", "diffusers UNet2DModel")
    assert {(r["model"], r["layout"]) for r in rows} == {(m, lay) for m in models for lay in ("contiguous", "channels_last")}
    seen = {(who, x_layout, w_layout, fast) for who, x_layout, w_layout, fast, _ in FakeUNet2DModel.calls}
    assert seen == {(who, lay, lay, fast) for lay in ("contiguous", "channels_last")
                    for who, fast in (("ours", frozenset({True})), ("ours", frozenset({False})),
                                      ("diffusers", frozenset({True})))}, seen
    x = FakeUNet2DModel.calls[0][-1]
    assert all(torch.equal(call[-1], x) for call in FakeUNet2DModel.calls)
    [config] = FakeUNet2DModel.configs
    assert (config["sample_size"], config["block_out_channels"], config["layers_per_block"]) == (16, (8, 16), 1)
    assert config["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D")
    assert config["up_block_types"] == ("AttnUpBlock2D", "UpBlock2D")
    assert config["attention_head_dim"] == 16 and config["norm_num_groups"] == 8
