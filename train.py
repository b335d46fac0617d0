"""Progressive training of a Deep Automodulator, one process or many.

    python train.py                                        # the embedded `shapes` data set, on a CPU
    python train.py --dataset=folder --data_root=~/photos --max_res=64 --batch_size=16
    python train.py --init_from=resume --total_kimg=400    # continue out/ckpt.pt, for longer
    python train.py --init_from=ffhq256 --dataset=folder --data_root=~/faces   # fine-tune a released model
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py --dataset=lsun_cars --data_root=/data/lsun/car --init_from=auto

Each step is one encoder update (L_phi of Eq. 6, which also trains the robust loss's alpha and
scale) and one decoder update (L_theta of Eq. 6 with the layer-specific loss L_j), each with the
other network frozen while gradients flow through it; then the EMA decoder follows (paper Sec. 3,
A.1; the authors' pioneer/train.py, `encoder_train` and `decoder_train`). Progress is a pure
function of the number of images seen, so a checkpoint resumes the same trajectory.

Settings, each layer over the one before: the defaults below, the data set's preset, on resume the
checkpoint's own settings, then the command line. All of them are checked before anything is read
or written.
"""
import importlib.util
import datetime
import json
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

import data
import losses
import model
from configurator import (ANY, PATH, Rule, above, at_least, between, check, clean, configure, expand_path, integer,
                          one_of, per_resolution, power_of_two)

# --------------------------------------------------------------------------------------------
# The values of `python train.py`: the embedded `shapes` data set, sized for a CPU. The real-data
# presets start from PAPER below instead. Where a value departs from the paper, its comment says so.
_before = set(globals())
# data
dataset = 'shapes'          # shapes (these values) | folder | ffhq | celebahq | lsun_bedroom | lsun_cars (PAPER + PRESETS)
data_root = ''              # images folder or LSUN lmdb (not needed for shapes)
cache_dir = ''              # where data caches go ('' = data_root/.automodulator_cache)
max_images = 0              # > 0: train on the first that many images of the train split only
lsun_cache_res = 0          # LSUN: resize once to 4..this many px (0: decode every read; README has the sizes)
test_fraction = 0.0         # held-out share of a plain folder (sample.py and metrics use it)
num_workers = 0             # DataLoader worker processes (shapes renders a batch at once in this process)
# model (--authors=True: the authors' blocks, AdaIN and encoder filtering, their extra KL and upper clamp;
# their learning rates, margins and mixed share are --lr, --margin, --mix_ratio; README lists every difference)
max_res = 32                # last resolution, a power of two (--max_res=64 adds a 64x64 phase: fine stripes, data.py)
arch = 'large'              # decoder widths: large (FFHQ, LSUN) or small (CelebA-HQ)
width = 1 / 16              # channel multiplier (paper 1: 1/16 trains on a CPU)
nz = 128                    # latent size (paper 512: the scenes have a handful of factors)
noise = 'none'              # layer noise: channel | shared | none (paper channel: the scenes have no stochastic detail)
authors = True              # the authors' networks and KL terms (their plain conv stacks reconstructed better here)
extra_kl = False            # authors: add KL(E(x)) to L_phi outside the margin clamp (on with authors=True)
upper_clamp = False         # authors: clamp KL_real - KL_fake also from above at M/2 (on with authors=True)
invariance = ''             # 'flip': Sec. 3.3/4.3, flip pairs drive pose through blocks 0-1 alone (extra 8x8 block, no noise)
# schedule, per resolution; kimg = thousands of images seen
phase_kimg = {4: 12, 8: 30, 16: 48, 32: 40, 64: 30}  # kimg per phase (paper: 2,400 and up)
fade = 0.5                  # share of each phase over which the new level fades in
total_kimg = 0.0            # stop here (0 = at the end of the max_res phase; beyond it, max_res runs on)
batch_size = {4: 32, 8: 32, 16: 32, 32: 16, 64: 32}  # per process (one number: all); 16 at 32x32: steps count more than images
lr = {4: 0.001, 8: 0.001, 16: 0.001, 32: 0.0003, 64: 0.0003}  # paper 0.0005 to 32x32, then 0.001
margin = {4: 0.5, 8: 0.5, 16: 0.5, 32: 0.5, 64: 0.5}  # KL margin M_gap (paper 2.0 at 4-8 px)
# loss weights, paper units (KL weight 1); every lambda_* reaches the loss functions by its name
lambda_x_fade = 2.0         # image reconstruction weight in the first (fade) half of a phase
lambda_x_stable = 3.0       # ... and in the second half
lambda_z = 2.0              # latent cosine reconstruction
lambda_j = 0.0              # layer-specific loss L_j (paper: on; 10 in its units, Eq. 6; no gain in separation here, RESULTS)
lambda_x_dec = 10.0         # not in the paper: the decoder also reconstructs real images (pictures within minutes)
recon = 'robust'            # the pixel distance d of Eq. 6: robust (Barron's, the paper) | l1 | l2 (Table 1's ablation)
recon_dec = ''              # d of the decoder's lambda_x_dec term ('' = as recon; robust with recon=l1: Table 1's ablation alone)
beta1 = 0.0                 # Adam's first-moment decay, encoder (paper A.1: 0; 0.9 destabilized the KL game on shapes)
beta1_dec = 0.9             # ... and decoder (paper A.1: 0, which settles slower here)
mix_ratio = 0.25            # share of style-mixed samples among the fakes (paper 1/4; authors' D step 1/2)
ema_decay = 0.9             # EMA of decoder weights per step, ramped up from 0.1 (paper 0.999: too slow to follow here)
# system
device = 'auto'             # auto (cuda if available) | cpu | cuda | cuda:N
dtype = 'float32'           # float32 | bfloat16 | float16 (+ GradScaler) | auto (bfloat16 where native, else float32)
compile = False             # torch.compile each network block
channels_last = False       # NHWC memory format for the convolutions (faster with bf16 / on tensor cores)
seed = 0                    # model init, data order, latent draws
out_dir = 'out'             # ckpt.pt, snapshot_*.pt, config.json, log.jsonl, grid_*.png
init_from = 'scratch'       # scratch (refuses an out_dir that holds a run) | resume (out_dir/ckpt.pt) | auto (resume where
                            # ckpt.pt exists, else scratch: for torchrun --max-restarts) | a checkpoint to fine-tune
log_every = 5.0             # kimg between progress lines
sample_every = 40.0         # kimg between sample grids
ckpt_every = 20.0           # kimg between writes of ckpt.pt, the file that resumes (also at each phase end and exit)
ckpt_minutes = 10.0         # ... and at most this many minutes apart (0 = kimg only); written in the background
snapshot_every = 0.0        # kimg between numbered EMA snapshots snapshot_*.pt (also one at each phase end; 0 = those only)
dry_run = False             # print the resolved config and the phase table, then exit
prepare_only = False        # build the data cache or LSUN's key list, say where and how large, then exit
dist_timeout = 60.0         # minutes a rank waits to reach the master, and for any one collective
wandb_log = False           # also log to Weights & Biases (imported only when on)
wandb_project = 'automodulator'  # W&B project
CONFIG_KEYS = sorted(set(globals()) - _before - {'_before'})
DEFAULTS = {k: globals()[k] for k in CONFIG_KEYS}
PER_RESOLUTION = ('phase_kimg', 'batch_size', 'lr', 'margin')

