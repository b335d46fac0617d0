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

Reads out_dir/ckpt.pt (or --ckpt), decodes with the EMA decoder at the resolution the checkpoint
reached, and writes one PNG grid into out_dir (its path is printed). Real inputs default to the
held-out test split of the data set the checkpoint was trained on; --inputs takes a folder or
comma-separated files, center-cropped and resized as in training (for the authors' released models,
their own resize -> centre crop -> resize). Face models expect aligned faces, as FFHQ and CelebA-HQ
are. The functions are importable: encode / mix / decode without the CLI.
"""
import os
import warnings

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

import data
import model
from configurator import ANY, check, configure, integer, matches, one_of

_before = set(globals())
mode = 'mix'                # mix | recon | random | cond | interp | invariance | encode | decode
mix = 'coarse'              # mix: blocks that take B's latents: coarse (4-8) | intermediate (16-32) | fine (64+) | a:b
cond = 'coarse'             # cond: blocks the input fixes, random latents drive the rest
out_dir = 'out'             # where ckpt.pt is read and the grid is written
ckpt = ''                   # checkpoint file ('' = out_dir/ckpt.pt), an authors' *_state.pth, or ffhq256 etc.
inputs = ''                 # real images: a folder or comma-separated files ('' = the data set's test split)
inputs_b = ''               # mix: the top row's sources ('' = the images after the first n of inputs)
n = 6                       # sources per row / column, inputs in recon and cond, samples in random
draws = 6                   # cond: random draws per input
steps = 7                   # interp: grid size
seed = 0                    # random latents
noise = False               # decode with layer noise (off: deterministic)
ema = True                  # use the EMA decoder
zoom = 0                    # enlarge tiles by this factor (0 = auto: tiles of at least 64 px)
singles = False             # also write every tile as its own PNG under out_dir/<mode>/
out = ''                    # output file ('' = out_dir/<mode>_<detail>.png)
latents = ''                # encode: where to write {file name: latent}; decode: what to draw ('' = out_dir/latents.pt)
device = 'auto'             # auto (cuda if available) | cpu | cuda
CONFIG_KEYS = sorted(set(globals()) - _before - {'_before'})

MODES = ('mix', 'recon', 'random', 'cond', 'interp', 'invariance', 'encode', 'decode')
_BLOCKS = matches(r'coarse|intermediate|fine|\d*:\d*', "coarse, intermediate, fine or a:b (block indices)")
RULES = dict(mode=one_of(*MODES), mix=_BLOCKS, cond=_BLOCKS, out_dir=ANY, ckpt=ANY, inputs=ANY, inputs_b=ANY,
             n=integer(1), draws=integer(1), steps=integer(2), seed=integer(0), noise=ANY, ema=ANY,
             zoom=integer(0), singles=ANY, out=ANY, latents=ANY, device=ANY)


# --------------------------------------------------------------------------------------------
# Inputs

def image_paths(spec):
    """A folder's images (sorted) or comma-separated files."""
    if os.path.isdir(spec):
        return data.list_images(spec)
    paths = [p for p in spec.split(',') if p]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise SystemExit(f'error: --inputs: {missing[0]!r} is neither a folder nor a file')
    return paths


def read_images(spec, res, crop=None):
    """Images from a folder, comma-separated files or a list of paths, as (B, 3, res, res) in [-1, 1],
    and their paths: centre crop and resize, or with `crop` the authors' resize -> crop -> resize
    (their models). Unreadable files are skipped with a warning; none readable is an error."""
    paths = spec if isinstance(spec, list) else image_paths(spec)
    images, names = [], []
    for p in paths:
        try:
            im = data.open_rgb(p)
            images.append(data.resize_crop_resize(im, crop, res) if crop else data.crop_resize(im, res))
            names.append(p)
        except Exception as e:                                  # noqa: BLE001 (any decoder failure)
            warnings.warn(f'skipping {p}: {type(e).__name__}: {e}')
    if not images:
        raise SystemExit(f'error: none of the inputs could be read ({spec!r})')
    return torch.stack(images).float() / 127.5 - 1, names


