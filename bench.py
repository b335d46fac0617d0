"""Speed: one training iteration, encoder inference, decoder sampling and the data loaders.

    python bench.py                                    # CPU, float32, 32x32, batch 16, large preset
    python bench.py --res=64 --dtype=bfloat16 --channels_last=True
    python bench.py --device=cuda --res=256 --batch=16 --compile=True

Every measurement prints one line and goes into bench.json (out). Times are medians over `repeat`
runs after `warmup`. FLOPs are counted with torch.utils.flop_counter; utilisation is the achieved
FLOP/s over this device's own peak, measured with a large matmul in the same dtype.
"""
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import model
import train
from configurator import configure, expand_path

_before = set(globals())
device = 'auto'             # auto (cuda if available) | cpu | cuda
dtype = 'float32'           # float32 | bfloat16 | float16 (autocast) | auto (bfloat16 where native, else float32)
compile = False             # torch.compile each network block
channels_last = False       # NHWC memory format for the convolutions
res = 32                    # training iteration resolution
batch = 16                  # training iteration batch size
arch = 'large'              # width table: large | small
width = 1.0                 # channel multiplier
authors = False             # the authors' architecture (ModelConfig(**model.AUTHORS))
encoder_res = 256           # encoder inference resolution (large preset)
warmup = 2                  # untimed runs first
repeat = 5                  # timed runs; medians are reported
skip = ''                   # comma-separated parts to skip: train, encoder, decoder, data
out = 'bench.json'          # where the results go
CONFIG_KEYS = sorted(set(globals()) - _before - {'_before'})


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def timed(fn, dev, warm, reps):
    """Median seconds of fn() over reps runs after warm untimed ones."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def flops_of(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def cpu_name():
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def peak_flops(dev, dt, n=2048, reps=5):
    """This device's matmul FLOP/s in dtype dt: the denominator of the utilisation. A dtype the
    hardware lacks (bfloat16 on a CPU without AVX-512 BF16 or AMX) is emulated and ~100x slower:
    the size doubles from 256 up to n only while one product stays under 0.1 s."""
    size = 256
    while size < n:
        a = torch.randn(size, size, device=dev, dtype=dt)
        if timed(lambda: a @ a, dev, 1, 1) > 0.1:
            break
        size *= 2
    a, b = torch.randn(size, size, device=dev, dtype=dt), torch.randn(size, size, device=dev, dtype=dt)
    return 2 * size ** 3 / timed(lambda: a @ b, dev, 2, reps)


def build(cfg, dev, max_res):
    extra = model.AUTHORS if cfg['authors'] else {}
    net = model.Automodulator(model.ModelConfig(max_res=max_res, arch=cfg['arch'], width=cfg['width'], **extra)).to(dev)
    if cfg['channels_last']:
        net = net.to(memory_format=torch.channels_last)
    if cfg['compile']:
        for block in list(net.encoder.blocks) + list(net.decoder.blocks):
            block.compile()
    return net


def bench_train(cfg, dev, autocast, report):
    """train.py's own step (Trainer.step_on) at one resolution, past its fade-in, with the paper's
    settings (train.PAPER) but for the options given here."""
    r = cfg['res']
    tcfg = {**train.DEFAULTS, **train.PAPER,
            **{k: cfg[k] for k in ('arch', 'width', 'authors', 'dtype', 'channels_last', 'compile')}, 'max_res': r}
    t = train.Trainer(tcfg, train.model_config_from(tcfg), dev)
    while t.robust.res < r:
        t.robust.grow()
    t.step = 10_000                                      # the EMA at its full decay
    x = torch.rand(cfg['batch'], 3, r, r, device=dev) * 2 - 1
    if cfg['channels_last']:
        x = x.contiguous(memory_format=torch.channels_last)
    seconds = timed(lambda: t.step_on(x, r, 1.0, False), dev, cfg['warmup'], cfg['repeat'])
    report('train_iteration', seconds, flops_of(lambda: t.step_on(x, r, 1.0, False)),
           f'{r}x{r} batch {cfg["batch"]}, encoder + decoder update + EMA', images=cfg['batch'])


@torch.no_grad()
def bench_encoder(cfg, dev, autocast, report):
    r = cfg['encoder_res']
    net = build({**cfg, 'arch': 'large', 'width': 1.0}, dev, r).eval()
    for b in (1, 16):
        x = torch.rand(b, 3, r, r, device=dev) * 2 - 1
        if cfg['channels_last']:
            x = x.contiguous(memory_format=torch.channels_last)

        def run():
            with autocast:
                net.encoder(x, r)
        seconds = timed(run, dev, cfg['warmup'], cfg['repeat'])
        report(f'encoder_{r}_batch{b}', seconds, flops_of(run), f'large preset, per image {seconds / b:.4f} s', images=b)


@torch.no_grad()
def bench_decoder(cfg, dev, autocast, report):
    r = cfg['res']
    net = build(cfg, dev, r).eval()
    z = model.sample_prior(cfg['batch'], 512, dev)

    def run():
        with autocast:
            net.decoder(z, r, noise=False)
    seconds = timed(run, dev, cfg['warmup'], cfg['repeat'])
    report(f'decoder_{r}_batch{cfg["batch"]}', seconds, flops_of(run), 'sampling from the prior', images=cfg['batch'])


def bench_data(cfg, dev, report):
    r, b = 64, 64
    shapes = data.make_loader(data.ShapesSource(), r, b)
    seconds = timed(lambda: next(shapes), dev, 2, 10)
    report('data_shapes_64', seconds, 0, 'shapes rendering, batch 64', images=b)
    with tempfile.TemporaryDirectory() as root:
        from PIL import Image
        imgs = data.ShapesSource().load_batch(list(range(256)), 256)
        for i, img in enumerate(imgs):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(root, f'{i:04d}.jpg'), quality=90)
        source = data.open_split(dict(dataset='folder', data_root=root, max_res=r))
        folder = data.make_loader(source, r, b)
        seconds = timed(lambda: next(folder), dev, 2, 10)
        report('data_folder_64', seconds, 0, 'folder from the per-resolution cache, batch 64', images=b)


def main(cfg):
    try:
        dev = model.resolve_device(cfg['device'])
        cfg = {**cfg, 'dtype': model.resolve_dtype(cfg['dtype'], dev)}
    except ValueError as e:
        raise SystemExit(f'error: {e}')
    dt = model.DTYPES[cfg['dtype']]
    autocast = torch.autocast(dev.type, dtype=dt) if dt != torch.float32 else nullcontext()
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    machine = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{cpu_name()}, {torch.get_num_threads()} threads'
    peak = peak_flops(dev, dt)
    print(f'device {dev} ({machine}) | dtype {cfg["dtype"]} | compile {cfg["compile"]} | channels_last '
          f'{cfg["channels_last"]} | torch {torch.__version__} | matmul peak {peak / 1e9:.1f} GFLOP/s')
    if dt != torch.float32 and peak < peak_flops(dev, torch.float32, 512):
        print(f'note: {cfg["dtype"]} matmuls are slower than float32 here: this device emulates {cfg["dtype"]} '
              f'(a CPU without AVX-512 BF16 / AMX); use --dtype=float32 on it')
    results = dict(device=str(dev), machine=machine, torch=torch.__version__, peak_flops=peak,
                   options={k: cfg[k] for k in CONFIG_KEYS}, results={})

    def report(what, seconds, flops, note, images):
        achieved = flops / seconds if flops else 0.0
        results['results'][what] = dict(seconds=seconds, images_per_s=images / seconds, flops=flops,
                                         flops_per_s=achieved, utilisation=achieved / peak, note=note)
        util = f' | {flops / 1e9:.1f} GFLOP, {achieved / 1e9:.1f} GFLOP/s, {achieved / peak:.0%} of peak' if flops else ''
        print(f'{what:24s} {seconds:9.4f} s | {images / seconds:9.1f} img/s{util} | {note}')

    skipped = set(cfg['skip'].split(',')) - {''}
    if 'train' not in skipped:
        bench_train(cfg, dev, autocast, report)
    if 'encoder' not in skipped:
        bench_encoder(cfg, dev, autocast, report)
    if 'decoder' not in skipped:
        bench_decoder(cfg, dev, autocast, report)
    if 'data' not in skipped:
        bench_data(cfg, dev, report)
    out = expand_path(cfg['out'])
    with open(out, 'w') as f:
        json.dump(results, f, indent=1)
    print(f'wrote {out}')
    return results


if __name__ == '__main__':
    configure(globals(), CONFIG_KEYS)
    main({k: globals()[k] for k in CONFIG_KEYS})
