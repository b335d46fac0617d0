"""The automodulator networks: a progressively grown encoder and an AdaIN-modulated decoder.

Heljakka, Hou, Kannala, Solin, "Deep Automodulators", NeurIPS 2020 (Sec. 3.1, Fig. 2-3, A.1).
Reference code: github.com/AaltoVision/automodulator (pioneer/model.py); where it differs from the
paper, the paper is the default here and the authors' choice is a ModelConfig switch
(`ModelConfig(**AUTHORS)` gives all the networks' ones; README has the table).

Blocks are indexed by level i = 0, 1, 2, ... at resolution 4 * 2**i in both networks. Every level up
to max_res exists from construction; the current resolution `res` and fade-in `alpha` are inputs.
Latents are (B, nz) on the unit sphere, or (B, n_blocks, nz) to drive each decoder block with its own.
"""
import logging
import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

# Channels per resolution, from the authors' pioneer/model.py (Generator, Discriminator). The encoder uses the
# 'small' table for every data set; the 'large' decoder doubles the widths from 64x64 up.
WIDTHS = {
    'large': {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32},
    'small': {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16},
}
ENCODER_WIDTHS = WIDTHS['small']


@dataclass
class ModelConfig:
    max_res: int = 256          # last resolution, a power of two in 4..1024
    nz: int = 512               # latent size (the paper's 512; tests use less)
    arch: str = 'large'         # decoder widths: 'large' (FFHQ, LSUN) or 'small' (CelebA-HQ)
    width: float = 1.0          # channel multiplier for both networks (CPU-sized models: 1/16)
    residual: bool = True       # paper A.1 "residual blocks"; authors: plain conv stacks
    encoder_blur: bool = True   # paper A.1 binomial filtering in the encoder; authors: none
    block0_convs: int = 2       # paper: two convs per block; authors: one conv at 4x4
    noise: str = 'channel'      # layer noise: 'channel' (authors), 'shared' (StyleGAN) or 'none'
    adain_eps: float = 1e-8     # added to the variance in AdaIN; authors: 0
    adain_unbiased: bool = False  # std with Bessel's correction, as the authors' torch.std
    extra_8x8: bool = False     # Sec. 4.3: a second 8x8 block after the first, for the invariance loss

    def __post_init__(self):
        if self.max_res < 4 or self.max_res > 1024 or self.max_res & (self.max_res - 1):
            raise ValueError(f'max_res must be a power of two in 4..1024, got {self.max_res}')
        if self.arch not in WIDTHS:
            raise ValueError(f"arch must be one of {sorted(WIDTHS)}, got {self.arch!r}")
        if self.noise not in ('channel', 'shared', 'none'):
            raise ValueError(f"noise must be 'channel', 'shared' or 'none', got {self.noise!r}")
        if self.block0_convs not in (1, 2):
            raise ValueError(f'block0_convs must be 1 or 2, got {self.block0_convs}')

    @property
    def n_blocks(self):
        """Resolution levels 4..max_res (the encoder's blocks; the decoder has one more with extra_8x8)."""
        return int(math.log2(self.max_res)) - 1

    @property
    def block_res(self):
        """The decoder's blocks by resolution: 4, 8, [8,] 16, ..."""
        res = [4 * 2 ** i for i in range(self.n_blocks)]
        return res[:2] + [8] + res[2:] if self.extra_8x8 and self.max_res >= 8 else res


# Where the authors' code differs from the paper: ModelConfig(**AUTHORS, ...) rebuilds their nets.
AUTHORS = dict(residual=False, encoder_blur=False, block0_convs=1, adain_eps=0.0, adain_unbiased=True)

# The paper's groups at block granularity (Sec. 4.2): coarse 4-8, intermediate 16-32, fine 64+
# (with extra_8x8 every group from 8x8 on holds one block more: block_range(..., extra_8x8=True)).
GROUPS = {'coarse': (0, 2), 'intermediate': (2, 4), 'fine': (4, None)}

# Sec. 4.3: flip invariance drives pose through the paper's layers #1-2, our blocks [0, INVARIANCE_K)
INVARIANCE_K = 2


def level(res, max_res):
    """Resolution -> block index, with a ValueError for anything that is not a valid phase."""
    if not isinstance(res, int) or res < 4 or res & (res - 1) or res > max_res:
        raise ValueError(f'resolution must be a power of two in 4..{max_res}, got {res!r}')
    return int(math.log2(res)) - 2


def _width(table, res, mult):
    return max(8, round(table[res] * mult))


# ---------------------------------------------------------------------------------------------
# Layers

