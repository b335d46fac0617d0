"""Progressive training of a Deep Automodulator, one process or many.

    python train.py                                   # the embedded `shapes` data set, on a CPU
    python train.py --dataset=ffhq --data_root=/data/ffhq/images1024x1024
    torchrun --standalone --nproc_per_node=8 train.py --dataset=lsun_cars --data_root=/data/lsun/car

Each step is one encoder update (L_phi of Eq. 6, which also trains the robust loss's alpha and
scale) and one decoder update (L_theta of Eq. 6 with the layer-specific loss L_j), each with the
other network frozen while gradients flow through it; then the EMA decoder follows (paper Sec. 3,
A.1; the authors' code, reference doc sections 2-3). Progress is a pure function of the number of
images seen, so a checkpoint resumes the same trajectory.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torchvision.utils import save_image

import data
import losses
import model
from configurator import configure

# --------------------------------------------------------------------------------------------
_before = set(globals())
# data
dataset = 'shapes'          # shapes | folder | ffhq | celebahq | lsun_bedroom | lsun_cars; picks a preset
data_root = ''              # images folder or LSUN lmdb (not needed for shapes)
cache_dir = ''              # where folder caches go ('' = data_root/.automodulator_cache)
test_fraction = 0.0         # held-out share of a plain folder (sample.py and metrics use it)
num_workers = 4             # DataLoader worker processes (folders, LSUN)
# model (paper defaults; --authors=True switches to the authors' code everywhere it differs)
max_res = 256               # last resolution, a power of two
arch = 'large'              # decoder widths: large (FFHQ, LSUN) or small (CelebA-HQ)
width = 1.0                 # channel multiplier
nz = 512                    # latent size
noise = 'channel'           # layer noise: channel | shared | none
authors = False             # the authors' architecture and loss choices (README tables)
extra_kl = False            # authors: add KL(E(x)) to L_phi outside the margin clamp (on with authors=True)
upper_clamp = False         # authors: clamp KL_real - KL_fake also from above at M/2 (on with authors=True)
invariance = ''             # 'flip': Sec. 3.3/4.3, flip pairs drive pose through blocks 0-1 alone (extra 8x8 block, no noise)
# schedule, per resolution; kimg = thousands of images seen
phase_kimg = {4: 2400, 8: 2400, 16: 2400, 32: 2400, 64: 10400, 128: 10600, 256: 16000, 512: 16000}
fade = 0.5                  # share of each phase over which the new level fades in
total_kimg = 0.0            # stop here (0 = at the end of the max_res phase; beyond it, max_res runs on)
batch_size = {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 32, 256: 16, 512: 4}  # per process
lr = {4: 0.0005, 8: 0.0005, 16: 0.0005, 32: 0.0005, 64: 0.001, 128: 0.001, 256: 0.001, 512: 0.001}
margin = {4: 2.0, 8: 2.0, 16: 0.5, 32: 0.5, 64: 0.5, 128: 0.5, 256: 0.5, 512: 0.5}  # KL margin M_gap
# loss weights, paper units (KL weight 1)
lambda_x_fade = 2.0         # image reconstruction weight in the first (fade) half of a phase
lambda_x_stable = 3.0       # ... and in the second half
lambda_z = 2.0              # latent cosine reconstruction
lambda_j = 10.0             # layer-specific loss L_j
lambda_x_dec = 0.0          # not in the paper: the decoder also reconstructs real images (on in the shapes preset)
beta1 = 0.0                 # Adam's first-moment decay, encoder (paper A.1: 0; 0.9 destabilized the KL game on shapes)
beta1_dec = 0.0             # ... and decoder (paper A.1: 0)
mix_ratio = 0.25            # share of style-mixed samples among the fakes (paper 1/4; authors' D step 1/2)
ema_decay = 0.999           # EMA of decoder weights per step (ramped up from 0.1 over the first steps)
# system
device = 'auto'             # auto (cuda if available) | cpu | cuda | cuda:N
dtype = 'float32'           # float32 | bfloat16 | float16 (autocast; float16 adds a GradScaler)
compile = False             # torch.compile each network block
channels_last = False       # NHWC memory format for the convolutions (faster with bf16 / on tensor cores)
seed = 0                    # model init, data order, latent draws
out_dir = 'out'             # ckpt.pt, config.json, log.jsonl, grid_*.png
init_from = 'scratch'       # scratch | resume (from out_dir/ckpt.pt)
log_every = 10.0            # kimg between progress lines
sample_every = 100.0        # kimg between sample grids
ckpt_every = 100.0          # kimg between checkpoints
dry_run = False             # print the resolved config and the phase table, then exit
wandb_log = False           # also log to Weights & Biases (imported only when on)
wandb_project = 'automodulator'  # W&B project
CONFIG_KEYS = sorted(set(globals()) - _before - {'_before'})

# Per data set presets (paper A.1; the authors' schedule, reference doc 3.2-3.3). They replace the
# defaults above unless the same key is given on the command line.
_PAPER = {4: 2400, 8: 2400, 16: 2400, 32: 2400, 64: 10400}
PRESETS = {
    # shapes: CPU-sized, under 20 minutes on 2 AVX2 EPYC cores (README). Choices that differ from the
    # paper, each measured on short runs (README): a 32-d latent for a handful of factors; margin 0.5
    # from the start; the authors' code (--authors: their plain conv stacks, extra KL(E(x)) term and
    # upper clamp; with Eq. 6 alone the clamped margin stops spreading the real encodings, and their
    # plain stacks reconstructed better than residual blocks in this budget); the decoder also learns
    # the real images (lambda_x_dec; without it the pictures stay noise-covered in this budget); no
    # layer noise (the scenes have no stochastic detail, and drawing it cost 10% of a step); EMA 0.99; a
    # 30-kimg 32x32 phase (the loss jumps when its fade ends and needs ~10 kimg to settle).
    'shapes': dict(max_res=32, width=1 / 16, nz=32, authors=True, ema_decay=0.99, lambda_x_dec=10.0, noise='none',
                   phase_kimg={4: 12, 8: 30, 16: 48, 32: 30}, fade=0.5,
                   batch_size={4: 32, 8: 32, 16: 32, 32: 32}, lr={r: 0.001 for r in (4, 8, 16, 32)},
                   margin={r: 0.5 for r in (4, 8, 16, 32)}, num_workers=0,
                   log_every=5.0, sample_every=40.0, ckpt_every=20.0),
    'celebahq': dict(arch='small', max_res=256, phase_kimg={**_PAPER, 128: 7500, 256: 16000},
                     margin={4: 2.0, 8: 2.0, 16: 0.5, 32: 0.5, 64: 0.5, 128: 0.2, 256: 0.4}),
    'ffhq': dict(arch='large', max_res=256, phase_kimg={**_PAPER, 128: 10600, 256: 16000, 512: 16000}),
    'lsun_bedroom': dict(arch='large', max_res=256, phase_kimg={**_PAPER, 128: 7500, 256: 16000},
                         margin={4: 2.0, 8: 2.0, 16: 0.5, 32: 0.5, 64: 0.5, 128: 0.2, 256: 0.2}),
    'lsun_cars': dict(arch='large', max_res=256, phase_kimg={**_PAPER, 128: 7500, 256: 16000}),
    'folder': dict(),
}

if __name__ == '__main__':
    given = configure(globals(), CONFIG_KEYS)
    if dataset not in PRESETS:
        sys.exit(f'error: unknown --dataset={dataset!r}; choose one of {", ".join(PRESETS)}')
    for key, value in PRESETS[dataset].items():
        if key not in given:
            globals()[key] = value
    config = {k: globals()[k] for k in CONFIG_KEYS}


# --------------------------------------------------------------------------------------------
# Pieces the loop uses (importable, so tests and forks can reuse them)

def invariance_on(cfg, res, alpha):
    """Flip pairs (half of each batch mirrors the other half, Sec. 4.3) and L_inv, once the split
    after block 1 has blocks after it that run without the fade-in: from the end of the 8x8 fade on
    (the authors also insert their extra 8x8 block after that fade)."""
    return cfg['invariance'] == 'flip' and (res > 8 or res == 8 and alpha >= 1)


def phase_table(max_res, phase_kimg, total_kimg=0.0):
    """[(res, start_kimg, length_kimg)] for 4..max_res, and the kimg where training ends."""
    rows, start = [], 0.0
    for i in range(model.level(max_res, max_res) + 1):
        res = 4 * 2 ** i
        if res not in phase_kimg:
            raise ValueError(f'phase_kimg has no entry for {res}x{res}; give one per resolution 4..{max_res}')
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


def gather(z):
    return _Gather.apply(z) if dist.is_initialized() and dist.get_world_size() > 1 else z


def average_gradients(params):
    """All-reduce the gradients of `params` (mean over ranks) in one flat buffer."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


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