# Appendix A.1 of the paper (the authors' schedule: pioneer/training_scheduler.py), the start of every
# real-data preset: what it sets replaces the values above. lambda_j = 10: Eq. 6 writes L_j with weight
# 1, but the authors' code weighs every KL by 0.1 and L_j by 1 (pioneer/train.py), 10 in the paper's units.
_TO_64 = {4: 2400, 8: 2400, 16: 2400, 32: 2400, 64: 10400}    # 2.4M images a phase, 10.4M at 64x64
PAPER = dict(
    num_workers=min(4, os.cpu_count() or 1), max_res=256, width=1.0, nz=512, noise='channel', authors=False,
    phase_kimg={**_TO_64, 128: 10600, 256: 16000, 512: 16000},
    batch_size={4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 32, 256: 16, 512: 4},
    lr={4: 0.0005, 8: 0.0005, 16: 0.0005, 32: 0.0005, 64: 0.001, 128: 0.001, 256: 0.001, 512: 0.001},
    margin={4: 2.0, 8: 2.0, 16: 0.5, 32: 0.5, 64: 0.5, 128: 0.5, 256: 0.5, 512: 0.5},
    lambda_j=10.0, lambda_x_dec=0.0, beta1_dec=0.0, ema_decay=0.999,
    log_every=10.0, sample_every=100.0, ckpt_every=100.0, snapshot_every=2000.0)
# Each data set's differences from PAPER (A.1: the 128x128 phase is 7.5M images but for FFHQ; CelebA-HQ
# and LSUN Bedrooms have their own margins; the small widths are the authors' CelebA-HQ model).
PRESETS = {
    'shapes': {},
    'celebahq': {**PAPER, 'arch': 'small', 'phase_kimg': {**_TO_64, 128: 7500, 256: 16000},
                 'margin': {4: 2.0, 8: 2.0, 16: 0.5, 32: 0.5, 64: 0.5, 128: 0.2, 256: 0.4}},
    'ffhq': PAPER,
    'lsun_bedroom': {**PAPER, 'phase_kimg': {**_TO_64, 128: 7500, 256: 16000},
                     'margin': {4: 2.0, 8: 2.0, 16: 0.5, 32: 0.5, 64: 0.5, 128: 0.2, 256: 0.2}},
    'lsun_cars': {**PAPER, 'phase_kimg': {**_TO_64, 128: 7500, 256: 16000}},
    'folder': PAPER,
}

# What each setting may be; `settings` checks all of them before anything runs.
RULES = dict(
    dataset=one_of(*data.DATASETS), data_root=PATH, cache_dir=PATH, test_fraction=between(0, 1, open_hi=True),
    num_workers=integer(0), max_images=integer(0),
    lsun_cache_res=Rule('0 or a power of two in 4..1024', lambda v: v == 0 or power_of_two(4, 1024).ok(v)),
    max_res=power_of_two(4, 1024), arch=one_of(*model.WIDTHS), width=between(1 / 64, 4), nz=integer(2),
    noise=one_of('channel', 'shared', 'none'), authors=ANY, extra_kl=ANY, upper_clamp=ANY,
    invariance=one_of('', 'flip'),
    phase_kimg=per_resolution(above(0)), fade=between(0, 1), total_kimg=at_least(0),
    batch_size=per_resolution(integer(1)), lr=per_resolution(above(0)),
    margin=per_resolution(Rule('a number >= 0, or None for no clamp', lambda m: m is None or at_least(0).ok(m))),
    recon=one_of('robust', 'l1', 'l2'), recon_dec=one_of('', 'robust', 'l1', 'l2'),
    beta1=between(0, 1, open_hi=True), beta1_dec=between(0, 1, open_hi=True),
    mix_ratio=between(0, 1), ema_decay=between(0, 1),
    device=ANY, dtype=one_of('auto', *model.DTYPES), compile=ANY, channels_last=ANY, seed=integer(0),
    out_dir=PATH, init_from=Rule("'scratch', 'resume', 'auto', or a checkpoint to fine-tune (a path or a released model's name)",
                                 lambda v: isinstance(v, str) and v != '', expand_path),
    log_every=above(0), sample_every=at_least(0), ckpt_every=at_least(0), ckpt_minutes=at_least(0),
    snapshot_every=at_least(0),
    dry_run=ANY, prepare_only=ANY, dist_timeout=above(0), wandb_log=ANY, wandb_project=ANY,
    **{k: at_least(0) for k in CONFIG_KEYS if k.startswith('lambda_')},    # loss weights
)
# What a resumed run may not change: the checkpoint would mean something else.
FIXED_ON_RESUME = ('dataset', 'test_fraction', 'max_res', 'arch', 'width', 'nz', 'noise', 'authors',
                   'invariance', 'seed')
# What a fine-tune takes from the checkpoint it starts from (the networks' shape).
FROM_CHECKPOINT = ('arch', 'width', 'nz', 'noise', 'authors', 'invariance')


# --------------------------------------------------------------------------------------------
# The schedule

def resolutions(max_res):
    return [4 * 2 ** i for i in range(model.level(max_res, max_res) + 1)]


def phase_table(max_res, phase_kimg, total_kimg=0.0, start_res=4):
    """[(res, start_kimg, length_kimg)] for start_res..max_res, and the kimg where training ends. A
    fine-tune starts at its checkpoint's resolution, with no fade-in (as the 4x4 phase of a new run)."""
    rows, start = [], 0.0
    for res in resolutions(max_res)[model.level(start_res, max_res):]:
        rows.append((res, start, float(phase_kimg[res])))
        start += phase_kimg[res]
    return rows, (total_kimg if total_kimg > 0 else start)


def schedule(kimg, table, fade_share):
    """kimg -> (phase index, resolution, fade-in alpha, in the fade half?). Resuming needs only kimg."""
    p = max(i for i, (_, start, _) in enumerate(table) if kimg >= start or i == 0)
    res, start, length = table[p]
    into = (kimg - start) / max(length * fade_share, 1e-9)
    alpha = 1.0 if p == 0 else min(1.0, into)
    return p, res, alpha, into < 1.0


def phase_end(table, p, end_kimg):
    """kimg where phase p stops: its scheduled end, or end_kimg if sooner; the last phase runs on
    to end_kimg (a --total_kimg beyond the schedule keeps training at max_res)."""
    start, length = table[p][1:]
    return end_kimg if p == len(table) - 1 else min(start + length, end_kimg)


def remaining_seconds(table, end_kimg, kimg, res, rate):
    """Rough time left at `rate` images/s for this resolution; later phases cost more per image."""
    left = 0.0
    for p, (r, start, _) in enumerate(table):
        todo = max(0.0, phase_end(table, p, end_kimg) - max(start, kimg))
        left += todo * 1000 / rate * max(1.0, (r / res) ** 1.5)   # per doubling ~2.8x, as measured on a CPU
    return left


def invariance_on(cfg, res, alpha):
    """Flip pairs (half of each batch mirrors the other half, Sec. 4.3) and L_inv, once the split
    after block 1 has blocks after it that run without the fade-in: from the end of the 8x8 fade on
    (the authors also insert their extra 8x8 block after that fade)."""
    return cfg['invariance'] == 'flip' and (res > 8 or res == 8 and alpha >= 1)


# --------------------------------------------------------------------------------------------
# Settings: defaults < preset < (resume) the checkpoint's own < what was given; checked in full

def _fail(message):
    raise SystemExit(f'error: {message}')


