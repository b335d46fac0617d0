"""Barron's adaptive robust loss, written from the paper, and every loss term of the automodulator.

Barron, "A General and Adaptive Robust Loss Function", CVPR 2019 (Eq. 1-3, 16-17 and the appendix on
the partition function). Heljakka et al., "Deep Automodulators", NeurIPS 2020, Sec. 3.2-3.3, Eq. 2-11.
The authors' code (pioneer/train.py) differs from Eq. 6 in places; each such choice is a keyword
switch here, off by default (README lists them).

Weights are in the paper's units (KL weight 1); the authors' code uses one tenth of every weight.
Their values are train.py's settings (paper A.1), passed in by the caller.

LPIPS v0.1 (Zhang et al. 2018) is here too: a perceptual loss that projection optimises
(sample.py) and that metrics.py reports.
"""
import functools
import math
import os
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import sample_prior, level


# ---------------------------------------------------------------------------------------------
# Barron's general loss rho(x, alpha, c) and its distribution


def _exprel(t):
    """expm1(t) / t with the value 1 at t = 0, smooth (series near 0, so gradients stay exact)."""
    small = t.abs() < 1e-4
    t_safe = torch.where(small, torch.ones_like(t), t)
    return torch.where(small, 1 + t / 2 + t * t / 6, torch.expm1(t_safe) / t_safe)


def _rho(x, alpha, scale):
    y = (x / scale) ** 2
    two = alpha == 2
    # double-where: at alpha = 2 the general branch would divide by |alpha - 2| = 0, so give it a
    # harmless stand-in and let the exact L2 branch win (its gradient wrt alpha is then 0, finite)
    a = torch.where(two, torch.ones_like(alpha), alpha)
    b = (a - 2).abs()
    log_term = torch.log1p(y / b)
    # |a-2|/a * ((y/|a-2| + 1)^(a/2) - 1) written as b*L/2 * expm1(aL/2)/(aL/2): exact and smooth
    # through a = 0, where it is log(y/2 + 1) (Barron Eq. 4), and accurate near it (no 0/0)
    general = b * log_term / 2 * _exprel(a * log_term / 2)
    return torch.where(two, y / 2, general)


def _as_tensors(x, alpha, scale):
    x = torch.as_tensor(x)
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return (x.to(dtype), torch.as_tensor(alpha, dtype=dtype, device=x.device),
            torch.as_tensor(scale, dtype=dtype, device=x.device))


def rho(x, alpha, scale):
    """Barron's general loss rho(x, alpha, c), elementwise with broadcasting (Barron Eq. 1).

    alpha = 2: 0.5 (x/c)^2;  alpha = 0: log(0.5 (x/c)^2 + 1);  alpha = 1: sqrt((x/c)^2 + 1) - 1;
    alpha -> -inf: 1 - exp(-0.5 (x/c)^2). Finite gradients in x, alpha and c everywhere.
    """
    x, alpha, scale = _as_tensors(x, alpha, scale)
    if (scale <= 0).any():
        raise ValueError(f'scale c must be positive, got min {scale.min().item():g}')
    return _rho(x, alpha, scale)


ALPHA_RANGE = (0.0, 3.0)    # where log Z(alpha) is tabulated; Z diverges for alpha < 0


def _rho_np(x, a):
    """rho(x, a, 1) in numpy for the quadrature; complex a gives d rho / d a by the complex step."""
    y = x * x
    b = (2 - a) if np.real(a) < 2 else (a - 2)     # |a - 2|, analytic on each side of 2
    log_term = np.log1p(y / b)
    t = a * log_term / 2
    return b * log_term / 2 * (np.expm1(t) / t if abs(t) > 1e-8 else 1 + t / 2)


