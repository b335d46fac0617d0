"""Pictures from a trained automodulator: every application of the paper on real inputs.

    python sample.py --mix coarse              # style mixing (Fig. 4a): A's image, B's coarse blocks
    python sample.py --mode=recon              # inputs over their reconstructions (Fig. 9-10)
    python sample.py --mode=random --n=16      # samples from the prior (Fig. 6-8)
    python sample.py --mode=cond --cond=coarse # the input fixes the coarse blocks, random the rest (Fig. 11)
    python sample.py --mode=interp             # 4 encoded images in the corners, slerp between (Fig. 12)
    python sample.py --mode=invariance         # pose (blocks 0-1) from the top row (Fig. 5)
    python sample.py --mix 2:4 --inputs=faces/ --ckpt=ffhq.pt
    python sample.py --ckpt=ffhq256 --mix coarse --inputs=my_aligned_faces/   # the authors' model
    python sample.py --mode=encode --inputs=photos/ --latents=z.pt   # {file name: latent}, for your own tools
    python sample.py --mode=decode --latents=z.pt --singles=True     # draw them back (per-block latents too)
    python sample.py --mode=direction --positive=smiling/ --negative=neutral/ --out=smile.pt
    python sample.py --mode=edit --direction=smile.pt --inputs=faces/ --mix=all --strength="(0, 1, 2)"
    python sample.py --mode=project --inputs=faces/ --steps=100   # encoder, then optimisation (Fig. 15)
    python sample.py --mode=align --inputs=photos/ --out=aligned/    # your photos' faces, cropped as FFHQ's
    python sample.py --ckpt=ffhq256 --mix coarse --inputs=photos/ --align=ffhq   # align first, then mix

Reads out_dir/ckpt.pt (or --ckpt), decodes with the EMA decoder at the resolution the checkpoint
reached, and writes one PNG grid into out_dir (its path is printed). Real inputs default to the
held-out test split of the data set the checkpoint was trained on; --inputs takes a folder or
comma-separated files, center-cropped and resized as in training (for the authors' released models,
their own resize -> centre crop -> resize). Face models expect aligned faces, as FFHQ and CelebA-HQ
are: --align finds five landmarks per face (MTCNN, or --landmarks) and crops as they were cropped.
The functions are importable: encode / mix / decode without the CLI.
"""
import json
import os
import time
import warnings

import numpy as np

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

import data
import losses
import model
from configurator import ANY, PATH, PATHS, Rule, above, at_least, check, clean, configure, integer, matches, one_of

_before = set(globals())
mode = 'mix'                # mix | recon | random | cond | interp | invariance | encode | decode | direction | edit | project
mix = 'coarse'              # mix: blocks that take B's latents; edit: blocks moved: coarse (4-8) | intermediate (16-32) | fine (64+) | a:b | all
cond = 'coarse'             # cond: blocks the input fixes, random latents drive the rest
out_dir = 'out'             # where ckpt.pt is read and the grid is written
ckpt = ''                   # checkpoint file ('' = out_dir/ckpt.pt), an authors' *_state.pth, or ffhq256 etc.
inputs = ''                 # real images: a folder or comma-separated files ('' = the data set's test split)
inputs_b = ''               # mix: the top row's sources ('' = the images after the first n of inputs)
n = 6                       # sources per row / column; the first n inputs in recon, cond, edit, project; samples in random
draws = 6                   # cond: random draws per input
steps = 0                   # interp: grid size (0 = 7); project: optimisation steps (0 = 100)
seed = 0                    # random latents
noise = False               # decode with layer noise (off: deterministic)
ema = True                  # use the EMA decoder
zoom = 0                    # enlarge tiles by this factor (0 = auto: tiles of at least 64 px)
singles = False             # also write every tile as its own PNG under out_dir/<mode>/
out = ''                    # output file ('' = out_dir/<mode>_<detail>.png)
latents = ''                # encode, project: where to write {file name: latent}; decode: what to draw ('' = out_dir/latents.pt)
positive = ''               # direction: images with the attribute (a folder or files) ...
negative = ''               # ... and without it; the direction is the difference of their mean latents
direction = ''              # edit: a file from --mode=direction, or the authors' smile, male, dark, left, smile512-16
strength = (0.0, 0.5, 1.0, 1.5, 2.0)  # edit: steps along the direction, one column each
lpips = 1.0                 # project: weight of LPIPS (VGG) in the loss (0 = the pixel term alone, no weights needed)
pixel = 1.0                 # project: weight of the mean squared pixel error
project_lr = 0.01           # project: Adam's learning rate on the per-block latents
vgg_backbone = ''           # project: path of torchvision's vgg16-397923af.pth ('' = official URL)
lpips_vgg = ''              # project: path of LPIPS v0.1 vgg.pth ('' = official URL)
align = ''                  # align the faces of --inputs first: ffhq | celebahq ('' = as they are; --mode=align: ffhq)
res = 256                   # align: the aligned crops' size
landmarks = ''              # align: a JSON file {image name: five [x, y] points, or a list of them} instead of MTCNN
all_faces = False           # align: every face of an image, not only the largest
device = 'auto'             # auto (cuda if available) | cpu | cuda
CONFIG_KEYS = sorted(set(globals()) - _before - {'_before'})

