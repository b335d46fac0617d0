"""Mix and edit your own photos in the browser (gradio, from requirements-extra.txt).

    python demo.py --ckpt=ffhq256                   # then open http://127.0.0.1:7860
    python demo.py --ckpt=out/ckpt.pt --port=8000   # any checkpoint; --host=0.0.0.0 serves the network

Upload images A and B, choose the blocks that take B's latents (a group, or block by block), and see
A's and B's reconstructions beside the mix, with their latents to download; the Edit tab moves an
image along a direction. On face checkpoints (FFHQ, CelebA-HQ) faces are aligned first. The
callbacks are plain functions of images and settings (tested without gradio); only `page` and the
script import gradio. A bad upload or setting gives a message in the page, never a traceback.
"""
import os
import tempfile

import torch

import data
import model
import sample
from configurator import ANY, PATH, check, clean, configure, integer, one_of

_before = set(globals())
ckpt = 'out/ckpt.pt'        # the checkpoint the page opens with: a file, or a released model's name (ffhq256, ...)
host = '127.0.0.1'          # the address the server binds (0.0.0.0: every interface, so others can reach it)
port = 7860                 # its port
align = 'auto'              # align uploads first: auto (on for FFHQ and CelebA-HQ checkpoints) | ffhq | celebahq | off
max_mb = 20                 # the largest upload, in MB
device = 'auto'             # auto (cuda if available) | cpu | cuda
CONFIG_KEYS = sorted(set(globals()) - _before - {'_before'})

RULES = dict(ckpt=PATH, host=ANY, port=integer(1), align=one_of('auto', 'off', *data.ALIGNMENTS), max_mb=integer(1),
             device=ANY)
GROUPS = ('coarse', 'intermediate', 'fine')
MAX_BLOCKS = 8                                       # 4x4 .. 512x512
OUT = os.path.join(tempfile.gettempdir(), 'automodulator_demo')     # the latents files offered for download


class DemoError(Exception):
    """A message for the page: what went wrong and what to do."""


_loaded = {}


def load(name, device='cpu'):
    """The checkpoint `name` (a file or a released model), loaded once."""
    if (name, device) not in _loaded:
        try:
            _loaded[name, device] = model.load_checkpoint(name, device=model.resolve_device(device))
        except model.NotCached as e:
            raise DemoError(e.advice('the checkpoint box: ')) from None
        except (FileNotFoundError, ValueError) as e:
            raise DemoError(str(e)) from None
    return _loaded[name, device]


def recipe(net, choice):
    """'auto' -> the alignment of the checkpoint's faces (ffhq, celebahq) or 'off'; else the choice."""
    if choice != 'auto':
        return choice
    dataset = net.config.get('dataset', '')
    return dataset if dataset in data.ALIGNMENTS else 'off'


def to_input(net, path, how, what='A'):
    """An uploaded file -> (1, 3, res, res) in [-1, 1] on net's device: upright by its EXIF orientation,
    its largest face aligned first unless how == 'off'."""
    if not path:
        raise DemoError(f'upload image {what} first')
    try:
        im = data.open_rgb(path)
    except Exception as e:                                    # noqa: BLE001 (not an image, truncated, a bomb)
        raise DemoError(f'image {what} could not be read as a picture ({type(e).__name__}): upload a PNG, JPEG '
                        f'or WebP file') from None
    if how != 'off':
        try:
            faces = sample.Faces('').crops(im, net.input_crop or net.res, what)
        except SystemExit as e:                              # MTCNN is not installed
            raise DemoError(str(e).removeprefix('error: ')) from None
        if not faces:
            raise DemoError(f'no face found in image {what}: upload a photo with a face, or set alignment to off')
        im = faces[0][1]
    x = data.resize_crop_resize(im, net.input_crop, net.res) if net.input_crop else data.crop_resize(im, net.res)
    return data.to_float(x[None]).to(net.const_device())


def blocks_of(net, group, picked):
    """The blocks that take B's latents: those picked one by one, else the group's."""
    used = sample.used_blocks(net)
    if picked:
        blocks = sorted(int(b) for b in picked)
        if blocks[-1] >= used:
            raise DemoError(f'block {blocks[-1]} is not in this {net.res}x{net.res} checkpoint: it uses blocks '
                            f'0-{used - 1}')
        return blocks
    try:
        return sample.blocks_of(net, group)
    except ValueError as e:
        raise DemoError(str(e)) from None


def picture(x):
    """(1, 3, res, res) in [-1, 1] -> a PIL image, enlarged (nearest) to at least 256 px."""
    from PIL import Image
    a = x[0].clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    im = Image.fromarray(a)
    return im.resize((256, 256), Image.Resampling.NEAREST) if im.width < 256 else im


