"""The DDPM noise-prediction UNet eps_theta(x_t, t) of Ho et al. 2020 (Appendix B), optionally conditioned.

Read beside DDPM Appendix B and its code (diffusion_tf/models/unet.py). The CIFAR-10 model is a PixelCNN++-style
UNet: levels 32 -> 16 -> 8 -> 4 with channels 128 x (1, 2, 2, 2), two residual blocks per level, single-head
self-attention at 16x16, GroupNorm, the timestep fed to every residual block through a sinusoidal embedding,
dropout 0.1: 35,746,307 parameters.

DiffuseVAE (Pandey et al. 2022, arXiv:2201.00308, Formulation 1 and 2) conditions the same network on the VAE's reconstruction x_hat_0
by concatenating it to x_t along channels: the input has img_ch + cond_ch channels, the output img_ch.

Timesteps: t is the code index 0..T-1 (the paper's 1..T), fed to the embedding as is (as DDPM's code does).
Init as in DDPM's code: Xavier-uniform weights, zero biases, and zero weights for each residual block's last conv,
the attention output projection and the output conv: every block starts as the identity and eps_theta as 0.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def timestep_embedding(t, dim):
    """Transformer sinusoidal embedding of the timestep, DDPM convention (diffusion_tf get_timestep_embedding):

        f_i = exp(-ln(10000) * i / (half - 1)),  i = 0..half-1,  half = dim / 2,
        emb(t) = [sin(t f_0), ..., sin(t f_{half-1}), cos(t f_0), ..., cos(t f_{half-1})]

    (half sin then half cos; frequencies from 1 down to exactly 1/10000). t: (B,) code indices -> (B, dim) float32.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"timestep embedding dim must be even and >= 4, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]                     # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)    # (B, dim)