MODES = ('mix', 'recon', 'random', 'cond', 'interp', 'invariance', 'encode', 'decode', 'direction', 'edit', 'project',
         'align')
_BLOCKS = matches(r'coarse|intermediate|fine|all|\d*:\d*', "coarse, intermediate, fine, all or a:b (block indices)")
RULES = dict(mode=one_of(*MODES), mix=_BLOCKS, cond=_BLOCKS, out_dir=PATH, ckpt=PATH, inputs=PATHS, inputs_b=PATHS,
             n=integer(1), draws=integer(1), steps=integer(0), seed=integer(0), noise=ANY, ema=ANY,
             zoom=integer(0), singles=ANY, out=PATH, latents=PATH, positive=PATHS, negative=PATHS, direction=PATH,
             strength=Rule('a tuple of numbers, e.g. (0, 1, 2)', lambda v: len(v) > 0 and all(
                 isinstance(a, (int, float)) and not isinstance(a, bool) for a in v)),
             lpips=at_least(0), pixel=at_least(0), project_lr=above(0), vgg_backbone=PATH, lpips_vgg=PATH,
             align=one_of('', *data.ALIGNMENTS), res=integer(8), landmarks=PATH, all_faces=ANY, device=ANY)


# --------------------------------------------------------------------------------------------
# Inputs

def image_paths(spec, flag='--inputs'):
    """A folder's images (sorted) or comma-separated files; `flag` is the option that gave them."""
    if os.path.isdir(spec):
        try:
            return data.list_images(spec)
        except ValueError as e:                                 # a folder without images
            raise SystemExit(f'error: {flag}: {e}') from None
    paths = [p for p in spec.split(',') if p]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing or not paths:
        raise SystemExit(f'error: {flag}: {(missing or [spec])[0]!r} is neither a folder nor a file')
    return paths


def read_images(spec, res, crop=None, flag='--inputs', faces=None):
    """Images from a folder, comma-separated files or a list of paths, as (B, 3, res, res) in [-1, 1],
    and their paths: centre crop and resize, or with `crop` the authors' resize -> crop -> resize
    (their models); with `faces` (Faces) each image's aligned faces instead, named path#faceK after
    the first. Unreadable files are skipped with a warning; none readable is an error."""
    paths = spec if isinstance(spec, list) else image_paths(spec, flag)
    images, names = [], []
    for p in paths:
        try:
            found = faces.of(p, crop or res) if faces else [(p, data.open_rgb(p))]
        except Exception as e:                                  # noqa: BLE001 (any decoder failure, a bomb)
            warnings.warn(f'skipping {p}: {type(e).__name__}: {str(e).splitlines()[0]}')
            continue
        for name, im in found:
            images.append(data.resize_crop_resize(im, crop, res) if crop else data.crop_resize(im, res))
            names.append(name)
    if not images:
        raise SystemExit(f'error: {flag}: none of the images could be read ({spec!r})')
    return data.to_float(torch.stack(images)), names


# --------------------------------------------------------------------------------------------
# Faces of your own photos: five landmarks each (MTCNN, or a file), then data.align_face

EXTRA = 'pip install -r requirements-extra.txt'


