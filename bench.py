"""Speed: one training iteration, encoder inference, decoder sampling and the data loaders.

    python bench.py                                    # CPU, float32, 32x32, batch 16, large preset
    python bench.py --res=64 --dtype=bfloat16 --channels_last=True
    python bench.py --device=cuda --res=256 --batch=16 --compile=True
    python bench.py --suite=gpu                        # a GPU: FFHQ's whole schedule, then the options

--suite=gpu walks every resolution of `preset` (its networks and per-resolution batches) with eager
training steps in bfloat16 where the device has it (ms/step, img/s, TFLOP/s, peak memory, kernel
launches and host syncs per step from a profiler trace), compares `compare` at the last resolution,
times the data loader with the preset's worker count, and stops starting parts past budget_minutes.

Every measurement prints one line and goes into bench.json (out). Times are medians over `repeat`
runs after `warmup`. FLOPs are counted with torch.utils.flop_counter; utilisation is the achieved
FLOP/s over this device's own peak, measured with a large matmul in the same dtype.
"""
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

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
suite = ''                  # '' (the parts above) | gpu (the module docstring)
preset = 'ffhq'             # --suite=gpu: the train.py preset whose schedule, networks and batches it walks
max_res = 0                 # --suite=gpu: its last resolution (0: the preset's)
compare = 'float32,bfloat16,channels_last,compile'  # --suite=gpu: options timed at the last resolution
budget_minutes = 7.0        # --suite=gpu: a part that would start later is listed under not_run
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


