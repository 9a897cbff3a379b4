"""The DDPM UNet of Ho et al. 2020 (Appendix B), conditioned on x_hat_0 by concatenation: it
outputs eps_theta(x_t, t) or another target (diffusevae.TARGETS), the config's.

The CIFAR-10 model (DDPM's code, diffusion_tf/models/unet.py): levels 32, 16, 8, 4 with 128 x (1, 2,
2, 2) channels, two residual blocks per level, self-attention at 16x16, GroupNorm, the timestep fed
to every residual block through a sinusoidal embedding, dropout 0.1: 35,746,307 parameters.
DiffuseVAE (arXiv:2201.00308) feeds x_hat_0 as cond_ch extra input channels. t is the code index
0..T-1, embedded as is. Init as DDPM's code: Xavier-uniform weights, zero biases, and zero weights
in each residual block's last conv, the attention's output projection and the output conv, so every
block starts as its skip path (the identity where the width stays)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def timestep_embedding(t, dim):
    """(B,) code indices -> (B, dim): [sin(t f_0), ..., sin(t f_{h-1}), cos(t f_0), ..., cos(t
    f_{h-1})], f_i = exp(-ln(10000) i / (h - 1)), h = dim / 2 (DDPM's get_timestep_embedding)."""
    if dim % 2 or dim < 4:
        raise ValueError(f"timestep embedding dim must be even and >= 4, got {dim}")
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000) * i / (half - 1))
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


