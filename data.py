"""Data: the embedded `shapes` default, any image folder, FFHQ, CelebA-HQ and LSUN (lmdb).

Every source hands out uint8 images (3, res, res) at the phase resolution; `prepare_batch` turns a
batch into the float [-1, 1] training input on the device: random horizontal flips, and during a
fade-in the blend x = alpha x + (1 - alpha) up2(down2(x)) that matches the decoder's fade (paper
Sec. 3.1; the authors' folder loaders in pioneer/data.py blend real images the same way).

Folders are decoded once into a per-resolution cache of uint8 arrays (numpy memmaps), so a 4x4
phase never decodes 1024 px PNGs and a DataLoader worker never meets a corrupt file. LSUN is read
from its official lmdb files with the key list cached next to them.

`shapes` renders scenes with known factors at different spatial scales (layout: shape class,
position, size; appearance: object and background colour, a fine stripe texture);
`estimate_factors` recovers them from pixels, so mixing can be scored on a CPU.
"""
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ('shapes', 'folder', 'ffhq', 'celebahq', 'lsun_bedroom', 'lsun_cars')
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff', '.ppm')
MAX_BAD_FRACTION = 0.1      # stop when more than 10% of a folder's files cannot be read ...
MIN_FILES_FOR_BAD_RULE = 100  # ... and it holds at least this many (a few bad files in a small folder are skipped)
CACHE_VERSION = 2           # bump when the decoded pixels change (2: EXIF orientation applied)
# worker processes: forked where the platform can (Linux), spawned elsewhere (Windows has no fork;
# on macOS forking a process that has threads is unsafe)
START_METHOD = 'fork' if 'fork' in mp.get_all_start_methods() and sys.platform != 'darwin' else 'spawn'

# ---------------------------------------------------------------------------------------------
# shapes: procedural scenes with known factors

SHAPES_TRAIN = 1_000_000     # indices [0, SHAPES_TRAIN) are the train split ...
SHAPES_TEST = 10_000         # ... the next SHAPES_TEST the held-out test split (the preset was tuned on it) ...
SHAPES_REPORT = 10_000       # ... and the next SHAPES_REPORT the report split, which no tuning run scored
SHAPE_CLASSES = ('circle', 'square', 'triangle')
TEXTURES = ('horizontal', 'vertical')   # stripes across y or across x, on the object only
STRIPE_FREQ = 8.0            # stripe cycles per image width: a 4 px period at 32x32
# From max_res 64 on the stripes are one pixel wide at max_res instead (a 2 px period): every 2x2
# average cancels them, so they exist at max_res alone and only the fine blocks (64 px and up) can
# draw them. At max_res 32 they stay 8 cycles per width, visible from 16x16: intermediate scale.
FINE_STRIPES_FROM = 64
STRIPE_AMP = 0.12            # +- on every channel of the object colour
# the equal-area radius s of each class: circle radius s, square half-side s sqrt(pi)/2,
# triangle (equilateral, point up) inradius s sqrt(pi / (3 sqrt 3)); extent = farthest point / s
_SQUARE_H = math.sqrt(math.pi) / 2
_TRI_R = math.sqrt(math.pi / (3 * math.sqrt(3)))
_EXTENT = torch.tensor([1.0, _SQUARE_H * math.sqrt(2), 2 * _TRI_R])
SIZE_RANGE = (0.16, 0.26)      # equal-area radius, in image widths: objects big enough to read at 16x16
OBJECT_RANGE = (0.6, 0.88)     # object colour, per channel in [0, 1]: room for the stripes' +-0.12
BACKGROUND_RANGE = (0.04, 0.32)  # background colour, per channel: always darker than the object


def _hash32(x):
    """A 32-bit integer mix (int64 tensors holding values < 2^32; products stay below 2^63)."""
    m = 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    return (x >> 16) ^ x


def _uniforms(seed, index, k):
    """(B, k) uniforms in [0, 1), a pure function of (seed, index): any batch renders the same image."""
    key = _hash32(_hash32(torch.full_like(index, seed & 0xFFFFFFFF)) ^ (index & 0xFFFFFFFF))
    key = _hash32(key ^ (index >> 32))
    cols = _hash32(key[:, None] ^ _hash32(torch.arange(1, k + 1, dtype=torch.int64))[None, :])
    return cols.double() / 2 ** 32


def shapes_factors(index, seed=0):
    """The factors of shapes images `index` (a LongTensor of indices): a dict of tensors."""
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
    u = _uniforms(seed, index, 12)
    shape = (u[:, 0] * 3).long().clamp(max=2)
    size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * u[:, 1]
    margin = _EXTENT[shape].double() * size + 0.04                  # the object stays inside
    center = margin[:, None] + (1 - 2 * margin[:, None]) * u[:, 2:4]
    # light objects on dark backgrounds, each colour uniform in its own box: two independent factors
    # whose edge has one polarity (both polarities took ~3x the steps to learn the shape; RESULTS.md)
    obj = OBJECT_RANGE[0] + (OBJECT_RANGE[1] - OBJECT_RANGE[0]) * u[:, 4:7]
    bg = BACKGROUND_RANGE[0] + (BACKGROUND_RANGE[1] - BACKGROUND_RANGE[0]) * u[:, 7:10]
    texture = (u[:, 10] < 0.5).long() ^ 1
    phase = u[:, 11]
    return dict(shape=shape, x=center[:, 0].float(), y=center[:, 1].float(), size=size.float(),
                color=obj.float(), background=bg.float(), texture=texture, phase=phase.float())