def read_checkpoint(out_dir):
    path = os.path.join(out_dir, 'ckpt.pt')
    try:                                                   # mmap: only what is touched is read
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except FileNotFoundError:
        _fail(f'--init_from=resume but there is no {path}; start a new run with --init_from=scratch')
    except Exception as e:                                 # noqa: BLE001 (truncated, not a checkpoint, ...)
        _fail(f'could not read {path} ({type(e).__name__}: {str(e).splitlines()[0][:160]})')


def images_seen_of(ck):
    return ck['images_seen'] if 'images_seen' in ck else ck['samples']      # older files: 'samples'


def resumed_settings(ck, given, say=print):
    """The checkpoint's settings with `given` on top: each change printed, a change of what the
    checkpoint is (FIXED_ON_RESUME) or of where it stands in the schedule refused."""
    saved = {k: v for k, v in ck['config'].items() if k in CONFIG_KEYS}
    saved = {**preset(saved['dataset']), **saved}     # settings newer than the file: the preset's
    cfg, changes = dict(saved), []
    for key, new in expand(given, saved).items():
        old = cfg[key]
        if key in ('init_from', 'out_dir', 'dry_run') or new == old:
            continue
        if key in FIXED_ON_RESUME:
            _fail(f'--{key}={new!r} but the checkpoint was trained with {key}={old!r}, and a resumed run keeps '
                  f'it; drop --{key}, or start a new run with --init_from=scratch --out_dir=ANOTHER_DIR')
        changes.append(f'resume: {key} {old!r} -> {new!r}')
        cfg[key] = new
    kimg, start_res = images_seen_of(ck) / 1000, ck.get('start_res', 4)
    where = [schedule(kimg, phase_table(c['max_res'], c['phase_kimg'], 0, start_res)[0], c['fade'])[1:3]
             for c in (saved, cfg)]
    if where[0] != where[1]:
        _fail(f'the checkpoint is at {kimg:g} kimg, {where[0][0]}x{where[0][0]} alpha {where[0][1]:.2f}; the new '
              f'--phase_kimg/--fade put that point at {where[1][0]}x{where[1][0]} alpha {where[1][1]:.2f}; change only '
              f'phases that have not started')
    if 0 < cfg['total_kimg'] <= kimg:
        _fail(f'--total_kimg={cfg["total_kimg"]:g} but the checkpoint is at {kimg:g} kimg; give a larger --total_kimg')
    for line in changes:
        say(line)
    return cfg


def fine_tune_source(name):
    """The checkpoint a fine-tune starts from, as model.load_checkpoint gives it (EMA decoder)."""
    try:
        return model.load_checkpoint(name)
    except model.NotCached as e:
        _fail(e.advice('--init_from='))
    except (FileNotFoundError, ValueError) as e:
        _fail(f'--init_from={name!r} is not scratch or resume, so it names a checkpoint to fine-tune, and: {e}')


def architecture_settings(net):
    """The settings that rebuild `net`'s networks (FROM_CHECKPOINT), and its resolution as max_res."""
    c = net.cfg
    authors = all(getattr(c, k) == v for k, v in model.AUTHORS.items())
    return dict(arch=c.arch, width=c.width, nz=c.nz, noise=c.noise, authors=authors,
                invariance='flip' if c.extra_8x8 else '', max_res=net.res)


def fine_tune_settings(net, given, say=print):
    """A new run from `net`'s weights: its architecture, at its resolution or above; the rest as usual
    (the data set's preset, then `given`), each training setting that differs from net's run printed."""
    source = architecture_settings(net)
    name = given['init_from']
    for key in FROM_CHECKPOINT:
        if key in given and given[key] != source[key]:
            _fail(f'--{key}={given[key]!r} but {name} was trained with {key}={source[key]!r}; a fine-tune keeps '
                  f'the networks of the checkpoint it starts from (drop --{key})')
    if given.get('max_res', source['max_res']) < source['max_res']:
        _fail(f'--max_res={given["max_res"]} is below the {source["max_res"]}x{source["max_res"]} of {name}; a '
              f'fine-tune starts at its checkpoint\'s resolution (give --max_res={source["max_res"]} or more)')
    base = {**preset(given.get('dataset', DEFAULTS['dataset'])), **source}
    cfg = {**base, **expand(given, base)}
    trained = {k: v for k, v in net.config.items() if k in CONFIG_KEYS and k not in ('init_from', 'out_dir', 'dry_run')}
    if set(trained) <= {'dataset'}:                            # the authors' files: at most their data set
        say(f"fine-tune: {name} records no training settings (the authors' files do not); the "
            f"{cfg['dataset']} preset and the command line give them")
        trained = {}
    for key in sorted(k for k in trained if cfg[k] != trained[k]):
        why = f'--{key}' if key in given else f"the {cfg['dataset']} preset"
        say(f'fine-tune: {key} {trained[key]!r} -> {cfg[key]!r} ({why})')
    return cfg


def preset(dataset):
    """What a new run on `dataset` starts from: the globals, and for real data PAPER with its differences."""
    return {**DEFAULTS, **PRESETS[dataset]}


def expand(given, base):
    """One number for a per-resolution setting: that number at every resolution of base's table."""
    return {k: ({r: v for r in base[k]} if k in PER_RESOLUTION and not isinstance(v, dict) else v)
            for k, v in given.items()}


def resolve(given, say=print):
    """The layers of a run's settings: the preset, on resume the checkpoint's own, then `given`."""
    unknown = sorted(set(given) - set(CONFIG_KEYS))
    if unknown:
        _fail(f'unknown setting {unknown[0]!r} (see python train.py --help)')
    given = clean(given, RULES)                               # paths: ~ and $VARS expanded
    start = {**DEFAULTS, **given}
    check({k: start[k] for k in ('dataset', 'init_from', 'out_dir')}, RULES)
    if start['init_from'] == 'auto':                          # a restarted worker finds its run again
        found = os.path.exists(os.path.join(start['out_dir'], 'ckpt.pt'))
        say(f'--init_from=auto: {"resuming " + os.path.join(start["out_dir"], "ckpt.pt") if found else "a new run"}')
        given = {**given, 'init_from': 'resume' if found else 'scratch'}
        start = {**DEFAULTS, **given}
    if start['init_from'] == 'resume':
        cfg = resumed_settings(read_checkpoint(start['out_dir']), given, say)
        cfg.update({k: start[k] for k in ('init_from', 'out_dir', 'dry_run')})    # the folder may have moved
        return cfg
    if start['init_from'] != 'scratch':
        return fine_tune_settings(fine_tune_source(start['init_from']), given, say)
    base = preset(start['dataset'])
    return {**base, **expand(given, base)}


def settings(given, say=print):
    """The whole configuration of a run from what the command line (or a caller) gave, checked."""
    cfg = resolve(given, say)
    check(cfg, RULES)
    check_combinations(cfg)
    return cfg