@functools.lru_cache(maxsize=None)
def _log_partition_table():
    """Knots, values and a cubic Hermite spline of log Z(alpha) on [0, 3], built once (~1 s).

    Z(alpha) = int exp(-rho(x, alpha, 1)) dx by scipy's quad; d log Z / d alpha = -E[d rho / d alpha]
    by the same quadrature with the complex-step derivative of rho. log Z has a logarithmic
    singularity in its derivative at alpha = 2 (d/d alpha ~ log|alpha - 2|), and alpha = 0 borders
    the divergent alpha < 0, so knots are geometric towards both; in between every 0.05.
    Measured against direct quadrature: values to 3e-8, derivatives to 3e-6 for |alpha - 2| >= 1e-3.
    """
    from scipy.integrate import quad
    from scipy.interpolate import CubicHermiteSpline

    geo = 10 ** np.linspace(-6, 0, 161)
    knots = np.unique(np.round(np.concatenate([np.linspace(0, 3, 61), geo, 2 - geo, 2 + geo]), 12))
    values, slopes = [], []
    for a in knots:
        if a == 2:                                  # the Gaussian: Z = sqrt(2 pi), slope -inf
            values.append(0.5 * math.log(2 * math.pi))
            slopes.append(np.nan)
            continue
        opts = dict(epsabs=1e-13, epsrel=1e-11, limit=1000)
        z = 2 * quad(lambda x: np.exp(-_rho_np(x, a)), 0, np.inf, **opts)[0]
        h = 1e-20
        dz = 2 * quad(lambda x: -np.imag(_rho_np(x, a + 1j * h)) / h * np.exp(-_rho_np(x, a)),
                      0, np.inf, **opts)[0]
        values.append(math.log(z))
        slopes.append(dz / z)
    values, slopes = np.array(values), np.array(slopes)
    i = int(np.where(knots == 2)[0][0])
    slopes[i] = (values[i + 1] - values[i - 1]) / (knots[i + 1] - knots[i - 1])
    coef = CubicHermiteSpline(knots, values, slopes).c           # (4, n_knots - 1), highest power first
    return torch.from_numpy(knots), torch.from_numpy(np.ascontiguousarray(coef.T))


@functools.lru_cache(maxsize=None)
def _log_partition_table_on(device):
    """The table, copied once to each device that asks (not on every call)."""
    return tuple(t.to(device) for t in _log_partition_table())


def _log_partition(alpha):
    knots, coef = _log_partition_table_on(alpha.device)
    a = alpha.double()
    i = (torch.searchsorted(knots, a.detach(), right=True) - 1).clamp(0, knots.numel() - 2)
    t = a - knots[i]
    c = coef[i]                                                  # (..., 4)
    out = ((c[..., 0] * t + c[..., 1]) * t + c[..., 2]) * t + c[..., 3]
    return out.to(alpha.dtype)


def log_partition(alpha):
    """log Z(alpha) for p(x | alpha, c) = exp(-rho(x, alpha, c)) / (c Z(alpha)), alpha in [0, 3].

    A cubic Hermite spline through quadrature values, so d log Z / d alpha (through autograd) is
    the exact derivative of a smooth interpolant. log Z(0) = log(pi sqrt 2), log Z(2) = log sqrt(2 pi).
    """
    alpha = torch.as_tensor(alpha, dtype=torch.get_default_dtype()) if not torch.is_tensor(alpha) else alpha
    lo, hi = ALPHA_RANGE
    if alpha.numel() and (alpha.min() < lo or alpha.max() > hi):
        raise ValueError(f'log_partition is defined for alpha in [{lo}, {hi}] (Z diverges below 0), '
                         f'got values in [{alpha.min().item():g}, {alpha.max().item():g}]')
    return _log_partition(alpha)


def nll(x, alpha, scale):
    """Negative log-likelihood of Barron's distribution: rho(x, alpha, c) + log c + log Z(alpha)."""
    x, alpha, scale = _as_tensors(x, alpha, scale)
    return rho(x, alpha, scale) + torch.log(scale) + log_partition(alpha)


