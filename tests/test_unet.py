"""The DDPM UNet (unet.py): the architecture count of Ho et al.'s CIFAR-10 model, the sinusoidal embedding,
the zero initialisation, the conditioning, the attention formula and the checkpoint round trip."""
import json
import math

import pytest
import torch

from unet import AttnBlock, UNet, UpsampleConv, timestep_embedding

# Small enough to run in well under a second on 2 cores, yet with every part: attention (at 8x8 and in the
# middle), a 1x1 skip conv (64 -> 128 channels), down/upsampling, dropout. ch = 64 so that every GroupNorm
# group holds >= 2 channels (with one channel per group the per-channel timestep shift is normalised away).
SMALL = dict(img_ch=1, cond_ch=1, ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1,
             image_size=16)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids waiting at every op for a second core another process holds."""
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
    """Give the zero-initialised layers (every res block's conv2, attention proj, output conv) random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_cifar10_config_has_ddpm_parameter_count():
    m = UNet(img_ch=3, cond_ch=0, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
             dropout=0.1, image_size=32)
    assert sum(p.numel() for p in m.parameters()) == 35_746_307  # Ho et al. 2020, CIFAR-10 model


@pytest.mark.parametrize("img_ch, cond_ch", [(1, 1), (1, 0), (3, 0), (3, 3)])
def test_output_shape_equals_input_shape(img_ch, cond_ch):
    m = UNet(img_ch=img_ch, cond_ch=cond_ch, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
             image_size=32)
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
    # float32: f carries a few ulps of relative error (exp, division) and t * f one more rounding, so the argument
    # is off by at most ~4 eps * t_max, and sin/cos pass that on (slope <= 1): the tolerance for t_max = 999
    tol = 4 * 999 * torch.finfo(torch.float32).eps
    assert (emb.double() - expected).abs().max() < tol
    # distinct timesteps give distinct embeddings (min pairwise distance far above rounding)
    assert torch.cdist(emb, emb)[~torch.eye(5, dtype=torch.bool)].min() > 0.1


def test_output_depends_on_t_and_cond_and_eval_is_deterministic():
    m = unzero(UNet(**SMALL)).eval()
    x, t, cond = inputs(m)
    out = m(x, t, cond)
    assert out.abs().mean() > 1e-3
    assert torch.equal(m(x, t, cond), out)                                  # eval: deterministic
    assert (m(x, (t + 100) % 1000, cond) - out).abs().max() > 1e-4          # t matters
    assert (m(x, t, cond + 0.5) - out).abs().max() > 1e-4                   # cond matters
    # and each example's output depends only on its own inputs (no mixing across the batch)
    assert torch.allclose(m(x[:1], t[:1], cond[:1]), out[:1], atol=1e-5)
    assert not torch.equal(m.train()(x, t, cond), out)                      # train: dropout is active


def test_gradients_reach_every_parameter():
    m = unzero(UNet(**SMALL))
    x, t, cond = inputs(m, B=3)
    (m(x, t, cond) * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


def test_sampling_modes_give_the_same_output_and_leave_the_inputs_alone():
    # The ResBlocks compute in place when no graph is recorded (sampling): the same arithmetic in the same order,
    # so the output is bit-identical under autograd, no_grad and inference_mode; a SiLU done in place on a tensor
    # used again later (the time embedding, shared by every block) or an add into an input would break this.
    m = unzero(UNet(**SMALL)).eval()
    x, t, cond = inputs(m)
    saved = x.clone(), cond.clone()
    outs = [m(x, t, cond).detach()]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            outs.append(m(x, t, cond))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert torch.equal(x, saved[0]) and torch.equal(cond, saved[1])


def test_in_place_resblocks_compute_what_the_out_of_place_code_does():
    # ResBlock.in_place False makes a new tensor at every op (the code before; bench.py's A/B): the same values
    # in the same order, so outputs and every parameter's gradient agree bit for bit, with and without a graph.
    import copy
    from unet import ResBlock
    m = unzero(UNet(**dict(SMALL, dropout=0.0)))
    old = copy.deepcopy(m)
    for block in old.modules():
        if isinstance(block, ResBlock):
            block.in_place = False
    x, t, cond = inputs(m, B=3)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for net in (m, old):
        (net(x, t, cond) * g).sum().backward()
    with torch.inference_mode():
        assert torch.equal(m(x, t, cond), old(x, t, cond))
    for (name, p), q in zip(m.named_parameters(), old.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_resblock_gradients_with_its_in_place_adds():
    # The adds into the conv outputs are in place under autograd too: torch.autograd.gradcheck compares the
    # analytic gradients (inputs, and through them the graph autograd kept) with central differences in float64.
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
    h = blk.norm(x).reshape(B, C, H * W).transpose(1, 2)                    # (B, HW, C)
    q, k, v = h @ blk.qkv.weight[:C].T, h @ blk.qkv.weight[C:2 * C].T, h @ blk.qkv.weight[2 * C:].T
    q, k, v = q + blk.qkv.bias[:C], k + blk.qkv.bias[C:2 * C], v + blk.qkv.bias[2 * C:]
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(C), dim=-1) @ v    # (B, HW, C)
    expected = x + (a @ blk.proj.weight.T + blk.proj.bias).transpose(1, 2).reshape(B, C, H, W)
    assert torch.allclose(blk(x), expected, atol=1e-12)


@pytest.mark.parametrize("fast", [True, False])
def test_upsample_conv_is_nearest_x2_then_3x3_conv_values_and_gradients(fast):
    # the reference upsamples by repeating every pixel into a 2x2 block, then convolves: the layer's definition
    torch.manual_seed(0)
    layer = UpsampleConv(5, 4, fast=fast).double()
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)                       # (3, 5, 12, 14)
    expected = torch.nn.functional.conv2d(up, layer.weight, layer.bias, padding=1)      # (3, 4, 12, 14)
    out = layer(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, rtol=0, atol=1e-13 * expected.abs().max().item())
    g = torch.randn_like(expected)
    got = torch.autograd.grad(out, (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(expected, (x, layer.weight, layer.bias), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-13 * b.abs().max().item())


def test_upsample_conv_keeps_a_plain_convs_parameters_and_channels_last():
    plain = torch.nn.Conv2d(4, 6, 3, 1, 1)
    layer = UpsampleConv(4, 6)
    layer.load_state_dict(plain.state_dict())  # strict: the same keys and shapes, so saved models load
    cl = torch.channels_last
    x = torch.randn(2, 4, 5, 5)
    out = layer.to(memory_format=cl)(x.contiguous(memory_format=cl))
    expected = plain(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert torch.allclose(out, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


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
        m(x, t, torch.cat([cond, cond], dim=1))                             # wrong channel count
    with pytest.raises(ValueError, match="unconditional"):
        UNet(**{**SMALL, "cond_ch": 0})(x, t, cond)
    with pytest.raises(ValueError, match="t must be"):
        m(x, t[:1], cond)
    with pytest.raises(ValueError, match="image_size"):
        UNet(ch_mult=(1, 2, 2), image_size=30)                              # 30 is not divisible by 4
    with pytest.raises(ValueError, match="multiple of norm_groups"):
        UNet(ch=48)
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(ch_mult=(1, 2, 2), attn_resolutions=(12,), image_size=32)


def test_config_round_trip_rebuilds_the_same_model():
    m = unzero(UNet(**SMALL)).eval()
    config = json.loads(json.dumps(m.config))                               # plain data, as in a checkpoint
    m2 = UNet(**config).eval()
    m2.load_state_dict(m.state_dict(), strict=True)
    x, t, cond = inputs(m)
    assert torch.equal(m2(x, t, cond), m(x, t, cond))


def test_one_channel_per_group_erases_the_timestep_shift_and_fewer_groups_keep_it():
    # GroupNorm with groups == channels subtracts each channel's mean, so the per-channel shift W SiLU(temb) added
    # just before it vanishes: the block ignores t. That is why small widths use norm_groups = 8.
    from unet import ResBlock
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    temb_a, temb_b = torch.randn(2, 128, dtype=torch.float64), torch.randn(2, 128, dtype=torch.float64)
    for groups, ignores_t in [(32, True), (8, False)]:
        block = ResBlock(32, 32, 128, 0.0, groups=groups).double().eval()
        torch.nn.init.normal_(block.conv2.weight)  # undo the zero init so the branch shows
        same = torch.allclose(block(x, temb_a), block(x, temb_b), rtol=0, atol=1e-9)
        assert same == ignores_t


def test_z_conditioning_is_off_by_default_and_changes_the_output_through_the_time_embedding():
    torch.manual_seed(0)
    plain = UNet(**SMALL)
    assert "z_dim" not in plain.config and plain.z_emb is None  # the paper's model: z only through x_hat_0
    m = unzero(UNet(**SMALL, z_dim=5)).eval()
    x, t = torch.randn(2, SMALL["img_ch"], 16, 16), torch.tensor([3, 700])
    cond = torch.randn(2, SMALL["cond_ch"], 16, 16) if SMALL["cond_ch"] else None
    z = torch.randn(2, 5)
    with torch.no_grad():
        a, b = m(x, t, cond, z=z), m(x, t, cond, z=z + 1)
        m.z_emb.weight.zero_()  # with a zero embedding z has no effect: it enters only through temb
        c, d = m(x, t, cond, z=z), m(x, t, cond, z=z + 1)
    assert not torch.allclose(a, b) and torch.equal(c, d)
    with pytest.raises(ValueError, match="z of shape"):
        m(x, t, cond)
    with pytest.raises(ValueError, match="never"):
        plain(x, t, cond, z=z)