def memory_text(dev):
    if dev.type == 'cuda':
        return f'{torch.cuda.max_memory_allocated(dev) / 2 ** 30:.1f}GB'
    import resource
    return f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f}GB rss'


def model_config_from(cfg):
    extra = model.AUTHORS if cfg['authors'] else {}
    flip = cfg['invariance'] == 'flip'                       # Sec. 4.3: an extra 8x8 block; noise off (authors)
    return model.ModelConfig(max_res=cfg['max_res'], nz=cfg['nz'], arch=cfg['arch'], width=cfg['width'],
                             noise='none' if flip else cfg['noise'], extra_8x8=flip, **extra)


# --------------------------------------------------------------------------------------------
# The run

def main(cfg):
    table, end_kimg = phase_table(cfg['max_res'], cfg['phase_kimg'], cfg['total_kimg'])
    for key in ('batch_size', 'lr', 'margin'):
        missing = [r for r, _, _ in table if r not in cfg[key]]
        if missing:
            raise SystemExit(f'error: --{key} has no entry for resolutions {missing}')
    if cfg['invariance'] not in ('', 'flip'):
        raise SystemExit(f"error: --invariance must be '' (off) or 'flip', got {cfg['invariance']!r}")
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)))
    master = rank == 0
    dev_name = cfg['device']
    if dev_name == 'auto':
        dev_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev_name == 'cuda':
        dev_name = f'cuda:{local}'
    dev = torch.device(dev_name)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    say = print if master else (lambda *a, **k: None)

    if cfg['dry_run']:
        say(json.dumps(cfg, indent=1, default=str))
        for res, start, length in table:
            say(f'{res:4d}x{res:<4d} from {start:9.1f} kimg for {length:8.1f} kimg, batch {cfg["batch_size"][res]} '
                f'x {world}, lr {cfg["lr"][res]}, margin {cfg["margin"][res]}')
        say(f'end at {end_kimg:.1f} kimg')
        return

    # model, robust loss, optimizers
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    ckpt = None
    if cfg['init_from'] == 'resume':
        if not os.path.exists(ckpt_path):
            raise SystemExit(f'error: --init_from=resume but there is no {ckpt_path}; start with --init_from=scratch')
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        mcfg = model.ModelConfig(**ckpt['model_config'])
    elif cfg['init_from'] == 'scratch':
        mcfg = model_config_from(cfg)
    else:
        raise SystemExit(f"error: --init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")
    torch.manual_seed(cfg['seed'])                       # the same initial weights on every rank
    net = model.Automodulator(mcfg).to(dev)
    encoder, decoder = net.encoder, net.decoder
    ema = model.make_ema(decoder)
    robust = losses.AdaptiveRobustLoss(mcfg.max_res).to(dev)
    opt_enc = torch.optim.Adam(list(encoder.parameters()) + list(robust.parameters()), lr=cfg['lr'][4],
                               betas=(cfg['beta1'], 0.99), eps=1e-8)      # paper A.1: beta1 = 0, beta2 = 0.99
    opt_dec = torch.optim.Adam(decoder.parameters(), lr=cfg['lr'][4], betas=(cfg['beta1_dec'], 0.99), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg['seed'] + 1)     # shared by all ranks: latents, j, flips
    samples, step = 0, 0
    sample_z = model.sample_prior(8, mcfg.nz, generator=torch.Generator().manual_seed(cfg['seed'] + 2)).to(dev)
    if ckpt is not None:
        encoder.load_state_dict(ckpt['encoder'])
        decoder.load_state_dict(ckpt['decoder'])
        ema.load_state_dict(ckpt['decoder_ema'])
        robust.load_state_dict(ckpt['robust'])
        opt_enc.load_state_dict(ckpt['opt_enc'])
        opt_dec.load_state_dict(ckpt['opt_dec'])
        samples, step = ckpt['samples'], ckpt['step']
        gen.set_state(ckpt['rng']['shared'])
        sample_z = ckpt['sample_z'].to(dev)
    torch.manual_seed(cfg['seed'] + 1000 * (rank + 1))   # layer noise: a different stream per rank
    if ckpt is not None and rank < len(ckpt['rng']['ranks']):
        mine = ckpt['rng']['ranks'][rank]
        torch.set_rng_state(mine['cpu'])
        if dev.type == 'cuda' and mine['cuda'] is not None:
            torch.cuda.set_rng_state(mine['cuda'], dev)
    if cfg['channels_last']:
        for m in (encoder, decoder, ema):
            m.to(memory_format=torch.channels_last)
    if cfg['compile']:
        for block in list(encoder.blocks) + list(decoder.blocks):
            block.compile()

    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[cfg['dtype']]
    autocast = (torch.autocast(dev.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext())
    scalers = [torch.amp.GradScaler(dev.type, enabled=ptdtype == torch.float16) for _ in range(2)]

    if world > 1 and not master:
        dist.barrier()                                   # rank 0 builds any folder cache first ...
    source = data.make_source(cfg['dataset'], cfg['data_root'], 'train', mcfg.max_res, cfg['seed'],
                              cfg['test_fraction'], cfg['cache_dir'], cfg['num_workers'], say)
    if world > 1 and master:
        dist.barrier()                                   # ... and the others read it when it is complete
    if master:
        os.makedirs(cfg['out_dir'], exist_ok=True)
        with open(os.path.join(cfg['out_dir'], 'config.json'), 'w') as f:
            json.dump({**cfg, 'model_config': asdict(mcfg), 'world_size': world}, f, indent=1, default=str)
        if cfg['wandb_log']:
            import wandb
            wandb.init(project=cfg['wandb_project'], config=cfg)
    say(f'world {world} | device {dev} | dtype {cfg["dtype"]} | data {cfg["dataset"]} ({len(source):,} train images)')
    say(f'decoder {model.count(decoder.parameters()):,} params | encoder {model.count(encoder.parameters()):,} | '
        f'robust loss {model.count(robust.parameters()):,}')
    for res, start, length in table:
        b = cfg['batch_size'][res]
        say(f'  phase {res:4d}x{res:<4d} from {start:9.1f} kimg, {length:8.1f} kimg, batch {b} x {world} = {b * world}, '
            f'lr {cfg["lr"][res]}, margin {cfg["margin"][res]}')

    stop = {'signal': None}

    def request_stop(signum, frame):
        stop['signal'] = signal.Signals(signum).name
        say(f'{stop["signal"]}: finishing this step, then writing the checkpoint')
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def save(res, alpha):
        states = all_rng_states(world, dev)             # a collective: every rank takes part
        if not master:
            return
        rng = dict(shared=gen.get_state(), ranks=states)
        model.save_checkpoint(ckpt_path, model_config=asdict(mcfg), res=res, alpha=alpha, kimg=samples / 1000,
                              samples=samples, step=step, encoder=encoder.state_dict(), decoder=decoder.state_dict(),
                              decoder_ema=ema.state_dict(), robust=robust.state_dict(), opt_enc=opt_enc.state_dict(),
                              opt_dec=opt_dec.state_dict(), rng=rng, config=cfg, sample_z=sample_z.cpu(),
                              sample_real=fixed_reals.cpu())

    def write_grid(res, alpha):
        if master:
            path = os.path.join(cfg['out_dir'], f'grid_{samples:09d}.png')     # named by images seen
            grid = sample_grid(ema, encoder, fade_reals(res), sample_z, res, alpha)
            grid = torch.nn.functional.interpolate(grid, scale_factor=max(1, 64 // res), mode='nearest')
            save_image(grid, path, nrow=8)              # small phases enlarged to 64 px tiles
            return path

    test_source = data.make_source(cfg['dataset'], cfg['data_root'], 'test' if cfg['dataset'] == 'shapes'
                                   or cfg['test_fraction'] > 0 else 'train', mcfg.max_res, cfg['seed'],
                                   cfg['test_fraction'], cfg['cache_dir'], 0, lambda *a: None)
    fixed_reals = test_source.load_batch([i % len(test_source) for i in range(8)], mcfg.max_res).to(dev)

    def fade_reals(res):                                 # the fixed real images at the current resolution
        return torch.nn.functional.adaptive_avg_pool2d(fixed_reals.float() / 127.5 - 1, res)

    cur_res, loader, last_log, t_log = None, None, samples, time.time()
    sums, counts = {}, {}             # per term: a term can be absent from some steps (inv before 8x8)
    t_start, kimg_start = time.time(), samples / 1000
    while samples / 1000 < end_kimg:
        kimg = samples / 1000
        p, res, alpha, fading = schedule(kimg, table, cfg['fade'])
        if res != cur_res:                               # phase change: grow data, robust loss, lr
            while robust.res < res:
                robust.grow()
            for opt in (opt_enc, opt_dec):
                for group in opt.param_groups:
                    group['lr'] = cfg['lr'][res]
            batch = cfg['batch_size'][res]
            loader = data.make_loader(source, res, batch, rank, world, cfg['seed'], samples,
                                      cfg['num_workers'], pin_memory=dev.type == 'cuda')
            if cur_res is not None:
                say(f'---- phase {p}: {res}x{res} at {kimg:.1f} kimg, fading in over '
                    f'{table[p][2] * cfg["fade"]:.0f} kimg ----')
            cur_res = res
        m = cfg['margin'][res]
        lambda_x = cfg['lambda_x_fade'] if fading else cfg['lambda_x_stable']
        x = data.prepare_batch(next(loader), alpha, dev, gen, pairs=invariance_on(cfg, res, alpha), rank=rank, world=world)
        if cfg['channels_last']:
            x = x.contiguous(memory_format=torch.channels_last)

        _, _, parts = train_step(encoder, decoder, ema, robust, opt_enc, opt_dec, scalers, x, res, alpha,
                                 cfg, m, lambda_x, gen, step, kimg, autocast, rank, world)
        samples += batch * world
        step += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.float()
            counts[k] = counts.get(k, 0) + 1
        kimg = samples / 1000
        stopping = stop['signal'] is not None
        if world > 1:                   # every rank must stop at the same step (the save is a collective)
            flag = torch.tensor([float(stopping)], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = flag.item() > 0
            stop['signal'] = stop['signal'] or ('a signal on another rank' if stopping else None)
        done = kimg >= end_kimg or stopping
        if kimg - last_log / 1000 >= cfg['log_every'] or done:
            means = {k: v.item() / counts[k] for k, v in all_mean(sums).items()}
            dt = time.time() - t_log
            rate = (samples - last_log) / dt
            eta_phase = (phase_end(table, p, end_kimg) - kimg) * 1000 / rate
            eta_run = remaining_seconds(table, end_kimg, kimg, res, rate)
            say(f'kimg {kimg:8.1f} | {res}px a={alpha:.2f} | E {means["E"]:.3f} D {means["D"]:.3f} '
                f'kl_r {means["kl_real"]:.3f} kl_f {means["kl_fake"]:.3f} rec {means["recon"]:.3f} '
                f'kl_d {means["kl_dec"]:.3f} dcos {means["dcos"]:.4f} Lj {means["layer"]:.4f} '
                + (f'rec_d {means["rec_dec"]:.3f} ' if 'rec_dec' in means else '')
                + (f'inv {means["inv"]:.3f} ' if 'inv' in means else '') + f'| {rate:.0f} img/s {1000 / rate:.1f} s/kimg | '
                f'eta phase {eta_phase / 60:.1f}m run ~{eta_run / 60:.0f}m | {memory_text(dev)}')
            if master:
                record = dict(kimg=kimg, step=step, res=res, alpha=alpha, **means, img_per_s=rate, time=time.time() - t_start)
                with open(os.path.join(cfg['out_dir'], 'log.jsonl'), 'a') as f:
                    f.write(json.dumps(record) + '\n')
                if cfg['wandb_log']:
                    import wandb
                    wandb.log(record, step=step)
            sums, counts, last_log, t_log = {}, {}, samples, time.time()
        if crossed(kimg, batch * world, cfg['sample_every']) and not done:
            write_grid(res, alpha)
        if crossed(kimg, batch * world, cfg['ckpt_every']) or done:
            save(res, alpha)
        if done:        # checked after the save: a signal that lands between steps still gets one
            break

    kimg = samples / 1000
    p, res, alpha, _ = schedule(min(kimg, end_kimg - 1e-9), table, cfg['fade'])
    path = write_grid(res, alpha)
    if world > 1:
        check_ranks_agree([encoder, decoder, ema, robust], world, say)
    minutes = (time.time() - t_start) / 60
    say(f'{"stopped by " + stop["signal"] if stop["signal"] else "done"} at {kimg:.1f} kimg ({res}x{res}, alpha {alpha:.2f}) '
        f'after {minutes:.1f} min this run ({kimg - kimg_start:.1f} kimg); checkpoint {ckpt_path}; grid {path}')
    if world > 1:
        dist.destroy_process_group()


def train_step(encoder, decoder, ema, robust, opt_enc, opt_dec, scalers, x, res, alpha, cfg, margin, lambda_x,
               gen, step, kimg=0.0, autocast=nullcontext(), rank=0, world=1):
    """One training iteration: encoder update, decoder update, EMA. Returns (L_phi, L_theta, parts)."""
    batch = x.shape[0]
    # encoder step: L_phi; the decoder is frozen, gradients flow through it into the encoder
    decoder.requires_grad_(False)
    encoder.requires_grad_(True)
    with torch.no_grad(), autocast:
        fakes = losses.fake_batch(decoder, batch, res, alpha, cfg['mix_ratio'], gen, rank=rank, world=world).images
    with autocast:
        e_loss, e_parts = losses.encoder_loss(encoder, decoder, robust, x, fakes.float(), res, alpha, margin, lambda_x,
                                              extra_kl=cfg['extra_kl'] or cfg['authors'],
                                              upper_clamp=cfg['upper_clamp'] or cfg['authors'], gather=gather,
                                              invariance_k=model.INVARIANCE_K if invariance_on(cfg, res, alpha) else 0)
    check_finite(e_loss, e_parts, 'encoder', kimg)
    opt_enc.zero_grad(set_to_none=True)
    scalers[0].scale(e_loss).backward()
    average_gradients(list(encoder.parameters()) + list(robust.parameters()))
    scalers[0].step(opt_enc)
    scalers[0].update()

    # decoder step: L_theta; the encoder is frozen, gradients flow through it into the decoder
    encoder.requires_grad_(False)
    robust.requires_grad_(False)                 # d_rho's alpha and scale learn in the encoder step only
    decoder.requires_grad_(True)
    with autocast:
        d_loss, d_parts = losses.decoder_loss(encoder, decoder, batch, res, alpha, cfg['mix_ratio'], cfg['lambda_z'],
                                              cfg['lambda_j'], gen, rank=rank, world=world, gather=gather,
                                              x=x, robust=robust, lambda_x=cfg['lambda_x_dec'])
    check_finite(d_loss, d_parts, 'decoder', kimg)
    opt_dec.zero_grad(set_to_none=True)
    scalers[1].scale(d_loss).backward()
    average_gradients(list(decoder.parameters()))
    scalers[1].step(opt_dec)
    scalers[1].update()
    encoder.requires_grad_(True)
    robust.requires_grad_(True)
    # the decay ramps up to ema_decay ((1 + t) / (10 + t), as TF's ExponentialMovingAverage), so
    # that early samples and short runs do not average in the random initialization
    model.update_ema(ema, decoder, min(cfg['ema_decay'], (1 + step) / (10 + step)))
    parts = dict(E=e_loss.detach(), D=d_loss.detach(), **e_parts, kl_dec=d_parts['kl_fake'],
                 dcos=d_parts['cos'], layer=d_parts['layer'])
    if 'recon' in d_parts:
        parts['rec_dec'] = d_parts['recon']
    return e_loss, d_loss, parts


def crossed(kimg, step_images, every):
    """True when this step crossed a multiple of `every` kimg."""
    if every <= 0:
        return False
    return math.floor(kimg / every) > math.floor((kimg - step_images / 1000) / every)


def check_finite(loss, parts, which, kimg):
    if not torch.isfinite(loss):
        bad = [k for k, v in parts.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
        where = f'in {", ".join(bad)}' if bad else 'in the weighted sum (its terms are finite: check the loss weights)'
        raise SystemExit(f'error: the {which} loss is not finite at {kimg:.3f} kimg, {where}; the last checkpoint '
                         f'is kept. Try a lower lr, or --dtype=float32')


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


def all_mean(values):
    """Average a dict of scalar tensors over ranks (for the log)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    keys = sorted(values)
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


if __name__ == '__main__':
    main(config)