def mtcnn():
    """facenet-pytorch's MTCNN (its wheel ships the weights: it runs offline), imported only when asked for."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise SystemExit(f'error: face alignment finds landmarks with MTCNN from facenet-pytorch, which is not '
                         f'installed: {EXTRA} (or pass --landmarks=FILE)') from None
    return MTCNN(keep_all=True, device='cpu')


def read_landmarks(path):
    """{name: [(5, 2) points, ...]} from a JSON file of five [x, y] points (or a list of them) per image."""
    try:
        with open(path) as f:
            table = json.load(f)
        return {k: [np.asarray(p, np.float64).reshape(5, 2) for p in
                    (v if np.asarray(v).ndim == 3 else [v])] for k, v in table.items()}
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f'error: --landmarks={path}: expected a JSON file {{"photo.jpg": [[x, y] x 5], ...}} '
                         f'(eyes, nose, mouth corners) ({type(e).__name__})') from None


class Faces:
    """How --align finds and crops faces: `of(path, size)` -> [(name, aligned PIL image)], the largest
    face first (or alone), from the image turned upright by its EXIF orientation."""

    def __init__(self, spec, landmarks='', all_faces=False):
        self.spec, self.all_faces = spec, all_faces
        self.table = read_landmarks(landmarks) if landmarks else None
        self.detector = None if self.table is not None else mtcnn()

    def points(self, path, im):
        if self.table is not None:
            rel = latent_name(path, self.spec)
            return self.table.get(rel, self.table.get(os.path.basename(path), []))
        boxes, _, points = self.detector.detect(im, landmarks=True)
        if boxes is None:
            return []
        boxes, points = np.asarray(boxes, np.float64), np.asarray(points, np.float64)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return [points[i] for i in np.argsort(-area)]

    def of(self, path, size):
        faces = self.crops(data.open_rgb(path), size, path)
        if not faces:
            print(f'no face found in {path}: skipped' + ('' if self.detector else ' (not in --landmarks)'))
        return faces

    def crops(self, im, size, path=''):
        """[(name, aligned face)] of a PIL image (`path` names it, and finds it in --landmarks)."""
        faces = self.points(path, im)
        out = []
        for k, p in enumerate(faces if self.all_faces else faces[:1]):
            width = 2 * np.hypot(*(p[1] - p[0]))                  # a face is about twice its eye distance
            if width < 64:
                warnings.warn(f'{path}: the face is about {width:.0f} px wide, under 64: its aligned crop is blurry')
            out.append((path if k == 0 else f'{path}#face{k}', data.align_face(im, p, size)))
        return out


def faces_of(cfg, spec):
    """The Faces for --align, or None without it."""
    return Faces(spec, cfg['landmarks'], cfg['all_faces']) if cfg['align'] else None


def write_aligned(cfg):
    """--mode=align: every face of --inputs aligned to --res, as PNGs in --out (a folder)."""
    if not cfg['inputs']:
        raise SystemExit('error: --mode=align needs --inputs=FOLDER (or comma-separated files)')
    folder = cfg['out'] or os.path.join(cfg['out_dir'], 'aligned')
    faces, written = Faces(cfg['inputs'], cfg['landmarks'], cfg['all_faces']), 0
    os.makedirs(folder, exist_ok=True)
    for p in image_paths(cfg['inputs']):
        try:
            found = faces.of(p, cfg['res'])
        except Exception as e:                                  # noqa: BLE001 (any decoder failure, a bomb)
            print(f'skipping {p}: {type(e).__name__}: {str(e).splitlines()[0]}')
            continue
        stem = os.path.splitext(latent_name(p, cfg['inputs']))[0].replace(os.sep, '_')
        for k, (_, im) in enumerate(found):                   # the largest face first, then _face1, ...
            im.save(os.path.join(folder, stem + (f'_face{k}' if k else '') + '.png'))
            written += 1
    print(f'wrote {written} aligned faces ({cfg["res"]}x{cfg["res"]}, {cfg["align"] or "ffhq"}) to {folder}')
    return folder


def test_images(config, res, count):
    """The first `count` images of the held-out split of the checkpoint's data set (a folder run
    without one: its train split)."""
    split = 'test' if config.get('dataset', 'shapes') != 'folder' or config.get('test_fraction', 0) > 0 else 'train'
    source = data.open_split({'max_res': res, **config, 'num_workers': 0}, split)
    return data.to_float(source.load_batch(list(range(min(count, len(source)))), res))


# --------------------------------------------------------------------------------------------
# Grids (lists of rows of images), importable

def used_blocks(net):
    """Blocks that a decode at the checkpoint's resolution runs."""
    return net.decoder.blocks_at(net.res)


def blocks_of(net, spec):
    """A group name, 'all' or an a:b range -> range of blocks, checked against what this checkpoint uses."""
    if spec == 'all':
        return range(0, net.decoder.n_blocks)
    return model.block_range(spec, used_blocks(net), net.cfg.extra_8x8)