def check_combinations(cfg):
    """What no single rule can see: settings that need each other, and the machine."""
    if cfg['dataset'] != 'shapes' and not cfg['data_root']:
        what = 'the LSUN lmdb folder' if cfg['dataset'].startswith('lsun') else 'the folder that holds your images'
        _fail(f'--dataset={cfg["dataset"]} needs --data_root=PATH, {what}')
    if cfg['dataset'] != 'shapes' and not os.path.exists(cfg['data_root']):
        _fail(f'--data_root={cfg["data_root"]!r} does not exist')
    for key in PER_RESOLUTION:
        missing = [r for r in resolutions(cfg['max_res']) if r not in cfg[key]]
        if missing:
            top = max(preset(cfg['dataset'])[key])
            _fail(f'--{key} has no entry for {missing[0]}x{missing[0]}' + (
                f' (the presets go up to {top}x{top}; give --phase_kimg, --batch_size, --lr and --margin up to '
                f'{cfg["max_res"]}, or --max_res={top})' if cfg['max_res'] > top else '; give one number or a dict '
                f'with every resolution 4..{cfg["max_res"]}'))
    odd = [r for r in resolutions(cfg['max_res']) if r >= 8 and cfg['batch_size'][r] % 2]
    if cfg['invariance'] and odd:
        _fail(f'--invariance=flip pairs each image with its mirror: --batch_size must be even, got '
              f'{cfg["batch_size"][odd[0]]} at {odd[0]}x{odd[0]}')
    try:
        model.resolve_device(cfg['device'])
    except ValueError as e:
        _fail(e)
    if cfg['wandb_log'] and importlib.util.find_spec('wandb') is None:
        _fail('--wandb_log=True needs the wandb package: pip install wandb (or leave --wandb_log off)')
    ckpt = os.path.join(cfg['out_dir'], 'ckpt.pt')
    if cfg['init_from'] != 'resume' and os.path.exists(ckpt) and not cfg['dry_run']:
        _fail(f'{ckpt} holds a run already; continue it with --init_from=resume, or start a new one '
              f'with --out_dir=ANOTHER_DIR (nothing was changed)')


# --------------------------------------------------------------------------------------------
# Several processes: every rank computes the same batch statistics and ends with the same weights

class _Gather(torch.autograd.Function):
    """all_gather with gradient: every rank computes the same batch statistic, so the backward
    sums the incoming gradients over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def distributed():
    return dist.is_initialized() and dist.get_world_size() > 1


def gather(z):
    return _Gather.apply(z) if distributed() else z


def average_gradients(params):
    """All-reduce the gradients of `params` (mean over ranks) in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if not distributed() or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def all_mean(values):
    """Average a dict of scalar tensors over ranks (for the log)."""
    if not distributed():
        return values
    keys = list(values)                 # every rank logs the same terms in the same order
    flat = torch.stack([values[k].float() for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat / dist.get_world_size()))


def all_rng_states(world, dev):
    """The torch RNG states (CPU and CUDA) of every rank, so a resume continues each stream."""
    state = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(dev) if dev.type == 'cuda' else None)
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def check_ranks_agree(modules, world, say):
    """Every rank must hold the same weights after training: compare float64 fingerprints."""
    flat = torch.cat([p.detach().double().flatten() for m in modules for p in m.state_dict().values()
                      if torch.is_tensor(p) and p.is_floating_point()])
    weights = torch.linspace(1, 2, flat.numel(), dtype=torch.float64, device=flat.device)
    mine = torch.stack([flat.sum(), (flat * weights).sum(), flat.abs().sum()]).cpu()
    every = [None] * world
    dist.all_gather_object(every, mine)
    if not all(torch.equal(every[0], f) for f in every):
        raise SystemExit(f'error: the {world} ranks ended with different weights: {every}')
    say(f'all {world} ranks hold identical weights (fingerprint {mine[0].item():.6f})')


# --------------------------------------------------------------------------------------------
# One training step

def loss_weights(cfg, fading):
    """Every lambda_* setting by its name, for the loss functions; lambda_x is this step's lambda_X
    of Eq. 6 (A.1: 2 while the new level fades in, 3 once it is stable)."""
    weights = {k: v for k, v in cfg.items() if k.startswith('lambda_')}
    return {**weights, 'lambda_x': cfg['lambda_x_fade'] if fading else cfg['lambda_x_stable']}