class AdaptiveRobustLoss(nn.Module):
    """d_rho of Eq. 6: Barron's NLL with one learned alpha and scale per (channel, pixel).

    alpha = 0.001 + 1.998 * sigmoid(latent) in (0.001, 1.999), scale = softplus(latent) + 1e-5, both 1
    at the start (authors' settings, from robust_loss_pytorch's defaults). Parameters for every
    resolution up to max_res exist from construction, so an optimizer built once holds them all;
    grow() moves to the next resolution and initializes each (c, 2y+dy, 2x+dx) from its parent
    (c, y, x), as the paper says in Sec. 3.2 (the authors' code scrambles this mapping).
    """

    def __init__(self, max_res, channels=3, res=4, alpha_lo=0.001, alpha_hi=1.999, scale_lo=1e-5):
        super().__init__()
        level(max_res, max_res)
        self.max_res, self.channels, self.res = max_res, channels, res
        self.alpha_lo, self.alpha_hi, self.scale_lo = alpha_lo, alpha_hi, scale_lo
        sizes = [4 * 2 ** i for i in range(level(max_res, max_res) + 1)]
        scale0 = math.log(math.expm1(1 - scale_lo))               # softplus^-1(1 - scale_lo)
        self.alpha_latent = nn.ParameterList([nn.Parameter(torch.zeros(channels, s, s)) for s in sizes])
        self.scale_latent = nn.ParameterList([nn.Parameter(torch.full((channels, s, s), scale0)) for s in sizes])
        level(res, max_res)

    def alpha(self):
        i = level(self.res, self.max_res)
        return self.alpha_lo + (self.alpha_hi - self.alpha_lo) * torch.sigmoid(self.alpha_latent[i])

    def scale(self):
        return F.softplus(self.scale_latent[level(self.res, self.max_res)]) + self.scale_lo

    def forward(self, residual):
        """Mean NLL over batch and elements of a residual (B, C, res, res), e.g. decoded - real."""
        want = (self.channels, self.res, self.res)
        if residual.dim() != 4 or tuple(residual.shape[1:]) != want:
            raise ValueError(f'robust loss at {self.res}x{self.res} takes residuals (B, {want[0]}, {want[1]}, '
                             f'{want[2]}), got {tuple(residual.shape)}; call grow() when the phase changes')
        alpha, scale = self.alpha(), self.scale()
        return (_rho(residual, alpha, scale) + torch.log(scale) + _log_partition(alpha)).mean()

    @torch.no_grad()
    def grow(self):
        """Double the resolution; each parameter at (c, y, x) initializes its four children."""
        i = level(self.res, self.max_res)
        if self.res >= self.max_res:
            raise ValueError(f'robust loss is already at max_res {self.max_res}')
        for params in (self.alpha_latent, self.scale_latent):
            params[i + 1].copy_(params[i].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2))
        self.res *= 2

    def get_extra_state(self):                                  # the resolution travels in state_dict
        return {'res': self.res}

    def set_extra_state(self, state):
        self.res = int(state['res'])


# ---------------------------------------------------------------------------------------------
# The automodulator's terms

def pixel_distance(kind, robust, fit_robust=False):
    """d of Eq. 6 as a function of the residual: Barron's adaptive loss `robust` (the paper), or the
    plain mean absolute ('l1') or squared ('l2') error, the ablation of d_rho in the paper's Table 1.

    fit_robust: with l1 or l2, `robust`'s alpha and scale still fit the same residuals (detached: a
    term of value 0 whose gradient reaches alpha and scale alone), as they do under d_rho; for a
    run whose other pixel term (the decoder's lambda_x_dec) keeps d_rho while L_phi takes l1 or l2.
    """
    if kind == 'robust':
        return robust
    plain = {'l1': lambda r: r.abs().mean(), 'l2': lambda r: r.pow(2).mean()}.get(kind)
    if plain is None:
        raise ValueError(f"the pixel distance must be 'robust', 'l1' or 'l2', got {kind!r}")
    if not fit_robust:
        return plain

    def fitted(r):
        fit = robust(r.detach())
        return plain(r) + (fit - fit.detach())
    return fitted