class EqualConv2d(nn.Module):
    """Conv with equalized learning rate (Karras et al. 2018): N(0,1) weights scaled at run time.
    up=True (3x3 only): the conv of the 2x nearest-upsampled input, computed by conv_up2."""

    def __init__(self, cin, cout, k, padding=0, up=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = math.sqrt(2 / (cin * k * k))
        self.padding = padding
        self.up = up

    def forward(self, x):
        if self.up:
            return conv_up2(x, self.weight * self.scale, self.bias)
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


def conv_up2(x, w, b):
    """F.conv2d(2x nearest upsampling of x, w (3x3), b, padding=1) without making the upsampled map.

    Output pixel (2i + dy, 2j + dx) sees input rows (i - 1, i, i) for dy = 0 and (i, i, i + 1) for
    dy = 1 (columns likewise), so each of the four parities is a 2x2 conv of x with summed taps
    ([w0, w1 + w2] or [w0 + w1, w2] per axis), and the zero padding maps onto x's. One 2x2 conv with
    4x the channels computes all four (16 multiply-adds per pixel and channel pair instead of 36;
    the same function up to float rounding). Its map row r sees input rows r - 1 and r: parity 0
    wants rows 0..H-1 and parity 1 rows 1..H, so with the parities in the order (1, 0) a pixel shuffle
    puts both one pixel off the final place, and a one-pixel crop finishes the job.
    """
    def halves(k, dim):                                # taps for parity 1 and parity 0 along dim
        k0, k1, k2 = k.unbind(dim)
        return torch.stack([k0 + k1, k2], dim), torch.stack([k0, k1 + k2], dim)
    k = torch.stack([torch.stack(halves(ky, 3)) for ky in halves(w, 2)])   # (2, 2, C, Cin, 2, 2)
    k = k.permute(2, 0, 1, 3, 4, 5).flatten(0, 2)                          # channel c * 4 + 2 ey + ex
    y = F.pixel_shuffle(F.conv2d(x, k, b.repeat_interleave(4), padding=1), 2)   # (B, C, 2H + 2, 2W + 2)
    return y[:, :, 1:-1, 1:-1]


class Blur(nn.Module):
    """Binomial [1,2,1] x [1,2,1] / 16 filter, depthwise, size-preserving (StyleGAN's blur2d)."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1., 2., 1.])
        self.register_buffer('kernel', (k[:, None] * k[None, :] / 16)[None, None], persistent=False)

    def forward(self, x):
        c = x.shape[1]
        return F.conv2d(x, self.kernel.expand(c, 1, 3, 3).to(x.dtype), padding=1, groups=c)


class Noise(nn.Module):
    """Gaussian layer noise times a learned per-channel scale that starts at 0."""

    def __init__(self, channels, mode):
        super().__init__()
        self.mode = mode
        self.scale = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        b, c, h, w = x.shape
        # authors: a full B x C x H x W draw; StyleGAN: one map shared by all channels
        shape = (b, c, h, w) if self.mode == 'channel' else (b, 1, h, w)
        # the scale in x's dtype: a float32 scale would promote a bfloat16 map, and all after it, to float32
        return x + self.scale.to(x.dtype)[None, :, None, None] * torch.randn(shape, device=x.device, dtype=x.dtype)


class AdaIN(nn.Module):
    """Eq. 1: xi = sigma_i(z) * (chi - mean(chi)) / std(chi) + mu_i(z), with (sigma_i, mu_i) = g_i(z)."""

    def __init__(self, channels, nz, eps, unbiased):
        super().__init__()
        self.style = nn.Linear(nz, 2 * channels)                 # g_i: z -> (scale, shift)
        nn.init.xavier_normal_(self.style.weight)
        nn.init.ones_(self.style.bias)                           # authors: bias 1 on both halves
        self.eps, self.unbiased = eps, unbiased

    def forward(self, x, z):
        c = x.shape[1]
        s = self.style(z)                                        # (B, 2C)
        # statistics in float32 (in bfloat16 the variance of a flat map can round to 0); _AdaIN keeps
        # x in its own dtype for the backward, not a float32 copy
        sigma, mu = s[:, :c, None, None].float(), s[:, c:, None, None].float()
        return _AdaIN.apply(x, sigma, mu, self.eps, int(self.unbiased)).to(s.dtype)


class _AdaIN(torch.autograd.Function):
    """Eq. 1 with a hand-written backward: autograd's of var_mean and the affine makes about ten
    passes over the map and torch.var_mean is slow on a CPU (4 ms where a sum takes 0.1 ms for a
    32 x 32 x 32 x 32 map); this makes five (six for a bfloat16 x) and computes the same function
    (the test checks it with gradcheck). With d = x - mean, r = 1 / sqrt(var + eps) and
    var = sum(d^2) / (n - correction):
        y = sigma r d + mu,  dmu = sum(g),  dsigma = r sum(g d),
        dx = sigma r (g - sum(g) / n - d r^2 sum(g d) / (n - correction)).
    In float32 whatever x's dtype. For a bfloat16 or float16 x (autocast) the backward keeps x and the
    mean and forms d again, rather than keep a float32 d of twice x's bytes; for a float32 x it keeps
    d (one pass less, the same bytes)."""

    @staticmethod
    def forward(ctx, x, sigma, mu, eps, correction):
        n = x.shape[2] * x.shape[3]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least (gradcheck: float64)
        mean = xf.mean((2, 3), keepdim=True)
        d = xf - mean
        flat = d.flatten(2)
        r = torch.rsqrt(torch.linalg.vecdot(flat, flat)[..., None, None] / (n - correction) + eps)
        ctx.low = xf is not x
        ctx.save_for_backward(x if ctx.low else d, mean if ctx.low else None, r, sigma)
        ctx.n, ctx.correction = n, correction
        return torch.addcmul(mu, d, sigma * r)

    @staticmethod
    def backward(ctx, g):
        saved, mean, r, sigma = ctx.saved_tensors
        d = saved.to(mean.dtype) - mean if ctx.low else saved
        n, k = ctx.n, sigma * r
        g_sum = g.sum((2, 3), keepdim=True)
        gd_sum = torch.linalg.vecdot(g.flatten(2), d.flatten(2))[..., None, None]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(-k * g_sum / n, g, k).addcmul_(d, -k * r * r * gd_sum / (n - ctx.correction))
            dx = dx.to(saved.dtype)
        return dx, r * gd_sum, g_sum, None, None


class ModLayer(nn.Module):
    """One decoder layer #i: conv3x3 -> [blur] -> [noise] -> LeakyReLU(0.2) -> AdaIN(g_i(z))."""

    def __init__(self, cin, cout, cfg, blur, noise, up=False):
        super().__init__()
        self.conv = EqualConv2d(cin, cout, 3, padding=1, up=up)         # up: conv of the 2x upsampled input
        self.blur = Blur() if blur else None
        self.noise = Noise(cout, cfg.noise) if noise and cfg.noise != 'none' else None
        self.adain = AdaIN(cout, cfg.nz, cfg.adain_eps, cfg.adain_unbiased)

    def forward(self, x, z, noise=True):
        x = self.conv(x)
        if self.blur is not None:
            x = self.blur(x)
        if self.noise is not None and noise:
            x = self.noise(x)
        return self.adain(F.leaky_relu(x, 0.2), z)


class DecoderBlock(nn.Module):
    """Level i: [2x nearest upsampling] and two modulated layers, both driven by the same latent."""

    def __init__(self, cin, cout, cfg, first, up=True):
        super().__init__()
        self.up = up and not first                               # False for the extra 8x8 block
        n_convs = cfg.block0_convs if first else 2
        # blur after the first conv of every block but the 4x4 one; no noise at 4x4 (both as the
        # authors, whose extra 8x8 block keeps its blur; paper silent)
        self.layers = nn.ModuleList([ModLayer(cin if k == 0 else cout, cout, cfg, blur=not first and k == 0,
                                              noise=not first, up=self.up and k == 0) for k in range(n_convs)])
        # residual form of StyleGAN2: (main + skip) / sqrt(2), on levels that change resolution
        self.skip = None
        if cfg.residual and self.up:
            self.skip = EqualConv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, z, noise=True):
        h = x                                  # with up, the first conv upsamples (conv_up2)
        for layer in self.layers:
            h = layer(h, z, noise)
        if self.skip is not None:              # a 1x1 conv commutes with nearest upsampling
            h = (h + F.interpolate(self.skip(x), scale_factor=2, mode='nearest')) * (1 / math.sqrt(2))
        return h