@torch.no_grad()
def decode_mixed(net, z_a, z_b, blocks, noise=False):
    """Decode z_a with z_b on `blocks` (a range)."""
    return net.decode(model.mix_latents(z_a, z_b, blocks, net.decoder.n_blocks), noise=noise)


@torch.no_grad()
def mix_grid(net, a, b, blocks, noise=False):
    """Fig. 4a: B sources on top, A sources on the left, cell (i, j) = A_i with B_j on `blocks`."""
    z_a, z_b = net.encode(a), net.encode(b)
    rows = [torch.cat([torch.ones_like(b[:1]), b])]
    for i in range(len(a)):
        cells = decode_mixed(net, z_a[i:i + 1].expand(len(b), -1), z_b, blocks, noise)
        rows.append(torch.cat([a[i:i + 1], cells]))
    return rows


@torch.no_grad()
def recon_grid(net, x, noise=False):
    return [x, net.reconstruct(x, noise=noise)]


@torch.no_grad()
def random_grid(net, count, seed=0, noise=False, cols=8):
    z = model.sample_prior(count, net.cfg.nz, generator=torch.Generator().manual_seed(seed)).to(net.const_device())
    images = net.decode(z, noise=noise)
    return [images[i:i + cols] for i in range(0, count, cols)]


@torch.no_grad()
def cond_grid(net, x, blocks, draws, seed=0, noise=False):
    """Fig. 11: each row an input, then draws where the input fixes `blocks` and random latents the rest."""
    g = torch.Generator().manual_seed(seed)
    z_in = net.encode(x)
    rows = []
    for i in range(len(x)):
        z_rand = model.sample_prior(draws, net.cfg.nz, generator=g).to(x.device)
        rows.append(torch.cat([x[i:i + 1], decode_mixed(net, z_rand, z_in[i:i + 1].expand(draws, -1), blocks, noise)]))
    return rows