def kl_prior(z):
    """AGE/PIONEER's empirical KL: fit N(m, v) per dimension to the batch (biased v) and return
    KL(N(m, v) || N(0, 1)) = (v + m^2 - log v - 1) / 2, averaged over dimensions."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f'kl_prior needs a batch of latents (B >= 2, nz), got {tuple(z.shape)}')
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    var, mean = torch.var_mean(z, dim=0, correction=0)
    # a floor under the variance keeps a batch that collapsed in some dimension finite (it happens
    # at initialization in bfloat16); at 1e-12 it changes no value in the normal range
    return 0.5 * (var + mean ** 2 - torch.log(var.clamp_min(1e-12)) - 1).mean()


def kl_latent(z):
    """The KL that Eq. 2 and 6 apply to encodings, which are unit vectors.

    A unit vector's coordinates have variance ~1/nz, so we compare sqrt(nz) * z with N(0, I): a
    batch spread uniformly on the sphere then reads ~0 instead of the ~2.6 of the authors'
    KL(z || N(0, I)). On the sphere sum_d (v_d + m_d^2) = mean |z|^2 = 1 exactly, so the two differ by
    a constant: gradients, and the real-minus-fake difference that the margin clamps, are identical.
    """
    return kl_prior(z * math.sqrt(z.shape[1]))


def margin_kl(kl_real, kl_fake, margin, upper_clamp=False):
    """Eq. 6's adversarial term max(-M_gap, KL_real - KL_fake); margin=None means no clamp at all.

    upper_clamp: the authors' code also clamps from above at M_gap / 2 (pioneer/train.py, `encoder_train`).
    """
    diff = kl_real - kl_fake
    if margin is None:
        return diff
    return diff.clamp(min=-margin, max=margin / 2 if upper_clamp else None)


def d_cos(z, z_rec):
    """Cosine distance 1 - cos(z, z'), averaged over the batch (Eq. 2, 6)."""
    return (1 - F.cosine_similarity(z, z_rec, dim=1)).mean()


class Fakes(NamedTuple):
    images: torch.Tensor            # (B, 3, res, res): regular samples first, then mixed ones
    z: torch.Tensor                 # (B_reg, nz) codes of the regular samples
    z_a: torch.Tensor               # (B_mix, nz) codes that drove blocks [0, j) of the mixed samples
    canvas: Optional[torch.Tensor]  # xi_j of the mixed samples from z_a (first pass, Fig. 3b)
    j: int                          # split: z_a on blocks [0, j), z_b on [j, ...); 0 = no mixing


def mix_splits(decoder, res, alpha):
    """The largest split j that a mixed sample can take here (0: a single block, nothing to mix)."""
    lvl = level(res, decoder.cfg.max_res)
    top = decoder.last_block(lvl)
    if alpha < 1 and lvl > 0:           # the fade-in needs the previous resolution's features: with
        top = min(top, decoder.last_block(lvl - 1) + 1)  # an extra 8x8 block, no split after it at 8x8 yet
    return top


def fake_batch(decoder, n, res, alpha, mix_ratio, generator=None, noise=True, rank=0, world=1, z_generator=None,
               j=None):
    """x_hat of Eq. 6: (1 - mix_ratio) of the batch decoded from z ~ prior, the rest mixed with
    z_A, z_B ~ prior and j ~ U{1, ..., n_current - 1} drawn once per batch (canvases differ in size
    per j). At 4x4 there is a single block and nothing to mix.

    With world > 1 every rank draws the codes of the whole global batch from the same `generator`
    and keeps its own slice, so N processes see exactly the samples of one process with N times n.
    z_generator: a generator on the decoder's device that draws the codes there (no copy from the
    host; train.py's); j: the split, drawn by the caller (train.py draws both steps' at once).
    """
    device = decoder.const.device
    nz = decoder.cfg.nz
    top = mix_splits(decoder, res, alpha)                            # splits j in 1..top
    n_mix = int(round(n * mix_ratio)) if top > 0 else 0
    n_reg = n - n_mix

    def prior(k):
        if z_generator is not None:
            return sample_prior(k * world, nz, device, z_generator)[rank * k:(rank + 1) * k]
        return sample_prior(k * world, nz, generator=generator)[rank * k:(rank + 1) * k].to(device)

    z = prior(n_reg)
    if n_mix == 0:
        return Fakes(decoder(z, res, alpha, noise=noise), z, z[:0], None, 0)
    if j is None:
        j = int(torch.randint(1, top + 1, (), generator=generator))
    z_a, z_b = prior(n_mix), prior(n_mix)
    xi = decoder.canvas(z_a, j, noise=noise)
    mixed = decoder(z_b, res, alpha, noise=noise, canvas=xi, start=j)
    return Fakes(torch.cat([decoder(z, res, alpha, noise=noise), mixed]), z, z_a, xi, j)


def layer_loss(decoder, z_ab, canvas, j, noise=True):
    """L_j of Eq. 5: mean squared difference between xi_j decoded from the re-encoded mixed image
    z_AB and xi_j of the first pass from z_A. Neither side is detached (as the authors)."""
    return F.mse_loss(decoder.canvas(z_ab, j, noise=noise), canvas)


def _same(z):
    return z


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `factor` on the way back."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def encoder_loss(encoder, decoder, distance, x, fakes, res, alpha, margin, weights,
                 extra_kl=False, upper_clamp=False, gather=_same, invariance_k=0, lambda_x_dec=0.0):
    """L_phi of Eq. 6: max(-M_gap, KL(phi(x)) - KL(phi(x_hat))) + lambda_X d(x, theta(phi(x))).

    distance: d of Eq. 6 (d_rho, the robust loss, or pixel_distance's l1 / l2); weights: the loss
    weights by their names in train.py, with 'lambda_x' this step's lambda_X (train.py takes
    lambda_x_fade or lambda_x_stable). fakes: images x_hat (made under no_grad). The decoder's
    parameters are the caller's to leave out of the backward (train.py names the ones it trains); the
    reconstruction gradient flows through it into the encoder and the robust loss.
    extra_kl: the authors' code adds KL(phi(x)) once more, outside the clamp (pioneer/train.py, `encoder_train`).
    invariance_k: x is (x1, flip(x1)) pairs, first half and second half; add L_inv + L'_inv of
    Eq. 10-11 with the split after block k (Sec. 3.3: added to L_phi). Their weight is lambda_X:
    with z1 = z2 they reduce to the reconstruction term, which they generalize (paper silent).
    gather: concatenates the latents of all processes (with gradient), so that the KL, a batch
    statistic, sees the global batch. Returns the loss, a dict of detached parts for logging, and
    phi(x) detached (the decoder step's lambda_x_dec term takes it).
    lambda_x_dec > 0: the decoder step's lambda_x_dec term (decoder_loss) comes from this pass too. Its
    decoder weights are the ones the decoder step will see, so theta(phi(x)) is decoded once: the
    loss's value is L_phi's, and its gradient also gives the decoder's parameters lambda_x_dec
    d(x, theta(phi(x))) with phi(x) fixed, to be summed into the decoder step's (train.py). The
    caller backpropagates into the encoder, d_rho and the decoder together; parts gains 'rec_dec'.
    """
    lambda_x = weights['lambda_x']
    z = encoder(x, res, alpha)
    kl_real = kl_latent(gather(z))
    kl_fake = kl_latent(gather(encoder(fakes, res, alpha)))
    adversarial = margin_kl(kl_real, kl_fake, margin, upper_clamp)
    if lambda_x_dec > 0:
        # theta sees lambda_x_dec d; phi(x), scaled on the way back, lambda_x d; d_rho's alpha and
        # scale lambda_x d in all (the detached copy adds the difference, and keeps the value L_phi's)
        rec = decoder(_ScaleGrad.apply(z, lambda_x / lambda_x_dec), res, alpha)
        shared = distance(rec - x)
        recon = shared.detach()
        loss = adversarial + lambda_x_dec * shared + (lambda_x - lambda_x_dec) * distance(rec.detach() - x)
    else:
        recon = distance(decoder(z, res, alpha) - x)
        loss = adversarial + lambda_x * recon
    loss = loss + (kl_real if extra_kl else 0)
    parts = dict(kl_real=kl_real, kl_fake=kl_fake, recon=recon)
    if invariance_k:
        h = x.shape[0] // 2
        parts['inv'] = invariance_loss(decoder, distance, x[:h], x[h:], z[:h], z[h:], invariance_k, res, alpha)
        loss = loss + lambda_x * parts['inv']
    if lambda_x_dec > 0:
        parts['rec_dec'] = recon
    return loss, {k: v.detach() for k, v in parts.items()}, z.detach()