class _Flops(TorchDispatchMode):
    """FLOPs of the matmuls and convolutions run inside, forward and backward, by the formulas of
    torch.utils.flop_counter. Its FlopCounterMode also tracks modules, which fails where a module's
    input needs a gradient under no_grad (L_j at weight 0, losses.decoder_loss)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def flops_of(fn):
    with _Flops() as counter:
        fn()
    return counter.total


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
        model.compile_blocks(net.encoder, net.decoder)
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
    # what an uncached LSUN read costs: a webp record, short side 256 as LSUN's, of a photo
    from PIL import Image
    im = Image.open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'astronaut.jpg')).convert('RGB')
    buf = io.BytesIO()
    im.resize((340, 256)).save(buf, format='WEBP', quality=75)
    seconds = timed(lambda: data.crop_resize(data.open_rgb(io.BytesIO(buf.getvalue())), 4), dev, 2, 20)
    report('data_lsun_record', seconds, 0, 'one 340x256 webp photo decoded and resized to 4x4', images=1)


# ---------------------------------------------------------------------------------------------
# --suite=gpu

SYNCS = ('cudaStreamSynchronize', 'cudaDeviceSynchronize', 'cudaEventSynchronize')
# --compare's options; channels_last and compile go on top of the suite's own dtype (auto: bfloat16 where native)
OPTIONS = {'float32': dict(dtype='float32'), 'bfloat16': dict(dtype='bfloat16'),
           'channels_last': dict(dtype='auto', channels_last=True), 'compile': dict(dtype='auto', compile=True)}


def trace_counts(fn, dev):
    """(kernel launches, host syncs) of one fn() from a torch.profiler trace. On CUDA: the kernels
    the device ran and the runtime's synchronize calls (item(), bool(), .cpu() each make one; the
    one that closes the trace is not counted). On a CPU, which has neither: the aten ops that no
    other op called, and the scalar reads (aten::_local_scalar_dense; there CPU Adam's own)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = dev.type == 'cuda'
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(dev)
    events = prof.events()
    if cuda:
        kernels = sum(e.device_type == DeviceType.CUDA and not e.name.startswith(('Memcpy', 'Memset')) for e in events)
        return kernels, sum(e.name in SYNCS for e in events) - 1
    ops = sum(e.name.startswith('aten::') and e.cpu_parent is None for e in events)
    return ops, sum(e.name == 'aten::_local_scalar_dense' for e in events)


def suite_trainer(cfg, dev, res, **options):
    """A Trainer of the preset's settings (and `options`) with every level up to res."""
    tcfg = {**train.resolve(dict(dataset=cfg['preset'])), 'compile': False, 'channels_last': False, **options}
    tcfg['max_res'] = cfg['max_res'] or tcfg['max_res']
    t = train.Trainer(tcfg, train.model_config_from(tcfg), dev)
    while t.robust.res < res:
        t.robust.grow()
    t.step = 10_000                                      # the EMA at its full decay
    return t, tcfg


def suite_step(t, tcfg, dev, res, warm, reps):
    """One resolution's row: Trainer.step_on past the fade-in at the preset's batch there."""
    b = tcfg['batch_size'][res]
    x = torch.rand(b, 3, res, res, device=dev) * 2 - 1
    if tcfg['channels_last']:
        x = x.contiguous(memory_format=torch.channels_last)
    step = lambda: t.step_on(x, res, 1.0, False)          # noqa: E731
    t0 = time.perf_counter()
    for _ in range(warm):                                  # compiles here, where compile is on
        step()
    sync(dev)
    first = time.perf_counter() - t0
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = timed(step, dev, 0, reps)
    flops = flops_of(step)
    launches, syncs = trace_counts(step, dev)
    return dict(res=res, batch=b, dtype=t.dtype, ms_per_step=1000 * seconds, img_per_s=b / seconds,
                tflop_per_step=flops / 1e12, tflop_per_s=flops / seconds / 1e12, warmup_seconds=first,
                memory_gib=torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == 'cuda' else None,
                launches=launches, syncs=syncs)


def suite_loader(tcfg, dev, res):
    """The data loader as train.py makes it (the preset's num_workers, pinned memory on CUDA) on a
    folder of 256 JPEGs cached up to res, at res and at 4x4 (where a step is quickest)."""
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        from PIL import Image
        for i, img in enumerate(data.ShapesSource(max_res=res).load_batch(list(range(256)), res)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(root, f'{i:04d}.jpg'), quality=90)
        source = data.open_split(dict(dataset='folder', data_root=root, max_res=res))
        for r in sorted({4, res}):
            b = tcfg['batch_size'][r]
            loader = data.make_loader(source, r, b, num_workers=tcfg['num_workers'], pin_memory=dev.type == 'cuda')
            seconds = timed(lambda: next(loader), dev, 5, 20)
            rows[r] = dict(batch=b, num_workers=tcfg['num_workers'], img_per_s=b / seconds)
    return rows


def run_suite(cfg, dev):
    """--suite=gpu: the rows described in the module docstring, printed and returned for bench.json."""
    t_start = time.time()
    not_run = []

    def in_budget(what):
        if time.time() - t_start < cfg['budget_minutes'] * 60:
            return True
        not_run.append(what)
        print(f'{what}: not run (past --budget_minutes={cfg["budget_minutes"]})')
        return False

    size = 8192 if dev.type == 'cuda' else 1024
    peaks = {name: peak_flops(dev, dt, size) for name, dt in (('bfloat16', torch.bfloat16), ('float32', torch.float32))}
    print(f'matmul peak ({size}-square where it runs under 0.1 s): bfloat16 {peaks["bfloat16"] / 1e12:.1f}, '
          f'float32{" (TF32)" if dev.type == "cuda" else ""} {peaks["float32"] / 1e12:.1f} TFLOP/s')
    t, tcfg = suite_trainer(cfg, dev, 4, dtype='auto')
    top = tcfg['max_res']
    rows, options = [], {}
    print(f'{cfg["preset"]} schedule, eager {t.dtype}:')
    for res in [4 * 2 ** i for i in range(int(math.log2(top)) - 1)]:
        if not in_budget(f'{res}x{res}'):
            continue
        while t.robust.res < res:
            t.robust.grow()
        rows.append(suite_step(t, tcfg, dev, res, cfg['warmup'], cfg['repeat']))
        print(suite_line(rows[-1], peaks))
    del t
    # the preset's whole schedule at these step times (a fading step costs somewhat more)
    hours = sum(tcfg['phase_kimg'][row['res']] * 1000 / row['batch'] * row['ms_per_step'] / 1000 for row in rows) / 3600
    if rows:
        print(f'{cfg["preset"]} schedule ({sum(tcfg["phase_kimg"][row["res"]] for row in rows):,} kimg to '
              f'{rows[-1]["res"]} px) at these step times: {hours:.1f} hours on one device')
    for name in [o for o in cfg['compare'].split(',') if o]:
        if in_budget(f'{name} at {top}x{top}'):
            tt, ttcfg = suite_trainer(cfg, dev, top, **OPTIONS[name])
            options[name] = suite_step(tt, ttcfg, dev, top, cfg['warmup'], cfg['repeat'])
            print(f'{name:14s}' + suite_line(options[name], peaks))
            del tt
    loader = suite_loader(tcfg, dev, top) if in_budget('data loader') else {}
    for r, row in loader.items():
        print(f'data loader {r}x{r}: {row["img_per_s"]:.0f} img/s (batch {row["batch"]}, {row["num_workers"]} workers)')
    return dict(suite='gpu', preset=cfg['preset'], peak_flops=peaks, resolutions=rows, schedule_hours=hours,
                options=options, data_loader=loader, not_run=not_run, minutes=(time.time() - t_start) / 60)


def suite_line(row, peaks):
    mem = f', {row["memory_gib"]:.1f} GiB' if row['memory_gib'] is not None else ''
    util = row['tflop_per_s'] * 1e12 / peaks['bfloat16' if row['dtype'] == 'bfloat16' else 'float32']
    return (f'{row["res"]:5d}px b{row["batch"]:<4d} {row["ms_per_step"]:8.1f} ms/step {row["img_per_s"]:8.0f} img/s '
            f'{row["tflop_per_s"]:7.3g} TFLOP/s ({util:.0%} of peak){mem} | {row["launches"]} launches, '
            f'{row["syncs"]} syncs a step | first {row["warmup_seconds"]:.1f} s')


def main(cfg):
    unknown = [o for o in cfg['compare'].split(',') if o and o not in OPTIONS]
    if unknown or cfg['preset'] not in train.PRESETS:
        raise SystemExit(f'error: --compare takes {", ".join(OPTIONS)}, got {", ".join(unknown)}' if unknown else
                         f'error: --preset={cfg["preset"]!r} is not a preset; choose one of {", ".join(train.PRESETS)}')
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
    results = dict(device=str(dev), machine=machine, torch=torch.__version__, options={k: cfg[k] for k in CONFIG_KEYS})
    if cfg['suite'] == 'gpu':                              # its own peaks, dtypes and options
        print(f'device {dev} ({machine}) | torch {torch.__version__}')
        return write_results({**results, **run_suite(cfg, dev)}, cfg['out'])
    peak = peak_flops(dev, dt)
    print(f'device {dev} ({machine}) | dtype {cfg["dtype"]} | compile {cfg["compile"]} | channels_last '
          f'{cfg["channels_last"]} | torch {torch.__version__} | matmul peak {peak / 1e9:.1f} GFLOP/s')
    if dt != torch.float32 and peak < peak_flops(dev, torch.float32, 512):
        print(f'note: {cfg["dtype"]} matmuls are slower than float32 here: this device emulates {cfg["dtype"]} '
              f'(a CPU without AVX-512 BF16 / AMX); use --dtype=float32 on it')
    results.update(peak_flops=peak, results={})

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
    return write_results(results, cfg['out'])


def write_results(results, out):
    out = expand_path(out)
    with open(out, 'w') as f:
        json.dump(results, f, indent=1)
    print(f'wrote {out}')
    return results


if __name__ == '__main__':
    configure(globals(), CONFIG_KEYS)
    main({k: globals()[k] for k in CONFIG_KEYS})