def slerp(a, b, t):
    """Spherical interpolation between unit vectors (rows of a and b)."""
    dot = (a * b).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    out = torch.where(safe, (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.where(safe, so, 1),
                      (1 - t) * a + t * b)
    return F.normalize(out, dim=-1)


@torch.no_grad()
def interp_grid(net, corners, steps, noise=False):
    """Fig. 12: four encoded images at the corners of a steps x steps grid, slerp along both axes."""
    z = net.encode(corners)
    rows = []
    for v in torch.linspace(0, 1, steps):
        left, right = slerp(z[0:1], z[2:3], v), slerp(z[1:2], z[3:4], v)
        zs = torch.cat([slerp(left, right, u) for u in torch.linspace(0, 1, steps)])
        rows.append(net.decode(zs, noise=noise))
    return rows


LABEL_HEIGHT = 14              # px of the strip above a grid whose columns have labels


def save_grid(rows, path, res, zoom=0, labels=None):
    """Rows of (k, 3, res, res) images in [-1, 1] -> one PNG, tiles enlarged (nearest) by zoom; with
    `labels`, one text per column in a strip above."""
    cols = max(len(r) for r in rows)
    blank = -torch.ones_like(rows[0][:1])
    tiles = torch.cat([torch.cat([r, blank.expand(cols - len(r), -1, -1, -1)]) for r in rows])
    zoom = zoom or max(1, 64 // res)
    tiles = F.interpolate(tiles.clamp(-1, 1), scale_factor=zoom, mode='nearest') if zoom > 1 else tiles.clamp(-1, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(tiles.add(1).div(2), path, nrow=cols, padding=2)
    if labels:
        from PIL import Image, ImageDraw
        grid = Image.open(path).convert('RGB')
        out = Image.new('RGB', (grid.width, grid.height + LABEL_HEIGHT), 'white')
        out.paste(grid, (0, LABEL_HEIGHT))
        draw, step = ImageDraw.Draw(out), tiles.shape[-1] + 2
        for j, text in enumerate(labels):
            draw.text((2 + j * step + 2, 1), str(text), fill='black')
        out.save(path)
    return tiles


# --------------------------------------------------------------------------------------------
# Editing: attribute directions (the authors ship such deltas in pioneer/attrib/) and projection

@torch.no_grad()
def latent_direction(net, positive, negative):
    """Mean latent of the images with an attribute minus that of the images without: (nz,)."""
    return net.encode(positive).mean(0) - net.encode(negative).mean(0)


def move_along(z, direction, strength, blocks, n_blocks):
    """Per-block latents (B, n_blocks, nz): z moved by strength * direction on `blocks` and put back
    on the unit sphere; the other blocks keep z."""
    moved = F.normalize(z + strength * direction.to(z), dim=-1)
    return model.mix_latents(z, moved, blocks, n_blocks)


@torch.no_grad()
def edit_grid(net, x, direction, strengths, blocks, noise=False):
    """Each row: an input, then its decode moved along `direction` by each strength."""
    z = net.encode(x)
    rows = []
    for i in range(len(x)):
        cells = [net.decode(move_along(z[i:i + 1], direction, s, blocks, net.decoder.n_blocks), noise=noise)
                 for s in strengths]
        rows.append(torch.cat([x[i:i + 1], *cells]))
    return rows


def project(net, x, steps, lpips=None, lpips_weight=1.0, pixel_weight=1.0, lr=0.01, report=(0, 10, 30, 100, 300),
            keep=False, say=None):
    """Refine the encoder's latents of x by Adam on lpips_weight LPIPS + pixel_weight MSE. Starts
    from the encoder's z repeated per block (the per-block latents of Eq. 5-9, this model's W+);
    each block's latent is kept on the sphere (normalized in the forward). Returns the refined
    (B, n_blocks, nz) latents and [(step, seconds, loss, pixel L1)] at the `report` steps and the last
    one, with keep=True also the latents of that step; the seconds include the encoder's pass (step 0
    is the encoder alone). say(line), if given, gets each of those rows as it is reached."""
    was = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)
    start = time.time()
    with torch.no_grad():
        z = net.encode(x)
    w = z[:, None].repeat(1, net.decoder.n_blocks, 1).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    history = []
    for step in range(steps + 1):
        y = net.decode(F.normalize(w, dim=-1), noise=False, grad=True)
        loss = pixel_weight * (y - x).pow(2).mean((1, 2, 3))
        if lpips is not None and lpips_weight > 0:
            loss = loss + lpips_weight * lpips(y, x)
        if step in report or step == steps:
            history.append((step, time.time() - start, loss.mean().item(), (y - x).abs().mean().item())
                           + ((F.normalize(w.detach(), dim=-1).clone(),) if keep else ()))
            if say:
                say('step {:5d} | {:7.2f} s | loss {:.4f} | pixel L1 {:.4f}'.format(*history[-1][:4]))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    for p, r in zip(net.parameters(), was):
        p.requires_grad_(r)
    return F.normalize(w.detach(), dim=-1), history


def lpips_for_projection(cfg, weight_flag='--lpips'):
    """losses.LPIPS (VGG) from local files or the official URLs, or None with weight 0."""
    if cfg['lpips'] == 0:
        return None
    try:
        return losses.LPIPS('vgg', cfg['vgg_backbone'], cfg['lpips_vgg'])
    except (FileNotFoundError, losses.MissingWeights) as e:
        raise SystemExit(f'error: projection with LPIPS needs its VGG weights: {str(e).splitlines()[0]}; or '
                         f'{weight_flag}=0 for the pixel term alone') from None


# --------------------------------------------------------------------------------------------
# Latents as files: {name: (nz,) or per-block (n_blocks, nz)}, for editing, interpolating or
# clustering with other tools

def save_latents(latents, path):
    """Write {name: latent} (or one tensor, a direction) with torch.save, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cpu = (lambda v: v.detach().float().cpu())
    model.save_file(cpu(latents) if torch.is_tensor(latents) else {k: cpu(v) for k, v in latents.items()}, path)


def load_latents(path, net):
    """A latents file checked against net: (names, per-block latents (B, n_blocks, nz) on the sphere).
    A (nz,) latent drives every block; each latent is normalized, as the encoder's are."""
    nz, n = net.cfg.nz, net.decoder.n_blocks
    try:
        found = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f'error: no latents file at {path}; write one with --mode=encode --inputs=DIR') from None
    except Exception as e:                                      # noqa: BLE001 (not a torch file)
        raise SystemExit(f'error: --latents={path} is not a torch file ({type(e).__name__}); write a latents file '
                         f'with --mode=encode --inputs=DIR') from None
    if not isinstance(found, dict) or not found or not all(torch.is_tensor(v) for v in found.values()):
        raise SystemExit(f'error: {path} is not a latents file: expected {{name: tensor}}, got {type(found).__name__}')
    out = []
    for name, z in found.items():
        if tuple(z.shape) not in ((nz,), (n, nz)):
            raise SystemExit(f'error: {path}: latent {name!r} has shape {tuple(z.shape)}; this checkpoint takes '
                             f'({nz},) or per block ({n}, {nz})')
        out.append(F.normalize(z.float().expand(n, nz), dim=-1))
    return list(found), torch.stack(out)


def latent_name(path, spec):
    return os.path.relpath(path, spec) if os.path.isdir(spec) else os.path.basename(path)


@torch.no_grad()
def encode_all(net, spec, crop=None, batch=32, flag='--inputs', faces=None):
    """{name: z} for every readable image of `spec` (a folder or files), a batch at a time (with
    `faces`, every aligned face)."""
    paths, found = image_paths(spec, flag), {}
    for i in range(0, len(paths), batch):
        try:
            x, names = read_images(paths[i:i + batch], net.res, crop, flag, faces)
        except SystemExit:                                     # a batch with no readable file
            continue
        for name, z in zip(names, net.encode(x.to(net.const_device()))):
            found[latent_name(name, spec)] = z
    if not found:
        raise SystemExit(f'error: {flag}: none of the images could be read ({spec!r})')
    return found


def write_direction(net, cfg):
    """--mode=direction: mean latent of --positive minus that of --negative, to --out."""
    if not (cfg['positive'] and cfg['negative']):
        raise SystemExit('error: --mode=direction needs --positive=DIR (with the attribute) and --negative=DIR')
    pos, neg = (torch.stack(list(encode_all(net, cfg[k], net.input_crop, flag=f'--{k}', faces=faces_of(cfg, cfg[k]))
                                 .values()))
                for k in ('positive', 'negative'))
    target = cfg['out'] or os.path.join(cfg['out_dir'], 'direction.pt')
    save_latents(pos.mean(0) - neg.mean(0), target)
    print(f'wrote {target} (mean latent of {len(pos)} positive minus {len(neg)} negative images; '
          f'length {(pos.mean(0) - neg.mean(0)).norm():.3f})')
    return target


# The authors' attribute directions (AaltoVision/automodulator, pioneer/attrib/, MIT): mean latent of
# exemplars with the attribute minus that of exemplars without, (1, 512), for their FFHQ models. Their
# torch.hub page edits ffhq512 with smile512-16 (2 x 16 exemplars) on blocks 2:5 (16-64 px) at +0.5 to
# add a smile and -1.5 to take it away; they document no blocks for the others (--mix picks them).
ATTRIB_URL = 'https://github.com/AaltoVision/automodulator/raw/master/pioneer/attrib/{}'
DIRECTIONS = {'smile': 'smile_delta2', 'male': 'male_delta2', 'dark': 'dark_delta2', 'left': 'left_delta2',
              'smile512-4': 'smile_delta512-4', 'smile512-16': 'smile_delta512-16'}


def load_direction(path, net):
    """A direction file, or one of the authors' by name (DIRECTIONS, fetched once into torch.hub's
    cache), as an (nz,) tensor on net's device; their (1, nz) files are taken as (nz,)."""
    if path in DIRECTIONS and not os.path.exists(path):
        try:
            path = model.fetch_once(f"the authors' direction {path!r}", ATTRIB_URL.format(DIRECTIONS[path]),
                                    DIRECTIONS[path])
        except model.NotCached as e:
            raise SystemExit(f'error: {e.advice("--direction=")}') from None
    try:
        d = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f'error: no direction file at {path!r}; make one with --mode=direction') from None
    except Exception as e:                                      # noqa: BLE001 (not a torch file)
        raise SystemExit(f'error: --direction={path} is not a torch file ({type(e).__name__}); make a direction '
                         f'with --mode=direction') from None
    if torch.is_tensor(d) and tuple(d.shape) == (1, net.cfg.nz):     # the authors' files
        d = d[0]
    if not torch.is_tensor(d) or tuple(d.shape) != (net.cfg.nz,):
        got = tuple(d.shape) if torch.is_tensor(d) else type(d).__name__
        raise SystemExit(f'error: {path} is not a direction for this checkpoint: expected a tensor of shape '
                         f'({net.cfg.nz},), got {got}')
    return d.float().to(net.const_device())