def decoder_loss(encoder, decoder, n, res, alpha, weights, mix_ratio, generator=None, noise=True,
                 rank=0, world=1, gather=_same, x=None, distance=None, z_real=None, z_generator=None, j=None):
    """L_theta of Eq. 6: KL(phi(x_hat)) + lambda_Z d_cos(z, phi(theta(z))) + lambda_j L_j.

    weights: the loss weights by their names in train.py (lambda_z, lambda_j, lambda_x_dec). The KL
    covers the whole batch; d_cos the regular samples; L_j the mixed ones (second pass, Fig. 3c). The
    caller backpropagates into the decoder alone (train.py names its parameters); gradients flow
    through the encoder.
    lambda_x_dec > 0 (not in the paper nor the authors' code): the decoder also learns to reconstruct
    the real batch x, lambda_x_dec distance(x, theta(phi(x))) with phi(x) held fixed. In Eq. 6 only the
    encoder sees real images; the decoder learns them through the latent cycle alone, which takes
    millions of images. The CPU preset turns this on to get pictures within minutes. z_real: phi(x)
    as the encoder step computed it, before its update, which saves an encoder pass (5% of a step
    at 32x32); without it, phi(x) is encoded here. Returns the loss and its detached parts, named as
    train.py logs them.
    """
    lambda_j, lambda_x = weights['lambda_j'], weights.get('lambda_x_dec', 0.0)
    fakes = fake_batch(decoder, n, res, alpha, mix_ratio, generator, noise, rank, world, z_generator, j)
    z_hat = encoder(fakes.images, res, alpha)
    n_reg = fakes.z.shape[0]
    kl_fake = kl_latent(gather(z_hat))
    cos = d_cos(fakes.z, z_hat[:n_reg]) if n_reg else z_hat.new_zeros(())
    with torch.set_grad_enabled(torch.is_grad_enabled() and lambda_j > 0):   # at weight 0, logged only
        lj = layer_loss(decoder, z_hat[n_reg:], fakes.canvas, fakes.j, noise) if fakes.j else z_hat.new_zeros(())
    loss = kl_fake + weights['lambda_z'] * cos + lambda_j * lj
    parts = dict(kl_dec=kl_fake.detach(), dcos=cos.detach(), layer=lj.detach())
    if lambda_x > 0:
        if z_real is None:
            with torch.no_grad():
                z_real = encoder(x, res, alpha)
        recon = distance(decoder(z_real, res, alpha, noise=noise) - x)
        loss = loss + lambda_x * recon
        parts['rec_dec'] = recon.detach()
    return loss, parts