class Trainer:
    """The networks, optimizers and random streams of a run: what one step changes and what a
    checkpoint holds. `gen` is shared by all ranks (latents, j, flips); the global torch generator
    is per rank (layer noise)."""

    def __init__(self, cfg, mcfg, dev, rank=0, world=1):
        self.cfg, self.mcfg, self.dev, self.rank, self.world = cfg, mcfg, dev, rank, world
        torch.manual_seed(cfg['seed'])                       # the same initial weights on every rank
        net = model.Automodulator(mcfg).to(dev)
        self.encoder, self.decoder = net.encoder, net.decoder
        self.ema = model.make_ema(self.decoder)
        self.robust = losses.AdaptiveRobustLoss(mcfg.max_res).to(dev)
        # d of Eq. 6 in L_phi, and of the decoder's own pixel term; d_rho's alpha and scale learn in
        # the encoder step, so with d_rho in the decoder's term alone they fit the encoder's residuals
        recon_dec = cfg['recon_dec'] or cfg['recon']
        self.distance = losses.pixel_distance(cfg['recon'], self.robust, fit_robust=recon_dec == 'robust')
        self.distance_dec = losses.pixel_distance(recon_dec, self.robust)
        # paper A.1: Adam, beta1 = 0, beta2 = 0.99; the robust loss's alpha and scale learn with the encoder
        self.params_enc = list(self.encoder.parameters()) + list(self.robust.parameters())
        self.params_dec = list(self.decoder.parameters())
        fused = dict(fused=True) if dev.type == 'cuda' else {}  # one kernel for all parameters
        self.opt_enc = torch.optim.Adam(self.params_enc, lr=cfg['lr'][4], betas=(cfg['beta1'], 0.99), eps=1e-8, **fused)
        self.opt_dec = torch.optim.Adam(self.params_dec, lr=cfg['lr'][4], betas=(cfg['beta1_dec'], 0.99), eps=1e-8,
                                        **fused)
        self.dtype = model.resolve_dtype(cfg['dtype'], dev)  # 'auto' is resolved on each start, resumes too
        half = self.dtype == 'float16'                       # float16 needs loss scaling; bfloat16 does not
        self.scaler_enc, self.scaler_dec = (torch.amp.GradScaler(dev.type, enabled=half) for _ in range(2))
        dtype = model.DTYPES[self.dtype]
        self.autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.gen = torch.Generator().manual_seed(cfg['seed'] + 1)
        # the latents are drawn where the networks are: on a GPU from a generator of its own
        self.gen_z = self.gen if dev.type == 'cpu' else torch.Generator(dev).manual_seed(cfg['seed'] + 3)
        self.sample_z = model.sample_prior(8, mcfg.nz, generator=torch.Generator().manual_seed(cfg['seed'] + 2)).to(dev)
        self.images_seen, self.step = 0, 0
        self.start_res, self.started_from = 4, None         # a fine-tune starts at its checkpoint's resolution
        torch.manual_seed(cfg['seed'] + 1000 * (rank + 1))   # layer noise: a different stream per rank
        if cfg['channels_last']:
            for m in (self.encoder, self.decoder, self.ema):
                m.to(memory_format=torch.channels_last)
        if cfg['compile']:
            model.compile_blocks(self.encoder, self.decoder)

    def state(self):
        """The checkpoint (a collective under torchrun: every rank gives its RNG state)."""
        return dict(model_config=asdict(self.mcfg), kimg=self.images_seen / 1000, images_seen=self.images_seen,
                    step=self.step, encoder=self.encoder.state_dict(), decoder=self.decoder.state_dict(),
                    decoder_ema=self.ema.state_dict(), robust=self.robust.state_dict(),
                    opt_enc=self.opt_enc.state_dict(), opt_dec=self.opt_dec.state_dict(),
                    scaler_enc=self.scaler_enc.state_dict(), scaler_dec=self.scaler_dec.state_dict(),
                    rng=dict(shared=self.gen.get_state(), ranks=all_rng_states(self.world, self.dev),
                             latents=None if self.gen_z is self.gen else self.gen_z.get_state()),
                    config=self.cfg, sample_z=self.sample_z.cpu(), start_res=self.start_res,
                    started_from=self.started_from)

    def start_from(self, ema):
        """Fine-tune: the encoder, decoder, EMA decoder and (where the file has it) the robust loss
        of the checkpoint `ema` was loaded from; the optimizers start fresh. A larger max_res adds
        new levels on top."""
        live = model.load_checkpoint(ema.path, ema=False, live_if_missing=True)
        grow = self.mcfg.max_res > ema.cfg.max_res
        for net, sd in ((self.encoder, ema.encoder), (self.decoder, live.decoder), (self.ema, ema.decoder)):
            missing, unexpected = net.load_state_dict(sd.state_dict(), strict=not grow)
            assert not unexpected, unexpected                # settings checked that the networks agree
        self.start_res = ema.res
        while self.robust.res < ema.res:
            self.robust.grow()
        raw = torch.load(ema.path, map_location='cpu', weights_only=True, mmap=True)
        if isinstance(raw, dict) and 'robust' in raw:
            self.robust.load_state_dict(raw['robust'])
        self.started_from = dict(checkpoint=os.path.abspath(ema.path), res=ema.res, kimg=ema.kimg)

    def load(self, ck):
        for name in ('encoder', 'decoder', 'robust', 'opt_enc', 'opt_dec'):
            getattr(self, name).load_state_dict(ck[name])
        self.ema.load_state_dict(ck['decoder_ema'])
        for name in ('scaler_enc', 'scaler_dec'):          # absent in older files: the scale restarts
            if ck.get(name):
                getattr(self, name).load_state_dict(ck[name])
        self.images_seen, self.step = images_seen_of(ck), ck['step']
        self.start_res, self.started_from = ck.get('start_res', 4), ck.get('started_from')
        self.gen.set_state(ck['rng']['shared'])
        if self.gen_z is not self.gen and ck['rng'].get('latents') is not None:
            self.gen_z.set_state(ck['rng']['latents'])
        self.sample_z = ck['sample_z'].to(self.dev)
        if self.rank < len(ck['rng']['ranks']):
            mine = ck['rng']['ranks'][self.rank]
            torch.set_rng_state(mine['cpu'])
            if self.dev.type == 'cuda' and mine['cuda'] is not None:
                torch.cuda.set_rng_state(mine['cuda'], self.dev)

    def step_on(self, x, res, alpha, fading):
        """One iteration on the real batch x: encoder update, decoder update, EMA. Returns the
        logged parts (detached scalars, still on the device: nothing here waits for the device).
        Each backward names the parameters it trains; the other network's weights get no gradient
        while gradients flow through it (requires_grad never changes, so compiled blocks stay valid)."""
        cfg, authors = self.cfg, self.cfg['authors']
        weights = loss_weights(cfg, fading)
        invariance_k = model.INVARIANCE_K if invariance_on(cfg, res, alpha) else 0
        # the decoder's lambda_x_dec term decodes the same phi(x) with the same weights as L_phi's
        # reconstruction: one pass serves both (losses.encoder_loss), where the two take one distance
        shared = weights['lambda_x_dec'] > 0 and self.share_recon and not invariance_k
        top = losses.mix_splits(self.decoder, res, alpha)   # both steps' splits j: one read of the CPU generator
        j_enc, j_dec = torch.randint(1, top + 1, (2,), generator=self.gen).tolist() if top else (None, None)
        # encoder step: L_phi; gradients flow through the decoder into the encoder
        with torch.no_grad(), self.autocast:
            fakes = losses.fake_batch(self.decoder, x.shape[0], res, alpha, cfg['mix_ratio'], self.gen,
                                      rank=self.rank, world=self.world, z_generator=self.gen_z, j=j_enc).images
        with self.autocast:
            loss_enc, parts_enc, z_real = losses.encoder_loss(
                self.encoder, self.decoder, self.distance, x, fakes.float(), res, alpha, cfg['margin'][res], weights,
                extra_kl=cfg['extra_kl'] or authors, upper_clamp=cfg['upper_clamp'] or authors, gather=gather,
                invariance_k=invariance_k, lambda_x_dec=weights['lambda_x_dec'] if shared else 0.0)
        rec_dec = parts_enc.pop('rec_dec', None)
        self.update(loss_enc, self.opt_enc, self.scaler_enc, self.params_enc, self.params_dec if shared else [])
        # decoder step: L_theta; gradients flow through the encoder (and d_rho, as it now stands)
        with self.autocast:
            loss_dec, parts_dec = losses.decoder_loss(
                self.encoder, self.decoder, x.shape[0], res, alpha, {**weights, 'lambda_x_dec': 0.0} if shared else
                weights, cfg['mix_ratio'], self.gen, rank=self.rank, world=self.world, gather=gather, x=x,
                distance=self.distance_dec, z_real=z_real, z_generator=self.gen_z, j=j_dec)
        self.update(loss_dec, self.opt_dec, self.scaler_dec, self.params_dec, keep_grad=shared)
        loss_dec = loss_dec.detach()
        if shared:                             # logged as the decoder's whole loss, as when it is computed here
            parts_dec['rec_dec'] = rec_dec
            loss_dec = loss_dec + weights['lambda_x_dec'] * rec_dec
        # the decay ramps up to ema_decay ((1 + t) / (10 + t), as TF's ExponentialMovingAverage), so
        # that early samples and short runs do not average in the random initialization; a fine-tune's
        # EMA starts from a trained average and keeps the full decay
        ramp = 1.0 if self.started_from else (1 + self.step) / (10 + self.step)
        model.update_ema(self.ema, self.decoder, min(cfg['ema_decay'], ramp))
        self.images_seen += x.shape[0] * self.world
        self.step += 1
        return dict(loss_enc=loss_enc.detach(), **parts_enc, loss_dec=loss_dec, **parts_dec)

    @property
    def share_recon(self):
        """One decoder pass for both reconstruction terms: the same distance in both, and no float16
        (its two loss scales would differ)."""
        return (self.cfg['recon_dec'] or self.cfg['recon']) == self.cfg['recon'] and self.dtype != 'float16'

    def update(self, loss, opt, scaler, params, also=(), keep_grad=False):
        """Backpropagate into params (and `also`, whose step comes later and adds to it) and step
        opt on params. keep_grad: params already hold gradient from the encoder step's shared pass.
        A non-finite loss is caught by the caller once per log interval (train_loop), not here: a
        check here would wait for the device every step."""
        for p in ([] if keep_grad else params) + list(also):
            p.grad = None
        scaler.scale(loss).backward(inputs=params + list(also))
        average_gradients(params)
        scaler.step(opt)
        scaler.update()


# --------------------------------------------------------------------------------------------
# What a run writes besides ckpt.pt: grids, snapshots, the progress line

@torch.no_grad()
def sample_grid(ema, encoder, reals, z, res, alpha):
    """Rows: real images, their reconstructions, coarse blocks (4-8) from the image to the left,
    the other blocks from the image to the left, random samples: all from the EMA decoder."""
    was = encoder.training
    encoder.eval()
    z_real = encoder(reals, res, alpha)
    left = z_real.roll(1, 0)
    n, extra = ema.n_blocks, ema.cfg.extra_8x8
    coarse = model.block_range('coarse', n, extra)
    rows = [reals, ema(z_real, res, alpha, noise=False),
            ema(model.mix_latents(z_real, left, coarse, n), res, alpha, noise=False),
            ema(model.mix_latents(z_real, left, range(coarse.stop, n), n), res, alpha, noise=False),
            ema(z, res, alpha, noise=False)]
    encoder.train(was)
    return torch.cat(rows).clamp(-1, 1).add(1).div(2)