def test_images(config, res, count):
    """The first `count` images of the held-out split of the checkpoint's data set."""
    name = config.get('dataset', 'shapes')
    split = 'test' if name != 'folder' or config.get('test_fraction', 0) > 0 else 'train'
    source = data.make_source(name, config.get('data_root', ''), split, res, config.get('seed', 0),
                              config.get('test_fraction', 0.0), config.get('cache_dir', ''), 0, lambda *a: None)
    return source.load_batch(list(range(min(count, len(source)))), res).float() / 127.5 - 1


# --------------------------------------------------------------------------------------------
# Grids (lists of rows of images), importable

def used_blocks(net):
    """Blocks that a decode at the checkpoint's resolution runs."""
    return net.decoder.blocks_at(net.res)


def blocks_of(net, spec):
    """A group name or a:b range -> range of blocks, checked against what this checkpoint uses."""
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


def save_grid(rows, path, res, zoom=0):
    """Rows of (k, 3, res, res) images in [-1, 1] -> one PNG, tiles enlarged (nearest) by zoom."""
    cols = max(len(r) for r in rows)
    blank = -torch.ones_like(rows[0][:1])
    tiles = torch.cat([torch.cat([r, blank.expand(cols - len(r), -1, -1, -1)]) for r in rows])
    zoom = zoom or max(1, 64 // res)
    tiles = F.interpolate(tiles.clamp(-1, 1), scale_factor=zoom, mode='nearest') if zoom > 1 else tiles.clamp(-1, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(tiles.add(1).div(2), path, nrow=cols, padding=2)
    return tiles


# --------------------------------------------------------------------------------------------
# Latents as files: {name: (nz,) or per-block (n_blocks, nz)}, for editing, interpolating or
# clustering with other tools

def save_latents(latents, path):
    """Write {name: latent} with torch.save, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    try:
        torch.save({k: v.detach().float().cpu() for k, v in latents.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_latents(path, net):
    """A latents file checked against net: (names, per-block latents (B, n_blocks, nz) on the sphere).
    A (nz,) latent drives every block; each latent is normalized, as the encoder's are."""
    nz, n = net.cfg.nz, net.decoder.n_blocks
    try:
        found = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f'error: no latents file at {path}; write one with --mode=encode --inputs=DIR') from None
    except Exception as e:                                      # noqa: BLE001 (not a torch file)
        raise SystemExit(f'error: could not read {path} as a latents file ({type(e).__name__})') from None
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
def encode_to_file(net, spec, path, crop=None, batch=32):
    """Encode every readable image of `spec` (a folder or files), a batch at a time; write {name: z}."""
    paths, found = image_paths(spec), {}
    for i in range(0, len(paths), batch):
        try:
            x, names = read_images(paths[i:i + batch], net.res, crop)
        except SystemExit:                                     # a batch with no readable file
            continue
        for name, z in zip(names, net.encode(x.to(net.const_device()))):
            found[latent_name(name, spec)] = z
    if not found:
        raise SystemExit(f'error: none of the inputs could be read ({spec!r})')
    save_latents(found, path)
    return found


# --------------------------------------------------------------------------------------------

def main(cfg):
    check(cfg, RULES)
    path = cfg['ckpt'] or os.path.join(cfg['out_dir'], 'ckpt.pt')
    try:
        dev = model.resolve_device(cfg['device'])
        net = model.load_checkpoint(path, ema=cfg['ema'], device=dev)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'error: {e}')
    saved, res, k, noise_on = net.config, net.res, cfg['n'], cfg['noise']
    want = {'mix': 2 * k, 'recon': k, 'cond': k, 'interp': 4, 'invariance': 2 * k}.get(cfg['mode'], 0)
    if cfg['mode'] == 'invariance' and used_blocks(net) <= model.INVARIANCE_K:
        raise SystemExit(f'error: --mode=invariance swaps blocks 0-{model.INVARIANCE_K - 1} and needs blocks after '
                         f'them: a checkpoint at 16x16 or more; {path} is at {res}x{res}')
    latents_path = cfg['latents'] or os.path.join(cfg['out_dir'], 'latents.pt')
    if cfg['mode'] == 'encode':
        if not cfg['inputs']:
            raise SystemExit('error: --mode=encode needs --inputs=FOLDER (or comma-separated files)')
        found = encode_to_file(net, cfg['inputs'], latents_path, net.input_crop)
        print(f'wrote {latents_path} ({len(found)} latents of size {net.cfg.nz}; {res}x{res} checkpoint at {path})')
        return latents_path
    names = None
    if want and not cfg['inputs'] and (net.input_crop or saved.get('dataset', 'shapes') != 'shapes' and not saved.get('data_root')):
        raise SystemExit(f'error: {path} records no images to use; pass --inputs=FOLDER (or comma-separated files)')
    if want:
        x = read_images(cfg['inputs'], res, net.input_crop)[0] if cfg['inputs'] else test_images(saved, res, want)
        x = x.to(dev)
    try:
        if cfg['mode'] in ('mix', 'invariance'):
            spec = cfg['mix'] if cfg['mode'] == 'mix' else f'0:{model.INVARIANCE_K}'
            blocks = blocks_of(net, spec)
            if cfg['inputs_b']:
                a, b = x[:k], read_images(cfg['inputs_b'], res, net.input_crop)[0][:k].to(dev)
            else:
                a, b = (x[:k], x[k:2 * k]) if len(x) > k else (x, x)
            rows = mix_grid(net, a, b, blocks, noise_on)
            detail = f'{spec.replace(":", "-")}'
            if cfg['mode'] == 'invariance' and not saved.get('invariance'):
                print('note: this checkpoint was trained without the invariance loss: the grid shows the '
                      "'regular' model of Fig. 5 (pose from the top row on blocks 0-1)")
        elif cfg['mode'] == 'decode':
            names, z = load_latents(latents_path, net)
            with torch.no_grad():
                images = torch.cat([net.decode(z[i:i + 32].to(dev), noise=noise_on) for i in range(0, len(z), 32)])
            cols = min(8, len(images))
            rows, detail = [images[i:i + cols] for i in range(0, len(images), cols)], os.path.splitext(
                os.path.basename(latents_path))[0]
        elif cfg['mode'] == 'recon':
            rows, detail = recon_grid(net, x, noise_on), f'{len(x)}'
        elif cfg['mode'] == 'random':
            rows, detail = random_grid(net, k, cfg['seed'], noise_on), f'seed{cfg["seed"]}'
        elif cfg['mode'] == 'cond':
            rows = cond_grid(net, x, blocks_of(net, cfg['cond']), cfg['draws'], cfg['seed'], noise_on)
            detail = cfg['cond'].replace(':', '-')
        else:
            if len(x) < 4:
                raise SystemExit(f'error: interp needs 4 input images, got {len(x)}')
            rows, detail = interp_grid(net, x[:4], cfg['steps'], noise_on), f'{cfg["steps"]}x{cfg["steps"]}'
    except ValueError as e:                                   # a block range this checkpoint does not have
        raise SystemExit(f'error: {e}')
    target = cfg['out'] or os.path.join(cfg['out_dir'], f"{cfg['mode']}_{detail}.png")
    save_grid(rows, target, res, cfg['zoom'])
    if cfg['singles']:
        folder = os.path.join(cfg['out_dir'], cfg['mode'])
        os.makedirs(folder, exist_ok=True)
        for i, img in enumerate(torch.cat(rows)):
            file = os.path.splitext(names[i])[0].replace(os.sep, '_') if names else f'{i:04d}'
            save_image(img.clamp(-1, 1).add(1).div(2), os.path.join(folder, f'{file}.png'))
    print(f'wrote {target} ({cfg["mode"]}, {res}x{res} checkpoint at {path})')
    return target


if __name__ == '__main__':
    configure(globals(), CONFIG_KEYS)
    main({k: globals()[k] for k in CONFIG_KEYS})