def invariance_loss(decoder, distance, x1, x2, z1, z2, k, res, alpha, noise=True):
    """L_inv + L'_inv of Eq. 10-11 for invariant pairs (x1, x2) encoded as (z1, z2).

    L_inv = d(x2, theta(z2 on blocks [0, k), z1 after)): the first k blocks alone must carry what
    differs within a pair (pose, for flip pairs; the paper's layers #1-2 are k = 2). L'_inv swaps the
    roles. d is the distance of the reconstructions (d_rho). Added to L_phi (Sec. 3.3).
    """
    x2_hat = decoder(z1, res, alpha, noise=noise, canvas=decoder.canvas(z2, k, noise=noise), start=k)
    x1_hat = decoder(z2, res, alpha, noise=noise, canvas=decoder.canvas(z1, k, noise=noise), start=k)
    return distance(x2_hat - x2) + distance(x1_hat - x1)


# ---------------------------------------------------------------------------------------------
# Weights from a local file or an official URL (LPIPS here, Inception in metrics.py)

LPIPS_URLS = {'vgg': 'https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth',
              'alex': 'https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth'}
BACKBONE_URLS = {'vgg': 'https://download.pytorch.org/models/vgg16-397923af.pth',
                 'alex': 'https://download.pytorch.org/models/alexnet-owt-7be5be79.pth'}


class MissingWeights(RuntimeError):
    pass


def load_weights(path, url, option):
    """A state dict from `path` if given, else from `url` through torch.hub's download cache; when
    neither gives one, MissingWeights in one line naming the file, the URL and --option."""
    if path:
        if not os.path.isfile(path):
            raise MissingWeights(f'--{option}={path} does not exist; download {url} to it')
        try:
            sd = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:                                    # noqa: BLE001 (not a torch file, truncated)
            raise MissingWeights(f'--{option}={path} is not a torch weights file ({type(e).__name__}); '
                                 f'download {url} to it') from None
        if not isinstance(sd, dict):
            raise MissingWeights(f'--{option}={path} holds a {type(sd).__name__}, not a state dict; download {url}')
        return sd
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))
    try:
        return torch.hub.load_state_dict_from_url(url, map_location='cpu', progress=True)
    except Exception as e:                                        # noqa: BLE001 (no network, 404, ...)
        raise MissingWeights(f'cannot get the weights {url} ({type(e).__name__}: {e}). Download the file by '
                             f'hand and put it at {cached}, or pass its path with --{option}=PATH') from None