# --------------------------------------------------------------------------------------------
# The modes: each makes the rows of one grid (and a word for its file name) from the inputs x

def mix_rows(net, cfg, x, names):
    """Fig. 4a: A (the first n inputs) on the left, B (the next n, or --inputs_b) on top."""
    spec, k = (cfg['mix'], cfg['n']) if cfg['mode'] == 'mix' else (f'0:{model.INVARIANCE_K}', cfg['n'])
    blocks = blocks_of(net, spec)
    if cfg['inputs_b']:
        b = read_images(cfg['inputs_b'], net.res, net.input_crop, '--inputs_b', faces_of(cfg, cfg['inputs_b']))[0]
        a, b = x[:k], b[:k].to(x.device)
    elif len(x) > k:
        a, b = x[:k], x[k:2 * k]
    else:
        print(f'note: {len(x)} input images, too few for {k} A and {k} B sources: the grid mixes them with each '
              f'other (give more images, or --n={max(1, len(x) // 2)})')
        a, b = x, x
    if cfg['mode'] == 'invariance' and not net.config.get('invariance'):
        print('note: this checkpoint was trained without the invariance loss: the grid shows the '
              "'regular' model of Fig. 5 (pose from the top row on blocks 0-1)")
    return mix_grid(net, a, b, blocks, cfg['noise']), spec.replace(':', '-')


