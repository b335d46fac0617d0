"""Metrics of the paper (Sec. 4, Tables 1-2, A.1) with their protocols in their names.

    python metrics.py --metric=fid         # fid50k: 50k prior samples vs the training set's statistics
    python metrics.py --metric=fid --fid_count=5000      # ... recorded as fid5k
    python metrics.py --metric=fid_rec     # FID of reconstructions of held-out images vs those images
    python metrics.py --metric=lpips_rec   # Table 2a: held-out images vs reconstructions (LPIPS)
    python metrics.py --metric=ppl         # perceptual path length (A.1), VGG LPIPS
    python metrics.py --metric=pr          # precision and recall of prior samples against the train split
    python metrics.py --metric=mix         # shapes only: which factors follow A and B under mixing
    python metrics.py --metric=invariance  # shapes only: blocks 0-1 from the mirror move the pose alone (Sec. 4.3)
    python metrics.py --metric=edit        # shapes only: a triangle direction turns circles into triangles
    python metrics.py --metric=project     # shapes only: pixel error and shape read along the projection
    python metrics.py --metric=fid --folder_a=real/ --folder_b=fake/   # two folders, no checkpoint (fid or pr)

The shapes scores take --shapes_range=test (10,000 held-out scenes, the range the preset was tuned
on) or report (the next 10,000, which no tuning run scored). Each prints its value and appends one
JSON line to metrics.jsonl beside the checkpoint. The networks are written its value and appends one JSON line to out_dir/metrics.jsonl. The networks are written
here: `InceptionV3` is the TensorFlow FID graph (it loads pt_inception-2015-12-05-6726825d.pth, the
standard PyTorch port of its weights, without renaming) and `LPIPS` is LPIPS v0.1 (torchvision
VGG16/AlexNet features and the official linear heads). Weights come from a local path (a global per
file) or the official URL through torch.hub's cache; without either, the error names both.
"""
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model
import sample
from configurator import ANY, PATH, Rule, above, at_least, check, clean, configure, integer, matches, one_of
from losses import LPIPS, MissingWeights, load_into, load_weights  # noqa: F401 (LPIPS, a perceptual loss, lives in losses.py)

FID_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
# --------------------------------------------------------------------------------------------
# Inception-v3 as in the TensorFlow FID graph (2015-12-05)

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # the TF graph averages over the valid pixels only; torchvision's Inception counts the padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool      # the last block of the TF graph max-pools in its pool branch
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """The FID feature extractor: images (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048).

    Module names follow torchvision's Inception3, so the state dict of the standard port of the TF
    FID weights (pt_inception-2015-12-05-6726825d.pth, 1008 classes) loads without renaming.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)             # logits are not used; kept so the file loads as is
        self.eval()

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1                                # the TF graph's input scaling
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
            x = getattr(self, 'Mixed_' + name)(x)
        return x.mean((2, 3))                        # pool3: (N, 2048)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2), computed with symmetric eigensolvers
    only: A from eigh(S1) with round-off negatives clipped to 0, then the square roots of the
    (clipped) eigenvalues of the symmetric A S2 A. So rank-deficient covariances (fewer samples than
    features) stay finite and exact, where a general eigensolver or sqrtm of S1 S2 loses accuracy.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f'statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}')
    lam, u = np.linalg.eigh((s1 + s1.T) / 2)
    a = (u * np.sqrt(np.clip(lam, 0, None))) @ u.T
    m = a @ s2 @ a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# --------------------------------------------------------------------------------------------
# Helpers: batches, progress, statistics

class Progress:
    """One line per few seconds with a rate and ETA, on stderr."""

    def __init__(self, what, total):
        self.what, self.total, self.start, self.last = what, total, time.time(), 0.0

    def __call__(self, done):
        now = time.time()
        if now - self.last > 5 or done >= self.total:
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - done) / max(rate, 1e-9)
            print(f'{self.what}: {done}/{self.total} ({rate:.1f}/s, eta {eta / 60:.1f} min)', file=sys.stderr)
            self.last = now


def batches(count, batch):
    for start in range(0, count, batch):
        yield start, min(batch, count - start)


def statistics(features):
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


@torch.no_grad()
def inception_features(inception, images_fn, count, batch, what):
    """Features (count, 2048) of images_fn(start, n) -> (n, 3, H, W) in [-1, 1], batch by batch."""
    feats, progress = [], Progress(what, count)
    for start, n in batches(count, batch):
        x = images_fn(start, n)
        feats.append(inception(x.clamp(-1, 1).add(1).div(2)).double().cpu())
        progress(start + n)
    return torch.cat(feats).numpy()


def load_source_images(source, res, start, n, device):
    return data.to_float(source.load_batch(list(range(start, start + n)), res)).to(device)


def face_crop(x, dataset, mode='auto'):
    """The authors' centre-face crop: rows 3c:7c, columns 2c:6c with c = res / 8 (128x128 at 256);
    'auto' crops the face data sets only."""
    if mode == 'no' or (mode == 'auto' and dataset not in ('ffhq', 'celebahq')):
        return x
    c = x.shape[-1] // 8
    return x[:, :, 3 * c:7 * c, 2 * c:6 * c]


# --------------------------------------------------------------------------------------------
# The metrics

def real_statistics(inception, saved, res, count, batch, device, cache_dir, split='train'):
    """Inception statistics of `count` images of the data set's split, cached as .npz."""
    name = saved.get('dataset', 'shapes')
    root = saved.get('data_root', '')
    tag = f'{name}_{split}_{res}px_{count}'
    top = saved.get('max_res', res)
    if name == 'shapes' and top >= data.FINE_STRIPES_FROM:
        tag += f'_of{top}'                              # its stripes exist at max_res only
    if root:                                            # a stable digest: str hash() changes per process
        tag += '_' + hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f'{tag}.npz')
    if os.path.exists(path):
        st = np.load(path)
        return st['mu'], st['sigma']
    source = data.open_split({'max_res': res, **saved, 'num_workers': 0}, split)
    if len(source) < count:
        print(f'note: the {split} split has {len(source)} images, fewer than {count}; using all of them', file=sys.stderr)
        count = len(source)
    mu, sigma = statistics(real_features(inception, source, res, count, batch, device, f'real statistics {tag}'))
    os.makedirs(cache_dir, exist_ok=True)
    try:
        np.savez(path + '.tmp.npz', mu=mu, sigma=sigma)
        os.replace(path + '.tmp.npz', path)
    finally:
        if os.path.exists(path + '.tmp.npz'):
            os.remove(path + '.tmp.npz')
    return mu, sigma