def _coverage(shape, cx, cy, size, res):
    """Anti-aliased coverage (B, res, res) of each object: clamp(0.5 - signed distance in pixels)."""
    t = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    dx = t[None, None, :] - cx[:, None, None]
    dy = t[None, :, None] - cy[:, None, None]                      # image y grows downwards
    s = size[:, None, None]
    circle = torch.sqrt(dx * dx + dy * dy) - s
    square = torch.maximum(dx.abs(), dy.abs()) - _SQUARE_H * s
    # equilateral triangle, point up: the largest of its three edge-normal projections minus the inradius
    c30, s30 = math.cos(math.pi / 6), 0.5
    tri = torch.maximum(torch.maximum(dy, c30 * dx - s30 * dy), -c30 * dx - s30 * dy) - _TRI_R * s
    sd = torch.where(shape[:, None, None] == 0, circle, torch.where(shape[:, None, None] == 1, square, tri))
    return (0.5 - sd * res).clamp(0, 1)


def render_shapes(index, res, seed=0, max_res=32):
    """Render shapes images: (float images (B, 3, res, res) in [-1, 1], factors dict)."""
    f = shapes_factors(index, seed)
    return render_factors(f, res, max_res), f


def render_factors(f, res, max_res=32):
    """Render images (B, 3, res, res) in [-1, 1] from a factors dict (as shapes_factors returns), as
    the data set of a run that grows to max_res sees them (which decides the stripes' scale)."""
    cov = _coverage(f['shape'], f['x'], f['y'], f['size'], res)[:, None]
    if max_res >= FINE_STRIPES_FROM:
        if res > max_res:
            raise ValueError(f'shapes grown to {max_res}x{max_res} has no {res}x{res} images')
        line = 1.0 - 2.0 * (torch.arange(res) % 2).float()             # +1, -1, +1, ... per pixel
        sign = torch.where(f['phase'] < 0.5, 1.0, -1.0)[:, None, None] * float(res == max_res)
        stripes = sign * torch.where(f['texture'][:, None, None] == 0, line[None, :, None], line[None, None, :])
    else:
        t = (torch.arange(res, dtype=torch.float32) + 0.5) / res
        along = torch.where(f['texture'][:, None, None] == 0,
                            (t[None, :, None] - f['y'][:, None, None]).expand(-1, res, res),
                            (t[None, None, :] - f['x'][:, None, None]).expand(-1, res, res))
        # a sinusoid box-filtered over the pixel is the sinusoid times sinc: exact anti-aliasing
        stripes = torch.sin(2 * math.pi * (STRIPE_FREQ * along + f['phase'][:, None, None]))
        stripes = stripes * float(np.sinc(STRIPE_FREQ / res))
    obj = f['color'][:, :, None, None] + STRIPE_AMP * stripes[:, None]
    img = f['background'][:, :, None, None] * (1 - cov) + obj * cov
    return img * 2 - 1


def estimate_factors(images):
    """Recover the shapes factors from images (B, 3, res, res) in [-1, 1], analytically.

    Background: the median of the border; coverage: each pixel's projection on the background ->
    object colour axis; position: the coverage centroid; size: sqrt(area / pi); class: the best
    matching rendered silhouette at that position and size; colours: means over the object's
    interior and the background; texture: stripes across y or across x, from the object's
    luminance gradients (meaningful from 16x16 up, where the stripes are resolved).
    """
    x = (images.float() + 1) / 2
    b, _, res, _ = x.shape
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
    bg = border.median(dim=2).values                                      # (B, 3)
    far = (x - bg[:, :, None, None]).norm(dim=1) > 0.3                     # (B, H, W) object pixels
    # interior: object pixels whose 3x3 neighbourhood is all object (no anti-aliased edge)
    inner = -F.max_pool2d(-far[:, None].float(), 3, 1, 1)[:, 0] > 0.5
    inner = torch.where(inner.flatten(1).any(1)[:, None, None], inner, far)
    w = inner.float()[:, None]
    color = (x * w).sum((2, 3)) / w.sum((2, 3)).clamp(min=1)
    axis = color - bg
    cov = ((x - bg[:, :, None, None]) * axis[:, :, None, None]).sum(1) / (axis * axis).sum(1)[:, None, None]
    cov = cov.clamp(0, 2)                    # not at 1: the stripes swing +- around it, average 1
    area = cov.sum((1, 2)) / res ** 2
    t = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    cx = (cov * t[None, None, :]).sum((1, 2)) / (area * res ** 2)
    cy = (cov * t[None, :, None]).sum((1, 2)) / (area * res ** 2)
    size = torch.sqrt(area / math.pi)
    masks = torch.stack([_coverage(torch.full((b,), k), cx, cy, size, res) for k in range(3)], 1)
    shape = (masks - cov.clamp(0, 1)[:, None]).abs().sum((2, 3)).argmin(1)
    lum = x.mean(1)
    gx = (lum[:, :, 1:] - lum[:, :, :-1]).abs() * (inner[:, :, 1:] & inner[:, :, :-1])
    gy = (lum[:, 1:, :] - lum[:, :-1, :]).abs() * (inner[:, 1:, :] & inner[:, :-1, :])
    texture = (gx.sum((1, 2)) > gy.sum((1, 2))).long()      # strong change across x: vertical stripes
    return dict(shape=shape, x=cx, y=cy, size=size, color=color, background=bg, texture=texture)