def _init(layer, zero=False):
    """DDPM's init: Xavier-uniform (or zero) weights, zero bias."""
    (nn.init.zeros_ if zero else nn.init.xavier_uniform_)(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def conv(c_in, c_out, k=3, stride=1, zero=False):
    return _init(nn.Conv2d(c_in, c_out, k, stride, k // 2), zero)


def norm(c, groups=32):
    return nn.GroupNorm(groups, c, eps=1e-6)  # DDPM: 32 groups, this eps


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W pixels: x + proj(softmax(q k^T / sqrt(C)) v), q, k, v
    1x1 convs (Linear layers on the channels) of GroupNorm(x), proj zero-initialised."""

    def __init__(self, c, groups=32):
        super().__init__()
        self.norm = norm(c, groups)
        self.qkv = _init(nn.Linear(c, 3 * c))
        self.proj = _init(nn.Linear(c, c), zero=True)

    def forward(self, x):
        H = x.shape[2]
        h = rearrange(self.norm(x), "b c h w -> b 1 (h w) c")  # (B, C, H, W) -> (B, 1, HW, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)  # 3 x (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        return x + rearrange(self.proj(h), "b 1 (h w) c -> b c h w", h=H)  # (B, C, H, W)


class ResBlock(nn.Module):
    """DDPM's residual block: h = conv1(SiLU(GN(x))) + W SiLU(temb), out = skip(x) +
    conv2(Dropout(SiLU(GN(h)))), conv2 zero-initialised, skip a 1x1 conv if the width changes; then
    attention at the attention resolutions."""

    def __init__(self, c_in, c_out, temb_ch, dropout, attn=False, groups=32):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, groups), conv(c_in, c_out)
        self.temb_proj = _init(nn.Linear(temb_ch, c_out))
        self.norm2, self.dropout = norm(c_out, groups), nn.Dropout(dropout)
        self.conv2 = conv(c_out, c_out, zero=True)
        self.skip = conv(c_in, c_out, k=1) if c_in != c_out else nn.Identity()
        self.attn = AttnBlock(c_out, groups) if attn else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_in, H, W) -> (B, C_out, H, W)
        h += self.temb_proj(F.silu(temb))[:, :, None, None]  # + (B, C_out, 1, 1) at every pixel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(h.add_(self.skip(x)))  # in place: conv2's backward needs its input only


class Downsample(nn.Module):
    """A 3x3 conv of stride 2: (B, C, H, W) -> (B, C, H/2, W/2), padding 1 on every side."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv(c, c, stride=2)

    def forward(self, x, temb=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv(c, c)

    def forward(self, x, temb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def check_config(
    img_ch, cond_ch, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, image_size, norm_groups
):
    """A ValueError naming every rule a UNet configuration breaks."""
    resolutions = [image_size // 2**i for i in range(len(ch_mult))]
    rules = [
        (img_ch >= 1 and cond_ch >= 0, "img_ch >= 1 and cond_ch >= 0"),
        (norm_groups >= 1 and ch > 0 and ch % norm_groups == 0, "ch a multiple of norm_groups"),
        (len(ch_mult) > 0 and min(ch_mult) >= 1, "ch_mult a list of ints >= 1"),
        (num_res_blocks >= 1, "num_res_blocks >= 1"),
        (image_size > 0 and image_size % 2 ** (len(ch_mult) - 1) == 0, "image_size halvable"),
        (all(r in resolutions for r in attn_resolutions), f"attn_resolutions in {resolutions}"),
        (0.0 <= dropout < 1.0, "dropout in [0, 1)"),
    ]
    broken = [rule for ok, rule in rules if not ok]
    if broken:
        raise ValueError(
            f"the UNet needs {'; '.join(broken)}; got ch={ch}, norm_groups={norm_groups}, "
            f"ch_mult={ch_mult}, image_size={image_size}, attn at {attn_resolutions}"
        )


class UNet(nn.Module):
    """The network of (x_t, t[, x_hat_0]): eps_theta or the config's target. Down: per level
    num_res_blocks ResBlocks, then a Downsample but at the last level, each output pushed on a skip
    stack. Middle: Res, Attn, Res. Up: per level num_res_blocks + 1 ResBlocks, each eating
    concat(h, a popped skip), then an Upsample but at the top. Out: GroupNorm, SiLU, a
    zero-initialised conv. Small widths want norm_groups = 8: a GroupNorm of one channel per group
    would remove the per-channel timestep shift right after it is added."""

    def __init__(
        self,
        img_ch=1,
        cond_ch=0,
        ch=64,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        image_size=32,
        norm_groups=32,
    ):
        super().__init__()
        config = dict(img_ch=img_ch, cond_ch=cond_ch, ch=ch, ch_mult=list(ch_mult))
        config |= dict(num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions))
        config |= dict(dropout=float(dropout), image_size=image_size, norm_groups=norm_groups)
        self.config = config
        check_config(**self.config)
        temb_ch, levels = 4 * ch, [(ch * m, image_size // 2**i) for i, m in enumerate(ch_mult)]
        block = lambda c_in, c_out, attn: ResBlock(c_in, c_out, temb_ch, dropout, attn, norm_groups)
        mlp = [_init(nn.Linear(ch, temb_ch)), nn.SiLU(), _init(nn.Linear(temb_ch, temb_ch))]
        self.temb = nn.Sequential(*mlp)  # the timestep's MLP: (B, ch) -> (B, 4ch)
        self.conv_in = conv(img_ch + cond_ch, ch)  # (B, img_ch + cond_ch, S, S) -> (B, ch, S, S)
        skips, c = [ch], ch  # the channels of every tensor pushed on the skip stack
        self.down = nn.ModuleList()
        for level, (width, res) in enumerate(levels):
            for _ in range(num_res_blocks):
                self.down.append(block(c, width, res in attn_resolutions))
                c = width
                skips.append(c)
            if level < len(levels) - 1:
                self.down.append(Downsample(c))  # (B, c, res, res) -> (B, c, res/2, res/2)
                skips.append(c)
        self.mid = nn.ModuleList([block(c, c, True), block(c, c, False)])
        self.up = nn.ModuleList()
        for level, (width, res) in reversed(list(enumerate(levels))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(c + skips.pop(), width, res in attn_resolutions))
                c = width
            if level > 0:
                self.up.append(Upsample(c))  # (B, c, res, res) -> (B, c, 2res, 2res)
        self.out = nn.Sequential(norm(c, norm_groups), nn.SiLU(), conv(c, img_ch, zero=True))

    def forward(self, x, t, cond=None):
        """x_t (B, img_ch, H, W), t (B,) code indices, cond (B, cond_ch, H, W) or None -> the
        target (B, img_ch, H, W)."""
        self.check_inputs(x, t, cond)
        x = x if cond is None else torch.cat([x, cond], dim=1)  # (B, img_ch + cond_ch, H, W)
        temb = self.temb(timestep_embedding(t, self.config["ch"]).to(x.dtype))  # (B, 4ch)
        hs = [self.conv_in(x)]
        for layer in self.down:
            hs.append(layer(hs[-1], temb))
        h = hs[-1]
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)  # the channels of h and its skip, side by side
            h = layer(h, temb)
        return self.out(h)

    def check_inputs(self, x, t, cond):
        size, img_ch, cond_ch = (self.config[k] for k in ("image_size", "img_ch", "cond_ch"))
        if x.dim() != 4 or x.shape[1:] != (img_ch, size, size):
            raise ValueError(f"x must be (B, {img_ch}, {size}, {size}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a (B,) tensor, B = {x.shape[0]}, got {tuple(t.shape)}")
        if cond_ch == 0 and cond is not None:
            raise ValueError("this UNet is unconditional (cond_ch=0) but a cond was given")
        if cond_ch > 0 and (cond is None or cond.shape[1:] != (cond_ch, size, size)):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(
                f"this UNet needs cond of shape (B, {cond_ch}, {size}, {size}), got {got}"
            )