def write_grid(t, reals, res, alpha):
    path = os.path.join(t.cfg['out_dir'], f'grid_{t.images_seen:09d}.png')       # named by images seen
    small = torch.nn.functional.adaptive_avg_pool2d(reals.float() / 127.5 - 1, res)
    grid = sample_grid(t.ema, t.encoder, small, t.sample_z, res, alpha)
    grid = torch.nn.functional.interpolate(grid, scale_factor=max(1, 64 // res), mode='nearest')
    # imported here: torchvision.utils imports torchvision.models, 2 s of every process's start on a CPU
    from torchvision.utils import save_image
    save_image(grid, path, nrow=8)                        # small phases enlarged to 64 px tiles
    return path


def write_snapshot(t, res, alpha, writer):
    """snapshot_<images seen>.pt: the EMA model at this point, for model.load_checkpoint, sample.py
    and metrics.py --ckpt= (ckpt.pt alone resumes)."""
    path = os.path.join(t.cfg['out_dir'], f'snapshot_{t.images_seen:09d}.pt')
    writer.save(path, dict(model_config=asdict(t.mcfg), res=res, alpha=alpha, kimg=t.images_seen / 1000,
                           images_seen=t.images_seen, encoder=t.encoder.state_dict(), decoder_ema=t.ema.state_dict(),
                           robust=t.robust.state_dict(), config=t.cfg))
    return path


def to_host(obj):
    """A copy of a state (dicts, lists, tensors) in host memory, detached from what training changes next."""
    if torch.is_tensor(obj):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):                 # a state_dict's OrderedDict keeps its _metadata (versions)
        out = type(obj)((k, to_host(v)) for k, v in obj.items())
        if hasattr(obj, '_metadata'):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class Writer:
    """Checkpoints and snapshots written by a background thread while training goes on: the state
    is copied to host memory first, then written atomically (model.save_checkpoint); one write at a
    time. A failed write (a full disk) leaves the file before it in place and stops the run with
    one line at the next save or at the end; `wait` is what Ctrl-C, SIGTERM and the end wait on."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, path, state):
        self.wait()
        host = to_host(state)
        self.thread = threading.Thread(target=self._write, args=(path, host), name='checkpoint-writer')
        self.thread.start()

    def _write(self, path, state):
        try:
            model.save_checkpoint(path, **state)
        except Exception as e:                             # noqa: BLE001 (reported by wait, in the main thread)
            self.error = (path, e)

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error:
            path, e = self.error
            self.error = None
            _fail(f'could not write {path} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); the file '
                  f'before it is intact: free space or pick another --out_dir, then --init_from=resume')


def crossed(kimg, step_images, every):
    """True when this step crossed a multiple of `every` kimg."""
    if every <= 0:
        return False
    return math.floor(kimg / every) > math.floor((kimg - step_images / 1000) / every)


def memory_text(dev):
    if dev.type == 'cuda':
        return f'{torch.cuda.max_memory_allocated(dev) / 2 ** 30:.1f}GB'
    try:
        import resource                                   # not on Windows
    except ImportError:
        return ''
    return f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f}GB rss'


def progress_line(kimg, res, alpha, means, rate, eta_phase, eta_run, dev, digits=1):
    """kimg | resolution and fade | every logged term by its log.jsonl name | speed | time left | memory.
    kimg has `digits` decimals (enough that lines --log_every apart differ)."""
    terms = ' '.join(f'{k} {v:.4g}' for k, v in means.items())
    return (f'kimg {kimg:8.{digits}f} | {res}px a={alpha:.2f} | {terms} | {rate:.0f} img/s {1000 / rate:.1f} s/kimg '
            f'| eta phase {max(0.0, eta_phase) / 60:.1f}m run ~{max(0.0, eta_run) / 60:.0f}m | {memory_text(dev)}'
            ).rstrip(' |')


def model_config_from(cfg):
    extra = model.AUTHORS if cfg['authors'] else {}
    flip = cfg['invariance'] == 'flip'                       # Sec. 4.3: an extra 8x8 block; noise off (authors)
    return model.ModelConfig(max_res=cfg['max_res'], nz=cfg['nz'], arch=cfg['arch'], width=cfg['width'],
                             noise='none' if flip else cfg['noise'], extra_8x8=flip, **extra)


def print_plan(cfg, table, end_kimg, world, say):
    """One line per phase: where it starts, how long, its batch, lr and margin; kimg with as many decimals
    as the shortest phase needs (a 0.032-kimg phase is not '0.0 kimg')."""
    d = max(1, 1 - math.floor(math.log10(min(length for _, _, length in table))))   # two significant digits
    for res, start, length in table:
        b = cfg['batch_size'][res]
        say(f'  phase {res:4d}x{res:<4d} from {start:9.{d}f} kimg, {length:8.{d}f} kimg, batch {b} x {world} = '
            f'{b * world}, lr {cfg["lr"][res]}, margin {cfg["margin"][res]}')
    say(f'  end at {end_kimg:.{d}f} kimg')


def check_enough_images(source, cfg, table, world):
    res, b = max(((r, cfg['batch_size'][r]) for r, _, _ in table), key=lambda rb: rb[1])
    if len(source) < b * world:
        skipped = getattr(source, 'skipped', [])
        why = f' ({len(skipped)} unreadable files skipped)' if skipped else ''
        _fail(f'--batch_size: {len(source)} training images{why} are fewer than one global batch at {res}x{res} '
              f'({b} x {world} process{"es" * (world > 1)}); pass --batch_size={max(1, len(source) // world)} '
              f'or less, or add images')


# --------------------------------------------------------------------------------------------
# The run

def main(cfg):
    """Train with the settings `cfg` (from `settings`, which has checked them). Ctrl-C and SIGTERM
    finish the step and write the checkpoint; the handlers they had before come back afterwards, so
    a notebook or a test process keeps its own."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(cfg)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Run:
    """Where a run stands besides the Trainer: the schedule, the processes, the data, the stop flag."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, self.local = (int(os.environ.get(k, d)) for k, d in
                                             (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
        self.master = self.rank == 0
        self.say = print if self.master else (lambda *a, **k: None)
        self.resume = cfg['init_from'] == 'resume'
        self.fine_tune = cfg['init_from'] not in ('scratch', 'resume')
        self.ck = read_checkpoint(cfg['out_dir']) if self.resume else None
        self.source = fine_tune_source(cfg['init_from']) if self.fine_tune else None
        start_res = self.ck.get('start_res', 4) if self.resume else self.source.res if self.fine_tune else 4
        self.table, self.end_kimg = phase_table(cfg['max_res'], cfg['phase_kimg'], cfg['total_kimg'], start_res)
        self.ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
        self.stop = None                     # the signal's name once Ctrl-C or SIGTERM asked to stop


def process_store(r, timeout):
    """The key-value store the ranks meet in: torchrun's own (or rank 0's), under a prefix of this
    attempt. Without it, workers that torchrun --max-restarts restarted read the addresses the
    previous attempt's workers left in torchrun's store, and cannot connect (pytorch issue 135712)."""
    if not os.environ.get('MASTER_ADDR') or not os.environ.get('MASTER_PORT'):
        _fail(f'WORLD_SIZE={r.world} but MASTER_ADDR and MASTER_PORT are not set; start several processes with torchrun')
    host, port = os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT'])
    serves = r.rank == 0 and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True'
    store = dist.TCPStore(host, port, r.world, is_master=serves, timeout=timeout)
    return dist.PrefixStore(f'automodulator/attempt{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}', store)


def start_processes(r):
    """The device, and the process group under torchrun (after the data is prepared: a cache build
    of an hour does not count against the group's timeout)."""
    dev = model.resolve_device(r.cfg['device'], r.local)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if r.world > 1:
        master = f'{os.environ.get("MASTER_ADDR", "?")}:{os.environ.get("MASTER_PORT", "?")}'
        timeout = datetime.timedelta(minutes=r.cfg['dist_timeout'])
        try:
            dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo', store=process_store(r, timeout),
                                    rank=r.rank, world_size=r.world, timeout=timeout)
        except (RuntimeError, ValueError, TimeoutError) as e:     # DistStoreError is a RuntimeError
            _fail(f'rank {r.rank} could not join the process group at {master} within --dist_timeout='
                  f'{r.cfg["dist_timeout"]:g} min ({type(e).__name__}: {str(e).splitlines()[0][:160]}); check '
                  f'--master_addr / --master_port (or --rdzv-endpoint) and that node 0 is up')
    return dev