def load_each(*wanted):
    """[load_weights(path, url, option) for each]; one MissingWeights that names every file that failed."""
    found, failed = [], []
    for spec in wanted:
        try:
            found.append(spec if isinstance(spec, dict) else load_weights(*spec))
        except MissingWeights as e:
            failed.append(str(e))
    if failed:
        raise MissingWeights(failed[0] if len(failed) == 1 else f'{len(failed)} weight files are missing: '
                             + ' | '.join(f'({i + 1}) {f}' for i, f in enumerate(failed)))
    return found


def load_into(module, state, option, path, url):
    """module.load_state_dict(state), a file of other weights reported as MissingWeights in one line."""
    try:
        result = module.load_state_dict(state, strict=False)
        wrong = (f'{len(result.missing_keys)} tensors missing, {len(result.unexpected_keys)} not of this network'
                 if result.missing_keys or result.unexpected_keys else '')
    except RuntimeError as e:                                    # the same names, other shapes
        wrong = next((line.strip() for line in str(e).splitlines() if 'size mismatch' in line), 'other shapes')[:160]
    if wrong:
        given = path if isinstance(path, str) and path else url
        raise MissingWeights(f'--{option}={given} does not hold the weights expected here ({wrong}); use {url}')


# --------------------------------------------------------------------------------------------
# LPIPS v0.1 (Zhang et al. 2018)

_TAPS = {'vgg': ((3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),      # relu1_2 .. relu5_3
         'alex': ((1, 4, 7, 9, 11), (64, 192, 384, 256, 256))}       # relu1 .. relu5


def _vgg16_features():
    """torchvision's vgg16().features up to relu5_3 (same indices, so its state dict loads)."""
    layers, cin = [], 3
    for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512):
        if v == 'M':
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)


def _alexnet_features():
    """torchvision's alexnet().features up to relu5."""
    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())


class LPIPS(nn.Module):
    """LPIPS distance: unit-normalized backbone features, squared differences weighted by the learned
    1x1 heads, averaged over space and summed over layers. forward(x, y) with images in [-1, 1]
    returns (N,) distances. backbone / heads: a path or a state dict ('' = the official URL)."""

    def __init__(self, net='vgg', backbone='', heads=''):
        super().__init__()
        if net not in _TAPS:
            raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
        taps, channels = _TAPS[net]
        self.features = _vgg16_features() if net == 'vgg' else _alexnet_features()
        files = ((backbone, BACKBONE_URLS[net], f'{net}_backbone'), (heads, LPIPS_URLS[net], f'lpips_{net}'))
        sd, hd = load_each(*(f[0] if isinstance(f[0], dict) else f for f in files))    # both, or every one missing
        # the torchvision file's features.N.* only: the classifier is not needed
        load_into(self.features, {k[len('features.'):]: v for k, v in sd.items() if k.startswith('features.')},
                  files[0][2], files[0][0], files[0][1])
        self.taps = taps
        self.heads = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in channels])
        load_into(self.heads, {f'{k}.weight': hd[f'lin{k}.model.1.weight'] for k in range(len(channels))
                               if f'lin{k}.model.1.weight' in hd},
                  files[1][2], files[1][0], files[1][1])
        self.register_buffer('shift', torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer('scale', torch.tensor([.458, .448, .450])[None, :, None, None])
        self.eval().requires_grad_(False)

    def _taps(self, x):
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x, y):
        if x.shape[-1] < 64:        # AlexNet's stride would leave nothing of tiny images: enlarge them
            x, y = (F.interpolate(t, size=64, mode='nearest') for t in (x, y))
        total = 0
        for head, fx, fy in zip(self.heads, self._taps(x), self._taps(y)):
            total = total + head((fx - fy) ** 2).mean((2, 3))
        return total.flatten()