@torch.no_grad()
def mix(name, how, a, b, group, picked, device='cpu'):
    """A and B as the model sees them (aligned), reconstructed, A with B's latents on the chosen blocks, and
    a latents file {A, B, mix}."""
    net = load(name, device)
    how = recipe(net, how)
    x_a, x_b = to_input(net, a, how, 'A'), to_input(net, b, how, 'B')
    z_a, z_b = net.encode(x_a), net.encode(x_b)
    blocks = blocks_of(net, group, picked)
    zs = model.mix_latents(z_a, z_b, blocks, net.decoder.n_blocks)
    os.makedirs(OUT, exist_ok=True)
    path = tempfile.NamedTemporaryFile(dir=OUT, prefix='latents_', suffix='.pt', delete=False).name
    sample.save_latents({'A': z_a[0], 'B': z_b[0], 'mix': zs[0]}, path)
    return (picture(x_a), picture(x_b), picture(net.decode(z_a, noise=False)), picture(net.decode(z_b, noise=False)),
            picture(net.decode(zs, noise=False)), path)


@torch.no_grad()
def edit(name, how, a, direction, strength, group, picked, device='cpu'):
    """The image moved by strength along a direction (a file, or the authors' by name) on the chosen blocks."""
    net = load(name, device)
    z = net.encode(to_input(net, a, recipe(net, how), 'to edit'))
    try:
        d = sample.load_direction(direction.strip(), net)
    except SystemExit as e:
        raise DemoError(str(e).removeprefix('error: ')) from None
    return picture(net.decode(sample.move_along(z, d, float(strength), blocks_of(net, group, picked),
                                                net.decoder.n_blocks), noise=False))


def guarded(fn, error):
    """fn for the page: any failure becomes one line in it (error(message)), never a traceback."""
    def call(*args):
        try:
            return fn(*args)
        except DemoError as e:
            raise error(str(e)) from None
        except Exception as e:                                # noqa: BLE001 (a bad upload, a bug: keep serving)
            raise error(f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
    return call


def page(cfg):
    """The gradio page: a Mix tab and an Edit tab over the checkpoint in the box."""
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit(f'error: the demo needs gradio, which is not installed: {sample.EXTRA}') from None
    dev = cfg['device']

    def say(message):                                        # a message in the page, no traceback on the console
        return gr.Error(message, print_exception=False)
    with gr.Blocks(title='automodulator') as ui:
        gr.Markdown('## automodulator: mix the coarse, intermediate and fine styles of real images')
        with gr.Row():
            ckpt_box = gr.Textbox(cfg['ckpt'], label='Checkpoint: a file, or ffhq256, ffhq512, celebahq256, '
                                                     'lsuncars256, lsunbedrooms256', elem_id='ckpt')
            align_box = gr.Dropdown(['auto', 'off', *data.ALIGNMENTS], value=cfg['align'], label='Align faces first')
        blocks = [str(i) for i in range(MAX_BLOCKS)]
        with gr.Tab('Mix'):
            with gr.Row():              # files, not gr.Image: a bad upload reaches our one-line message
                a = gr.File(label='Image A (PNG, JPEG, WebP)', file_types=['image'], elem_id='image_a')
                b = gr.File(label='Image B: its latents drive the chosen blocks', file_types=['image'], elem_id='image_b')
            with gr.Row():
                group = gr.Radio(list(GROUPS), value='coarse', label="B's latents on the blocks of", elem_id='group')
                picked = gr.CheckboxGroup(blocks, label='... or on these blocks (block i works at 4 x 2^i px)')
            go = gr.Button('Mix', variant='primary', elem_id='mix')
            with gr.Row():
                outs = [gr.Image(label='A as the model sees it'), gr.Image(label='B as the model sees it'),
                        gr.Image(label='A reconstructed'), gr.Image(label='B reconstructed'),
                        gr.Image(label='A with B on those blocks', elem_id='mixed')]
            latents = gr.File(label='Latents {A, B, mix} (torch.load)')
            go.click(guarded(lambda *v: mix(*v, device=dev), say),
                     [ckpt_box, align_box, a, b, group, picked], [*outs, latents])
        with gr.Tab('Edit'):
            with gr.Row():
                e_in = gr.File(label='Image (PNG, JPEG, WebP)', file_types=['image'])
                e_out = gr.Image(label='Edited')
            direction = gr.Textbox('smile512-16', label="Direction: a file from sample.py --mode=direction, or the "
                                                        "authors' smile, male, dark, left, smile512-4, smile512-16")
            strength = gr.Slider(-3, 3, value=0.5, step=0.1, label='Strength')
            with gr.Row():
                e_group = gr.Radio([*GROUPS, 'all'], value='intermediate', label='Move the latents of the blocks of')
                e_picked = gr.CheckboxGroup(blocks, label='... or of these blocks')
            e_go = gr.Button('Edit', variant='primary')
            e_go.click(guarded(lambda *v: edit(*v, device=dev), say),
                       [ckpt_box, align_box, e_in, direction, strength, e_group, e_picked], e_out)
    return ui


def main(cfg):
    cfg = clean(cfg, RULES)
    check(cfg, RULES)
    ui = page(cfg)
    print(f'serving http://{cfg["host"]}:{cfg["port"]} ({cfg["ckpt"]}); Ctrl-C stops')
    ui.launch(server_name=cfg['host'], server_port=cfg['port'], max_file_size=f'{cfg["max_mb"]}mb',
              allowed_paths=[OUT], show_error=True, quiet=True)


if __name__ == '__main__':
    configure(globals(), CONFIG_KEYS)
    main({k: globals()[k] for k in CONFIG_KEYS})