def build_trainer(r, dev):
    """The networks: new, resumed, or from the checkpoint a fine-tune starts from."""
    if r.resume:
        mcfg = model.ModelConfig(**r.ck['model_config'])
    elif r.fine_tune:
        mcfg = replace(r.source.cfg, max_res=r.cfg['max_res'])
    else:
        mcfg = model_config_from(r.cfg)
    t = Trainer(r.cfg, mcfg, dev, r.rank, r.world)
    if r.resume:
        t.load(r.ck)
    elif r.fine_tune:
        t.start_from(r.source)
        r.say(f'fine-tuning {t.started_from["checkpoint"]} ({t.start_res}x{t.start_res}, '
              f'{t.started_from["kimg"]:.1f} kimg): new optimizers, the schedule from {t.start_res}x{t.start_res}')
    return t


def prepare_data(r):
    """The train split and the split the grids show, opened before the process group exists: a
    folder's cache is built (or an LSUN key list scanned) by one process per cache folder, which
    with a node-local --cache_dir is one per node; the others wait on its lock (data.BuildLock).
    Each node's local rank 0 shows the progress."""
    cfg, log = r.cfg, print if r.local == 0 else None
    try:
        source = data.open_split(cfg, 'train', log)
        held_out = cfg['dataset'] == 'shapes' or cfg['test_fraction'] > 0
        grid_source = data.open_split({**cfg, 'num_workers': 0}, 'test' if held_out else 'train', log)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        _fail(e)
    return source, grid_source


def load_data(r, t, dev, source, grid_source):
    """The checks the data needs against the schedule, and the 8 real images of the grids (held-out
    ones where the data set has them)."""
    check_enough_images(source, r.cfg, r.table, r.world)
    return grid_source.load_batch([i % len(grid_source) for i in range(8)], t.mcfg.max_res).to(dev)


def trim_log(path, kimg):
    """Drop the lines a crash left past the checkpoint (and a line it cut short): the resumed run
    logs those kimg again."""
    def before(line):
        try:
            return json.loads(line)['kimg'] <= kimg + 1e-9
        except (ValueError, KeyError, TypeError):
            return False
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if before(line)]
    if len(keep) < len(lines):
        with open(f'{path}.tmp', 'w') as f:
            f.writelines(keep)
        os.replace(f'{path}.tmp', path)


def announce(r, t, dev, source):
    """config.json (and W&B) on rank 0; what will run, on the screen."""
    cfg = r.cfg
    if r.master:
        os.makedirs(cfg['out_dir'], exist_ok=True)
        if r.resume:
            trim_log(os.path.join(cfg['out_dir'], 'log.jsonl'), t.images_seen / 1000)
        with open(os.path.join(cfg['out_dir'], 'config.json'), 'w') as f:
            json.dump({**cfg, 'model_config': asdict(t.mcfg), 'world_size': r.world}, f, indent=1, default=str)
        if cfg['wandb_log']:
            import wandb
            wandb.init(project=cfg['wandb_project'], config=cfg)
    dtype = t.dtype if t.dtype == cfg['dtype'] else f'{cfg["dtype"]} -> {t.dtype}'
    r.say(f'world {r.world} | device {dev} | dtype {dtype} | data {cfg["dataset"]} ({len(source):,} train images)')
    r.say(f'decoder {model.count(t.decoder.parameters()):,} params | encoder {model.count(t.encoder.parameters()):,} | '
          f'robust loss {model.count(t.robust.parameters()):,}')
    print_plan(cfg, r.table, r.end_kimg, r.world, r.say)


def catch_signals(r):
    """Ctrl-C and SIGTERM finish the step, write the checkpoint, then stop."""
    def request_stop(signum, frame):
        r.stop = signal.Signals(signum).name
        r.say(f'{r.stop}: finishing this step, then writing the checkpoint')
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def enter_phase(r, t, source, res, p, dev, say_so):
    """Grow to the phase's resolution: robust loss, learning rate, data loader; say_so: print the phase line."""
    while t.robust.res < res:
        t.robust.grow()
    for opt in (t.opt_enc, t.opt_dec):
        for group in opt.param_groups:
            group['lr'] = r.cfg['lr'][res]
    loader = data.make_loader(source, res, r.cfg['batch_size'][res], r.rank, r.world, r.cfg['seed'], t.images_seen,
                              r.cfg['num_workers'], pin_memory=dev.type == 'cuda')
    if say_so:
        fade = r.table[p][2] * r.cfg['fade']
        r.say(f'---- phase {p}: {res}x{res} at {t.images_seen / 1000:g} kimg, '
              + (f'fading in over {fade:g} kimg ----' if fade > 0 else 'no fade-in ----'))
    return loader


AGREE_EVERY = 50        # steps between the ranks' agreement on a signal and a timed save (0.2-5 s on a GPU)


def agree(r, dev, now, save_due):
    """(stop, save): whether a signal asked any rank to stop, and whether the timed checkpoint is
    due: every rank must stop and save at the same step (the save is a collective). One process
    reads its own flags every step; several agree only when `now`, as that read waits for the device."""
    stopping = r.stop is not None
    if r.world == 1:
        return stopping, save_due
    if not now:
        return False, False
    flags = torch.tensor([float(stopping), float(save_due)], device=dev)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stopping, save_due = (v > 0 for v in flags.tolist())
    r.stop = r.stop or ('a signal on another rank' if stopping else None)
    return stopping, save_due


