"""The DDPM UNet (unet.py): the architecture count of Ho et al.'s CIFAR-10 model, the sinusoidal
embedding, the zero initialisation, the conditioning, the attention formula and the checkpoint round
trip."""

import json
import math

import pytest
import torch

from unet import AttnBlock, UNet, Upsample, timestep_embedding

# Small enough to run in well under a second on 2 cores, yet with every part: attention (at 8x8 and
# in the middle), a 1x1 skip conv (64 -> 128 channels), down/upsampling, dropout. ch = 64 so that
# every GroupNorm group holds >= 2 channels (with one channel per group the per-channel timestep
# shift is normalised away).
SMALL = dict(
    img_ch=1,
    cond_ch=1,
    ch=64,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    dropout=0.1,
    image_size=16,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids waiting at every op for a second core another
    process holds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def inputs(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    S = cfg["image_size"]
    x = torch.randn(B, cfg["img_ch"], S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    cond = torch.randn(B, cfg["cond_ch"], S, S, generator=g) if cfg["cond_ch"] else None
    return x, t, cond


def unzero(model, seed=0):
    """Give the zero-initialised layers (every res block's conv2, attention proj, output conv)
    random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_cifar10_config_has_ddpm_parameter_count():
    m = UNet(
        img_ch=3,
        cond_ch=0,
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        image_size=32,
    )
    assert sum(p.numel() for p in m.parameters()) == 35_746_307  # Ho et al. 2020, CIFAR-10 model


@pytest.mark.parametrize("img_ch, cond_ch", [(1, 1), (1, 0), (3, 0), (3, 3)])
def test_output_shape_equals_input_shape(img_ch, cond_ch):
    m = UNet(
        img_ch=img_ch,
        cond_ch=cond_ch,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(16,),
        image_size=32,
    )
    x, t, cond = inputs(m)
    assert m(x, t, cond).shape == (2, img_ch, 32, 32)


def test_output_is_exactly_zero_at_initialisation():
    m = UNet(**SMALL)
    x, t, cond = inputs(m)
    out = m(x, t, cond)
    assert torch.equal(out, torch.zeros_like(out))


def test_timestep_embedding_matches_closed_form():
    dim, half = 64, 32
    t = torch.tensor([0, 1, 17, 500, 999])
    # DDPM convention, in float64: f_i = 10000^(-i / (half - 1)), emb = [sin(t f), cos(t f)]
    i = torch.arange(half, dtype=torch.float64)
    args = t.double()[:, None] * 10000.0 ** (-i / (half - 1))[None, :]
    expected = torch.cat([args.sin(), args.cos()], dim=1)
    emb = timestep_embedding(t, dim)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    # float32: f carries a few ulps of relative error (exp, division) and t * f one more rounding,
    # so the argument is off by at most ~4 eps * t_max, and sin/cos pass that on (slope <= 1): the
    # tolerance for t_max = 999
    tol = 4 * 999 * torch.finfo(torch.float32).eps
    assert (emb.double() - expected).abs().max() < tol
    # distinct timesteps give distinct embeddings (min pairwise distance far above rounding)
    assert torch.cdist(emb, emb)[~torch.eye(5, dtype=torch.bool)].min() > 0.1


def test_output_depends_on_t_and_cond_and_eval_is_deterministic():
    m = unzero(UNet(**SMALL)).eval()
    x, t, cond = inputs(m)
    out = m(x, t, cond)
    assert out.abs().mean() > 1e-3
    assert torch.equal(m(x, t, cond), out)  # eval: deterministic
    assert (m(x, (t + 100) % 1000, cond) - out).abs().max() > 1e-4  # t matters
    assert (m(x, t, cond + 0.5) - out).abs().max() > 1e-4  # cond matters
    # and each example's output depends only on its own inputs (no mixing across the batch)
    assert torch.allclose(m(x[:1], t[:1], cond[:1]), out[:1], atol=1e-5)
    assert not torch.equal(m.train()(x, t, cond), out)  # train: dropout is active


def test_gradients_reach_every_parameter():
    m = unzero(UNet(**SMALL))
    x, t, cond = inputs(m, B=3)
    (
        m(x, t, cond) * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ).sum().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


def test_sampling_modes_give_the_same_output_and_leave_the_inputs_alone():
    # The same arithmetic in the same order whether a graph is recorded or not (sampling): the
    # output is bit-identical under autograd, no_grad and inference_mode, and the inputs are never
    # written to.
    m = unzero(UNet(**SMALL)).eval()
    x, t, cond = inputs(m)
    saved = x.clone(), cond.clone()
    outs = [m(x, t, cond).detach()]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            outs.append(m(x, t, cond))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert torch.equal(x, saved[0]) and torch.equal(cond, saved[1])


def test_resblock_gradients_match_central_differences():
    # torch.autograd.gradcheck compares the analytic gradients (inputs, and through them the graph
    # autograd kept) with central differences in float64.
    from unet import ResBlock

    torch.manual_seed(0)
    block = ResBlock(4, 6, temb_ch=8, dropout=0.0, groups=2).double()
    with torch.no_grad():
        block.conv2.weight.normal_(0, 0.2)  # zero-initialised: give its gradient path a slope
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    temb = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x, temb), eps=1e-6, atol=1e-7)


def test_attention_matches_explicit_softmax_formula():
    torch.manual_seed(0)
    blk = AttnBlock(64).double()
    unzero(blk)
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    B, C, H, W = x.shape
    h = blk.norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
    q, k, v = (
        h @ blk.qkv.weight[:C].T,
        h @ blk.qkv.weight[C : 2 * C].T,
        h @ blk.qkv.weight[2 * C :].T,
    )
    q, k, v = q + blk.qkv.bias[:C], k + blk.qkv.bias[C : 2 * C], v + blk.qkv.bias[2 * C :]
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(C), dim=-1) @ v  # (B, HW, C)
    expected = x + (a @ blk.proj.weight.T + blk.proj.bias).transpose(1, 2).reshape(B, C, H, W)
    assert torch.allclose(blk(x), expected, atol=1e-12)


def test_upsample_is_nearest_x2_then_the_same_3x3_conv_values_gradients_and_channels_last():
    # the reference: F.interpolate(nearest, x2), then conv2d with the layer's own 3x3 weight and
    # bias (padding 1); and, independently of interpolate, every pixel repeated into a 2x2 block
    F = torch.nn.functional
    torch.manual_seed(0)
    layer = Upsample(5).double()
    assert set(layer.state_dict()) == {"conv.weight", "conv.bias"} and layer.conv.weight.shape == (
        5,
        5,
        3,
        3,
    )
    with torch.no_grad():
        layer.conv.bias.normal_()  # zero-initialised: give it a value that shows
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    assert torch.equal(
        up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    )  # (3, 5, 12, 14)
    expected = F.conv2d(up, layer.conv.weight, layer.conv.bias, padding=1)  # (3, 5, 12, 14)
    out = layer(x, temb=torch.randn(3, 8, dtype=torch.float64))  # temb is ignored
    assert out.shape == expected.shape == (3, 5, 12, 14)
    assert torch.allclose(out, expected, rtol=0, atol=1e-13 * expected.abs().max().item())
    g = torch.randn_like(expected)
    got = torch.autograd.grad(out, (x, layer.conv.weight, layer.conv.bias), g)
    want = torch.autograd.grad(expected, (x, layer.conv.weight, layer.conv.bias), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-13 * b.abs().max().item())
    cl = torch.channels_last
    out_cl = layer.to(memory_format=cl)(x.detach().contiguous(memory_format=cl))
    assert torch.allclose(out_cl, expected, rtol=0, atol=1e-13 * expected.abs().max().item())


def test_channels_last_gives_the_same_output():
    m = unzero(UNet(**SMALL)).eval()
    x, t, cond = inputs(m)
    out = m(x, t, cond)
    cl = torch.channels_last
    m_cl = m.to(memory_format=cl)
    out_cl = m_cl(x.contiguous(memory_format=cl), t, cond.contiguous(memory_format=cl))
    assert torch.allclose(out_cl, out, atol=1e-5 * out.abs().max().item())


def test_clear_errors():
    m = UNet(**SMALL)
    x, t, cond = inputs(m)
    with pytest.raises(ValueError, match="needs cond"):
        m(x, t)
    with pytest.raises(ValueError, match="needs cond"):
        m(x, t, torch.cat([cond, cond], dim=1))  # wrong channel count
    with pytest.raises(ValueError, match="unconditional"):
        UNet(**{**SMALL, "cond_ch": 0})(x, t, cond)
    with pytest.raises(ValueError, match="t must be"):
        m(x, t[:1], cond)
    with pytest.raises(ValueError, match="image_size"):
        UNet(ch_mult=(1, 2, 2), image_size=30)  # 30 is not divisible by 4
    with pytest.raises(ValueError, match="multiple of norm_groups"):
        UNet(ch=48)
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(ch_mult=(1, 2, 2), attn_resolutions=(12,), image_size=32)


def test_config_round_trip_rebuilds_the_same_model():
    m = unzero(UNet(**SMALL)).eval()
    config = json.loads(json.dumps(m.config))  # plain data, as in a checkpoint
    m2 = UNet(**config).eval()
    m2.load_state_dict(m.state_dict(), strict=True)
    x, t, cond = inputs(m)
    assert torch.equal(m2(x, t, cond), m(x, t, cond))


def test_one_channel_per_group_erases_the_timestep_shift_and_fewer_groups_keep_it():
    # GroupNorm with groups == channels subtracts each channel's mean, so the per-channel shift W
    # SiLU(temb) added just before it vanishes: the block ignores t. That is why small widths use
    # norm_groups = 8.
    from unet import ResBlock

    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    temb_a, temb_b = (
        torch.randn(2, 128, dtype=torch.float64),
        torch.randn(2, 128, dtype=torch.float64),
    )
    for groups, ignores_t in [(32, True), (8, False)]:
        block = ResBlock(32, 32, 128, 0.0, groups=groups).double().eval()
        torch.nn.init.normal_(block.conv2.weight)  # undo the zero init so the branch shows
        same = torch.allclose(block(x, temb_a), block(x, temb_b), rtol=0, atol=1e-9)
        assert same == ignores_t