# Tolerances within which estimate_factors recovers each factor from clean renders (README has the
# measured rates): exact classes, position and size in image widths, colours per channel in [0, 1].
FACTOR_TOLERANCE = dict(shape=0, texture=0, x=0.02, y=0.02, size=0.01, color=0.05, background=0.02)


def factor_errors(estimated, true):
    """Per image: True where each factor is within FACTOR_TOLERANCE (dict of (B,) bool tensors)."""
    out = {}
    for k, tol in FACTOR_TOLERANCE.items():
        diff = (estimated[k].float() - true[k].float()).abs()
        out[k] = (diff.amax(1) if diff.dim() == 2 else diff) <= tol
    return out


# ---------------------------------------------------------------------------------------------
# Sources: one object per data set and split, handing out uint8 images at any resolution

class ShapesSource:
    """The embedded default: rendered on the fly, deterministic from (seed, index); max_res is the
    run's last resolution (from 64 on the stripes are a fine-scale factor, FINE_STRIPES_FROM)."""
    name = 'shapes'

    SPLITS = {'train': (0, SHAPES_TRAIN), 'test': (SHAPES_TRAIN, SHAPES_TEST),
              'report': (SHAPES_TRAIN + SHAPES_TEST, SHAPES_REPORT)}

    def __init__(self, split='train', seed=0, max_res=32):
        self.offset, self.n = self.SPLITS[split]
        self.seed, self.max_res = seed, max_res

    def __len__(self):
        return self.n

    def load_batch(self, indices, res):
        img, _ = render_shapes(torch.as_tensor(indices, dtype=torch.int64) + self.offset, res, self.seed, self.max_res)
        return _to_uint8(img)

    def factors(self, indices):
        return shapes_factors(torch.as_tensor(indices, dtype=torch.int64) + self.offset, self.seed)


def _to_uint8(img):
    return ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_float(x):
    """uint8 images (0..255), as every source hands them out -> float in [-1, 1], the networks' range."""
    return x.float().div(127.5).sub(1)


def open_rgb(source):
    """PIL image from a path or a file-like object, as 8-bit RGB (grayscale, RGBA, 16-bit, palette),
    turned upright by its EXIF orientation (phones store portraits sideways with a rotate tag)."""
    from PIL import Image, ImageOps
    im = Image.open(source)
    im.load()
    im = ImageOps.exif_transpose(im)
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):      # 16-bit / 32-bit gray
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith('I;16') or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
        im = im.convert('RGBA')
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))   # transparent parts become white
        im = Image.alpha_composite(white, im)
    return im.convert('RGB')