class Terms:
    """The logged terms of the steps since the last progress line, summed on the device, and for
    each the images seen when it first went non-finite: a NaN is named where it started, not by all
    the terms it spread to. Read once per line (`read`), the one wait for the device in that interval."""

    ENCODER = ('loss_enc', 'kl_real', 'kl_fake', 'recon', 'inv')     # the encoder step's, which comes first

    def __init__(self):
        self.groups = {}        # term names (a step's, in order) -> [sums, steps, first non-finite]

    def add(self, parts, images_seen):
        names = tuple(parts)                          # inv joins at 8x8: a new group
        v = torch.stack([parts[k].float() for k in names])
        g = self.groups.setdefault(names, [torch.zeros_like(v), 0, torch.full_like(v, math.inf)])
        g[0] += v
        g[1] += 1
        g[2] = torch.where(torch.isfinite(v) | (g[2] < math.inf), g[2], torch.full_like(v, images_seen))

    def read(self):
        """{term: mean over the steps (and ranks)}, and a list of the terms that went non-finite
        first (of the earliest step; the encoder's before the decoder's, which run after its update)."""
        if not self.groups:
            return {}, []
        sums = torch.cat([g[0] for g in self.groups.values()])
        first = torch.cat([g[2] for g in self.groups.values()])
        if distributed():
            dist.all_reduce(sums)
            sums /= dist.get_world_size()
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        values = torch.cat([sums, first]).tolist()
        sums, first = values[:len(values) // 2], values[len(values) // 2:]
        means, totals, i = {}, {}, 0
        for names, (_, steps, _) in self.groups.items():
            for k in names:
                means[k] = means.get(k, 0.0) + sums[i]
                totals[k] = totals.get(k, 0) + steps
                i += 1
        names = [k for group in self.groups for k in group]
        start = min(first)
        bad = list(dict.fromkeys(k for k, f in zip(names, first) if f == start)) if start < math.inf else []
        in_encoder = [k for k in bad if k in Terms.ENCODER]
        return {k: v / totals[k] for k, v in means.items()}, in_encoder or bad


def check_finite(terms, since_kimg, kimg):
    """The means of the terms; stop without writing anything once one has gone non-finite."""
    means, bad = terms.read()
    if bad:
        hint = ('its terms are finite: check the loss weights' if set(bad) <= {'loss_enc', 'loss_dec'} else
                'try a lower lr, or --dtype=float32')
        _fail(f'a loss went non-finite between {since_kimg:.3f} and {kimg:.3f} kimg, in {", ".join(bad)} ({hint}); '
              f'the last checkpoint is kept')
    return means


def log_progress(r, t, means, p, res, alpha, rate, dev):
    """The progress line, and the same numbers as one line of log.jsonl (and W&B)."""
    kimg = t.images_seen / 1000
    eta_phase = (phase_end(r.table, p, r.end_kimg) - kimg) * 1000 / rate
    digits = max(1, -math.floor(math.log10(r.cfg['log_every'])))         # 0.001 kimg apart: 3 decimals
    r.say(progress_line(kimg, res, alpha, means, rate, eta_phase,
                        remaining_seconds(r.table, r.end_kimg, kimg, res, rate), dev, digits))
    for line in model.compile_fallbacks() if r.cfg['compile'] else ():
        r.say(line)
    if r.master:
        record = dict(kimg=kimg, step=t.step, res=res, alpha=alpha, **means, img_per_s=rate, time=time.time() - r.t_start)
        with open(os.path.join(r.cfg['out_dir'], 'log.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')
        if r.cfg['wandb_log']:
            import wandb
            wandb.log(record, step=t.step)


def train_loop(r, t, source, grid_reals, dev, writer):
    """Steps until end_kimg or a signal: progress lines, grids, checkpoints and snapshots on the way."""
    cfg = r.cfg
    cur_res, loader, last_log, t_log, t_save = None, None, t.images_seen, time.time(), time.time()
    terms = Terms()
    while t.images_seen / 1000 < r.end_kimg:
        p, res, alpha, fading = schedule(t.images_seen / 1000, r.table, cfg['fade'])
        if res != cur_res:
            loader = enter_phase(r, t, source, res, p, dev, say_so=cur_res is not None)
            cur_res, batch = res, cfg['batch_size'][res]

        # One step.
        x = data.prepare_batch(next(loader), alpha, dev, t.gen, pairs=invariance_on(cfg, res, alpha), rank=r.rank,
                               world=r.world)
        if cfg['channels_last']:
            x = x.contiguous(memory_format=torch.channels_last)
        terms.add(t.step_on(x, res, alpha, fading), t.images_seen)
        kimg, step_images = t.images_seen / 1000, batch * r.world
        finished = kimg >= r.end_kimg
        log_now = kimg - last_log / 1000 >= cfg['log_every']
        timed = cfg['ckpt_minutes'] > 0 and time.time() - t_save >= cfg['ckpt_minutes'] * 60
        stop, timed = agree(r, dev, log_now or t.step % AGREE_EVERY == 0, timed)
        done = finished or stop
        phase_over = schedule(kimg, r.table, cfg['fade'])[0] != p
        save = crossed(kimg, step_images, cfg['ckpt_every']) or timed or phase_over or done
        snapshot = crossed(kimg, step_images, cfg['snapshot_every']) or phase_over or finished

        # Print the progress line (the one read of the device per interval), write grids, checkpoint
        # and snapshots, each only with weights that every term so far has left finite.
        if log_now or done or save or snapshot:
            means = check_finite(terms, last_log / 1000, kimg)
        if log_now or done:
            log_progress(r, t, means, p, res, alpha, (t.images_seen - last_log) / (time.time() - t_log), dev)
            terms, last_log, t_log = Terms(), t.images_seen, time.time()
        if r.master and crossed(kimg, step_images, cfg['sample_every']) and not done:
            write_grid(t, grid_reals, res, alpha)
        if save:
            state = t.state()                             # every rank takes part (RNG states)
            if r.master:
                writer.save(r.ckpt_path, dict(res=res, alpha=alpha, **state))
            t_save = time.time()
        if r.master and snapshot:
            write_snapshot(t, res, alpha, writer)
        if done:        # checked after the save: a signal that lands between steps still gets one
            break


def run(cfg):
    """main's body: the steps of a run, from the device to the last grid."""
    r = Run(cfg)
    if cfg['dry_run']:
        r.say(json.dumps(cfg, indent=1, default=str))
        print_plan(cfg, r.table, r.end_kimg, r.world, r.say)
        return
    source, grid_source = prepare_data(r)
    if cfg['prepare_only']:
        where = f' in {source.cache.dir}' if getattr(source, 'cache', None) else ''
        r.say(f'prepared: {len(source):,} train images of {cfg["dataset"]}{where}; a run with these settings '
              f'starts training at once')
        return
    dev = start_processes(r)
    t = build_trainer(r, dev)
    grid_reals = load_data(r, t, dev, source, grid_source)
    announce(r, t, dev, source)
    catch_signals(r)
    r.t_start, kimg_start = time.time(), t.images_seen / 1000
    writer = Writer()
    try:
        train_loop(r, t, source, grid_reals, dev, writer)
    finally:                                              # a stop waits for the last write
        writer.wait()

    # Finish: the last grid, a check that all ranks agree, a summary.
    kimg = t.images_seen / 1000
    p, res, alpha, _ = schedule(min(kimg, r.end_kimg - 1e-9), r.table, cfg['fade'])
    path = write_grid(t, grid_reals, res, alpha) if r.master else None
    if r.world > 1:
        check_ranks_agree([t.encoder, t.decoder, t.ema, t.robust], r.world, r.say)
    minutes = (time.time() - r.t_start) / 60
    r.say(f'{"stopped by " + r.stop if r.stop else "done"} at {kimg:.1f} kimg ({res}x{res}, alpha {alpha:.2f}) '
          f'after {minutes:.1f} min this run ({kimg - kimg_start:.1f} kimg); checkpoint {r.ckpt_path}; grid {path}')
    if r.world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(settings(configure(globals(), CONFIG_KEYS, shown=lambda given: resolve(given, say=lambda *a: None))))