def decode_rows(net, cfg, x, names):
    """Draw back the latents of --latents, 8 to a row."""
    path = cfg['latents'] or os.path.join(cfg['out_dir'], 'latents.pt')
    names, z = load_latents(path, net)
    with torch.no_grad():
        images = torch.cat([net.decode(z[i:i + 32].to(net.const_device()), noise=cfg['noise'])
                            for i in range(0, len(z), 32)])
    cols = min(8, len(images))
    rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    return rows, os.path.splitext(os.path.basename(path))[0], dict(tiles=names)   # --singles names tiles by latent


def edit_rows(net, cfg, x, names):
    """Each input moved along --direction by each --strength on the --mix blocks."""
    rows = edit_grid(net, x, load_direction(cfg['direction'], net), cfg['strength'], blocks_of(net, cfg['mix']),
                     cfg['noise'])
    strengths = '_'.join(f'{v:g}' for v in cfg['strength'])
    labels = ['input'] + [f'{v:+g}' if v else '0' for v in cfg['strength']]           # the strength above each column
    return (rows, f'{os.path.splitext(os.path.basename(cfg["direction"]))[0]}_{cfg["mix"].replace(":", "-")}_s{strengths}',
            dict(labels=labels))


def project_rows(net, cfg, x, names):
    """Inputs, their encoder reconstructions, then the per-block latents refined by optimisation."""
    lpips = lpips_for_projection(cfg)
    refined, history = project(net, x, cfg['steps'] or 100, lpips.to(x.device) if lpips else None, cfg['lpips'],
                               cfg['pixel'], cfg['project_lr'], say=lambda line: print(line, flush=True))
    path = cfg['latents'] or os.path.join(cfg['out_dir'], 'latents.pt')
    save_latents(dict(zip(names, refined)), path)
    print(f'wrote {path} ({len(x)} per-block latents)')
    with torch.no_grad():
        rows = [x, net.reconstruct(x, noise=False), net.decode(refined, noise=False)]
    return rows, f'{history[-1][0]}steps'


def interp_rows(net, cfg, x, names):
    """Fig. 12: the first 4 inputs at the corners of a --steps x --steps grid."""
    if len(x) < 4:
        raise SystemExit(f'error: interp needs 4 input images, got {len(x)}')
    size = cfg['steps'] or 7
    if size < 2:
        raise SystemExit(f'error: interp needs --steps of 2 or more, got {size}')
    return interp_grid(net, x[:4], size, cfg['noise']), f'{size}x{size}'


# mode -> (inputs it reads, given n; the function that makes its rows, a word for the file name and,
# optionally, {'tiles': names of the --singles tiles, 'labels': texts above the columns})
GRIDS = {
    'mix': (lambda n: 2 * n, mix_rows),
    'invariance': (lambda n: 2 * n, mix_rows),
    'recon': (lambda n: n, lambda net, cfg, x, names: (recon_grid(net, x, cfg['noise']), f'{len(x)}')),
    'cond': (lambda n: n, lambda net, cfg, x, names: (
        cond_grid(net, x, blocks_of(net, cfg['cond']), cfg['draws'], cfg['seed'], cfg['noise']),
        cfg['cond'].replace(':', '-'))),
    'interp': (lambda n: 4, interp_rows),
    'edit': (lambda n: n, edit_rows),
    'project': (lambda n: n, project_rows),
    'random': (lambda n: 0, lambda net, cfg, x, names: (random_grid(net, cfg['n'], cfg['seed'], cfg['noise']),
                                                        f'seed{cfg["seed"]}')),
    'decode': (lambda n: 0, decode_rows),
}