def crop_resize(im, res):
    """Center-crop to a square, then resize to res (bilinear, antialiased: torchvision's default)."""
    from PIL import Image
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != res:
        im = im.resize((res, res), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_crop_resize(im, crop, res):
    """The authors' photo transform (AaltoVision/automodulator: `.tf` of the model their hubconf.py
    returns): shorter side to `crop`, centre crop to crop x crop, then resize to res (torchvision's
    bilinear, antialiased), as uint8 (3, res, res)."""
    import torchvision.transforms.functional as TF
    im = TF.center_crop(TF.resize(im, crop), crop)
    if crop != res:
        im = TF.resize(im, res)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Face alignment from five landmarks (left eye, right eye, nose, left and right mouth corner: the
# order MTCNN gives), written from the published recipes. FFHQ (Karras et al. 2019, the ffhq-dataset
# README) and CelebA-HQ (Karras et al. 2018, Appendix C) choose the same oriented square; CelebA-HQ's
# JPEG clean-up and super-resolution networks are not reproduced, so both recipes crop alike here.

ALIGNMENTS = ('ffhq', 'celebahq')


def face_square(points):
    """(5, 2) landmarks in pixels -> (centre, x, y): the crop square's centre and its half-side vectors
    to the right and down (image coordinates, y down). Centre: the eye midpoint plus 0.1 times the
    eye-to-mouth vector. Half side: max(2 x the eye distance, 1.8 x the eye-to-mouth distance). x: the
    eye line, tilted by the eye-to-mouth direction turned 90 degrees; y: x turned 90 degrees."""
    p = np.asarray(points, np.float64).reshape(5, 2)
    eyes, mouth = (p[0] + p[1]) / 2, (p[3] + p[4]) / 2
    eye_to_eye, eye_to_mouth = p[1] - p[0], mouth - eyes
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    x *= max(2.0 * np.hypot(*eye_to_eye), 1.8 * np.hypot(*eye_to_mouth)) / np.hypot(*x)
    return eyes + 0.1 * eye_to_mouth, x, np.array([-x[1], x[0]])


def _reflect(index, n):
    """Indices mirrored into 0..n-1 (..., 2, 1, 0, 1, 2, ..., n-2, n-1, n-2, ...)."""
    period = 2 * (n - 1) if n > 1 else 1
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def align_face(im, points, res=256):
    """PIL image + five landmarks -> the aligned res x res face (PIL RGB). The oriented square of
    face_square is sampled with supersampling (ceil(side / res) bilinear samples per pixel and axis,
    averaged, at most 8). Where it leaves the image, the image is mirrored at its border and blurred
    the more the farther from the border (Gaussian of 2% of the side, in full 10% of the side out)."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter
    centre, x, y = face_square(points)
    side = 2 * np.hypot(*x)
    corners = centre + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) @ np.stack([x, y])
    x0, y0 = np.floor(corners.min(0)).astype(int) - 2
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 3
    w, h = im.size
    cols, rows = np.arange(x0, x1), np.arange(y0, y1)
    a = np.asarray(im.convert('RGB'), np.float32)[_reflect(rows, h)][:, _reflect(cols, w)]   # mirrored past the border
    out_x = np.maximum(np.maximum(-cols, cols - (w - 1)), 0)
    out_y = np.maximum(np.maximum(-rows, rows - (h - 1)), 0)
    reach = np.maximum(out_y[:, None], out_x[None, :])                  # pixels beyond the image, 0 inside
    if reach.max() > 0:
        blurred = gaussian_filter(a, sigma=(max(1.0, 0.02 * side),) * 2 + (0,))
        weight = np.clip(reach / (0.1 * side), 0, 1)[..., None]
        a = a + (blurred - a) * weight
    ss = int(min(8, max(1, math.ceil(side / res))))
    t = torch.linspace(-1 + 1 / (res * ss), 1 - 1 / (res * ss), res * ss, dtype=torch.float64)
    pts = (torch.from_numpy(centre - np.array([x0, y0]))[None, None] + t[None, :, None] * torch.from_numpy(x)
           + t[:, None, None] * torch.from_numpy(y))                   # (res*ss, res*ss, 2) in the crop's pixels
    size = torch.tensor([a.shape[1], a.shape[0]], dtype=torch.float64)
    grid = ((pts + 0.5) / size * 2 - 1).float()[None]
    img = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]
    sampled = F.grid_sample(img, grid, mode='bilinear', padding_mode='border', align_corners=False)
    face = F.avg_pool2d(sampled, ss)[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(face)


def list_images(root):
    """All image files under root, sorted by relative path (the order that splits rely on)."""
    if not root:
        raise ValueError('this data set needs --data_root=PATH, the folder that holds the images')
    if not os.path.isdir(root):
        raise FileNotFoundError(f'data_root {root!r} is not a directory; pass --data_root=PATH to a '
                                f'folder of images ({", ".join(IMAGE_EXTS)})')
    files = []
    for dirpath, dirnames, names in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
    if not files:
        raise ValueError(f'no images ({", ".join(IMAGE_EXTS)}) found under {root!r}')
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def _cache_dir(root, cache_dir):
    """Where a folder's resolution caches live: cache_dir, else root/.automodulator_cache when
    writable, else ~/.cache/automodulator/<hash of root>."""
    if cache_dir:
        return cache_dir
    here = os.path.join(root, '.automodulator_cache')
    if os.access(root, os.W_OK):
        return here
    digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser('~/.cache/automodulator'), digest)


def build_workers(n_items):
    """Processes for a one-time build (a cache, a resize): every core this process may use; none
    for a small folder, where starting a pool costs more than it saves."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return cores if n_items >= 256 and cores > 1 else 0


def progress_text(what, done, total, t0):
    """'what: [#####.....] 50% 35,000/70,000, 512/s, 1.1 min left' for a long build."""
    rate = done / max(time.time() - t0, 1e-9)
    bar = '#' * int(20 * done / max(total, 1))
    left = (total - done) / rate / 60 if rate > 0 else float('inf')
    return f'{what}: [{bar:<20}] {done / max(total, 1):4.0%} {done:,}/{total:,}, {rate:.0f}/s, {left:.1f} min left'


def temporary(path):
    """A name beside `path` that no other process on any machine writes to (host and pid)."""
    return f'{path}.{socket.gethostname()}.{os.getpid()}.tmp'


class BuildLock:
    """One builder per cache folder: the first process to take the lock builds, the others wait on
    the lock (not on the process group), showing the builder's progress line, then find the cache
    complete. With node-local --cache_dir that is one builder per node. Where the platform has no
    flock (Windows) there is no lock: run one process there."""

    WAIT_LINE_EVERY = 10.0     # seconds between the waiting process's lines

    def __init__(self, folder, log):
        self.path, self.log, self.file = os.path.join(folder, 'build.lock'), log, None
        self.progress = os.path.join(folder, 'build.progress')

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.file = open(self.path, 'a+')
        last = time.time()
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.time() - last >= self.WAIT_LINE_EVERY:
                    last = time.time()
                    self.log(f'waiting for another process to finish the cache in {os.path.dirname(self.path)} '
                             f'({self.builder_progress()})')
                time.sleep(0.2)

    def builder_progress(self):
        try:
            with open(self.progress) as f:
                return f.read().strip() or 'starting'
        except OSError:
            return 'starting'

    def report(self, text):
        """The builder's progress line, for the processes that wait."""
        with open(temporary(self.progress), 'w') as f:
            f.write(text)
        os.replace(temporary(self.progress), self.progress)

    def __exit__(self, *exc):
        if os.path.exists(self.progress):
            os.remove(self.progress)
        if self.file is not None:
            self.file.close()                       # releases the lock
        return False


def size_text(n):
    """Bytes as people read them: 960 B, 3.2 MiB, 294.1 GiB."""
    for unit, scale in (('TiB', 2 ** 40), ('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
        if n >= scale:
            return f'{n / scale:.1f} {unit}'
    return f'{n} B'


def check_space(folder, need, what):
    """Fail before a build that the disk cannot hold, naming the size and the setting to move it."""
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(f'{what} needs {size_text(need)} in {folder} but only {size_text(free)} are free; point '
                      f'--cache_dir at a larger disk')


def _decode_all(item):
    """Worker: decode one image (a file's path, or an lmdb's (path, key)) and return it at every
    requested resolution, or the error text."""
    where, resolutions = item
    try:
        im = open_rgb(where if isinstance(where, str) else io.BytesIO(lmdb_value(*where)))
        return [crop_resize(im, r).numpy() for r in resolutions], None
    except Exception as e:                                      # noqa: BLE001 (any decoder failure)
        return None, f'{type(e).__name__}: {e}'


class ResolutionCache:
    """Images decoded once into uint8 memmaps, one per resolution ((n, 3, r, r) in .npy format,
    named RxR.u8), and index.json, written last, which marks the cache complete: `files` says what
    was cached (a folder's file list, an lmdb's selected keys), `valid` which of those items
    decoded (the rows, in order), `skipped` the names of those that did not. One builder per
    folder (BuildLock); unreadable items are skipped with a warning that names each, and the build
    stops only when they are more than MAX_BAD_FRACTION of at least MIN_FILES_FOR_BAD_RULE."""

    def __init__(self, folder, resolutions):
        self.dir, self.resolutions = folder, resolutions
        self.index_path = os.path.join(folder, 'index.json')
        self.paths = {r: os.path.join(folder, f'{r}x{r}.u8') for r in resolutions}
        self._maps = {}

    def complete(self, files):
        """(valid, skipped) of a finished cache of exactly `files`, else None."""
        if not os.path.exists(self.index_path):
            return None
        with open(self.index_path) as f:
            index = json.load(f)
        if (index.get('files') == files and index.get('version') == CACHE_VERSION
                and all(os.path.exists(p) for p in self.paths.values())):
            return index['valid'], index['skipped']
        return None

    def build(self, files, items, name_of, what, log):
        """(valid, skipped), building the cache first unless a complete one of `files` exists.
        items: the n (where, resolutions) for _decode_all, in row order; name_of(i): item i as the
        warnings and `skipped` name it; what: the source, as the progress lines name it."""
        done = self.complete(files)
        if done:
            return done
        os.makedirs(self.dir, exist_ok=True)
        with BuildLock(self.dir, log) as lock:
            done = self.complete(files)      # another process may have built it while this one waited
            if done:
                return done
            if os.path.exists(self.index_path):
                log(f'cache in {self.dir} is stale (files, resolutions or decoding changed): rebuilding')
            n = len(items)
            need = n * sum(3 * r * r for r in self.resolutions)
            log(f'caching {n:,} images of {what} at {self.resolutions[0]}..{self.resolutions[-1]} px in {self.dir}: '
                f'{size_text(need)} (--cache_dir moves it)')
            check_space(self.dir, need, 'the cache')
            tmp = {r: temporary(p) + '.npy' for r, p in self.paths.items()}
            try:
                valid, bad = self._decode_into(tmp, items, name_of, what, lock, log)
                for r, p in self.paths.items():     # rows [0, len(valid)) hold the images that decoded
                    os.replace(tmp[r], p)
                with open(temporary(self.index_path), 'w') as f:     # written last: it marks the cache complete
                    json.dump(dict(files=files, valid=valid, skipped=bad, version=CACHE_VERSION), f)
                os.replace(temporary(self.index_path), self.index_path)
            finally:                             # an error or Ctrl-C leaves no temporary file behind
                for path in [*tmp.values(), temporary(self.index_path)]:
                    if os.path.exists(path):
                        os.remove(path)
        return valid, bad

    def _decode_into(self, tmp, items, name_of, what, lock, log):
        """Decode every item into the memmaps `tmp`, on every core; returns (positions that decoded,
        skipped names)."""
        n = len(items)
        maps = {r: np.lib.format.open_memmap(p, 'w+', np.uint8, (n, 3, r, r)) for r, p in tmp.items()}
        valid, bad = [], []
        t0 = last = time.time()
        for i, (arrays, err) in enumerate(_imap(_decode_all, items, build_workers(n))):
            if err is not None:
                bad.append(name_of(i))
                warnings.warn(f'skipping unreadable image {bad[-1]} of {what} ({err}); {len(bad)} skipped so far')
                if n >= MIN_FILES_FOR_BAD_RULE and len(bad) > MAX_BAD_FRACTION * n:
                    raise ValueError(f'more than {MAX_BAD_FRACTION:.0%} of the {n} images of {what} '
                                     f'cannot be read ({len(bad)} so far, e.g. {bad[:3]}); fix or remove them')
                continue
            for r, a in zip(self.resolutions, arrays):
                maps[r][len(valid)] = a
            valid.append(i)
            if time.time() - last > 10:
                last = time.time()
                line = progress_text(f'caching {what}', i + 1, n, t0)
                log(line)
                lock.report(line)
        for m in maps.values():
            m.flush()
        del maps
        if not valid:
            raise ValueError(f'none of the {n} images of {what} could be read')
        log(f'cached {len(valid)} images of {what} at {self.resolutions[0]}..{self.resolutions[-1]} px '
            f'in {self.dir} ({time.time() - t0:.1f}s, {len(bad)} unreadable skipped'
            + (f': {", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""})' if bad else ')'))
        return valid, bad

    def read(self, row, res):
        if res not in self._maps:       # opened lazily, so each DataLoader worker maps its own
            self._maps[res] = np.load(self.paths[res], mmap_mode='r')
        return torch.from_numpy(np.array(self._maps[res][row]))

    def __getstate__(self):             # memmaps do not pickle; workers reopen them
        return {**self.__dict__, '_maps': {}}


class FolderSource:
    """Images under a folder, cached once (ResolutionCache) at every resolution 4..max_res, with a
    progress line, and reused afterwards. `files` is the sorted list; `indices` picks the files to
    use; `skipped` lists the files that could not be read.
    """
    name = 'folder'

    def __init__(self, root, max_res, indices=None, cache_dir='', log=print):
        self.root, self.max_res = root, max_res
        self.resolutions = [4 * 2 ** i for i in range(int(math.log2(max_res)) - 1)]
        self.files = list_images(root)
        self.cache = ResolutionCache(_cache_dir(root, cache_dir), self.resolutions)
        rel = [os.path.relpath(f, root) for f in self.files]
        self.valid, self.skipped = self.cache.build(rel, [(f, self.resolutions) for f in self.files],
                                                    lambda i: rel[i], root, log)
        self.indices = np.arange(len(self.valid)) if indices is None else self._select(indices)

    def _select(self, wanted):
        """Map file positions to rows of the cache (files that failed to decode drop out)."""
        row_of = {f: r for r, f in enumerate(self.valid)}
        return np.array([row_of[i] for i in wanted if i in row_of], dtype=np.int64)

    def __len__(self):
        return len(self.indices)

    def load_batch(self, indices, res):
        return torch.stack([self.load(i, res) for i in indices])

    def load(self, i, res):
        return self.cache.read(self.indices[i], res)


def _worker_signals(*_):
    """In a worker process: Ctrl-C is the parent's to handle, SIGTERM ends the worker (a forked worker
    would otherwise inherit the training loop's handlers and outlive its pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _imap(fn, items, num_workers):
    """map() in order, in a process pool (START_METHOD) when num_workers > 0."""
    if num_workers <= 0:
        yield from map(fn, items)
        return
    with mp.get_context(START_METHOD).Pool(num_workers, initializer=_worker_signals) as pool:
        yield from pool.imap(fn, items, chunksize=16)


class LmdbSource:
    """LSUN's official lmdb (keys: image ids, values: webp/jpeg bytes), read with the lmdb package.

    The key list is scanned once and cached as <lmdb dir>_keys.npy next to the data (else in
    ~/.cache/automodulator), so a restart does not rescan millions of keys. Each read decodes its
    record (bench.py's data_lsun_record, a 340x256 webp photo: 1.7 ms on a 2-vCPU EPYC, whatever the
    resolution) unless cache_upto() has resized the selected records once into a ResolutionCache:
    reads at those resolutions come from it (9 us an image at 64 px).
    """
    name = 'lsun'

    def __init__(self, path, indices=None, cache_dir='', log=print):
        try:
            import lmdb  # noqa: F401 (checked here so the error comes early and clear)
        except ImportError:
            raise ImportError('LSUN lmdb files need the lmdb package: pip install lmdb '
                              '(or export the images to a folder and use --dataset=folder)') from None
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, 'data.mdb')):
            raise FileNotFoundError(f'{path!r} is not an lmdb directory (no data.mdb); pass --data_root='
                                    f'the LSUN folder, e.g. .../bedroom_train_lmdb')
        self.path = path
        self.keys = self._keys(cache_dir, log)
        self.indices = np.arange(len(self.keys)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.cache = None

    def _keys(self, cache_dir, log):
        import lmdb
        base = os.path.abspath(self.path).rstrip('/')
        cached = base + '_keys.npy'
        if not os.access(os.path.dirname(base), os.W_OK) or cache_dir:
            name = hashlib.sha1(base.encode()).hexdigest()[:12] + '_keys.npy'
            cached = os.path.join(cache_dir or os.path.expanduser('~/.cache/automodulator'), name)
        if os.path.exists(cached):
            return np.load(cached, mmap_mode='r')
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        with BuildLock(os.path.dirname(cached), log):        # one scan per node, the others wait
            if os.path.exists(cached):
                return np.load(cached, mmap_mode='r')
            log(f'scanning the keys of {self.path} once (cached in {cached})')
            env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)
            with env.begin(write=False) as txn:
                keys = list(txn.cursor().iternext(keys=True, values=False))
            env.close()
            if not keys:
                raise ValueError(f'the lmdb at {self.path} holds no records')
            arr = np.array(keys, dtype=f'S{max(len(k) for k in keys)}')
            tmp = temporary(cached) + '.npy'
            try:
                np.save(tmp, arr)
                os.replace(tmp, cached)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return np.load(cached, mmap_mode='r')

    def cache_upto(self, res, max_res, cache_dir, log):
        """Resize the selected records once, on every core, into a ResolutionCache at 4..res px
        (in cache_dir, else <lmdb dir>/.automodulator_cache); records that do not decode drop out
        of `indices`. A different selection (--max_images, the split) rebuilds it."""
        resolutions = [4 * 2 ** i for i in range(int(math.log2(min(res, max_res))) - 1)]
        self.cache = ResolutionCache(_cache_dir(self.path, cache_dir), resolutions)
        keys = self.keys[self.indices]
        files = [os.path.abspath(self.path), len(keys), hashlib.sha1(keys.tobytes()).hexdigest()]
        items = [((self.path, bytes(k)), resolutions) for k in keys]
        valid, _ = self.cache.build(files, items, lambda i: repr(bytes(keys[i])), f'the lmdb {self.path}', log)
        self.indices = self.indices[valid]

    def __len__(self):
        return len(self.indices)

    def load_batch(self, indices, res):
        return torch.stack([self.load(i, res) for i in indices])

    def load(self, i, res):
        if self.cache is not None and res in self.cache.paths:
            return self.cache.read(i, res)           # row i holds indices[i]
        for step in range(len(self.indices)):        # a corrupt record: warn and take the next one
            key = bytes(self.keys[self.indices[(i + step) % len(self.indices)]])
            try:
                return crop_resize(open_rgb(io.BytesIO(lmdb_value(self.path, key))), res)
            except Exception as e:                    # noqa: BLE001
                warnings.warn(f'skipping unreadable LSUN record {key!r} in {self.path} ({type(e).__name__}: {e})')
        raise ValueError(f'no record of {self.path} could be decoded')


def lmdb_value(path, key):
    """The bytes under `key` in the lmdb at `path`, through one read-only environment per path and
    process (lmdb allows no more; a forked worker opens its own)."""
    import lmdb
    env_key = (os.getpid(), path)
    if env_key not in _LMDB_ENVS:
        _LMDB_ENVS[env_key] = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False,
                                        max_readers=64)
    with _LMDB_ENVS[env_key].begin(write=False) as txn:
        return txn.get(key)


_LMDB_ENVS = {}


def _split_by_count(n, n_train, split):
    """Indices: the first n_train for train, the rest for test."""
    return np.arange(n_train) if split == 'train' else np.arange(n_train, n)


def _quiet(*args, **kwargs):
    pass


def open_split(cfg, split='train', log=None):
    """The source of one split of the data set that the settings `cfg` name: a run's config (train.py's
    settings, or the `config` a checkpoint records; absent keys take train.py's meaning). split:
    'train', 'test' or, for shapes, 'report'; log: where cache and key-scan progress goes (None: nowhere).

    folder: sorted files, with a held-out `test_fraction` drawn by a fixed permutation (seed 0, not
    the run's seed, so every run holds out the same files); ffhq: file order, first 60,000 train and
    last 10,000 test (the paper); celebahq: file order, first 27,000 train, last 3,000 test (the
    paper's 27k/3k; the authors split by CelebA index instead); lsun_bedroom: the official train lmdb
    and the val lmdb beside it for test; lsun_cars: key order, first 4,968,695 train, the rest test.
    max_images > 0 keeps the first that many of the train split; lsun_cache_res > 0 resizes LSUN's
    train split once to 4..that many px (LmdbSource.cache_upto).
    """
    dataset, data_root = cfg.get('dataset', 'shapes'), cfg.get('data_root', '')
    max_res, seed, test_fraction = cfg.get('max_res', 256), cfg.get('seed', 0), cfg.get('test_fraction', 0.0)
    cache_dir, log = cfg.get('cache_dir', ''), log or _quiet
    limit = cfg.get('max_images', 0) if split == 'train' else 0
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')
    if split not in ('train', 'test') and not (dataset == 'shapes' and split == 'report'):
        raise ValueError(f"split must be 'train' or 'test' (shapes also 'report'), got {split!r}")
    if dataset == 'shapes':
        return ShapesSource(split, seed, max_res)
    if dataset.startswith('lsun'):
        return _open_lsun(dataset, data_root, split, limit, cfg.get('lsun_cache_res', 0), max_res, cache_dir, log)
    files = list_images(data_root)
    n = len(files)
    if dataset == 'folder':
        perm = np.random.default_rng(0).permutation(n)
        n_test = int(round(n * test_fraction))
        wanted = np.sort(perm[:n_test] if split == 'test' else perm[n_test:])
    else:
        train, test = (60_000, 10_000) if dataset == 'ffhq' else (27_000, 3_000)
        wanted = _split_by_count(n, _paper_train_count(n, train, test, dataset, log), split)
    if len(wanted) == 0:
        raise ValueError(f'the {split} split of {data_root} is empty ({n} images, test_fraction={test_fraction})')
    return FolderSource(data_root, max_res, wanted[:limit or None].tolist(), cache_dir, log)


def _open_lsun(dataset, data_root, split, limit, cache_res, max_res, cache_dir, log):
    """open_split for LSUN: the split's records (the first `limit` of them where limit > 0), resized
    once into a cache up to cache_res px for the train split where cache_res > 0."""
    if not data_root:
        raise ValueError(f'{dataset} needs --data_root=PATH to the LSUN lmdb folder')
    if dataset == 'lsun_bedroom':
        path = data_root if split == 'train' else data_root.rstrip('/').replace('_train_lmdb', '_val_lmdb')
        if split == 'test' and path == data_root.rstrip('/'):
            raise ValueError(f'the LSUN bedroom test split is the official val lmdb beside {data_root} '
                             f'(bedroom_val_lmdb); name the train one bedroom_train_lmdb')
        src = LmdbSource(path, cache_dir=cache_dir, log=log)
    else:
        src = LmdbSource(data_root, cache_dir=cache_dir, log=log)
        n_train = _paper_train_count(len(src), 4_968_695, 552_061, dataset, log)
        src.indices = _split_by_count(len(src), n_train, split)
    src.indices = src.indices[:limit or None]
    if split != 'train':
        return src
    if cache_res:
        src.cache_upto(cache_res, max_res, cache_dir, log)
    else:
        upto = [4 * 2 ** i for i in range(int(math.log2(min(64, max_res))) - 1)]
        log(f'{dataset}: each read decodes its record (milliseconds a core); --lsun_cache_res=64 resizes '
            f'{len(src):,} images once to 4..64 px ({size_text(len(src) * sum(3 * r * r for r in upto))}), '
            f'--max_images=N takes the first N')
    return src


def _paper_train_count(n, train, test, dataset, log):
    if n == train + test:
        return train
    n_train = int(round(n * train / (train + test)))
    log(f'warning: {dataset} has {train + test:,} images in the paper, found {n:,}; '
        f'using the same proportion: first {n_train:,} train, last {n - n_train:,} test')
    return n_train


# ---------------------------------------------------------------------------------------------
# Sampling, loading and the training batch

class ShardSampler(torch.utils.data.Sampler):
    """An endless stream of index batches for one rank.

    One global stream of indices for all ranks: epoch e is a permutation of range(n) seeded by
    (seed, e). Each step takes the next batch * world indices, and rank r keeps the r-th chunk of
    `batch`: ranks never share an image, and N processes together read exactly what one process with
    an N times larger batch would. `start` counts the global samples already drawn, so a resumed run
    continues the very same stream.
    """

    def __init__(self, n, batch, rank=0, world=1, seed=0, start=0):
        if n < batch * world:
            raise ValueError(f'{n} images are fewer than one global batch (--batch_size={batch} x {world} '
                             f'process{"es" * (world > 1)}); pass --batch_size={max(1, n // world)} or less, or add images')
        self.n, self.batch, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start

    def permutation(self, epoch):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self):
        epoch, offset = divmod(self.start, self.n)
        perm = self.permutation(epoch)
        size = self.batch * self.world
        while True:
            out = []
            while len(out) < size:
                take = perm[offset:offset + size - len(out)]
                out += take.tolist()
                offset += len(take)
                if offset == self.n:
                    epoch, offset = epoch + 1, 0
                    perm = self.permutation(epoch)
            yield out[self.rank * self.batch:(self.rank + 1) * self.batch]


class _AtResolution(torch.utils.data.Dataset):
    def __init__(self, source, res):
        self.source, self.res = source, res

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source.load(i, self.res)


def make_loader(source, res, batch, rank=0, world=1, seed=0, start=0, num_workers=0, pin_memory=False):
    """An iterator of uint8 batches (batch, 3, res, res) from this rank's shard, endless."""
    sampler = ShardSampler(len(source), batch, rank, world, seed, start)
    if isinstance(source, ShapesSource):            # rendered in bulk, faster than any worker pool
        return (source.load_batch(idx, res) for idx in sampler)
    # Its own generator: every iter(DataLoader) draws a worker base seed, which from the global
    # generator would shift the layer noise's stream and make a resumed run differ from a straight one.
    loader = torch.utils.data.DataLoader(_AtResolution(source, res), batch_sampler=sampler,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         prefetch_factor=4 if num_workers else None,
                                         generator=torch.Generator().manual_seed(seed),
                                         multiprocessing_context=START_METHOD if num_workers else None,
                                         worker_init_fn=_worker_signals if num_workers else None)
    return iter(loader)


def fade(x, alpha):
    """The real images' fade-in: alpha x + (1 - alpha) up2(down2(x)), as the decoder blends."""
    if alpha >= 1:
        return x
    low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode='nearest')
    return torch.lerp(low, x, alpha)


def prepare_batch(x, alpha=1.0, device='cpu', generator=None, flip=True, pairs=False, rank=0, world=1):
    """uint8 (B, 3, res, res) -> float [-1, 1] on device: random horizontal flips (drawn from
    `generator` on the CPU for the global batch, this rank's slice kept, so runs reproduce on any
    device and any number of processes), the fade-in blend, and with pairs=True the second half of
    the batch replaced by mirrors of the first (x, flip(x)) for the invariance loss."""
    x = to_float(x.to(device, non_blocking=True))
    b = x.shape[0]
    if flip:
        mirror = (torch.rand(b * world, generator=generator)[rank * b:(rank + 1) * b] < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    if pairs:
        if x.shape[0] % 2:
            raise ValueError(f'pairs need an even batch, got {x.shape[0]}')
        half = x[:x.shape[0] // 2]
        x = torch.cat([half, half.flip(-1)])
    return fade(x, alpha)