def _init(layer, zero=False):
    """DDPM's init: Xavier-uniform weights (or zeros for the layers that must start at zero), zero bias."""
    (nn.init.zeros_ if zero else nn.init.xavier_uniform_)(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def conv(c_in, c_out, k=3, stride=1, zero=False):
    return _init(nn.Conv2d(c_in, c_out, k, stride, k // 2), zero)


def norm(c, groups=32):
    return nn.GroupNorm(groups, c, eps=1e-6)  # DDPM: 32 groups, this eps


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W pixels: x + proj(softmax(q k^T / sqrt(C)) v), with q, k, v 1x1 convs
    of GroupNorm(x) and proj zero-initialised. DDPM uses it at 16x16 and in the middle of the UNet.
    The 1x1 convs are Linear layers on the channel axis of the (B, 1, HW, C) pixel tokens (the same map; DDPM's
    code calls them "nin"), in the (B, heads, L, C) layout scaled_dot_product_attention takes."""

    def __init__(self, c, groups=32):
        super().__init__()
        self.norm = norm(c, groups)
        self.qkv = _init(nn.Linear(c, 3 * c))
        self.proj = _init(nn.Linear(c, c), zero=True)

    def forward(self, x):
        H = x.shape[2]
        h = rearrange(self.norm(x), "b c h w -> b 1 (h w) c")               # (B, C, H, W) -> (B, 1, HW, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)                               # 3 x (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)                          # (B, 1, HW, C), scale 1/sqrt(C)
        return x + rearrange(self.proj(h), "b 1 (h w) c -> b c h w", h=H)  # (B, C, H, W)


class ResBlock(nn.Module):
    """DDPM residual block (Wide-ResNet block with GroupNorm; the timestep enters after the first conv):

        h = conv1(SiLU(GN(x))) + W SiLU(temb),   out = skip(x) + conv2(Dropout(SiLU(GN(h))))

    conv2 is zero-initialised; skip is a 1x1 conv when the channel count changes, else the identity.
    With attn=True it is followed by an AttnBlock (DDPM: after every res block at the attention resolutions).
    """

    def __init__(self, c_in, c_out, temb_ch, dropout, attn=False, groups=32):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, groups), conv(c_in, c_out)
        self.temb_proj = _init(nn.Linear(temb_ch, c_out))
        self.norm2, self.dropout, self.conv2 = norm(c_out, groups), nn.Dropout(dropout), conv(c_out, c_out, zero=True)
        self.skip = conv(c_in, c_out, k=1) if c_in != c_out else nn.Identity()
        self.attn = AttnBlock(c_out, groups) if attn else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))                         # (B, C_in, H, W) -> (B, C_out, H, W)
        h += self.temb_proj(F.silu(temb))[:, :, None, None]           # + (B, C_out, 1, 1), the same at every pixel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(h.add_(self.skip(x)))  # adds in place: a conv's backward needs its input, not its output


class Downsample(nn.Module):
    """Strided 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2). Takes (and ignores) temb like every layer of the paths."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv(c, c, stride=2)  # pads 1 on every side (TF's "SAME" in DDPM pads only bottom/right)

    def forward(self, x, temb=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv(c, c)

    def forward(self, x, temb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t[, x_hat_0]) -> predicted noise, the DDPM UNet (Appendix B).

    Down path: per level num_res_blocks ResBlocks (channels ch * ch_mult[level]), then a Downsample except at the
    last level; the output of conv_in and of every down layer is pushed on a skip stack. Middle: Res, Attn, Res.
    Up path: per level num_res_blocks + 1 ResBlocks, each eating concat(h, skip stack pop), then an Upsample except
    at the top level. Out: GroupNorm -> SiLU -> zero-initialised 3x3 conv to img_ch channels.
    Attention follows each ResBlock whose resolution is in attn_resolutions.
    Note: GroupNorm with as many groups as channels normalises each channel alone, which subtracts the
    per-channel timestep shift W SiLU(temb) right after it is added; so small widths (ch = 32) want
    norm_groups = 8, while DDPM's 32 groups are the default (the canonical model is unchanged).
    """

    def __init__(self, img_ch=1, cond_ch=0, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, image_size=32, norm_groups=32):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        resolutions = [image_size // 2 ** i for i in range(len(ch_mult))]
        rules = [(img_ch >= 1 and cond_ch >= 0, "img_ch >= 1 and cond_ch >= 0"),
                 (norm_groups >= 1 and ch > 0 and ch % norm_groups == 0, f"ch a positive multiple of norm_groups"),
                 (ch_mult and min(ch_mult) >= 1 and num_res_blocks >= 1, "ch_mult ints >= 1, num_res_blocks >= 1"),
                 (image_size > 0 and image_size % 2 ** (len(ch_mult) - 1) == 0,
                  "image_size divisible by 2**(len(ch_mult)-1), the UNet halves it len(ch_mult)-1 times"),
                 (all(r in resolutions for r in attn_resolutions), f"attn_resolutions among {resolutions}"),
                 (0.0 <= dropout < 1.0, "dropout in [0, 1)")]
        broken = [rule for ok, rule in rules if not ok]
        if broken:
            raise ValueError(f"the UNet needs {'; '.join(broken)}; got img_ch={img_ch}, cond_ch={cond_ch}, ch={ch}, "
                             f"norm_groups={norm_groups}, ch_mult={ch_mult}, num_res_blocks={num_res_blocks}, "
                             f"image_size={image_size}, attn_resolutions={attn_resolutions}, dropout={dropout}")
        self.config = dict(img_ch=img_ch, cond_ch=cond_ch, ch=ch, ch_mult=list(ch_mult),
                           num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                           dropout=float(dropout), image_size=image_size, norm_groups=norm_groups)
        g = norm_groups
        temb_ch = 4 * ch
        # timestep MLP: (B, ch) sinusoid -> (B, 4ch)
        self.temb = nn.Sequential(_init(nn.Linear(ch, temb_ch)), nn.SiLU(), _init(nn.Linear(temb_ch, temb_ch)))
        self.conv_in = conv(img_ch + cond_ch, ch)                   # (B, img_ch + cond_ch, S, S) -> (B, ch, S, S)

        skip_chs, c = [ch], ch  # channels of every tensor pushed on the skip stack
        self.down = nn.ModuleList()
        for level, (mult, res) in enumerate(zip(ch_mult, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, ch * mult, temb_ch, dropout, res in attn_resolutions, g))
                c = ch * mult
                skip_chs.append(c)
            if level < len(ch_mult) - 1:
                self.down.append(Downsample(c))                     # (B, c, res, res) -> (B, c, res/2, res/2)
                skip_chs.append(c)
        # middle: Res, Attn, Res
        self.mid = nn.ModuleList([ResBlock(c, c, temb_ch, dropout, True, g), ResBlock(c, c, temb_ch, dropout, False, g)])
        self.up = nn.ModuleList()
        for level, (mult, res) in reversed(list(enumerate(zip(ch_mult, resolutions)))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skip_chs.pop(), ch * mult, temb_ch, dropout, res in attn_resolutions, g))
                c = ch * mult
            if level > 0:
                self.up.append(Upsample(c))                         # (B, c, res, res) -> (B, c, 2res, 2res)
        self.out = nn.Sequential(norm(c, g), nn.SiLU(), conv(c, img_ch, zero=True))  # (B, ch, S, S) -> (B, img_ch, S, S)

    def _check_inputs(self, x, t, cond):
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg["img_ch"] or x.shape[2:] != (cfg["image_size"],) * 2:
            raise ValueError(f"x must be (B, {cfg['img_ch']}, {cfg['image_size']}, {cfg['image_size']}), "
                             f"got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a (B,) = ({x.shape[0]},) tensor of timesteps, got shape {tuple(t.shape)}")
        if cfg["cond_ch"] == 0 and cond is not None:
            raise ValueError("this UNet is unconditional (cond_ch=0) but a cond was given")
        if cfg["cond_ch"] > 0 and (cond is None or cond.shape != (x.shape[0], cfg["cond_ch"], *x.shape[2:])):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"this UNet needs cond of shape (B, {cfg['cond_ch']}, H, W) matching x, got {got}")

    def forward(self, x, t, cond=None):
        """x: (B, img_ch, H, W) noisy image x_t; t: (B,) long code indices; cond: (B, cond_ch, H, W) or None.
        Returns (B, img_ch, H, W), the predicted noise eps_theta."""
        self._check_inputs(x, t, cond)
        if cond is not None:
            x = torch.cat([x, cond], dim=1)                         # (B, img_ch + cond_ch, H, W)
        temb = self.temb(timestep_embedding(t, self.config["ch"]).to(x.dtype))  # (B, ch) -> (B, 4ch)
        hs = [self.conv_in(x)]
        for layer in self.down:
            hs.append(layer(hs[-1], temb))
        h = hs[-1]
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)                 # (B, c, r, r) + (B, c_skip, r, r) -> channels add
            h = layer(h, temb)
        return self.out(h)