def real_features(inception, source, res, count, batch, device, what='real images'):
    return inception_features(inception, lambda s, n: load_source_images(source, res, s, n, device),
                              min(count, len(source)), batch, what)


def fid_samples(net, inception, real_stats, count, batch, seed=0):
    """FID of `count` prior samples from the (EMA) decoder against real statistics."""
    return frechet_distance(*statistics(sample_features(net, inception, count, batch, seed)), *real_stats)


@torch.no_grad()
def fid_reconstructions(net, inception, source, count, batch):
    """FID of reconstructions of `count` held-out images against those same images."""
    dev = net.const_device()
    real, rec = [], []
    progress = Progress('reconstructions', count)
    for start, n in batches(count, batch):
        x = load_source_images(source, net.res, start, n, dev)
        real.append(inception(x.add(1).div(2)).double().cpu())
        rec.append(inception(net.reconstruct(x, noise=False).clamp(-1, 1).add(1).div(2)).double().cpu())
        progress(start + n)
    return frechet_distance(*statistics(torch.cat(rec).numpy()), *statistics(torch.cat(real).numpy()))


STABLE_FID = 2048       # the feature dimension: below it the covariance is rank-deficient


def folder_files(root, count, flag):
    """The first `count` images under `root` (sorted), checked before any weights load: one line when
    the folder is missing or holds none, a warning when it holds too few for a stable FID."""
    if not os.path.isdir(root):
        raise SystemExit(f'error: {flag}={root} is not a folder')
    try:
        files = data.list_images(root)[:count]
    except ValueError as e:
        raise SystemExit(f'error: {flag}: {e}') from None
    if len(files) < STABLE_FID:
        warnings.warn(f'{flag}={root} holds {len(files)} images; FID and precision/recall from fewer than '
                      f'{STABLE_FID} are biased and vary between draws (the paper uses 50,000)')
    return files


@torch.no_grad()
def folder_features(inception, files, res, batch, device, name):
    """Inception features of image files, centre-cropped and resized to res as training does; an
    unreadable file is skipped with a warning, none readable is an error."""
    feats, x, progress = [], [], Progress(f'features of {name}', len(files))
    for i, path in enumerate(files):
        try:
            x.append(data.crop_resize(data.open_rgb(path), res))
        except Exception as e:                                    # noqa: BLE001 (any decoder failure)
            warnings.warn(f'skipping unreadable image {path} ({type(e).__name__}: {e})')
        if len(x) == batch or (i == len(files) - 1 and x):
            images = torch.stack(x).to(device).float() / 255
            feats.append(inception(images).double().cpu())
            x = []
            progress(i + 1)
    if not feats:
        raise SystemExit(f'error: none of the {len(files)} images under {name} could be read')
    return torch.cat(feats).numpy()


def _kth_neighbour_distance(f, k, chunk=1024):
    """Distance from each row of f to its k-th nearest other row."""
    out = [torch.cdist(f[i:i + chunk], f).kthvalue(k + 1, dim=1).values for i in range(0, len(f), chunk)]
    return torch.cat(out)                                  # k + 1: each row is its own nearest, at 0


def _covered(points, centres, radii, chunk=1024):
    """For each point: does it lie in some ball (centre, radius)?"""
    return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(1)
                      for i in range(0, len(points), chunk)])


def precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. (2019): each set's manifold is the union of balls around its points
    reaching their k-th nearest neighbour. Precision: share of fakes inside the real manifold;
    recall: share of reals inside the fake manifold."""
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    precision = _covered(fake, real, _kth_neighbour_distance(real, k)).double().mean().item()
    recall = _covered(real, fake, _kth_neighbour_distance(fake, k)).double().mean().item()
    return dict(precision=precision, recall=recall)


@torch.no_grad()
def sample_features(net, inception, count, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = net.const_device()
    return inception_features(inception, lambda s, n: net.decode(model.sample_prior(n, net.cfg.nz, generator=g).to(dev),
                                                                   noise=True), count, batch, 'samples')


@torch.no_grad()
def lpips_reconstructions(net, lpips, source, count, batch, dataset, crop='auto'):
    """Mean LPIPS between held-out images and their reconstructions (paper Table 2a)."""
    dev = net.const_device()
    total, progress = 0.0, Progress('lpips', count)
    for start, n in batches(count, batch):
        x = load_source_images(source, net.res, start, n, dev)
        y = net.reconstruct(x, noise=False).clamp(-1, 1)
        total += lpips(face_crop(x, dataset, crop), face_crop(y, dataset, crop)).sum().item()
        progress(start + n)
    return total / count


@torch.no_grad()
def path_length(net, lpips, count, batch, dataset, crop='auto', epsilon=1e-4, seed=0):
    """PPL (A.1, after StyleGAN): E[LPIPS(G(slerp(z1, z2, t)), G(slerp(z1, z2, t + eps))) / eps^2].

    Spherical interpolation, because encodings and prior samples live on the unit sphere, where
    a linear step would leave it (StyleGAN's z-space PPL slerps for the same reason). Layer noise
    is off so that only the latent moves. As StyleGAN, samples outside the 1st-99th percentiles
    are dropped before averaging. Images above 256 px are downsampled to 256 first.
    """
    from sample import slerp
    g = torch.Generator().manual_seed(seed)
    dev = net.const_device()
    dists, progress = [], Progress('ppl', count)
    for start, n in batches(count, batch):
        z1 = model.sample_prior(n, net.cfg.nz, generator=g).to(dev)
        z2 = model.sample_prior(n, net.cfg.nz, generator=g).to(dev)
        t = torch.rand(n, 1, generator=g).to(dev)
        x = net.decode(torch.cat([slerp(z1, z2, t), slerp(z1, z2, t + epsilon)]), noise=False).clamp(-1, 1)
        x = face_crop(x, dataset, crop)
        if x.shape[-1] > 256:
            x = F.interpolate(x, size=256, mode='area')
        dists.append((lpips(x[:n], x[n:]).double() / epsilon ** 2).cpu())
        progress(start + n)
    d = torch.cat(dists).numpy()
    lo, hi = np.percentile(d, [1, 99])
    return float(d[(d >= lo) & (d <= hi)].mean())


LAYOUT, APPEARANCE = ('shape', 'x', 'y', 'size'), ('color', 'background', 'texture')
CONTINUOUS = ('x', 'y', 'size', 'color', 'background')     # scored relatively too (nearer A or B)


def mix_score(images, factors_a, factors_b):
    """For images that mix sources A and B: per factor, the share of images whose estimated factor
    matches A's and the share that matches B's (within data.FACTOR_TOLERANCE), counted over the pairs
    where A and B differ in that factor; for the continuous factors also `b_nearer`, the share whose
    estimate lies nearer B's value than A's (a relative score that sees colours the strict one misses)."""
    est = data.estimate_factors(images)
    follows_a, follows_b = data.factor_errors(est, factors_a), data.factor_errors(est, factors_b)
    differ = data.factor_errors(factors_a, factors_b)
    out = {}
    for k in follows_a:
        d = ~differ[k]
        n = int(d.sum())
        out[k] = dict(a=float(follows_a[k][d].float().mean()) if n else float('nan'),
                      b=float(follows_b[k][d].float().mean()) if n else float('nan'), pairs=n)
        if k in CONTINUOUS and n:            # relative: the estimate lies nearer B's value than A's
            dist_a, dist_b = ((est[k].float() - f[k].float()).reshape(len(d), -1).norm(dim=1)
                              for f in (factors_a, factors_b))
            out[k]['b_nearer'] = float((dist_b < dist_a)[d].float().mean())
    return out


def shapes_split(net, split):
    """The shapes images a checkpoint was trained on (its max_res decides the stripes' scale)."""
    return data.ShapesSource(split, max_res=net.cfg.max_res)


@torch.no_grad()
def reconstruction_score(net, test, count, batch):
    """On shapes: the first `count` held-out images through E and G: pixel L1 (images in [-1, 1]) and,
    per factor, the share read back within data.FACTOR_TOLERANCE (the first column of the mix table);
    shape_by_class: the shape class's share per true class."""
    dev = net.const_device()
    l1, recs = 0.0, []
    for start, n in batches(count, batch):
        x = load_source_images(test, net.res, start, n, dev)
        rec = net.decode(net.encode(x), noise=False).clamp(-1, 1)
        l1 += float((rec - x).abs().mean()) * n
        recs.append(rec.cpu())
    true = test.factors(range(count))
    right = data.factor_errors(data.estimate_factors(torch.cat(recs)), true)
    # per class too: a model that draws every square as a circle still reads 2/3 of the classes
    by_class = {name: float(right['shape'][true['shape'] == k].float().mean())
                for k, name in enumerate(data.SHAPE_CLASSES) if (true['shape'] == k).any()}
    return dict(l1=l1 / count, **{k: float(v.float().mean()) for k, v in right.items()}, shape_by_class=by_class)


@torch.no_grad()
def mixing(net, count, batch, split='test'):
    """On shapes: decode A with B's latents on the coarse / intermediate / fine blocks and score which
    factors follow which source. A model disentangled by scale has layout from whoever drives the
    coarse blocks and appearance from whoever drives the rest."""
    test = shapes_split(net, split)
    n_used = net.decoder.blocks_at(net.res)
    results = {'reconstruction': reconstruction_score(net, test, count, batch)}
    for group in model.GROUPS:
        try:
            blocks = model.block_range(group, n_used, net.cfg.extra_8x8)
        except ValueError:                                     # a group this resolution does not reach
            continue
        imgs, fa, fb = [], [], []
        for start, n in batches(count, batch):
            ia, ib = list(range(start, start + n)), list(range(count + start, count + start + n))
            xa, xb = (load_source_images(test, net.res, i[0], n, net.const_device()) for i in (ia, ib))
            z = model.mix_latents(net.encode(xa), net.encode(xb), blocks, net.decoder.n_blocks)
            imgs.append(net.decode(z, noise=False).clamp(-1, 1).cpu())
            fa.append(test.factors(ia))
            fb.append(test.factors(ib))
        cat = {k: torch.cat([f[k] for f in fa]) for k in fa[0]}, {k: torch.cat([f[k] for f in fb]) for k in fb[0]}
        results[group] = mix_score(torch.cat(imgs), *cat)
    return results


@torch.no_grad()
def edit_score(net, count, batch, strengths, blocks='coarse', split='test'):
    """On shapes: a triangle direction (mean latent of train-split triangles minus that of circles,
    `count` each at most) applied on `blocks` to `count` held-out circles. Per strength: the share
    read as a triangle, and how far position (image widths) and colours (per channel, [0, 1]) move
    from the plain reconstruction (strength 0), as mean absolute differences of the estimates."""
    dev = net.const_device()

    def codes(source, kind):                                    # latents of the first `count` of a shape class
        idx = torch.nonzero(source.factors(range(6 * count))['shape'] == kind)[:count, 0].tolist()
        return torch.cat([net.encode(data.to_float(source.load_batch(idx[i:i + batch], net.res)).to(dev))
                          for i in range(0, len(idx), batch)])

    def estimates(z, strength):
        moved = [sample.move_along(z[i:i + batch], direction, strength, group, net.decoder.n_blocks)
                 for i in range(0, len(z), batch)]
        return data.estimate_factors(torch.cat([net.decode(m, noise=False).clamp(-1, 1).cpu() for m in moved]))
    train, test = shapes_split(net, 'train'), shapes_split(net, split)
    direction = codes(train, 2).mean(0) - codes(train, 0).mean(0)        # triangles minus circles
    z, group = codes(test, 0), sample.blocks_of(net, blocks)
    est = {s: estimates(z, s) for s in (0.0, *strengths)}
    base = est[0.0]
    return {f'{s:g}': dict(triangle=float((e['shape'] == 2).float().mean()), circle=float((e['shape'] == 0).float().mean()),
                           moved_xy=float(((e['x'] - base['x']).abs() + (e['y'] - base['y']).abs()).mean() / 2),
                           moved_colour=float((e['color'] - base['color']).abs().mean()),
                           moved_background=float((e['background'] - base['background']).abs().mean()))
            for s, e in est.items()} | dict(images=len(z), direction_length=float(direction.norm()))


def projection_curve(net, count, steps, lpips=None, lpips_weight=1.0, lr=0.01, split='test'):
    """On shapes: `count` held-out images projected (sample.project) together; pixel L1 and the
    shape class read from the decodes at steps 0 (the encoder alone), 10, 30, 100, 300 (up to
    `steps`), with the wall time per image of each."""
    test = shapes_split(net, split)
    x = data.to_float(test.load_batch(range(count), net.res)).to(net.const_device())
    truth = test.factors(range(count))['shape']
    _, history = sample.project(net, x, steps, lpips, lpips_weight, 1.0, lr, keep=True)
    out = {}
    for step, seconds, loss, l1, w in history:
        with torch.no_grad():
            shape = data.estimate_factors(net.decode(w, noise=False).clamp(-1, 1).cpu())['shape']
        out[str(step)] = dict(pixel_l1=l1, shape=float((shape == truth).float().mean()), seconds_per_image=seconds / count,
                              loss=loss)
    return out


@torch.no_grad()
def invariance_score(net, count, batch, k=model.INVARIANCE_K, split='test'):
    """Sec. 4.3 on shapes: decode each held-out image with blocks [0, k) driven by the encoding of
    its horizontal mirror (the paper's layers #1-2) and the rest by its own. Flip invariance holds
    when that mirrors the layout alone: x -> 1 - x with y, size, shape, colour, background and
    texture kept. Returns, per factor, the share of images where the swap gives the mirrored x or
    keeps the factor, 'all' where every one holds, and the same shares for plain reconstructions
    (against the unmirrored image) as the reference for what the estimator can read. 'pixels', which
    needs no estimator: the mean L1 distance of the swap to the mirror's reconstruction (where pose
    alone from the mirror should land) and to the image's own, and the share closer to the first."""
    test = shapes_split(net, split)
    n_blocks, keep = net.decoder.n_blocks, ('y', 'size', 'shape', 'color', 'background', 'texture')
    hits, to_mirror, to_own = {'swap': [], 'recon': []}, [], []
    for start, n in batches(count, batch):
        x = load_source_images(test, net.res, start, n, net.const_device())
        z, z_flip = net.encode(x), net.encode(x.flip(-1))
        swap = net.decode(model.mix_latents(z, z_flip, range(k), n_blocks), noise=False)
        own, mirror = net.decode(z, noise=False), net.decode(z_flip, noise=False)
        to_mirror.append((swap - mirror).abs().mean((1, 2, 3)).cpu())
        to_own.append((swap - own).abs().mean((1, 2, 3)).cpu())
        truth = test.factors(list(range(start, start + n)))
        mirrored = dict(truth, x=1 - truth['x'])
        for name, images, want in (('swap', swap, mirrored), ('recon', own, truth)):
            hits[name].append(data.factor_errors(data.estimate_factors(images.clamp(-1, 1).cpu()), want))
    # x is only informative where mirroring moves it by more than the tolerance
    moves = (1 - 2 * test.factors(list(range(count)))['x']).abs() > 2 * data.FACTOR_TOLERANCE['x']
    out = {}
    for name, parts in hits.items():
        ok = {f: torch.cat([p[f] for p in parts]) for f in parts[0]}
        row = {f: float(ok[f].float().mean()) for f in keep}
        row['x'] = float(ok['x'][moves].float().mean())
        row['all'] = float(torch.stack([ok[f] for f in keep + ('x',)]).all(0)[moves].float().mean())
        out[name] = row
    a, b = torch.cat(to_mirror)[moves], torch.cat(to_own)[moves]
    out['pixels'] = dict(l1_to_mirrored=float(a.mean()), l1_to_own=float(b.mean()), closer_to_mirrored=float((a < b).float().mean()))
    return out


# --------------------------------------------------------------------------------------------
# Command line

_before = set(globals())
metric = 'fid'              # fid | fid_rec | lpips_rec | ppl | pr | mix | invariance | edit | project
out_dir = 'out'             # reads out_dir/ckpt.pt, appends to out_dir/metrics.jsonl
ckpt = ''                   # another checkpoint file ('' = out_dir/ckpt.pt), an authors' *_state.pth, or ffhq256 etc.
dataset = ''                # the real images' data set ('' = the one the checkpoint records; needed for the authors')
data_root = ''              # ... and their folder or lmdb
fid_count = 50000           # fid, pr: generated samples and real images (the name says it: fid50k)
folder_a = ''               # fid, pr between two folders (no checkpoint): the reference images ...
folder_b = ''               # ... and the images to score (pr: precision of B against A, recall of A by B)
folder_res = 256            # folders: centre crop and resize to this, then Inception's own resize to 299
pr_k = 3                    # pr: k of the k-nearest-neighbour balls (Kynkaanniemi et al. 2019)
rec_count = 10000           # fid_rec, lpips_rec: held-out images (paper: 10k unseen FFHQ images)
ppl_count = 100000          # ppl: latent pairs (paper: 100k)
mix_count = 1000            # mix: held-out pairs per group; invariance, edit: held-out images
shapes_range = 'test'       # mix, invariance, edit, project: test (the preset was tuned on it) | report (no tuning run scored it)
strengths = (0.5, 1.0, 1.5, 2.0, 3.0)  # edit: steps along the triangle direction
edit_blocks = 'coarse'      # edit: the blocks the direction moves (coarse | intermediate | fine | all | a:b)
project_count = 64          # project: held-out images
project_steps = 300         # project: optimisation steps (scores at 0, 10, 30, 100, 300)
project_lpips = 1.0         # project: weight of LPIPS (VGG) beside the pixel MSE (0 = the pixel term alone)
project_lr = 0.01           # project: Adam's learning rate on the per-block latents
batch = 50                  # images per forward pass
epsilon = 1e-4              # ppl: step length in latent space
lpips_net = 'alex'          # lpips_rec backbone (authors' LPIPS used AlexNet)
ppl_net = 'vgg'             # ppl backbone (StyleGAN's PPL uses VGG16)
crop = 'auto'               # centre-face crop for lpips_rec / ppl: auto (ffhq, celebahq) | yes | no
inception = ''              # path of pt_inception-2015-12-05-6726825d.pth ('' = official URL via torch.hub)
vgg_backbone = ''           # path of torchvision's vgg16-397923af.pth ('' = official URL)
alex_backbone = ''          # path of torchvision's alexnet-owt-7be5be79.pth ('' = official URL)
lpips_vgg = ''              # path of LPIPS v0.1 vgg.pth ('' = official URL)
lpips_alex = ''             # path of LPIPS v0.1 alex.pth ('' = official URL)
stats_dir = ''              # cache of real statistics ('' = ~/.cache/automodulator/fid_stats)
seed = 0                    # latent draws
device = 'auto'             # auto (cuda if available) | cpu | cuda
CONFIG_KEYS = sorted(set(globals()) - _before - {'_before'})

RULES = dict(
    metric=matches(r'fid(\d+k?)?|fid_rec|lpips_rec|ppl|pr|mix|invariance|edit|project',
                   'fid (fid50k, fid5k, ...), fid_rec, lpips_rec, ppl, pr, mix, invariance, edit or project'),
    strengths=Rule('a tuple of numbers, e.g. (1, 2)', lambda v: len(v) > 0 and all(isinstance(a, (int, float)) for a in v)),
    edit_blocks=matches(r'coarse|intermediate|fine|all|\d*:\d*', 'coarse, intermediate, fine, all or a:b'),
    project_count=integer(1), project_steps=integer(0), project_lpips=at_least(0), project_lr=above(0),
    folder_a=PATH, folder_b=PATH, folder_res=integer(8), pr_k=integer(1),
    out_dir=PATH, ckpt=PATH, dataset=one_of('', *data.DATASETS), data_root=PATH, fid_count=integer(2),
    rec_count=integer(2), ppl_count=integer(1), mix_count=integer(1), batch=integer(1), epsilon=above(0),
    shapes_range=one_of('test', 'report'), lpips_net=one_of('alex', 'vgg'), ppl_net=one_of('alex', 'vgg'), crop=one_of('auto', 'yes', 'no'),
    inception=PATH, vgg_backbone=PATH, alex_backbone=PATH, lpips_vgg=PATH, lpips_alex=PATH, stats_dir=PATH,
    seed=integer(0), device=ANY)


def _count_name(n):
    return f'{n // 1000}k' if n % 1000 == 0 else str(n)


def held_out(saved, res):
    name = saved.get('dataset', 'shapes')
    if name == 'folder' and saved.get('test_fraction', 0) <= 0:
        raise SystemExit('error: this folder run has no held-out images; train with --test_fraction=0.1 '
                         '(or use a data set with a test split)')
    return data.open_split({'max_res': res, **saved, 'num_workers': 0}, 'test')


def fid_count_of(cfg):
    """--metric=fid5k is --metric=fid --fid_count=5000."""
    tail = cfg['metric'][3:] if cfg['metric'].startswith('fid') and cfg['metric'] != 'fid_rec' else ''
    return int(float(tail.rstrip('k')) * (1000 if tail.endswith('k') else 1)) if tail else cfg['fid_count']


def load_inception(cfg, dev):
    inc = InceptionV3()
    load_into(inc, load_weights(cfg['inception'], FID_URL, 'inception'), 'inception', cfg['inception'], FID_URL)
    return inc.to(dev)


def compare_folders(cfg, dev):
    """FID or precision/recall between two folders of images, no checkpoint."""
    if not (cfg['folder_a'] and cfg['folder_b']):
        raise SystemExit('error: comparing folders needs both --folder_a=DIR (reference) and --folder_b=DIR')
    if not (cfg['metric'].startswith('fid') and cfg['metric'] != 'fid_rec' or cfg['metric'] == 'pr'):
        raise SystemExit(f"error: --metric={cfg['metric']} needs a checkpoint; between folders use fid or pr")
    count, t0 = fid_count_of(cfg), time.time()
    files = {k: folder_files(cfg[k], count, f'--{k}') for k in ('folder_a', 'folder_b')}    # before any weights
    inc = load_inception(cfg, dev)
    a, b = (folder_features(inc, files[k], cfg['folder_res'], cfg['batch'], dev, cfg[k]) for k in ('folder_a', 'folder_b'))
    if cfg['metric'] == 'pr':
        value, name = precision_recall(a, b, cfg['pr_k']), f'pr{_count_name(min(len(a), len(b)))}'
    else:
        value, name = frechet_distance(*statistics(b), *statistics(a)), f'fid{_count_name(min(len(a), len(b)))}'
    return dict(metric=name, value=value, folder_a=os.path.abspath(cfg['folder_a']), images_a=len(a),
                folder_b=os.path.abspath(cfg['folder_b']), images_b=len(b), seconds=round(time.time() - t0, 1),
                protocol=f'folders, centre crop and resize to {cfg["folder_res"]}, then bilinear to 299'
                         + (f', k = {cfg["pr_k"]}' if cfg['metric'] == 'pr' else ''))


def write_record(record, log_dir, detail=''):
    """Print a result (a table's numbers stay in the file) and append it as one JSON line to log_dir/metrics.jsonl."""
    value = record['value']
    shown = '' if isinstance(value, dict) else f' = {value:.4f}'
    path = os.path.join(log_dir, 'metrics.jsonl')
    print(f'{record["metric"]}{shown}  ({detail}{record["seconds"]} s); appended to {path}')
    os.makedirs(log_dir, exist_ok=True)
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


# --------------------------------------------------------------------------------------------
# One function per metric: (net, cfg, the run's data settings, device) -> (name, value, protocol)

def fid_metric(net, cfg, saved, dev):
    count = fid_count_of(cfg)
    inc = load_inception(cfg, dev)
    stats = real_statistics(inc, saved, net.res, count, cfg['batch'], dev,
                            cfg['stats_dir'] or os.path.expanduser('~/.cache/automodulator/fid_stats'))
    value = fid_samples(net, inc, stats, count, cfg['batch'], cfg['seed'])
    return (f'fid{_count_name(count)}', value,
            'EMA decoder prior samples (layer noise on) vs train split, bilinear resize to 299')


def pr_metric(net, cfg, saved, dev):
    inc = load_inception(cfg, dev)
    source = data.open_split({'max_res': net.res, **saved, 'num_workers': 0}, 'train')
    real = real_features(inc, source, net.res, cfg['fid_count'], cfg['batch'], dev)
    value = precision_recall(real, sample_features(net, inc, len(real), cfg['batch'], cfg['seed']), cfg['pr_k'])
    return f'pr{_count_name(len(real))}', value, f'EMA decoder prior samples vs train split, k = {cfg["pr_k"]}, Inception pool3'


def fid_rec_metric(net, cfg, saved, dev):
    inc = load_inception(cfg, dev)
    source = held_out(saved, net.res)
    count = min(cfg['rec_count'], len(source))
    value = fid_reconstructions(net, inc, source, count, cfg['batch'])
    return f'fid_rec{_count_name(count)}', value, 'reconstructions vs the same held-out images'


def _lpips(cfg, which, dev):
    paths = dict(vgg=(cfg['vgg_backbone'], cfg['lpips_vgg']), alex=(cfg['alex_backbone'], cfg['lpips_alex']))
    return LPIPS(which, *paths[which]).to(dev)


def lpips_rec_metric(net, cfg, saved, dev):
    source = held_out(saved, net.res)
    count = min(cfg['rec_count'], len(source))
    value = lpips_reconstructions(net, _lpips(cfg, cfg['lpips_net'], dev), source, count, cfg['batch'],
                                  saved.get('dataset', 'shapes'), cfg['crop'])
    return f'lpips_rec{_count_name(count)}', value, f'LPIPS v0.1 {cfg["lpips_net"]}, crop {cfg["crop"]}'


def ppl_metric(net, cfg, saved, dev):
    count = cfg['ppl_count']
    value = path_length(net, _lpips(cfg, cfg['ppl_net'], dev), count, cfg['batch'], saved.get('dataset', 'shapes'),
                        cfg['crop'], cfg['epsilon'], cfg['seed'])
    return (f'ppl{_count_name(count)}', value,
            f'LPIPS v0.1 {cfg["ppl_net"]}, crop {cfg["crop"]}, slerp, eps {cfg["epsilon"]}, 1-99% kept')


def mix_metric(net, cfg, saved, dev):
    value = mixing(net, cfg['mix_count'], cfg['batch'], cfg['shapes_range'])
    rec = value['reconstruction']
    classes = ' '.join(f'{k} {v:.2f}' for k, v in rec['shape_by_class'].items())
    print(f'reconstruction: pixel L1 {rec["l1"]:.4f} | read back: '
          + ' '.join(f'{k} {rec[k]:.2f}' for k in LAYOUT + APPEARANCE) + f' | shape per class: {classes}')
    for group, scores in value.items():
        if group != 'reconstruction':
            print(f'{group:13s} strict, follows B: ' + ' '.join(f'{k} {scores[k]["b"]:.2f}' for k in LAYOUT + APPEARANCE)
                  + ' | nearer B: ' + ' '.join(f'{k} {scores[k]["b_nearer"]:.2f}' for k in CONTINUOUS
                                               if 'b_nearer' in scores[k]))
    return (f'mix{_count_name(cfg["mix_count"])}', value,
            f"{cfg['shapes_range']} range; B's latents on the group's blocks, A's elsewhere; share of each factor matching A / B")


def invariance_metric(net, cfg, saved, dev):
    value = invariance_score(net, cfg['mix_count'], cfg['batch'], split=cfg['shapes_range'])
    for row, scores in value.items():
        print(f'{row:6s} ' + ' '.join(f'{k} {v:.2f}' for k, v in scores.items()))
    return (f'invariance{_count_name(cfg["mix_count"])}', value, f"{cfg['shapes_range']} range; blocks 0-1 from the "
            "mirrored image's latent: share with x mirrored and each other factor kept; recon: plain reconstructions")


def edit_metric(net, cfg, saved, dev):
    value = edit_score(net, cfg['mix_count'], cfg['batch'], cfg['strengths'], cfg['edit_blocks'], cfg['shapes_range'])
    for s_, row in value.items():
        if isinstance(row, dict):
            print(f'strength {s_:>4s}: triangle {row["triangle"]:.2f} circle {row["circle"]:.2f} | position moved '
                  f'{row["moved_xy"]:.3f} | colour {row["moved_colour"]:.3f} | background {row["moved_background"]:.3f}')
    return (f'edit{_count_name(value["images"])}', value,
            f'direction: train triangles minus circles, on {cfg["edit_blocks"]}; {cfg["shapes_range"]} range circles')


def project_metric(net, cfg, saved, dev):
    lp = sample.lpips_for_projection(dict(lpips=cfg['project_lpips'], vgg_backbone=cfg['vgg_backbone'],
                                          lpips_vgg=cfg['lpips_vgg']), '--project_lpips')
    value = projection_curve(net, cfg['project_count'], cfg['project_steps'], lp.to(dev) if lp else None,
                             cfg['project_lpips'], cfg['project_lr'], cfg['shapes_range'])
    for step, row in value.items():
        print(f'step {step:>4s}: pixel L1 {row["pixel_l1"]:.4f} | shape {row["shape"]:.2f} | '
              f'{row["seconds_per_image"] * 1000:.1f} ms per image')
    return (f'project{_count_name(cfg["project_count"])}', value, f'{cfg["shapes_range"]} range, Adam lr '
            f'{cfg["project_lr"]}, MSE + {cfg["project_lpips"]} LPIPS (VGG)')


METRICS = dict(fid=fid_metric, pr=pr_metric, fid_rec=fid_rec_metric, lpips_rec=lpips_rec_metric, ppl=ppl_metric,
               mix=mix_metric, invariance=invariance_metric, edit=edit_metric, project=project_metric)
SHAPES_ONLY = ('mix', 'invariance', 'edit', 'project')   # scores that need the scenes' known factors
NO_IMAGES = ('ppl', 'mix', 'invariance', 'edit', 'project')   # what an authors' file without a data set can score


def main(cfg):
    """Score a checkpoint (or two folders) by --metric and append the record; returns it."""
    cfg = clean(cfg, RULES)                                   # paths: ~ and $VARS expanded
    check(cfg, RULES)
    try:
        dev = model.resolve_device(cfg['device'])
    except ValueError as e:
        raise SystemExit(f'error: {e}')
    if cfg['folder_a'] or cfg['folder_b']:
        record = compare_folders(cfg, dev)
        write_record(record, cfg['out_dir'], f'{record["images_a"]} and {record["images_b"]} images, ')
        return record
    path = cfg['ckpt'] or os.path.join(cfg['out_dir'], 'ckpt.pt')
    try:
        net = model.load_checkpoint(path, device=dev)
    except model.NotCached as e:
        raise SystemExit(f'error: {e.advice("--ckpt=")}') from None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'error: {e}')
    # the data set the checkpoint records, or --dataset / --data_root (the authors' files record none)
    saved = {**net.config, **{k: cfg[k] for k in ('dataset', 'data_root') if cfg[k]}}
    dataset = saved.get('dataset', 'shapes')
    which = 'fid' if cfg['metric'].startswith('fid') and cfg['metric'] != 'fid_rec' else cfg['metric']
    if net.input_crop and not saved.get('data_root') and which not in NO_IMAGES:
        raise SystemExit(f'error: {net.path} records no data set; pass --dataset=NAME --data_root=PATH '
                         f'(the real images this metric compares with)')
    if which in SHAPES_ONLY and dataset != 'shapes':
        raise SystemExit(f'error: the {which} score needs the shapes data set (its factors are known); this '
                         f'checkpoint was trained on {dataset}')
    t0 = time.time()
    try:
        name, value, protocol = METRICS[which](net, cfg, saved, dev)
    except ValueError as e:                                    # e.g. a block range this checkpoint lacks
        raise SystemExit(f'error: {e}')
    record = dict(metric=name, value=value, kimg=net.kimg, res=net.res, ckpt=os.path.abspath(net.path),
                  protocol=protocol, seconds=round(time.time() - t0, 1))
    # beside this repo's checkpoints; the authors' files often sit in a shared cache, so out_dir
    log_dir = cfg['out_dir'] if net.input_crop else os.path.dirname(os.path.abspath(net.path))
    write_record(record, log_dir, f'{net.res}x{net.res}, {net.kimg:.1f} kimg, ')
    return record


if __name__ == '__main__':
    configure(globals(), CONFIG_KEYS)
    try:
        main({k: globals()[k] for k in CONFIG_KEYS})
    except (FileNotFoundError, MissingWeights) as e:
        sys.exit(f'error: {e}')