def write_latents_file(net, cfg, path):
    """--mode=encode: {file name: latent} of every image of --inputs."""
    if not cfg['inputs']:
        raise SystemExit('error: --mode=encode needs --inputs=FOLDER (or comma-separated files)')
    found = encode_all(net, cfg['inputs'], net.input_crop, faces=faces_of(cfg, cfg['inputs']))
    target = cfg['latents'] or os.path.join(cfg['out_dir'], 'latents.pt')
    save_latents(found, target)
    print(f'wrote {target} ({len(found)} latents of size {net.cfg.nz}; {net.res}x{net.res} checkpoint at {path})')
    return target


def grid_inputs(net, cfg, path, count):
    """The first `count` images of --inputs, or of the checkpoint's held-out split; with their names."""
    if not cfg['inputs'] and (net.input_crop or net.config.get('dataset', 'shapes') != 'shapes'
                              and not net.config.get('data_root')):
        raise SystemExit(f'error: {path} records no images to use; pass --inputs=FOLDER (or comma-separated files)')
    if cfg['inputs']:
        x, paths = read_images(cfg['inputs'], net.res, net.input_crop, faces=faces_of(cfg, cfg['inputs']))
        names = [latent_name(p, cfg['inputs']) for p in paths]
    else:
        x = test_images(net.config, net.res, count)
        names = [f'test_{i:05d}' for i in range(len(x))]
    return x[:count].to(net.const_device()), names[:count]


def write_grid_files(rows, extra, cfg, target, res):
    """The grid PNG (with extra['labels'] above its columns), and with --singles every tile as its own
    PNG under out_dir/<mode>/ (named by extra['tiles'], else numbered)."""
    save_grid(rows, target, res, cfg['zoom'], extra.get('labels'))
    names = extra.get('tiles', [])
    if cfg['singles']:
        folder = os.path.join(cfg['out_dir'], cfg['mode'])
        os.makedirs(folder, exist_ok=True)
        for i, img in enumerate(torch.cat(rows)):
            file = os.path.splitext(names[i])[0].replace(os.sep, '_') if i < len(names) else f'{i:04d}'
            save_image(img.clamp(-1, 1).add(1).div(2), os.path.join(folder, f'{file}.png'))


def main(cfg):
    """Load the checkpoint, run the mode, write its file; returns the file's path."""
    cfg = clean(cfg, RULES)                                   # paths: ~ and $VARS expanded
    check(cfg, RULES)
    if cfg['mode'] == 'align':                                # no checkpoint: photos in, aligned faces out
        return write_aligned(cfg)
    path = cfg['ckpt'] or os.path.join(cfg['out_dir'], 'ckpt.pt')
    try:
        net = model.load_checkpoint(path, ema=cfg['ema'], device=model.resolve_device(cfg['device']))
    except model.NotCached as e:
        raise SystemExit(f'error: {e.advice("--ckpt=")}') from None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'error: {e}')
    if cfg['mode'] == 'encode':
        return write_latents_file(net, cfg, path)
    if cfg['mode'] == 'direction':
        return write_direction(net, cfg)
    if cfg['mode'] == 'invariance' and used_blocks(net) <= model.INVARIANCE_K:
        raise SystemExit(f'error: --mode=invariance swaps blocks 0-{model.INVARIANCE_K - 1} and needs blocks after '
                         f'them: a checkpoint at 16x16 or more; {path} is at {net.res}x{net.res}')
    count, make_rows = GRIDS[cfg['mode']]
    x, names = grid_inputs(net, cfg, path, count(cfg['n'])) if count(cfg['n']) else (None, [])
    try:
        rows, detail, *extra = make_rows(net, cfg, x, names)
    except ValueError as e:                                   # a block range this checkpoint does not have
        raise SystemExit(f'error: {e}')
    target = cfg['out'] or os.path.join(cfg['out_dir'], f"{cfg['mode']}_{detail}.png")
    write_grid_files(rows, extra[0] if extra else {}, cfg, target, net.res)
    print(f'wrote {target} ({cfg["mode"]}, {net.res}x{net.res} checkpoint at {path})')
    return target


if __name__ == '__main__':
    configure(globals(), CONFIG_KEYS)
    main({k: globals()[k] for k in CONFIG_KEYS})