class EncoderBlock(nn.Module):
    """Level i > 0: two SN-conv3x3 + LeakyReLU(0.2), [binomial filter], 2x2 average pooling.
    Level 0: SN-conv3x3 + LeakyReLU(0.2), then a 4x4 valid SN-conv to the latent (no activation)."""

    def __init__(self, cin, cout, cfg, last):
        super().__init__()
        self.last = last
        self.conv1 = spectral_norm(nn.Conv2d(cin, cin if last else cout, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(cin, cout, 4) if last else nn.Conv2d(cout, cout, 3, padding=1))
        self.blur = Blur() if cfg.encoder_blur and not last else None
        self.skip = None
        if cfg.residual and not last:
            self.skip = spectral_norm(nn.Conv2d(cin, cout, 1)) if cin != cout else nn.Identity()

    def forward(self, x, rgb=None):
        """x: features, or images when rgb (the level's fromRGB) is given: rgb then folds into conv1."""
        h = F.leaky_relu(self.conv1(x) if rgb is None else self.rgb_conv1(x, rgb), 0.2)
        if self.last:
            return self.conv2(h)                                  # (B, nz, 1, 1)
        h = F.leaky_relu(self.conv2(h), 0.2)
        if self.blur is not None:
            h = self.blur(h)
        h = F.avg_pool2d(h, 2)
        if self.skip is not None:
            pooled = F.avg_pool2d(x, 2)            # fromRGB (1x1) commutes with the pooling
            h = (h + self.skip(pooled if rgb is None else rgb(pooled))) * (1 / math.sqrt(2))
        return h

    def rgb_conv1(self, x, rgb):
        """conv1(rgb(x)) as one 3-channel conv: both are linear, so W1 * (A x + a) = (W1 A) x plus
        W1 * a, where the bias a of fromRGB only reaches the taps inside the image (conv1 pads rgb(x)
        with zeros): per output channel the sum of the taps k = W1 a, but on the border rows and
        columns, which lose one kernel row or column (corners both: one tap comes back). At the input
        level this cuts conv1 from C x C to 3 x C multiply-adds per pixel (exact up to float rounding);
        the border is corrected in place, not by adding a map of the image's size (at 256 px that
        map and its add took 7% of the encoder's time)."""
        w = self.conv1.weight                        # one access: one SN power step in training, as conv1(x)
        a = rgb.weight.flatten(1)                    # (C, 3)
        k = torch.einsum('omyx,m->oyx', w, rgb.bias)  # (C, 3, 3)
        y = F.conv2d(x, torch.einsum('omyx,mc->ocyx', w, a), self.conv1.bias + k.sum((1, 2)), padding=1)
        y[:, :, 0] -= k[:, 0].sum(1)[:, None]
        y[:, :, -1] -= k[:, 2].sum(1)[:, None]
        y[:, :, :, 0] -= k[:, :, 0].sum(1)[:, None]
        y[:, :, :, -1] -= k[:, :, 2].sum(1)[:, None]
        for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            y[:, :, i, j] += k[:, i, j]
        return y


def _init_sn_convs(module):
    # authors: kaiming-normal weights and zero bias under the spectral norm
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and hasattr(m, 'parametrizations'):
            nn.init.kaiming_normal_(m.parametrizations.weight.original)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Networks

class Decoder(nn.Module):
    """theta: a constant 4x4 canvas xi_0, then blocks theta_i(xi_{i-1}, z_i) (Sec. 3.1, Fig. 3b)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.block_res = cfg.block_res
        self.n_blocks = len(self.block_res)
        ch = [_width(WIDTHS[cfg.arch], r, cfg.width) for r in self.block_res]
        # xi_0: a fixed all-ones canvas (paper: "constant input"; authors: ones, not learned)
        self.register_buffer('const', torch.ones(1, ch[0], 4, 4), persistent=False)
        self.blocks = nn.ModuleList([DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg, first=i == 0,
                                                  up=i > 0 and self.block_res[i] > self.block_res[i - 1])
                                     for i in range(self.n_blocks)])
        # one toRGB per resolution, on the last block of that resolution; no output nonlinearity
        self.to_rgb = nn.ModuleList([nn.Conv2d(ch[self.last_block(n)], 3, 1) for n in range(cfg.n_blocks)])

    def last_block(self, n):
        """Index of the last block at resolution level n (4 * 2**n)."""
        return n + (1 if self.cfg.extra_8x8 and n >= 1 else 0)

    def latents(self, z):
        """(B, nz) or (B, n_blocks, nz) -> (B, n_blocks, nz), checking the shape."""
        nz = self.cfg.nz
        if z.dim() == 2 and z.shape[1] == nz:
            return z[:, None].expand(-1, self.n_blocks, -1)
        if z.dim() == 3 and z.shape[1:] == (self.n_blocks, nz):
            return z
        raise ValueError(f'latent must be (B, {nz}) or (B, {self.n_blocks}, {nz}) per block, '
                         f'got {tuple(z.shape)}')

    def canvas(self, z, j, noise=True):
        """xi_j: the output of blocks [0, j) (Eq. 5's theta_{1:j}(xi_0, z)), at block_res[j - 1]."""
        if not 1 <= j <= self.n_blocks:
            raise ValueError(f'canvas index j must be in 1..{self.n_blocks}, got {j}')
        zs = self.latents(z)
        x = self.const         # batch 1: block 0's first conv is the same for every latent
        for i in range(j):
            x = self.blocks[i](x, zs[:, i], noise)
        return x

    def forward(self, z, res, alpha=1.0, noise=True, canvas=None, start=0):
        """Decode to (B, 3, res, res) in about [-1, 1]; continue from `canvas` = xi_start if given.

        While alpha < 1 the new level fades in: (1 - alpha) * up2(toRGB_{n-1}) + alpha * toRGB_n.
        """
        n = level(res, self.cfg.max_res)
        last, last_before = self.last_block(n), self.last_block(n - 1) if n > 0 else -1
        zs = self.latents(z)
        if canvas is None:
            if start != 0:
                raise ValueError(f'start={start} needs the canvas xi_{start}')
            x = self.const         # batch 1: block 0's first conv is the same for every latent
        else:
            if not 1 <= start <= last:
                raise ValueError(f'start must be in 1..{last} at {res}x{res}, got {start}')
            r = self.block_res[start - 1]
            want = (zs.shape[0], self.blocks[start - 1].layers[-1].adain.style.out_features // 2, r, r)
            if tuple(canvas.shape) != want:
                raise ValueError(f'canvas xi_{start} must be {want}, got {tuple(canvas.shape)}')
            if alpha < 1 and start > last_before + 1:
                raise ValueError(f'fading in at {res}x{res} needs the canvas of block {last_before} or earlier')
            x = canvas
        prev = x                                              # the previous resolution's last features
        for i in range(start, last + 1):
            x = self.blocks[i](x, zs[:, i], noise)
            if i == last_before:
                prev = x
        img = self.to_rgb[n](x)
        if alpha < 1 and n > 0:
            old = F.interpolate(self.to_rgb[n - 1](prev), scale_factor=2, mode='nearest')
            img = torch.lerp(old, img, alpha)
        return img

    def blocks_at(self, res):
        """How many blocks a decode at res runs."""
        return self.last_block(level(res, self.cfg.max_res)) + 1

    def used_parameters(self, res):
        """The parameters that a decode at res (alpha = 1) uses: blocks 0..n and toRGB_n."""
        n = level(res, self.cfg.max_res)
        return [p for b in self.blocks[:self.last_block(n) + 1] for p in b.parameters()] + list(self.to_rgb[n].parameters())


class Encoder(nn.Module):
    """phi: fromRGB at the input level, blocks down to 4x4, a 4x4 conv to nz, then L2-normalized."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.n_blocks
        ch = [_width(ENCODER_WIDTHS, 4 * 2 ** i, cfg.width) for i in range(n)]
        self.from_rgb = nn.ModuleList([nn.Conv2d(3, c, 1) for c in ch])  # plain 1x1, as the authors
        self.blocks = nn.ModuleList(
            [EncoderBlock(ch[i], cfg.nz if i == 0 else ch[i - 1], cfg, last=i == 0) for i in range(n)])
        _init_sn_convs(self)

    def forward(self, x, res, alpha=1.0):
        """Images (B, 3, res, res) in [-1, 1] -> latents (B, nz) of unit norm.

        While alpha < 1 the new level fades in after its pooling:
        (1 - alpha) * fromRGB_{n-1}(avgpool(x)) + alpha * block_n(fromRGB_n(x)).
        """
        n = level(res, self.cfg.max_res)
        if x.dim() != 4 or x.shape[1:] != (3, res, res):
            raise ValueError(f'encoder at {res}x{res} takes images (B, 3, {res}, {res}), got {tuple(x.shape)}')
        h = self.blocks[n](x, rgb=self.from_rgb[n])             # = blocks[n](from_rgb[n](x)), cheaper
        if alpha < 1 and n > 0:
            h = torch.lerp(self.from_rgb[n - 1](F.avg_pool2d(x, 2)), h, alpha)
        for i in range(n - 1, -1, -1):
            h = self.blocks[i](h)
        return F.normalize(h.flatten(1).float(), dim=1)        # float32 even under bf16 autocast

    def used_parameters(self, res):
        n = level(res, self.cfg.max_res)
        return list(self.from_rgb[n].parameters()) + [p for b in self.blocks[:n + 1] for p in b.parameters()]


# ---------------------------------------------------------------------------------------------
# Latents: the prior and scale-specific mixing

def sample_prior(n, nz=512, device=None, generator=None):
    """z ~ N(0, I) projected onto the unit sphere, where encodings live (authors' 'sphere' noise)."""
    return F.normalize(torch.randn(n, nz, device=device, generator=generator), dim=1)


def block_range(spec, n_blocks, extra_8x8=False):
    """'coarse' | 'intermediate' | 'fine' | 'a:b' (block indices, b may be empty) -> range of blocks;
    a range past the model's last block keeps the blocks it has, as a group does. extra_8x8: the decoder has a second 8x8 block (index 2), so groups from 8x8 on hold one more."""
    if spec in GROUPS:                  # a group cut short by the model's resolution keeps what exists
        a, b = GROUPS[spec]
        if extra_8x8:
            a, b = a + (a >= 2), None if b is None else b + 1
        b = n_blocks if b is None else min(b, n_blocks)
    else:
        try:
            a, b = (int(t) if t.strip() else None for t in str(spec).split(':'))
        except ValueError:
            a = b = -1
    b = n_blocks if b is None else min(b, n_blocks)     # cut short as a group is: '2:4' = intermediate
    if a is None or not 0 <= a < b <= n_blocks:
        valid = ', '.join(f'{k} ({GROUPS[k][0]}:{GROUPS[k][1] or ""})' for k in GROUPS
                          if GROUPS[k][0] < n_blocks)
        raise ValueError(f'block range {spec!r} is not valid for {n_blocks} blocks (0..{n_blocks - 1}, '
                         f'4x4 to {2 ** (n_blocks + 1)}x{2 ** (n_blocks + 1)}); use {valid} '
                         f'or a:b with 0 <= a < b <= {n_blocks}')
    return range(a, b)


def mix_latents(z_a, z_b, blocks, n_blocks, extra_8x8=False):
    """Per-block latents (B, n_blocks, nz): z_b on `blocks` (a range or a spec), z_a elsewhere."""
    if isinstance(blocks, str):
        blocks = block_range(blocks, n_blocks, extra_8x8)
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f'z_a and z_b must both be (B, nz), got {tuple(z_a.shape)} and {tuple(z_b.shape)}')
    use_b = torch.zeros(n_blocks, dtype=torch.bool, device=z_a.device)
    use_b[list(blocks)] = True
    return torch.where(use_b[None, :, None], z_b[:, None], z_a[:, None])


# ---------------------------------------------------------------------------------------------
# The autoencoder, EMA and checkpoints

class Automodulator(nn.Module):
    """Encoder + decoder at one resolution: what sample.py, metrics.py and forks use."""

    def __init__(self, cfg: ModelConfig, res=None, alpha=1.0):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.res = cfg.max_res if res is None else res
        self.alpha = alpha
        self.input_crop = None      # authors' models: their photo transform's crop size (from_authors)
        self.config, self.kimg, self.path = {}, 0.0, None   # training config, progress, file (load_checkpoint)
        level(self.res, cfg.max_res)

    def _grad(self, grad):
        """Gradients in train mode; in eval mode only when asked (grad=True: e.g. to optimise latents)."""
        return nullcontext() if (self.training if grad is None else grad) else torch.no_grad()

    def encode(self, images, grad=None):
        """(B, 3, res, res) in [-1, 1] -> (B, nz) on the unit sphere."""
        with self._grad(grad):
            return self.encoder(images, self.res, self.alpha)

    def decode(self, z, noise=True, grad=None):
        """(B, nz) or per-block (B, n_blocks, nz) -> (B, 3, res, res) in about [-1, 1]."""
        with self._grad(grad):
            return self.decoder(z, self.res, self.alpha, noise=noise)

    def reconstruct(self, images, noise=True):
        return self.decode(self.encode(images), noise=noise)

    def sample(self, n, generator=None, noise=True):
        z = sample_prior(n, self.cfg.nz, self.const_device(), generator)
        return self.decode(z, noise=noise)

    def mix(self, z_a, z_b, blocks, noise=True):
        """Decode z_a with z_b on `blocks` ('coarse', 'intermediate', 'fine' or 'a:b')."""
        return self.decode(mix_latents(z_a, z_b, blocks, self.decoder.n_blocks, self.cfg.extra_8x8), noise=noise)

    def const_device(self):
        return self.decoder.const.device


def make_ema(decoder):
    """A frozen copy of the decoder for the exponential moving average of its weights."""
    ema = type(decoder)(decoder.cfg).to(decoder.const.device)
    ema.load_state_dict(decoder.state_dict())
    return ema.eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema, decoder, decay=0.999):
    """ema <- decay * ema + (1 - decay) * decoder, over parameters (authors: 0.999 every D step)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in decoder.parameters()], 1 - decay)


# ---------------------------------------------------------------------------------------------
# torch.compile

COMPILE_VARIANTS = 16       # compiled variants allowed per block level (measured: 4-6 in a training step)


def compile_blocks(*nets):
    """torch.compile each block of `nets`, with static shapes. compile_fallbacks() says where the
    compiled code fell back to eager.

    Every block of a class shares one code object, so dynamo keeps one cache, and one recompile
    limit (8), for all of them. A step compiles a few variants per block resolution (grad or
    no_grad, inputs that need a gradient or not, the mixed sub-batches' sizes); past the limit
    dynamo runs the blocks eager from then on and only warns. The limit here covers every level,
    so each variant compiles once, on first use, and stays compiled. Static shapes: with dynamic
    ones the blocks still recompiled at each resolution (specialized on their sizes) and a run over
    three resolutions on the CPU compiled for longer (232 s against 172 s)."""
    import torch._dynamo as dynamo
    levels = max(len(net.blocks) for net in nets)
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, COMPILE_VARIANTS * levels)
    dynamo.config.accumulated_recompile_limit = max(dynamo.config.accumulated_recompile_limit,
                                                    2 * dynamo.config.recompile_limit)
    for net in nets:
        for block in net.blocks:
            block.compile(dynamic=False)
    if _FALLBACKS not in logging.getLogger('torch._dynamo').handlers:
        logging.getLogger('torch._dynamo').addHandler(_FALLBACKS)


def compile_fallbacks():
    """The recompile-limit fallbacks since the last call, one line each, for the run's log."""
    seen, _FALLBACKS.seen = _FALLBACKS.seen, []
    return seen


class _Fallbacks(logging.Handler):
    """Keeps dynamo's 'hit config.<limit>' warnings: the function it names runs eager from then on."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = []

    def emit(self, record):
        if str(record.msg).startswith('torch._dynamo hit config.'):
            limit, where = record.getMessage().splitlines()[:2]
            self.seen.append(f"compile: {limit.removeprefix('torch._dynamo ')} in {where.split(':', 1)[1].strip()}: "
                             'it runs eager from here (raise model.COMPILE_VARIANTS)')


_FALLBACKS = _Fallbacks()


DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def native_bfloat16(device):
    """Whether `device` computes bfloat16 matmuls in hardware: a CUDA GPU of compute capability 8.0 or
    newer, a CPU with AMX or AVX-512 BF16. Elsewhere bfloat16 is emulated, slower than float32."""
    if device.type == 'cuda':
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == 'cpu':
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, 'get_capabilities') else {}
        return bool(caps.get('amx_bf16') or caps.get('avx512_bf16'))
    return False


def resolve_dtype(name, device):
    """'auto' | a DTYPES key -> that key; 'auto' is bfloat16 where `device` has it natively, else float32."""
    if name == 'auto':
        return 'bfloat16' if native_bfloat16(device) else 'float32'
    if name not in DTYPES:
        raise ValueError(f"--dtype={name!r} is not valid; expected auto or one of {', '.join(DTYPES)}")
    return name


def resolve_device(name='auto', local_rank=0):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device; ValueError naming the fix when the
    machine has no such device. 'cuda' means this process's GPU under torchrun (LOCAL_RANK)."""
    given = name
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda':
        name = f'cuda:{local_rank}'
    if not isinstance(name, str) or not re.fullmatch(r'cpu|mps|cuda:\d+', name):
        raise ValueError(f"--device={given!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith('cuda'):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name[5:]) >= count:
            why = ('this torch has no CUDA support' if torch.version.cuda is None else
                   f'torch sees {count} CUDA device{"s" * (count != 1)}')
            raise ValueError(f'--device={given} but {why}; use --device=cpu (or auto)')
    if name == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        raise ValueError('--device=mps but this machine has no MPS device; use --device=cpu (or auto)')
    return torch.device(name)


def save_checkpoint(path, **state):
    """torch.save to path.tmp, then an atomic rename: a crash never leaves a half-written file,
    and a failed write (disk full, Ctrl-C) leaves no .tmp behind."""
    save_file(state, path)


def save_file(obj, path):
    """save_checkpoint for any object (a latents dict, a direction tensor)."""
    tmp = f'{path}.tmp'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, ema=True, device='cpu', live_if_missing=False):
    """Rebuild an Automodulator from a checkpoint, at the resolution and alpha it had reached.

    This repo's files hold `model_config` (a ModelConfig as a dict), `res`, `alpha`, `encoder`,
    `decoder` and (from training) `decoder_ema`, used when ema=True and present; training's numbered
    snapshots hold the EMA decoder alone (live_if_missing=True takes it where ema=False asks for the other). The authors'
    `<samples>_state.pth` files are recognised by their keys and converted (`from_authors`); a
    released model can also be named ('ffhq256', ...: RELEASED). Returns the model in eval mode.
    """
    path = resolve_checkpoint(path)
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:                                       # noqa: BLE001 (truncated, not torch, ...)
        raise ValueError(f'could not read {path} as a torch checkpoint ({type(e).__name__}: '
                         f'{str(e).splitlines()[0][:200]}); is the file complete?') from None
    if isinstance(ck, dict) and 'G_running_state_dict' in ck:
        model = from_authors(ck, ema=ema, name=os.path.basename(path))
        model.kimg = ck.get('iteration', 0) / 1000
        release = [r for r in RELEASED.values() if r[0] == os.path.basename(path)]
        model.config = {'dataset': release[0][4]} if release else {}
    else:
        missing = [k for k in ('model_config', 'res', 'encoder') if not isinstance(ck, dict) or k not in ck]
        missing += [] if isinstance(ck, dict) and ('decoder' in ck or 'decoder_ema' in ck) else ['decoder']
        if missing:
            raise ValueError(f'{path} is not a checkpoint of this repo or of the authors\' code: missing '
                             f'{missing} (it has {sorted(ck)[:8] if isinstance(ck, dict) else type(ck).__name__})')
        names = {f.name for f in fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in ck['model_config'].items() if k in names})
        model = Automodulator(cfg, res=ck['res'], alpha=ck.get('alpha', 1.0))
        model.encoder.load_state_dict(ck['encoder'])
        if not ema and 'decoder' not in ck and not live_if_missing:
            raise ValueError(f'{path} is a snapshot: it holds only the EMA decoder; load it with ema=True')
        model.decoder.load_state_dict(ck['decoder_ema'] if 'decoder_ema' in ck and (ema or 'decoder' not in ck) else ck['decoder'])
        model.kimg, model.config = ck.get('kimg', 0.0), ck.get('config', {})
    model.path = path
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# The authors' released models (Zenodo record 4298894, loaded by their hubconf.py)

ZENODO = 'https://zenodo.org/record/4298894/files/{}?download=1'
# name: (file, resolution, decoder widths, crop of their input transform, our data set name)
RELEASED = {
    'ffhq256': ('34740000_state.pth', 256, 'large', 256, 'ffhq'),
    'ffhq512': ('42420000_state.pth', 512, 'large', 512, 'ffhq'),
    'celebahq256': ('31877148_state.pth', 256, 'small', 256, 'celebahq'),
    'lsuncars256': ('32057140_state.pth', 256, 'large', 256, 'lsun_cars'),
    'lsunbedrooms256': ('27574284_state.pth', 256, 'large', 256, 'lsun_bedroom'),
}


class NotCached(FileNotFoundError):
    """A released file (a model, an attribute direction) that is not in torch.hub's cache and could not
    be downloaded. `advice(how)` says what to do, with `how` the caller's way of passing a file
    ('--ckpt=', "checkpoint='")."""

    def __init__(self, what, url, cached, why):
        self.what, self.url, self.cached, self.why = what, url, cached, why
        super().__init__(self.advice("load_checkpoint('"))

    def advice(self, how):
        file = os.path.basename(self.cached)
        close = "')" if how.endswith("'") else ''
        return (f'{self.what} is not in the cache and could not be downloaded ({self.why}). '
                f'Download {self.url} and put it at {self.cached}, or pass {how}/path/to/{file}{close}')


def fetch_once(what, url, file):
    """The path of `file` in torch.hub's cache, downloaded from `url` the first time; NotCached offline."""
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', file)
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(url, cached, progress=True)
        except Exception as e:                                   # noqa: BLE001 (no network, HTTP error, ...)
            raise NotCached(what, url, cached, f'{type(e).__name__}: {e}') from None
    return cached


def resolve_checkpoint(path):
    """A local file, or a released model by name or file name, fetched once into torch.hub's cache."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return path
    release = {n: r for n, r in RELEASED.items() if path == n or os.path.basename(path) == r[0]}
    if not release:
        where = path if os.path.isabs(path) else f'{path} ({os.path.abspath(path)})'
        raise FileNotFoundError(f'no checkpoint at {where}; train one with `python train.py` (it writes '
                                f'out_dir/ckpt.pt), pass the path of another, or name a released model: '
                                f'{", ".join(RELEASED)}')
    name, (file, *_rest) = release.popitem()
    return fetch_once(f'the released model {name!r}', ZENODO.format(file), file)


def _authors_decoder(sd, n, arch):
    """Their Generator's state dict (levels 0..n) -> ours, and the keys it consumed."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    def conv(src, dst):                  # equalized-lr conv: fold the (gradient-free) gain into the weight
        out[f'{dst}.weight'] = take(f'{src}.weight_orig') * take(f'{src}.weight_gain')
        out[f'{dst}.bias'] = take(f'{src}.bias')

    def style(src, dst, k):              # AdaIN map; adanorm_blocks.k holds the same module a second time
        for p in ('weight', 'bias'):
            out[f'{dst}.style.{p}'] = take(f'{src}.mod.{p}')
            if not torch.equal(take(f'adanorm_blocks.{k}.mod.{p}'), out[f'{dst}.style.{p}']):
                raise ValueError(f'adanorm_blocks.{k}.mod.{p} differs from {src}.mod.{p}: their code '
                                 f'registers one module under both names, so the file is inconsistent')

    conv('progression.0.conv.1.conv', 'blocks.0.layers.0.conv')
    style('progression.0.conv.3', 'blocks.0.layers.0.adain', 0)
    for i in range(1, n + 1):
        conv(f'progression.{i}.conv.0.0.conv', f'blocks.{i}.layers.0.conv')
        style(f'progression.{i}.conv.0.3', f'blocks.{i}.layers.0.adain', 2 * i - 1)
        conv(f'progression.{i}.conv.1.conv', f'blocks.{i}.layers.1.conv')
        style(f'progression.{i}.conv.3', f'blocks.{i}.layers.1.adain', 2 * i)
        for k in range(2):
            out[f'blocks.{i}.layers.{k}.noise.scale'] = take(f'noise.{i}.{k}.noise_scale')
    for i in range(n + 1):
        for p in ('weight', 'bias'):
            out[f'to_rgb.{i}.{p}'] = take(f'to_rgb.{i}.{p}')
    return out, used


def _authors_encoder(sd, snu, n):
    """Their Discriminator (level i stored at index 8 - i) and SN u vectors -> ours, and keys used."""
    out, used = {}, set()
    for i in range(n + 1):
        j = 8 - i
        for c, (src, dst) in enumerate(((f'progression.{j}.conv.0.conv', f'blocks.{i}.conv1'),
                                        (f'progression.{j}.conv.2.conv', f'blocks.{i}.conv2'))):
            w = sd[f'{src}.weight_orig']
            u = snu[2 * j + c].reshape(-1).to(w.dtype)
            # their eval-mode spectral norm: one power step from the stored (frozen) u per forward,
            # sigma = u'^T W v; torch's parametrization in eval computes u^T W v from its _u, _v
            w_mat = w.flatten(1)
            v = F.normalize(w_mat.t() @ u, dim=0, eps=0)
            u = F.normalize(w_mat @ v, dim=0, eps=0)
            out.update({f'{dst}.parametrizations.weight.original': w, f'{dst}.bias': sd[f'{src}.bias'],
                        f'{dst}.parametrizations.weight.0._u': u, f'{dst}.parametrizations.weight.0._v': v})
            used |= {f'{src}.weight_orig', f'{src}.bias'}
        for p in ('weight', 'bias'):
            out[f'from_rgb.{i}.{p}'] = sd[f'from_rgb.{j}.{p}']
            used.add(f'from_rgb.{j}.{p}')
    return out, used


def _authors_unused(key, n, part):
    """Keys their files hold that a model at level n does not use, by design: levels above n (the
    encoder stores level i at index 8 - i), the 4x4 block's idle noise, the 17 AdaIN maps' second
    names beyond level n, the mapping network (off: --stylefc 0) and the unused label embedding."""
    m = re.match(r'(\w+)\.(\d+)\.', key)
    if part == 'D':
        return bool(m) and m.group(1) in ('progression', 'from_rgb') and 8 - int(m.group(2)) > n
    if m and m.group(1) in ('progression', 'to_rgb', 'noise'):
        return int(m.group(2)) > n or m.group(1) == 'noise' and m.group(2) == '0'
    if m and m.group(1) == 'adanorm_blocks':
        return int(m.group(2)) > 2 * n
    return key.startswith(('z_preprocess.', 'label_embed.'))


def from_authors(ck, ema=True, name='checkpoint'):
    """An Automodulator that computes what the authors' code computes in eval mode for a
    `<samples>_state.pth` of theirs: architecture and resolution from the tensors and the stored
    phase, their running-average decoder (G_running_state_dict) when ema=True. Every tensor is
    either converted or one of the documented unused ones; anything else is an error."""
    need = ['G_state_dict', 'G_running_state_dict', 'D_state_dict', 'SNU', 'phase', 'alpha']
    missing = [k for k in need if k not in ck]
    if missing:
        raise ValueError(f'{name}: an authors\' checkpoint needs {need}; missing {missing}')
    strip = lambda sd: {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    g = strip(ck['G_running_state_dict'] if ema else ck['G_state_dict'])
    d = strip(ck['D_state_dict'])
    if any(k.startswith('supportProgression') for k in g):
        raise ValueError(f'{name} was trained with --flip_invariance_layer (an extra support block); '
                         f'converting those is not supported')
    n = int(ck['phase'])
    if not 0 <= n <= 8:
        raise ValueError(f'{name}: phase {n} is outside 0..8')
    res = 4 * 2 ** n
    arch = 'large' if g.get('to_rgb.4.weight', torch.empty(3, 512)).shape[1] == 512 else 'small'
    nz = g['to_rgb.0.weight'].shape[1] if 'to_rgb.0.weight' in g else 512
    alpha = float(ck['alpha'])
    alpha = alpha if 0 <= alpha < 1 else 1.0                    # theirs: -1 (or >= 1) means no fade
    cfg = ModelConfig(max_res=res, nz=nz, arch=arch, **AUTHORS)
    net = Automodulator(cfg, res=res, alpha=alpha)
    snu = list(ck['SNU'])
    if len(snu) != 18:
        raise ValueError(f'{name}: SNU holds {len(snu)} u vectors, their encoder has 18 SN convs')
    try:
        dec, dec_used = _authors_decoder(g, n, arch)
        enc, enc_used = _authors_encoder(d, snu, n)
    except KeyError as e:
        raise ValueError(f'{name}: key {e.args[0]!r} is missing for a {res}x{res} {arch} model '
                         f'(truncated file, or not the authors\' layout)') from None
    for what, sd, used, part in (('G_running_state_dict' if ema else 'G_state_dict', g, dec_used, 'G'),
                                 ('D_state_dict', d, enc_used, 'D')):
        unexpected = sorted(k for k in sd if k not in used and not _authors_unused(k, n, part))
        if unexpected:
            raise ValueError(f'{name}: unexpected keys in {what}: {unexpected[:6]}'
                             f'{" ..." if len(unexpected) > 6 else ""}')
    for net_part, sd in ((net.decoder, dec), (net.encoder, enc)):
        own = net_part.state_dict()
        bad = [f'{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}' for k, v in sd.items()
               if k in own and own[k].shape != v.shape]
        if bad:
            raise ValueError(f'{name}: shapes do not match a {res}x{res} {arch} model: {bad[:4]}')
        net_part.load_state_dict(sd, strict=True)
    net.input_crop = 512 if res >= 512 else 256                 # the authors' hub model's `.tf`: 256, or 512 for ffhq512
    return net


def count(params):
    return sum(p.numel() for p in params)


if __name__ == '__main__':
    # Parameter counts at 256x256 against those of the authors' models, instantiated from pioneer/model.py
    authors = {'large': (28_971_907, 25_360_384), 'small': (23_442_627, 25_360_384)}
    for arch in ('large', 'small'):
        for name, extra in (('paper', {}), ('authors', AUTHORS)):
            m = Automodulator(ModelConfig(arch=arch, **extra))
            d, e = count(m.decoder.used_parameters(256)), count(m.encoder.used_parameters(256))
            print(f'{arch:5s} {name:7s} decoder {d:>11,} ({d / authors[arch][0] - 1:+.1%} vs authors) '
                  f'encoder {e:>11,} ({e / authors[arch][1] - 1:+.1%})')
