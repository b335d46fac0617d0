"""Fast CPU tests: python -m pytest -q test_all.py (or python test_all.py)."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import configurator
import data as D
import losses as L
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(**kw):
    """A CPU-sized automodulator up to 64x64 with 32-d latents."""
    torch.manual_seed(0)
    cfg = M.ModelConfig(**{**dict(max_res=64, nz=32, width=1 / 16), **kw})
    m = M.Automodulator(cfg)
    # non-zero noise scales, so a test that forgets noise=False would see random output
    with torch.no_grad():
        for name, p in m.decoder.named_parameters():
            if name.endswith('noise.scale'):
                p.normal_()
    return m


def _png(path):
    from PIL import Image
    return torch.from_numpy(np.array(Image.open(path).convert('RGB'))).permute(2, 0, 1).float()


def grid_cell(image, row, col, tile=64, pad=2):
    """The tile at (row, col) of a grid that save_image laid out with `pad` pixels around each."""
    top, left = pad + row * (tile + pad), pad + col * (tile + pad)
    return image[:, top:top + tile, left:left + tile]


def grid_shape(rows, cols, tile=64, pad=2):
    """The (3, H, W) of such a grid."""
    return (3, rows * (tile + pad) + pad, cols * (tile + pad) + pad)


def z_of(m, b=3, seed=1):
    return M.sample_prior(b, m.cfg.nz, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# model.py

@pytest.mark.parametrize('variant', [{}, M.AUTHORS, dict(noise='shared'), dict(noise='none'), dict(extra_8x8=True)])
def test_shapes_at_every_phase_and_unit_norm(variant):
    m = tiny(**variant)
    z = z_of(m)
    for res in (4, 8, 16, 32, 64):
        for alpha in (0.3, 1.0):
            img = m.decoder(z, res, alpha)
            assert img.shape == (3, 3, res, res) and torch.isfinite(img).all()
            e = m.encoder(img, res, alpha)
            assert e.shape == (3, 32)
            assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)


def test_decoder_fade_endpoints():
    m = tiny()
    z = z_of(m)
    for res in (8, 16, 64):
        n = M.level(res, 64)
        new_path = m.decoder.to_rgb[n](m.decoder.canvas(z, n + 1, noise=False))
        assert torch.equal(m.decoder(z, res, 1.0, noise=False), new_path)
        old = F.interpolate(m.decoder(z, res // 2, 1.0, noise=False), scale_factor=2, mode='nearest')
        assert torch.equal(m.decoder(z, res, 0.0, noise=False), old)
        mid = m.decoder(z, res, 0.5, noise=False)
        assert torch.allclose(mid, 0.5 * (old + new_path), atol=1e-5)


def test_encoder_fade_endpoints():
    m = tiny()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    enc = m.encoder.eval()               # freeze the spectral-norm power iteration
    # equal up to float rounding: at 16x16 the input level folds fromRGB into its first conv
    assert torch.allclose(enc(x, 32, 0.0), enc(F.avg_pool2d(x, 2), 16, 1.0), atol=1e-6)
    at_one = enc(x, 32, 1.0)
    with torch.no_grad():                # alpha = 1 must not read the previous level's fromRGB
        enc.from_rgb[M.level(16, 64)].weight.add_(1.0)
    assert torch.equal(enc(x, 32, 1.0), at_one)
    assert not torch.allclose(enc(x, 32, 0.5), at_one)


def test_per_block_latents_equal_to_z_decode_exactly():
    m = tiny()
    z = z_of(m)
    per_block = z[:, None].repeat(1, m.decoder.n_blocks, 1)
    for res, alpha in ((4, 1.0), (16, 0.4), (64, 1.0)):
        assert torch.equal(m.decoder(per_block, res, alpha, noise=False), m.decoder(z, res, alpha, noise=False))


def test_fine_latents_leave_the_coarse_canvas_bit_identical():
    m = tiny()
    z_a, z_b = z_of(m, seed=1), z_of(m, seed=2)
    mixed = M.mix_latents(z_a, z_b, 'fine', m.decoder.n_blocks)          # blocks 4.. from z_b
    assert torch.equal(mixed[:, :4], z_a[:, None].expand(-1, 4, -1)) and torch.equal(mixed[:, 4], z_b)
    for j in (1, 2, 3, 4):
        assert torch.equal(m.decoder.canvas(mixed, j, noise=False), m.decoder.canvas(z_a, j, noise=False))
    # ... while the image does change
    assert not torch.allclose(m.decoder(mixed, 64, noise=False), m.decoder(z_a, 64, noise=False))
    coarse = M.mix_latents(z_a, z_b, 'coarse', m.decoder.n_blocks)
    assert not torch.allclose(m.decoder.canvas(coarse, 1, noise=False), m.decoder.canvas(z_a, 1, noise=False))


def test_canvas_then_continue_equals_full_decode():
    m = tiny()
    z_a, z_b = z_of(m, seed=1), z_of(m, seed=2)
    per_block = M.mix_latents(z_a, z_b, '2:4', m.decoder.n_blocks)
    for z in (z_a, per_block):
        for res, alpha in ((8, 1.0), (32, 0.25), (64, 1.0)):
            full = m.decoder(z, res, alpha, noise=False)
            for j in range(1, M.level(res, 64) + 1):
                xi = m.decoder.canvas(z, j, noise=False)
                assert xi.shape[-1] == 2 ** (j + 1)
                assert torch.equal(m.decoder(z, res, alpha, noise=False, canvas=xi, start=j), full)


def test_fast_convolutions_equal_the_plain_ones():
    torch.manual_seed(0)
    # conv_up2: the conv of the 2x nearest-upsampled map, without making it; values and gradients
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 5, 6, 6).contiguous(memory_format=fmt).requires_grad_()
        w, b = torch.randn(7, 5, 3, 3, requires_grad=True), torch.randn(7, requires_grad=True)
        fast = M.conv_up2(x, w, b)
        plain = F.conv2d(F.interpolate(x, scale_factor=2, mode='nearest'), w, b, padding=1)
        assert fast.shape == plain.shape == (2, 7, 12, 12) and torch.allclose(fast, plain, atol=1e-5)
        g = torch.randn_like(plain)
        for a, c in zip(torch.autograd.grad(fast, (x, w, b), g), torch.autograd.grad(plain, (x, w, b), g)):
            assert torch.allclose(a, c, atol=1e-4)
    # the encoder's input level folds fromRGB into conv1 (and pools before fromRGB on the skip)
    for extra in ({}, M.AUTHORS):
        m = tiny(**extra)
        m.encoder.eval()                 # the same SN estimate for both calls
        for n in (0, 3):
            blk, rgb, r = m.encoder.blocks[n], m.encoder.from_rgb[n], 4 * 2 ** n
            img = torch.rand(2, 3, r, r, requires_grad=True)
            params = (img, rgb.weight, rgb.bias, blk.conv1.parametrizations.weight.original)
            fast, plain = blk(img, rgb=rgb), blk(rgb(img))
            assert torch.allclose(fast, plain, atol=1e-5 * plain.abs().max().item())
            g = torch.randn_like(plain)
            for a, c in zip(torch.autograd.grad(fast, params, g), torch.autograd.grad(plain, params, g)):
                assert torch.allclose(a, c, rtol=1e-4, atol=1e-5 * c.abs().max().item())


def test_adain_equals_eq1_and_its_backward_is_exact():
    torch.manual_seed(0)
    # Eq. 1 written out in float64: values and gradients wrt x, z and the style map
    for eps, unbiased in ((1e-8, False), (0.0, True)):
        ada = M.AdaIN(6, 4, eps, unbiased)
        x = (torch.randn(3, 6, 5, 5) * 3 + 2).requires_grad_()
        z = torch.randn(3, 4, requires_grad=True)
        s = ada.style(z).double()
        var, mean = torch.var_mean(x.double(), dim=(2, 3), keepdim=True, correction=int(unbiased))
        plain = s[:, :6, None, None] * (x.double() - mean) / torch.sqrt(var + eps) + s[:, 6:, None, None]
        fast = ada(x, z)
        assert fast.dtype == torch.float32 and torch.allclose(fast.double(), plain, atol=1e-5)
        g = torch.randn_like(fast)
        for a, c in zip(torch.autograd.grad(fast, (x, z, ada.style.weight), g),
                        torch.autograd.grad(plain, (x, z, ada.style.weight), g.double())):
            assert torch.allclose(a, c, atol=1e-4)
    saved = []                                 # under bfloat16 autocast the backward keeps no float32 map
    xb = x.detach().bfloat16().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = ada(xb, z)
    assert y.dtype == torch.bfloat16 and [t.dtype for t in saved if t.shape == x.shape] == [torch.bfloat16]
    assert torch.autograd.grad(y.float().sum(), xb)[0].dtype == torch.bfloat16
    m, saved = tiny(max_res=16), []            # nor does a whole decoder (its noise layers stay bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            m.decoder(z_of(m), 16)
    maps = [t for t in saved if t.dim() == 4 and t.shape[-1] > 1 and t.shape[0] > 1]
    assert len(maps) > 10 and {t.dtype for t in maps} == {torch.bfloat16}
    # its hand-written backward, against finite differences in float64
    xd, sd = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2 + 1, torch.randn(2, 6, 1, 1, dtype=torch.float64)
    for eps, corr in ((1e-8, 0), (0.0, 1)):
        assert torch.autograd.gradcheck(lambda x, a, b: M._AdaIN.apply(x, a, b, eps, corr),
                                        (xd.requires_grad_(), sd[:, :3].requires_grad_(), sd[:, 3:].requires_grad_()))


def test_layer_noise_is_random_unless_switched_off():
    m = tiny()
    z = z_of(m)
    assert not torch.allclose(m.decoder(z, 32), m.decoder(z, 32))
    assert torch.equal(m.decoder(z, 32, noise=False), m.decoder(z, 32, noise=False))
    # the 4x4 block carries no noise (as the authors): its canvas is deterministic with noise on
    assert torch.equal(m.decoder.canvas(z, 1), m.decoder.canvas(z, 1))
    shared = tiny(noise='shared').decoder.blocks[2].layers[0].noise
    x = torch.zeros(2, shared.scale.numel(), 8, 8)
    with torch.no_grad():
        shared.scale.fill_(1.0)
    out = shared(x)                     # one noise map repeated over channels
    assert torch.equal(out[:, :1].expand_as(out), out)


def test_spectral_norm_weights_have_unit_largest_singular_value():
    m = tiny(width=1 / 4)
    convs = [mod for mod in m.encoder.modules() if hasattr(mod, 'parametrizations')]
    skips = sum(isinstance(b.skip, torch.nn.Conv2d) for b in m.encoder.blocks)
    assert skips >= 1 and len(convs) == 2 * m.encoder.cfg.n_blocks + skips   # fromRGB is not normalized
    for conv in convs:
        for _ in range(300):             # each training-mode access runs one power iteration,
            w = conv.weight              # as each training step does
        sigma = torch.linalg.matrix_norm(w.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 0.01, sigma


@pytest.mark.parametrize('extra_8x8', [False, True])
def test_used_parameters_are_exactly_those_with_gradients(extra_8x8):
    m = tiny(extra_8x8=extra_8x8)
    z = z_of(m)
    for res in (4, 8, 16):
        m.zero_grad(set_to_none=True)
        m.encoder(m.decoder(z, res), res).sum().backward()
        with_grad = {id(p) for p in m.parameters() if p.grad is not None}
        used = {id(p) for p in m.decoder.used_parameters(res) + m.encoder.used_parameters(res)}
        assert with_grad == used


def test_large_preset_parameter_counts():
    # the authors' models' counts at 256 (pioneer/model.py, instantiated); construction only
    for extra, tol in ((M.AUTHORS, 1e-9), ({}, 0.15)):
        m = M.Automodulator(M.ModelConfig(arch='large', **extra))
        dec, enc = M.count(m.decoder.used_parameters(256)), M.count(m.encoder.used_parameters(256))
        print(f'large {extra or "paper"}: decoder {dec:,} encoder {enc:,}')
        assert abs(dec / 28_971_907 - 1) <= tol and abs(enc / 25_360_384 - 1) <= tol


def test_bad_input_names_expected_and_got():
    m = tiny()
    z = z_of(m)
    with pytest.raises(ValueError, match=r'\(B, 3, 16, 16\).*\(2, 3, 32, 32\)'):
        m.encoder(torch.zeros(2, 3, 32, 32), 16)
    with pytest.raises(ValueError, match=r'power of two.*24'):
        m.decoder(z, 24)
    with pytest.raises(ValueError, match=r'power of two.*128'):
        m.decoder(z, 128)                # beyond max_res
    with pytest.raises(ValueError, match=r'\(B, 32\) or \(B, 5, 32\).*\(3, 16\)'):
        m.decoder(z[:, :16], 16)
    with pytest.raises(ValueError, match=r'\(B, 32\) or \(B, 5, 32\).*\(3, 4, 32\)'):
        m.decoder(z[:, None].repeat(1, 4, 1), 16)
    with pytest.raises(ValueError, match='power of two'):
        M.ModelConfig(max_res=96)
    with pytest.raises(ValueError, match=r'coarse \(0:2\).*fine \(4:\)'):
        M.block_range('9:12', 5)
    with pytest.raises(ValueError, match=r'canvas xi_2 must be'):
        m.decoder(z, 16, canvas=torch.zeros(3, 8, 4, 4), start=2)


def test_block_groups_follow_the_paper():
    assert list(M.block_range('coarse', 7)) == [0, 1]            # 4-8
    assert list(M.block_range('intermediate', 7)) == [2, 3]      # 16-32
    assert list(M.block_range('fine', 7)) == [4, 5, 6]           # 64-256
    assert list(M.block_range('intermediate', 3)) == [2]         # cut short at 16x16
    assert M.block_range('2:4', 3) == M.block_range('intermediate', 3)   # a range is cut short as a group is
    assert list(M.block_range('0:2', 7)) == [0, 1] and list(M.block_range('3:', 7)) == [3, 4, 5, 6]


def test_prior_is_on_the_unit_sphere():
    z = M.sample_prior(1000, 512, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z.norm(dim=1), torch.ones(1000), atol=1e-5)
    assert z.mean(0).abs().max() < 0.01     # uniform on the sphere: zero mean, variance 1/512
    assert abs(z.var(0).mean().item() * 512 - 1) < 0.05


def test_ema_update():
    m = tiny()
    ema = M.make_ema(m.decoder)
    assert not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        for p in m.decoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    M.update_ema(ema, m.decoder, decay=0.9)
    for b, pe, p in zip(before, ema.parameters(), m.decoder.parameters()):
        assert torch.allclose(pe, 0.9 * b + 0.1 * p)


def test_checkpoint_roundtrip_uses_ema_decoder(tmp_path):
    m = tiny()
    ema = M.make_ema(m.decoder)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    path = str(tmp_path / 'ckpt.pt')
    M.save_checkpoint(path, model_config=dataclasses.asdict(m.cfg), res=32, alpha=1.0, encoder=m.encoder.state_dict(),
                      decoder=m.decoder.state_dict(), decoder_ema=ema.state_dict(), kimg=1.5)
    assert os.listdir(tmp_path) == ['ckpt.pt']           # the temporary file was renamed away
    loaded = M.load_checkpoint(path)
    assert not loaded.training and loaded.res == 32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m.encoder.eval()
    assert torch.equal(loaded.encode(x), m.encoder(x, 32))
    z = loaded.encode(x)
    assert torch.equal(loaded.decode(z, noise=False), ema(z, 32, noise=False))
    assert loaded.reconstruct(x, noise=False).shape == (2, 3, 32, 32)
    mixed = loaded.mix(z, z.flip(0), 'coarse', noise=False)
    assert mixed.shape == (2, 3, 32, 32) and not torch.allclose(mixed, loaded.decode(z, noise=False))
    assert torch.equal(M.load_checkpoint(path, ema=False).decode(z, noise=False), m.decoder(z, 32, noise=False))
    with pytest.raises(FileNotFoundError, match='python train.py'):
        M.load_checkpoint(str(tmp_path / 'nope.pt'))


# The authors' checkpoint files (<samples>_state.pth of Zenodo record 4298894, as pioneer/train.py saves them)

def authors_layout(arch):
    """key -> shape of G_state_dict (and G_running_state_dict) and D_state_dict in an authors'
    `<samples>_state.pth`, in file order, and the SNU shapes: the keys, order and shapes of the
    released ffhq256 (large) and celebahq256 (small) files, listed with torch.load."""
    c = [512, 512, 512, 512] + [w * (2 if arch == 'large' else 1) for w in (256, 128, 64, 32, 16)]
    g = {'label_embed.weight': (1, 1)}
    for k, ch in enumerate([c[0]] + [c[i] for i in range(1, 9) for _ in range(2)]):
        g.update({f'adanorm_blocks.{k}.mod.weight': (2 * ch, 512), f'adanorm_blocks.{k}.mod.bias': (2 * ch,)})

    def layer(conv, mod, cout, cin):
        g.update({f'{conv}.bias': (cout,), f'{conv}.weight_orig': (cout, cin, 3, 3), f'{conv}.weight_gain': (1,),
                  f'{mod}.mod.weight': (2 * cout, 512), f'{mod}.mod.bias': (2 * cout,)})
    layer('progression.0.conv.1.conv', 'progression.0.conv.3', 512, 512)
    for i in range(1, 9):
        layer(f'progression.{i}.conv.0.0.conv', f'progression.{i}.conv.0.3', c[i], c[i - 1])
        layer(f'progression.{i}.conv.1.conv', f'progression.{i}.conv.3', c[i], c[i])
    g.update({f'to_rgb.{i}.{p}': (3, c[i], 1, 1) if p == 'weight' else (3,) for i in range(9) for p in ('weight', 'bias')})
    g.update({f'noise.{i}.{k}.noise_scale': (c[i],) for i in range(9) for k in range(2)})
    g.update({f'z_preprocess.{k}.0.{p}': s for k in range(2)
              for p, s in (('bias', (512,)), ('weight_orig', (512, 512)), ('weight_gain', (1,)))})
    e = [16, 32, 64, 128, 256, 512, 512, 512, 512, 512]
    d = {}
    for j in range(9):
        d.update({f'progression.{j}.conv.0.conv.bias': (e[j + 1],),
                  f'progression.{j}.conv.0.conv.weight_orig': (e[j + 1], e[j], 3, 3),
                  f'progression.{j}.conv.2.conv.bias': (e[j + 1],),
                  f'progression.{j}.conv.2.conv.weight_orig': (e[j + 1], e[j + 1]) + ((4, 4) if j == 8 else (3, 3))})
    d.update({f'from_rgb.{j}.{p}': (e[j], 3, 1, 1) if p == 'weight' else (e[j],) for j in range(9) for p in ('weight', 'bias')})
    return g, d, [(e[j + 1], 1) for j in range(9) for _ in range(2)]


def _level_of(key, part):
    m = re.match(r'(\w+)\.(\d+)\.', key)
    if part == 'D':
        return 8 - int(m.group(2))
    if m and m.group(1) == 'adanorm_blocks':
        return (int(m.group(2)) + 1) // 2
    return int(m.group(2)) if m and m.group(1) in ('progression', 'to_rgb', 'noise') else None


def write_authors_checkpoint(path, arch='large', phase=2, alpha=-1, drop=(), extra=()):
    """A random checkpoint in the authors' structure (DataParallel 'module.' keys, 3 optimizers,
    SNU, 9 robust losses). Tensors of levels above `phase` and of the unused mapping network are
    stride-0 views of one number: the right shapes at a fraction of the file size."""
    gen = torch.Generator().manual_seed(3)
    g_shapes, d_shapes, snu_shapes = authors_layout(arch)

    def fill(shapes, part):
        out = {}
        for k, s in shapes.items():
            lvl = _level_of(k, part)
            if lvl is None or lvl > phase:
                out[k] = torch.zeros(1).expand(s)
            elif k.endswith('weight_gain'):
                out[k] = 0.8 + 0.4 * torch.rand(s, generator=gen)
            else:
                out[k] = torch.randn(s, generator=gen) * (0.3 if k.endswith(('bias', 'noise_scale')) else 1)
        return out
    g_run, d = fill(g_shapes, 'G'), fill(d_shapes, 'D')
    for k in list(g_run):                                  # the same modules under two names
        m = re.match(r'adanorm_blocks\.(\d+)\.mod\.(\w+)', k)
        if m and int(m.group(1)) <= 2 * phase:
            a = int(m.group(1))
            src = 'progression.0.conv.3' if a == 0 else f'progression.{(a + 1) // 2}.conv.{"0.3" if a % 2 else "3"}'
            g_run[k] = g_run[f'{src}.mod.{m.group(2)}']
    g = dict(g_run, **{f'to_rgb.{phase}.weight': -g_run[f'to_rgb.{phase}.weight']})   # live != running
    snu = [torch.randn(s, generator=gen) for s in snu_shapes]
    mod = lambda sd: {'module.' + k: v for k, v in sd.items() if k not in drop} | {'module.' + k: torch.zeros(1) for k in extra}
    ck = dict(G_state_dict=mod(g), D_state_dict=mod(d), G_running_state_dict=mod(g_run), optimizerD={}, optimizerG={},
              optimizerA={}, iteration=31_877_148, phase=phase, alpha=alpha, SNU=snu)
    ck.update({f'adaptive_loss_{j}': ({'latent_alpha': torch.zeros(1, 3 * 4 ** (j + 2)).expand(1, -1),
                                       'latent_scale': torch.zeros(1, 3 * 4 ** (j + 2))},) for j in range(9)})
    torch.save(ck, path)
    return g_run, d, snu


def _authors_decode(g, z, n):
    """Their Generator (pioneer/model.py) in eval mode with layer noise off, written from its forward."""
    def adain(x, lin):
        a = F.linear(z, g[f'{lin}.mod.weight'], g[f'{lin}.mod.bias'])[:, :, None, None]
        c = x.shape[1]
        x = (x - x.mean((2, 3), keepdim=True)) / x.flatten(2).std(2)[:, :, None, None]
        return a[:, :c] * x + a[:, c:]

    def conv(x, p):
        w = g[f'{p}.weight_orig']
        return F.conv2d(x, w * math.sqrt(2 / w[0].numel()) * g[f'{p}.weight_gain'], g[f'{p}.bias'], padding=1)
    blur = (torch.tensor([1., 2., 1.])[:, None] * torch.tensor([1., 2., 1.]) / 16)[None, None]
    x = adain(F.leaky_relu(conv(torch.ones(len(z), 512, 4, 4), 'progression.0.conv.1.conv'), 0.2), 'progression.0.conv.3')
    for i in range(1, n + 1):
        x = F.interpolate(x, scale_factor=2)
        x = conv(x, f'progression.{i}.conv.0.0.conv')
        x = F.conv2d(x, blur.expand(x.shape[1], 1, 3, 3), padding=1, groups=x.shape[1])
        x = adain(F.leaky_relu(x, 0.2), f'progression.{i}.conv.0.3')
        x = adain(F.leaky_relu(conv(x, f'progression.{i}.conv.1.conv'), 0.2), f'progression.{i}.conv.3')
    return F.conv2d(x, g[f'to_rgb.{n}.weight'], g[f'to_rgb.{n}.bias'])


def _authors_encode(d, snu, x, n):
    """Their Discriminator (pioneer/model.py, binary_predictor=False) in eval mode, with frozen SN u."""
    def sn_conv(h, p, u, pad):
        w = d[f'{p}.weight_orig']
        mat = w.reshape(len(w), -1)
        v = mat.t() @ u
        v = v / v.norm()
        u = mat @ v
        u = u / u.norm()
        return F.conv2d(h, w / (u.t() @ mat @ v), d[f'{p}.bias'], padding=pad)
    h = F.conv2d(x, d[f'from_rgb.{8 - n}.weight'], d[f'from_rgb.{8 - n}.bias'])
    for i in range(n, -1, -1):
        j = 8 - i
        h = F.leaky_relu(sn_conv(h, f'progression.{j}.conv.0.conv', snu[2 * j], 1), 0.2)
        h = sn_conv(h, f'progression.{j}.conv.2.conv', snu[2 * j + 1], 0 if i == 0 else 1)
        h = h if i == 0 else F.avg_pool2d(F.leaky_relu(h, 0.2), 2)
    return F.normalize(h.flatten(1), dim=1)


@pytest.mark.parametrize('arch', ['large', 'small'])
def test_authors_checkpoint_converts_and_computes_what_their_code_does(tmp_path, arch):
    path = str(tmp_path / '31877148_state.pth')
    g, d, snu = write_authors_checkpoint(path, arch, phase=2 if arch == 'large' else 1)
    n = 2 if arch == 'large' else 1
    net = M.load_checkpoint(path)
    assert net.res == net.cfg.max_res == 4 * 2 ** n and net.alpha == 1.0 and not net.training
    assert net.cfg.arch == arch and net.cfg.nz == 512 and all(getattr(net.cfg, k) == v for k, v in M.AUTHORS.items())
    assert net.input_crop == 256 and net.kimg == 31_877.148 and net.config == {'dataset': 'celebahq'}
    # every tensor of levels 0..n went somewhere: the converted model's parameter count equals theirs
    used = sum(v.numel() for k, v in g.items() if (_level_of(k, 'G') or 0) <= n and not k.startswith(
        ('adanorm', 'label', 'z_pre', 'noise.0.')) and not k.endswith('weight_gain'))
    assert M.count(net.decoder.parameters()) == used
    assert M.count(net.encoder.parameters()) == sum(v.numel() for k, v in d.items() if _level_of(k, 'D') <= n)
    x = torch.rand(3, 3, net.res, net.res, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = M.sample_prior(3, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want_z, got_z = _authors_encode(d, snu, x, n), net.encode(x)
        assert ((got_z - want_z).norm() / want_z.norm()) < 1e-4
        want, got = _authors_decode(g, z, n), net.decode(z, noise=False)
        assert ((got - want).norm() / want.norm()) < 1e-4
        # G_state_dict is the live decoder; G_running (the default) is what their evaluation uses
        live = M.load_checkpoint(path, ema=False).decode(z, noise=False)
        assert not torch.allclose(live, got) and torch.allclose(live, got - 2 * F.conv2d(
            net.decoder.canvas(z, n + 1, noise=False), g[f'to_rgb.{n}.weight']), atol=1e-4)


def test_authors_checkpoint_errors_name_the_keys(tmp_path):
    path = str(tmp_path / 'a_state.pth')
    write_authors_checkpoint(path, phase=1, drop=('progression.1.conv.3.mod.weight',))
    with pytest.raises(ValueError, match=r"progression\.1\.conv\.3\.mod\.weight' is missing for a 8x8 large"):
        M.load_checkpoint(path)
    write_authors_checkpoint(path, phase=1, extra=('progression.1.conv.9.weight', 'mystery'))
    with pytest.raises(ValueError, match=r"unexpected keys in G_running_state_dict: \['mystery', 'progression\.1\.conv\.9"):
        M.load_checkpoint(path)
    with open(path, 'rb') as f:
        head = f.read(100_000)
    with open(path, 'wb') as f:                              # a truncated download
        f.write(head)
    with pytest.raises(ValueError, match='could not read .*a_state.pth as a torch checkpoint.*complete'):
        M.load_checkpoint(path)


def test_released_models_resolve_through_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    calls = []

    def offline(url, dst, progress=True):
        calls.append((url, dst))
        raise OSError('network is unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    cached = tmp_path / 'hub' / 'checkpoints' / '34740000_state.pth'
    url = 'https://zenodo.org/record/4298894/files/34740000_state.pth?download=1'
    with pytest.raises(FileNotFoundError) as e:
        M.load_checkpoint('ffhq256')
    assert url in str(e.value) and str(cached) in str(e.value) and calls == [(url, str(cached))]
    assert "load_checkpoint('/path/to/34740000_state.pth')" in str(e.value)         # each caller in its own words
    import hubconf
    import train as T
    with pytest.raises(FileNotFoundError, match=r"checkpoint='/path/to/34740000_state.pth'\)"):
        hubconf.ffhq256()
    assert '--init_from=/path/to/34740000_state.pth' in _error_of(T.settings, given={'init_from': 'ffhq256'})
    assert '--ckpt=/path/to/34740000_state.pth' in _error_of(_sample, ckpt='ffhq256')
    calls.clear()
    write_authors_checkpoint(str(cached), phase=0)
    for name in ('ffhq256', '34740000_state.pth'):
        net = M.load_checkpoint(name)
        assert net.res == 4 and net.path == str(cached) and net.config == {'dataset': 'ffhq'}
    assert calls == []                                                    # once cached, never fetched again


def test_hubconf_loads_what_load_checkpoint_loads(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    write_authors_checkpoint(str(tmp_path / 'hub' / 'checkpoints' / '34740000_state.pth'), phase=1)
    z = M.sample_prior(2, 512, generator=torch.Generator().manual_seed(0))
    net = torch.hub.load(HERE, 'ffhq256', source='local')
    want = M.load_checkpoint('ffhq256')
    assert net.res == want.res == 8 and torch.equal(net.decode(z, noise=False), want.decode(z, noise=False))
    ours = torch.hub.load(HERE, 'automodulator', source='local', checkpoint=str(tiny_ckpt / 'ckpt.pt'))
    x = torch.zeros(1, 3, 16, 16)
    assert torch.equal(ours.encode(x), M.load_checkpoint(str(tiny_ckpt / 'ckpt.pt')).encode(x))
    import hubconf
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith('_')}
    assert entries == {'automodulator', *M.RELEASED} and hubconf.dependencies == ['torch', 'torchvision', 'numpy', 'scipy']
    assert 'FFHQ model at 256x256' in hubconf.ffhq256.__doc__            # what torch.hub.help prints
    monkeypatch.chdir(tiny_ckpt.parent)                                   # a relative path: the caller's directory
    assert hubconf.automodulator(f'{tiny_ckpt.name}/ckpt.pt').res == 16
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'out' / 'ckpt.pt'))):
        hubconf.automodulator()                                           # and the error says where it looked


def test_eval_mode_encode_and_decode_keep_no_graph_unless_asked(tiny_ckpt):
    net = M.load_checkpoint(str(tiny_ckpt / 'ckpt.pt'))
    x, z = torch.zeros(2, 3, 16, 16), z_of(net, 2)
    assert not net.encode(x).requires_grad and not net.decode(z).requires_grad and not net.reconstruct(x).requires_grad
    w = z.clone().requires_grad_(True)
    net.decode(w, grad=True).sum().backward()                             # e.g. to optimise latents
    assert w.grad is not None and w.grad.abs().sum() > 0
    net.train()
    assert net.encode(x).requires_grad and not net.encode(x, grad=False).requires_grad


def test_sample_and_metrics_take_an_authors_checkpoint(tmp_path):
    import sample as S
    from PIL import Image
    path = str(tmp_path / '12_state.pth')
    write_authors_checkpoint(path, phase=1)
    faces = tmp_path / 'faces'
    faces.mkdir()
    for i in range(4):
        Image.new('RGB', (40 + 10 * i, 30), (60 * i, 90, 200 - 40 * i)).save(faces / f'{i}.png')
    cfg = {k: getattr(S, k) for k in S.CONFIG_KEYS}
    out = S.main({**cfg, 'ckpt': path, 'mode': 'mix', 'n': 2, 'inputs': str(faces), 'out': str(tmp_path / 'm.png')})
    assert _png(out).shape == grid_shape(3, 3)                     # B row over A column, 2 x 2 mixes
    # the authors' transform: shorter side to 256, centre crop, resize to the model's 8x8
    x, _ = S.read_images(str(faces / '3.png'), 8, crop=256)
    import torchvision.transforms as T
    want = T.Compose([T.Resize(256), T.CenterCrop(256), T.Resize(8), T.PILToTensor()])(Image.open(faces / '3.png'))
    assert torch.equal(x[0], want.float() / 127.5 - 1)
    with pytest.raises(SystemExit, match='pass --inputs'):
        S.main({**cfg, 'ckpt': path, 'mode': 'recon'})
    r = _cli('metrics.py', '--metric=lpips_rec', f'--ckpt={path}', f'--out_dir={tmp_path}')
    assert r.returncode != 0 and '--dataset=NAME --data_root=PATH' in r.stderr


# ---------------------------------------------------------------------------------------------
# losses.py

X = torch.tensor([-30., -3., -1., -0.1, 0., 0.05, 0.5, 2., 7.], dtype=torch.float64)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_rho_special_cases(dtype):
    x, c = X.to(dtype), 0.7
    y = (x / c) ** 2
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    assert torch.equal(L.rho(x, 2.0, c), 0.5 * y)                                # exact L2
    assert torch.allclose(L.rho(x, 0.0, c), torch.log(0.5 * y + 1), **tol)       # Cauchy / log form
    assert torch.allclose(L.rho(x, 1.0, c), torch.sqrt(y + 1) - 1, **tol)        # Charbonnier
    assert torch.allclose(L.rho(x, -1e7, c), 1 - torch.exp(-0.5 * y), rtol=1e-4, atol=1e-6)   # Welsch
    assert L.rho(x, 1.3, c).dtype == dtype


def test_rho_gradients_finite_and_correct():
    for a in (0.0, 2.0, 1e-7, 1.0, 1.999, 2.5, -3.0):
        x = X.clone().requires_grad_()
        alpha = torch.full_like(X, a).requires_grad_()
        c = torch.full_like(X, 0.8).requires_grad_()
        L.rho(x, alpha, c).sum().backward()
        for g in (x.grad, alpha.grad, c.grad):
            assert torch.isfinite(g).all(), a
        assert x.grad[4] == 0                                       # x = 0 is the minimum
        if a != 2.0:                                                # no derivative in alpha at 2
            assert torch.autograd.gradcheck(L.rho, (x.detach().requires_grad_(), alpha.detach().requires_grad_(),
                                                    c.detach().requires_grad_()))
    for a in (0.0, 2.0):                                            # float32 at the special points
        alpha = torch.tensor(a, requires_grad=True)
        L.rho(torch.tensor([0., 1e-3, 5.]), alpha, 1.0).sum().backward()
        assert torch.isfinite(alpha.grad)


def _quad_log_z(a):
    from scipy.integrate import quad
    f = lambda x: math.exp(-L.rho(torch.tensor(x, dtype=torch.float64), a, 1.0).item())
    return math.log(2 * quad(f, 0, math.inf, epsabs=1e-13, epsrel=1e-11, limit=500)[0])


def test_log_partition_values_and_derivative():
    from scipy.special import k1
    lz = L.log_partition(torch.tensor([0., 1., 2.], dtype=torch.float64))
    want = torch.tensor([math.log(math.pi * math.sqrt(2)), math.log(2 * math.e * k1(1.0)),
                         math.log(math.sqrt(2 * math.pi))], dtype=torch.float64)
    assert torch.allclose(lz, want, rtol=0, atol=1e-7)
    for a in (0.05, 0.37, 1.3, 1.9, 1.995, 2.7):        # against quadrature, off the knots
        alpha = torch.tensor(a, dtype=torch.float64, requires_grad=True)
        value = L.log_partition(alpha)
        value.backward()
        assert abs(value.item() - _quad_log_z(a)) < 1e-6, a
        h = 1e-5
        fd = (_quad_log_z(a + h) - _quad_log_z(a - h)) / (2 * h)
        assert abs(alpha.grad.item() - fd) < 1e-4, (a, alpha.grad.item(), fd)


def test_density_integrates_to_one_and_nll_gradient():
    from scipy.integrate import quad
    for a, c in ((0.0, 1.0), (0.5, 0.3), (1.2, 2.0), (1.999, 1.0), (2.6, 0.5)):
        p = lambda x: math.exp(-L.nll(torch.tensor(x, dtype=torch.float64), a, c).item())
        assert abs(2 * quad(p, 0, math.inf, epsabs=1e-12, limit=500)[0] - 1) < 1e-6, a
    for a in (0.2, 1.0, 1.8, 2.4):
        alpha = torch.tensor(a, dtype=torch.float64, requires_grad=True)
        L.nll(X, alpha, 0.6).sum().backward()
        h = 1e-6
        fd = (L.nll(X, a + h, 0.6).sum() - L.nll(X, a - h, 0.6).sum()) / (2 * h)
        assert abs(alpha.grad.item() - fd.item()) < 1e-5 * max(1, abs(fd.item()))


def test_robust_loss_starts_at_one_and_grows_by_parent_pixel():
    torch.manual_seed(0)
    r = L.AdaptiveRobustLoss(max_res=16)
    assert torch.allclose(r.alpha(), torch.ones(3, 4, 4)) and torch.allclose(r.scale(), torch.ones(3, 4, 4))
    with torch.no_grad():
        r.alpha_latent[0].normal_()
        r.scale_latent[0].normal_()
    assert 0.001 < r.alpha().min() and r.alpha().max() < 1.999
    residual = torch.randn(5, 3, 4, 4)
    before = r(residual)
    alpha4, scale4 = r.alpha(), r.scale()
    r.grow()
    assert r.res == 8 and r.alpha().shape == (3, 8, 8)
    for dy in (0, 1):
        for dx in (0, 1):
            assert torch.equal(r.alpha_latent[1][:, dy::2, dx::2], r.alpha_latent[0])     # (c, 2y+dy, 2x+dx)
            assert torch.equal(r.scale_latent[1][:, dy::2, dx::2], r.scale_latent[0])     # <- (c, y, x)
            assert torch.allclose(r.alpha()[:, dy::2, dx::2], alpha4) and torch.allclose(r.scale()[:, dy::2, dx::2], scale4)
    up = F.interpolate(residual, scale_factor=2, mode='nearest')       # constant over each 2x2 block
    assert torch.allclose(r(up), before, rtol=1e-6)
    state = r.state_dict()
    fresh = L.AdaptiveRobustLoss(max_res=16)
    fresh.load_state_dict(state)
    assert fresh.res == 8 and torch.equal(fresh(up), r(up))


def test_kl_prior_and_its_sphere_form():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 16, generator=g, dtype=torch.float64)
    assert L.kl_prior(z) < 2e-3
    assert L.kl_prior(z + 1.0) > L.kl_prior(z) + 0.45          # a unit mean shift adds 1/2 per dimension
    assert L.kl_prior(z * 2) > 0.5
    sphere = M.sample_prior(20000, 64, generator=g)
    assert L.kl_latent(sphere) < 5e-3 and L.kl_prior(sphere) > 1.0   # the authors' form reads ~ log(nz)/2
    # ... and both give the same gradient through the normalization (they differ by a constant)
    h = torch.randn(32, 64, generator=g, dtype=torch.float64).add_(0.3).requires_grad_()
    g1, = torch.autograd.grad(L.kl_latent(F.normalize(h, dim=1)), h)
    g2, = torch.autograd.grad(L.kl_prior(F.normalize(h, dim=1)), h)
    assert torch.allclose(g1, g2, atol=1e-10) and g1.abs().max() > 1e-3


def test_margin_clamps():
    real, fake = torch.tensor(1.0, requires_grad=True), torch.tensor(5.0)
    out = L.margin_kl(real, fake, margin=0.5)
    out.backward()
    assert out.item() == -0.5 and real.grad.item() == 0.0          # clamped: no gradient
    assert L.margin_kl(torch.tensor(5.0), torch.tensor(1.0), 0.5).item() == 4.0
    assert L.margin_kl(torch.tensor(5.0), torch.tensor(1.0), 0.5, upper_clamp=True).item() == 0.25
    assert L.margin_kl(torch.tensor(1.0), torch.tensor(5.0), None).item() == -4.0


def test_fake_batch_split_and_layer_loss():
    m = tiny()
    g = torch.Generator().manual_seed(3)
    f = L.fake_batch(m.decoder, 8, 32, 1.0, mix_ratio=0.25, generator=g, noise=False)
    assert f.images.shape == (8, 3, 32, 32) and f.z.shape == (6, 32) and f.z_a.shape == (2, 32)
    assert 1 <= f.j <= 3 and torch.equal(m.decoder.canvas(f.z_a, f.j, noise=False), f.canvas)
    assert torch.equal(f.images[:6], m.decoder(f.z, 32, noise=False))
    assert L.fake_batch(m.decoder, 8, 4, 1.0, 0.25).j == 0                      # one block: nothing to mix
    # L_j is exactly 0 when the re-encoded code equals z_A ...
    assert L.layer_loss(m.decoder, f.z_a, f.canvas, f.j, noise=False).item() == 0.0
    # ... and otherwise its gradient reaches the coarse blocks of the decoder
    z_ab = m.encoder(f.images[6:], 32)
    L.layer_loss(m.decoder, z_ab, f.canvas, f.j).backward()
    grad = m.decoder.blocks[0].layers[0].adain.style.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_encoder_and_decoder_losses_backpropagate():
    m = tiny()
    robust = L.AdaptiveRobustLoss(max_res=64, res=16)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        fakes = L.fake_batch(m.decoder, 6, 16, 0.5, 0.25).images
    loss, parts, z = L.encoder_loss(m.encoder, m.decoder, robust, x, fakes, 16, 0.5, margin=0.5, weights=dict(lambda_x=3.0))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {'kl_real', 'kl_fake', 'recon'}
    assert z.shape == (6, 32) and not z.requires_grad
    assert m.encoder.blocks[0].conv2.parametrizations.weight.original.grad.abs().sum() > 0
    assert robust.alpha_latent[2].grad.abs().sum() > 0 and robust.alpha_latent[1].grad is None
    m.zero_grad()
    weights = dict(lambda_z=2.0, lambda_j=10.0)
    loss, parts = L.decoder_loss(m.encoder, m.decoder, 8, 16, 1.0, weights, 0.25, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {'kl_dec', 'dcos', 'layer'} and parts['layer'] > 0
    assert m.decoder.blocks[2].layers[1].conv.weight.grad.abs().sum() > 0


def test_decoder_reconstruction_switch_adds_exactly_its_term():
    m = tiny()
    m.encoder.eval()                  # spectral norm's power iteration would move between the calls
    robust = L.AdaptiveRobustLoss(max_res=64, res=16)
    x = torch.rand(6, 3, 16, 16) * 2 - 1

    def loss_with(lambda_x_dec=0.0, **kw):   # the same fakes each time: same generator, no layer noise
        weights = dict(lambda_z=2.0, lambda_j=10.0, lambda_x_dec=lambda_x_dec)
        return L.decoder_loss(m.encoder, m.decoder, 8, 16, 1.0, weights, 0.25, torch.Generator().manual_seed(0),
                              noise=False, **kw)
    base, _ = loss_with()
    loss, parts = loss_with(x=x, distance=robust, lambda_x_dec=3.0)
    with torch.no_grad():
        recon = robust(m.decoder(m.encoder(x, 16), 16, noise=False) - x)
    assert torch.allclose(parts['rec_dec'], recon) and torch.allclose(loss, base + 3.0 * recon)
    # phi(x) handed over from the encoder step is the code it decodes (train.py passes it)
    with torch.no_grad():
        z = m.encoder(x, 16)
    assert torch.allclose(loss_with(x=x, distance=robust, lambda_x_dec=3.0, z_real=z)[0], loss)
    assert not torch.allclose(loss_with(x=x, distance=robust, lambda_x_dec=3.0, z_real=z.roll(1, 0))[0], loss)
    # the added term trains the decoder alone: phi(x) enters as a fixed code
    (loss - base).backward()
    assert m.decoder.to_rgb[2].weight.grad.abs().sum() > 1e-3
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in m.encoder.parameters())


@pytest.mark.parametrize('recon', ['robust', 'l1'])
def test_one_shared_reconstruction_pass_gives_both_steps_their_gradients(recon):
    # train.py decodes phi(x) once for L_phi's term and the decoder's lambda_x_dec term: one backward
    # must give the encoder and d_rho L_phi's gradient and the decoder lambda_x_dec d(x, theta(phi(x)))'s
    m = tiny(noise='none')
    m.encoder.eval()                  # spectral norm's power iteration would move between the calls
    robust = L.AdaptiveRobustLoss(max_res=64, res=16)
    with torch.no_grad():
        robust.alpha_latent[2].normal_()
    distance = L.pixel_distance(recon, robust)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        fakes = L.fake_batch(m.decoder, 6, 16, 1.0, 0.25).images
    w = dict(lambda_x=3.0)
    enc, dec, rob = list(m.encoder.parameters()), list(m.decoder.parameters()), list(robust.parameters())

    def grads(params):
        out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return out
    loss, parts, z = L.encoder_loss(m.encoder, m.decoder, distance, x, fakes, 16, 1.0, 0.5, w)
    loss.backward(inputs=enc + rob)
    apart = grads(enc + rob)
    (10.0 * distance(m.decoder(z, 16, 1.0) - x)).backward(inputs=dec)
    apart += grads(dec)
    shared, parts_shared, _ = L.encoder_loss(m.encoder, m.decoder, distance, x, fakes, 16, 1.0, 0.5, w, lambda_x_dec=10.0)
    shared.backward(inputs=enc + rob + dec)
    together = grads(enc + rob + dec)
    assert torch.allclose(shared, loss) and torch.allclose(parts_shared['rec_dec'], parts['recon'])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item()) for a, b in zip(apart, together))
    assert sum(g.abs().sum() for g in together[len(enc) + len(rob):]) > 0        # the decoder did get its part


def test_a_training_step_reads_the_device_at_most_once():
    # every read of a tensor's value in our code waits for the device: a step may hold one (j, the
    # mixing split, drawn on the CPU), the progress line's read comes once per interval
    import train as T
    cfg = T.settings({**TINY_TRAIN, 'max_res': 8, 'out_dir': 'unused'})
    t = T.Trainer(cfg, T.model_config_from(cfg), torch.device('cpu'))
    t.robust.grow()
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    t.step_on(x, 8, 1.0, False)
    ours = {os.path.join(HERE, f) for f in ('model.py', 'losses.py', 'train.py', 'data.py')}
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller in ours:
                reads.append((name, caller, sys._getframe(1).f_lineno))
            return original(self, *a, **k)
        return original, read
    names = ('item', 'cpu', 'tolist', 'numpy', '__bool__', '__int__', '__float__', '__index__')
    saved = {}
    try:
        for name in names:
            saved[name], wrapper = counted(name)
            setattr(torch.Tensor, name, wrapper)
        terms = T.Terms()
        terms.add(t.step_on(x, 8, 1.0, False), t.images_seen)
        at_8 = list(reads)
        terms.add(t.step_on(x, 8, 1.0, True), t.images_seen)
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
    assert len(at_8) <= 1 and len(reads) <= 2, reads
    means, bad = terms.read()
    assert not bad and set(means) >= {'loss_enc', 'recon', 'loss_dec', 'rec_dec'}
    # loss_dec is the decoder's whole loss also when its reconstruction term came from the shared pass
    whole = means['kl_dec'] + cfg['lambda_z'] * means['dcos'] + cfg['lambda_x_dec'] * means['rec_dec']
    assert cfg['lambda_j'] == 0 and abs(means['loss_dec'] - whole) < 1e-4 * max(1, abs(whole))


def test_invariance_loss_generalizes_reconstruction():
    m = tiny()
    robust = L.AdaptiveRobustLoss(max_res=64, res=16)
    x1 = torch.rand(4, 3, 16, 16) * 2 - 1
    x2 = x1.flip(-1)
    z1, z2 = m.encoder(x1, 16), m.encoder(x2, 16)
    # z1 = z2 reduces it to twice the reconstruction loss (Sec. 3.3)
    same = L.invariance_loss(m.decoder, robust, x1, x1, z1, z1, 2, 16, 1.0, noise=False)
    assert torch.allclose(same, 2 * robust(m.decoder(z1, 16, noise=False) - x1))
    pair = L.invariance_loss(m.decoder, robust, x1, x2, z1, z2, 2, 16, 1.0, noise=False)
    pair.backward()
    assert torch.isfinite(pair) and m.encoder.from_rgb[2].weight.grad.abs().sum() > 0


def test_extra_8x8_block_for_the_invariance_split():
    m = tiny(extra_8x8=True, noise='none')
    d = m.decoder
    assert d.block_res == [4, 8, 8, 16, 32, 64] and d.n_blocks == 6 and len(d.to_rgb) == 5
    assert not d.blocks[2].up and d.blocks[2].layers[0].blur is not None     # keeps the size, as the authors'
    z, z2 = z_of(m), z_of(m, seed=2)
    assert d.canvas(z, 2).shape[-1] == d.canvas(z, 3).shape[-1] == 8 and d.canvas(z, 4).shape[-1] == 16
    assert [d.blocks_at(r) for r in (4, 8, 16)] == [1, 3, 4]
    # the split after block 1 (paper's layers #1-2), continued at 8x8 and at 16x16 mid-fade
    for res, alpha in ((8, 1.0), (16, 0.5)):
        want = d(M.mix_latents(z, z2, range(2), d.n_blocks), res, alpha, noise=False)
        assert torch.allclose(d(z, res, alpha, noise=False, canvas=d.canvas(z2, 2, noise=False), start=2), want, atol=1e-6)
    # the groups hold the extra block: coarse 4-8 is blocks 0-2, intermediate 16-32 is 3-4
    assert M.block_range('coarse', 6, True) == range(0, 3) and M.block_range('intermediate', 6, True) == range(3, 5)
    with pytest.raises(ValueError, match='fading in at 8x8 needs the canvas of block 0'):
        d(z, 8, 0.5, canvas=d.canvas(z, 2), start=2)
    # L_inv + L'_inv join L_phi on flip pairs, with gradients in the encoder (eval: SN u stays put)
    m.eval()
    robust = L.AdaptiveRobustLoss(max_res=64, res=16)
    x = D.prepare_batch(D.ShapesSource('train').load_batch(list(range(4)), 16), pairs=True, flip=False)
    fakes = d(M.sample_prior(4, 32), 16, noise=False).detach()
    base, _, _ = L.encoder_loss(m.encoder, d, robust, x, fakes, 16, 1.0, 0.5, dict(lambda_x=3.0))
    loss, parts, _ = L.encoder_loss(m.encoder, d, robust, x, fakes, 16, 1.0, 0.5, dict(lambda_x=3.0), invariance_k=2)
    z = m.encoder(x, 16)
    inv = L.invariance_loss(d, robust, x[:2], x[2:], z[:2], z[2:], 2, 16, 1.0)
    assert torch.allclose(parts['inv'], inv) and torch.allclose(loss, base + 3.0 * inv)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.encoder.used_parameters(16))


def test_loss_bad_input():
    with pytest.raises(ValueError, match='scale c must be positive'):
        L.rho(torch.ones(3), 1.0, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r'alpha in \[0.0, 3.0\].*-0.5'):
        L.log_partition(torch.tensor([-0.5, 1.0]))
    with pytest.raises(ValueError, match=r'\(B, 3, 8, 8\), got \(2, 3, 16, 16\).*grow'):
        L.AdaptiveRobustLoss(max_res=32, res=8)(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match='B >= 2'):
        L.kl_prior(torch.zeros(1, 8))


# ---------------------------------------------------------------------------------------------
# data.py

def _write_images(folder, n_plain=0):
    """A folder with the awkward cases: grayscale, RGBA, 16-bit, non-square, corrupt, nested."""
    from PIL import Image
    os.makedirs(folder / 'sub', exist_ok=True)
    Image.new('L', (20, 20), 100).save(folder / 'gray.png')
    rgba = Image.new('RGBA', (16, 16), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 8, 16))                 # left half fully transparent
    rgba.save(folder / 'rgba.png')
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(folder / 'deep16.png')
    wide = np.zeros((16, 48, 3), dtype=np.uint8)
    wide[:, 16:32] = (0, 0, 255)                               # blue square in the middle, red sides
    wide[:, :16] = wide[:, 32:] = (255, 0, 0)
    Image.fromarray(wide).save(folder / 'sub' / 'wide.png')
    Image.new('RGB', (12, 12), (0, 200, 0)).save(folder / 'sub' / 'green.jpg')
    (folder / 'broken.png').write_bytes(b'not an image at all')
    for k in range(n_plain):
        Image.new('RGB', (8, 8), (k % 256, 50, 60)).save(folder / f'plain_{k:03d}.png')


def source(dataset, data_root='', split='train', log=None, **cfg):
    """data.open_split on the settings a run would give it."""
    return D.open_split(dict(cfg, dataset=dataset, data_root=data_root), split, log=log)


def test_folder_converts_awkward_images_and_skips_corrupt_ones(tmp_path):
    root = tmp_path / 'imgs'
    _write_images(root, n_plain=100)                           # 1 corrupt file in 106: within 1%
    logs = []
    with pytest.warns(UserWarning, match=r'skipping unreadable image .*broken.png.*1 skipped'):
        src = source('folder', str(root), max_res=8, log=logs.append)
    assert len(src) == 105 and src.skipped == ['broken.png'] and any('1 unreadable skipped: broken.png' in m for m in logs)
    by_name = {os.path.basename(src.files[v]): r for r, v in enumerate(src.valid)}
    gray = src.load(list(src.indices).index(by_name['gray.png']), 8)
    assert gray.shape == (3, 8, 8) and (gray == 100).all()
    rgba = src.load(list(src.indices).index(by_name['rgba.png']), 8)
    assert (rgba[:, :, :3] == 255).all() and tuple(rgba[:, 4, 6]) == (255, 0, 0)   # transparent -> white
    deep = src.load(list(src.indices).index(by_name['deep16.png']), 4)
    assert (deep == 255).all()                                 # 16-bit white stays white
    wide = src.load(list(src.indices).index(by_name['wide.png']), 8).int()
    assert (wide[2] > 230).all() and (wide[0] < 25).all()     # center-cropped: only the blue square
    # the per-resolution cache is reused: a second source does not decode again
    logs.clear()
    again = source('folder', str(root), max_res=8, log=logs.append)
    assert logs == [] and torch.equal(again.load(5, 8), src.load(5, 8))


def test_folder_bad_input(tmp_path):
    with pytest.raises(ValueError, match='--data_root'):
        source('folder', '')
    with pytest.raises(FileNotFoundError, match='not a directory'):
        source('folder', str(tmp_path / 'missing'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no images'):
        source('folder', str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match=r'unknown dataset .*shapes, folder, ffhq, celebahq, lsun_bedroom, lsun_cars'):
        source('imagenet')
    _write_images(tmp_path / 'few', n_plain=5)                 # 1 corrupt in 11: skipped, small folder
    with pytest.warns(UserWarning, match='broken.png'):
        assert len(source('folder', str(tmp_path / 'few'), max_res=8, cache_dir=str(tmp_path / 'c'))) == 10
    many = tmp_path / 'many'
    _write_images(many, n_plain=100)
    for k in range(11):                                        # 12 corrupt in 117: more than 10%
        (many / f'zz_broken_{k}.png').write_bytes(b'junk')
    with pytest.raises(ValueError, match=r'more than 10% of the 117 images .*cannot be read \(12 so far'), \
            pytest.warns(UserWarning):
        source('folder', str(many), max_res=8, cache_dir=str(tmp_path / 'c2'))
    assert os.listdir(tmp_path / 'c2') == ['build.lock']       # no temporary file left behind (the lock stays)


def test_folder_cache_build_interrupted_leaves_no_temporary_files(tmp_path, monkeypatch):
    root = tmp_path / 'imgs'
    _write_images(root, n_plain=20)
    real, seen = D._decode_all, []

    def interrupted(item):
        seen.append(item)
        if len(seen) == 10:
            raise KeyboardInterrupt                            # Ctrl-C halfway through the cache
        return real(item)
    monkeypatch.setattr(D, '_decode_all', interrupted)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        source('folder', str(root), max_res=8)
    assert os.listdir(root / '.automodulator_cache') == ['build.lock']     # the lock stays, nothing else
    monkeypatch.setattr(D, '_decode_all', real)
    with pytest.warns(UserWarning):
        assert len(source('folder', str(root), max_res=8)) == 25


FACE = np.array([[-20, 0], [20, 0], [0, 15], [-15, 40], [15, 40]], float)   # eyes, nose, mouth corners


def _dotted_face(theta, scale, centre, size):
    """A uniform picture with blue dots at FACE's eyes and mouth corners, turned by theta, scaled, moved."""
    from PIL import Image, ImageDraw
    turn = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = FACE @ turn.T * scale + np.asarray(centre, float)
    im = Image.new('RGB', size, (200, 100, 50))
    draw = ImageDraw.Draw(im)
    for x, y in points[[0, 1, 3, 4]]:
        draw.ellipse([x - 3 * scale, y - 3 * scale, x + 3 * scale, y + 3 * scale], fill=(0, 0, 255))
    return im, points


def _dots(face):
    """Centres (x, y) of the blue dots of an aligned face, sorted."""
    from scipy import ndimage
    a = np.asarray(face).astype(float)
    blue = (a[..., 2] > 150) & (a[..., 0] < 120)
    labels, n = ndimage.label(blue)
    return sorted((c[1], c[0]) for c in ndimage.center_of_mass(blue, labels, range(1, n + 1))), a[~blue]


def test_face_alignment_lands_the_landmarks_at_fixed_pixels_under_any_similarity():
    # the square: centre = eye midpoint + 0.1 eye-to-mouth = (0, 4); half side max(2 * 40, 1.8 * 40) = 80,
    # so at 64 px a point (x, y) of FACE lands at ((x / 80 + 1) * 32, ((y - 4) / 80 + 1) * 32) - 0.5
    want = sorted(((x / 80 + 1) * 32 - 0.5, ((y - 4) / 80 + 1) * 32 - 0.5) for x, y in FACE[[0, 1, 3, 4]])
    for theta, scale, centre, size in ((0.0, 1.0, (200, 150), (400, 300)), (0.5, 2.0, (300, 250), (600, 500)),
                                       (-1.0, 0.7, (40, 40), (200, 160))):        # the last reaches past two borders
        im, points = _dotted_face(theta, scale, centre, size)
        got, rest = _dots(D.align_face(im, points, 64))
        assert len(got) == 4 and np.abs(np.array(got) - np.array(want)).max() < 1.0, (theta, got)
        assert np.abs(rest - [200, 100, 50]).max(1).mean() < 8     # padded by mirroring the picture, not black
    c, x, y = D.face_square(FACE)
    assert np.allclose(c, [0, 4]) and np.allclose(x, [80, 0]) and np.allclose(y, [0, 80])


def _astronaut():
    return os.path.join(HERE, 'assets', 'astronaut.jpg')


# where the eyes, nose tip and mouth corners of assets/astronaut.jpg are, read off the picture by hand
ASTRONAUT = np.array([[204, 101], [245, 103], [225, 128], [202, 140], [245, 141]], float)


def test_faces_found_by_mtcnn_on_a_real_photo_align_upright_largest_first(tmp_path, capsys):
    import sample as S
    from PIL import Image
    faces = S.Faces(_astronaut())
    photo = Image.open(_astronaut())
    found = faces.points(_astronaut(), photo)
    assert len(found) == 1 and np.abs(found[0] - ASTRONAUT).max() < 4     # within a few pixels
    upright = np.asarray(faces.of(_astronaut(), 128)[0][1]).astype(float)
    sideways = tmp_path / 'sideways.jpg'                       # a phone's portrait: pixels turned, an EXIF tag
    exif = Image.Exif()
    exif[0x0112] = 6                                           # rotate 90 CW to display
    photo.rotate(90, expand=True).save(sideways, exif=exif, quality=95)
    turned = np.asarray(faces.of(str(sideways), 128)[0][1]).astype(float)
    again = faces.points(str(sideways), D.open_rgb(str(sideways)))
    assert np.abs(again[0] - found[0]).max() < 2 and np.abs(turned - upright).mean() < 10   # the same face, upright
    two = Image.new('RGB', (900, 520), (90, 90, 90))           # two faces: the larger first, both with all_faces
    two.paste(photo, (0, 0))
    two.paste(photo.resize((256, 256)), (600, 100))
    two.save(tmp_path / 'two.png')
    assert len(faces.of(str(tmp_path / 'two.png'), 64)) == 1
    with pytest.warns(UserWarning, match='under 64'):         # the second face is small
        both = S.Faces(str(tmp_path), all_faces=True).of(str(tmp_path / 'two.png'), 64)
    assert [name for name, _ in both] == [str(tmp_path / 'two.png'), f'{tmp_path / "two.png"}#face1']
    Image.new('RGB', (200, 200), (30, 120, 30)).save(tmp_path / 'no_face.png')
    capsys.readouterr()
    assert faces.of(str(tmp_path / 'no_face.png'), 64) == []
    assert f'no face found in {tmp_path / "no_face.png"}: skipped' in capsys.readouterr().out
    photo.resize((300, 300)).save(tmp_path / 'far.png')      # eyes 24 px apart: a face about 50 px wide
    with pytest.warns(UserWarning, match=r'about \d+ px wide, under 64: its aligned crop is blurry'):
        assert len(faces.of(str(tmp_path / 'far.png'), 64)) == 1


def test_align_mode_and_align_on_other_modes(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import builtins
    from PIL import Image
    photos = tmp_path / 'photos'
    photos.mkdir()
    im, points = _dotted_face(0.3, 1.5, (150, 120), (320, 240))
    im.save(photos / 'me.png')
    Image.new('RGB', (50, 50)).save(photos / 'nobody.png')
    marks = tmp_path / 'marks.json'
    marks.write_text(json.dumps({'me.png': points.tolist()}))
    folder = _sample(mode='align', inputs=str(photos), landmarks=str(marks), res=64, out=str(tmp_path / 'aligned'))
    assert sorted(os.listdir(folder)) == ['me.png'] and 'not in --landmarks' in capsys.readouterr().out
    got, _ = _dots(Image.open(os.path.join(folder, 'me.png')))
    assert len(got) == 4
    out = _sample(out_dir=str(tiny_ckpt), mode='recon', inputs=str(photos), align='ffhq', landmarks=str(marks),
                  out=str(tmp_path / 'r.png'))
    assert _png(out).shape == grid_shape(2, 1)                 # the one face, aligned, then reconstructed
    with monkeypatch.context() as m:
        m.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)             # a decompression bomb: one line, then on
        _sample(mode='align', inputs=str(photos), landmarks=str(marks), out=str(tmp_path / 'bomb'))
        said = capsys.readouterr().out
    assert re.search(r'skipping .*me.png: DecompressionBombError: [^\n]*\n', said) and 'wrote 0 aligned' in said
    marks.write_text('not json')
    assert f'--landmarks={marks}: expected a JSON file' in _error_of(_sample, mode='align', inputs=str(photos),
                                                                      landmarks=str(marks))
    real_import = builtins.__import__

    def without_facenet(name, *args, **kwargs):
        if name.startswith('facenet_pytorch'):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', without_facenet)
    text = _error_of(_sample, mode='align', inputs=str(photos))
    assert 'MTCNN from facenet-pytorch, which is not installed: pip install -r requirements-extra.txt' in text


def test_exif_orientation_is_applied_wherever_images_are_read(tmp_path):
    from PIL import Image
    import sample as S
    im = np.zeros((10, 20, 3), dtype=np.uint8)                 # stored 20 wide, 10 high
    im[:, :10] = (255, 0, 0)                                   # left half red, right half blue
    im[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                                           # "rotate 90 CW to view": a phone portrait
    path = tmp_path / 'portrait.png'
    Image.fromarray(im).save(path, exif=exif)
    up = D.open_rgb(path)
    assert up.size == (10, 20)                                 # upright: 10 wide, 20 high
    assert up.getpixel((5, 2)) == (255, 0, 0) and up.getpixel((5, 17)) == (0, 0, 255)   # red on top
    x, _ = S.read_images(str(path), 8)
    assert x.shape == (1, 3, 8, 8) and x[0, 0, 0].mean() > 0 > x[0, 0, 7].mean()   # centre crop: red rows on top
    src = source('folder', str(tmp_path), max_res=8)
    assert torch.equal(src.load(0, 8), ((x[0] + 1) * 127.5).round().to(torch.uint8))


def _noisy_folder(root, n=24, size=12):
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    g = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f'{k:03d}.png')


def test_processes_that_open_one_folder_at_once_share_one_build(tmp_path, monkeypatch):
    # torchrun's ranks of one node open the data together: one builds, the others wait on its lock
    import multiprocessing as mp
    root = tmp_path / 'imgs'
    _noisy_folder(root)
    monkeypatch.setattr(D.BuildLock, 'WAIT_LINE_EVERY', 0.0)              # the waiting line at once
    slow = D._decode_all

    def decode_slowly(item):                                              # a build the others must wait for
        time.sleep(0.02)
        return slow(item)
    monkeypatch.setattr(D, '_decode_all', decode_slowly)

    def child(q):
        lines = []
        src = source('folder', str(root), max_res=8, cache_dir=str(tmp_path / 'cache'), log=lines.append)
        q.put((lines, src.load_batch(range(len(src)), 8).numpy()))
    ctx = mp.get_context('fork')
    q = ctx.Queue()
    procs = [ctx.Process(target=child, args=(q,)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    lines = [line for r in results for line in r[0]]
    assert sum(line.startswith('cached 24 images') for line in lines) == 1, lines
    assert any(line.startswith('waiting for another process to finish the cache') for line in lines), lines
    assert all(np.array_equal(results[0][1], r[1]) for r in results)
    assert sorted(os.listdir(tmp_path / 'cache')) == ['4x4.u8', '8x8.u8', 'build.lock', 'index.json']   # no temporaries


def test_train_prepare_only_builds_the_cache_and_trains_nothing(tmp_path, capsys):
    import train as T
    root = tmp_path / 'imgs'
    _noisy_folder(root, n=8)
    cfg = T.settings(dict(dataset='folder', data_root=str(root), max_res=8, out_dir=str(tmp_path / 'run'),
                          prepare_only=True))
    T.main(cfg)
    out = capsys.readouterr().out
    assert 'caching 8 images of' in out and '1.9 KiB (--cache_dir moves it)' in out
    assert f'prepared: 8 train images of folder in {root / ".automodulator_cache"}' in out
    assert (root / '.automodulator_cache' / 'index.json').exists() and not (tmp_path / 'run').exists()


def test_a_cache_larger_than_the_free_disk_is_refused_before_it_is_written(tmp_path, monkeypatch):
    import shutil
    root = tmp_path / 'imgs'
    _noisy_folder(root, n=4)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(D.shutil, 'disk_usage', lambda p: usage._replace(free=100))
    with pytest.raises(OSError, match=r'the cache needs 960 B in .* but only 100 B are free; point --cache_dir'):
        source('folder', str(root), max_res=8, cache_dir=str(tmp_path / 'cache'))
    assert os.listdir(tmp_path / 'cache') == ['build.lock']


def test_worker_pools_spawn_where_fork_is_missing(tmp_path, monkeypatch):
    import train as T
    root = tmp_path / 'imgs'
    _write_images(root, n_plain=6)
    with pytest.warns(UserWarning):
        plain = source('folder', str(root), max_res=8, cache_dir=str(tmp_path / 'a'))
    monkeypatch.setattr(D, 'START_METHOD', 'spawn')                       # as on Windows
    monkeypatch.setattr(D, 'build_workers', lambda n: 2)                  # a pool even for 6 images
    with pytest.warns(UserWarning):
        spawned = source('folder', str(root), max_res=8, cache_dir=str(tmp_path / 'b'))
    assert torch.equal(plain.load_batch(range(len(plain)), 8), spawned.load_batch(range(len(spawned)), 8))
    batch = next(D.make_loader(spawned, 8, batch=4, num_workers=1))
    assert torch.equal(batch, spawned.load_batch(next(iter(D.ShardSampler(len(spawned), 4))), 8))
    monkeypatch.setitem(sys.modules, 'resource', None)                    # no `resource` module (Windows)
    assert T.memory_text(torch.device('cpu')) == ''


def test_folder_split_and_loader_with_workers(tmp_path):
    from PIL import Image
    root = tmp_path / 'ffhq'
    root.mkdir()
    for k in range(14):
        Image.new('RGB', (8, 8), (k * 10, 0, 0)).save(root / f'{k:05d}.png')
    logs = []
    train = source('ffhq', str(root), 'train', max_res=8, log=logs.append)
    test = source('ffhq', str(root), 'test', max_res=8, log=logs.append)
    assert len(train) == 12 and len(test) == 2 and any('60,000' in m or '70,000' in m for m in logs)
    assert test.load(0, 8)[0, 0, 0] == 120 and test.load(1, 8)[0, 0, 0] == 130    # the last files
    held = source('folder', str(root), 'test', max_res=8, test_fraction=0.25)
    rest = source('folder', str(root), 'train', max_res=8, test_fraction=0.25)
    assert len(held) == 4 and len(rest) == 10 and not set(held.indices) & set(rest.indices)
    batches = D.make_loader(train, 8, batch=5, num_workers=2)
    first = next(batches)
    assert first.shape == (5, 3, 8, 8) and first.dtype == torch.uint8


def _write_lmdb(path, n=12, corrupt=3):
    """An LSUN-style lmdb of n 24x16 webp records, record k red 20 k, record `corrupt` not an image."""
    lmdb = pytest.importorskip('lmdb')
    from PIL import Image
    import io
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for k in range(n):
            buf = io.BytesIO()
            Image.new('RGB', (24, 16), (20 * k, 0, 0)).save(buf, format='WEBP', lossless=True)
            txn.put(f'{k:040x}'.encode(), buf.getvalue() if k != corrupt else b'corrupt record')
    env.close()


def test_lsun_lmdb_keys_cached_and_split(tmp_path):
    path = tmp_path / 'car'
    _write_lmdb(path)
    logs = []
    train = source('lsun_cars', str(path), 'train', log=logs.append)
    assert os.path.exists(str(path) + '_keys.npy') and any('scanning' in m for m in logs)
    assert len(train) == 11 and any('4,968,695' in m or 'proportion' in m for m in logs)  # 12 * 0.9 = 11
    assert any('--lsun_cache_res=64 resizes 11 images once to 4..64 px (175.8 KiB)' in m for m in logs)
    assert train.load(2, 8).shape == (3, 8, 8) and train.load(2, 8)[0, 0, 0] == 40    # 24x16 center-cropped
    with pytest.warns(UserWarning, match='skipping unreadable LSUN record'):
        assert train.load(3, 8)[0, 0, 0] == 80                  # the corrupt record falls back to the next
    logs.clear()
    test = source('lsun_cars', str(path), 'test', log=logs.append)
    assert not any('scanning' in m for m in logs) and len(test) == 1 and test.load(0, 4)[0, 0, 0] == 220


def test_lsun_resized_once_into_a_cache_up_to_lsun_cache_res(tmp_path, capsys):
    import train as T
    path = tmp_path / 'car'
    _write_lmdb(path)
    logs, cfg = [], dict(max_res=16, lsun_cache_res=8, max_images=6)
    with pytest.warns(UserWarning, match=r"skipping unreadable image b'0+3' of the lmdb"):
        train = source('lsun_cars', str(path), 'train', log=logs.append, **cfg)
    assert any('caching 6 images of the lmdb' in m and '4..8 px' in m for m in logs), logs
    assert len(train) == 5 and list(train.indices) == [0, 1, 2, 4, 5]        # the corrupt record drops out
    direct = D.LmdbSource(str(path))
    for i, k in enumerate([0, 1, 2, 4, 5]):
        for res in (4, 8):                                     # from the cache, as the lmdb decodes them
            assert torch.equal(train.load(i, res), direct.load(k, res))
        assert torch.equal(train.load(i, 16), direct.load(k, 16)) and train.load(i, 16)[0, 0, 0] == 20 * k
    assert not (path / '.automodulator_cache' / '16x16.u8').exists()    # above lsun_cache_res: read from the lmdb
    logs.clear()
    again = source('lsun_cars', str(path), 'train', log=logs.append, **cfg)
    assert len(again) == 5 and not any('cach' in m for m in logs)                     # reused, not rebuilt
    with pytest.warns(UserWarning):
        source('lsun_cars', str(path), 'train', log=logs.append, **{**cfg, 'max_images': 8})
    assert any('stale' in m for m in logs) and any('caching 8 images' in m for m in logs)
    with pytest.warns(UserWarning):                            # back to 6 images: rebuilt again
        T.main(T.settings(dict(dataset='lsun_cars', data_root=str(path), out_dir=str(tmp_path / 'run'),
                               prepare_only=True, **cfg)))
    assert f'prepared: 5 train images of lsun_cars in {path / ".automodulator_cache"}' in capsys.readouterr().out


def test_shapes_are_deterministic_and_estimable():
    a, fa = D.render_shapes(torch.tensor([3, 9, 12]), 32)
    b, fb = D.render_shapes(torch.tensor([12]), 32)
    assert torch.equal(a[2], b[0]) and fa['shape'][2] == fb['shape'][0]
    assert not torch.equal(D.render_shapes(torch.tensor([12]), 32, seed=1)[0], b)
    assert a.min() >= -1 and a.max() <= 1
    f = D.shapes_factors(torch.arange(5000))
    assert (f['color'] > f['background']).all()          # one edge polarity: lighter object, every channel
    assert f['color'].std(0).min() > 0.07 and f['background'].std(0).min() > 0.07   # both vary
    train, test = D.ShapesSource('train'), D.ShapesSource('test')
    assert not torch.equal(train.load_batch([0], 16), test.load_batch([0], 16))
    for res in (32, 64):
        src = D.ShapesSource('test')
        idx = list(range(1000))
        x = src.load_batch(idx, res).float() / 127.5 - 1
        ok = D.factor_errors(D.estimate_factors(x), src.factors(idx))
        for k, v in ok.items():
            assert v.float().mean() >= 0.95, (res, k, v.float().mean())
    # the estimator is not trivially right: a mismatched pairing fails it
    wrong = D.factor_errors(D.estimate_factors(x), src.factors(list(range(1, 1001))))
    assert wrong['x'].float().mean() < 0.2 and wrong['color'].float().mean() < 0.2


def test_shapes_grown_to_64_have_stripes_at_64x64_alone():
    fine, coarse = D.ShapesSource('test', max_res=64), D.ShapesSource('test')
    idx = list(range(400))
    x64 = fine.load_batch(idx, 64).float() / 127.5 - 1
    ok = D.factor_errors(D.estimate_factors(x64), fine.factors(idx))
    assert all(v.float().mean() == 1 for v in ok.values()), {k: v.float().mean() for k, v in ok.items()}
    f = fine.factors(idx)
    other = {**f, 'texture': 1 - f['texture'], 'phase': 1 - f['phase']}   # the other stripes, everything else kept
    assert torch.equal(D.render_factors(other, 32, 64), D.render_factors(f, 32, 64))   # none below 64x64
    assert (D.render_factors(other, 64, 64) - D.render_factors(f, 64, 64)).abs().max() > 0.4
    assert not torch.equal(D.render_factors(other, 32, 32), D.render_factors(f, 32, 32))  # at max_res 32 they show
    inside = D._coverage(f['shape'], f['x'], f['y'], f['size'], 64) == 1            # pixels fully on the object
    pooled_inside = F.avg_pool2d(inside[:, None].float(), 2)[:, 0] == 1
    flat = F.avg_pool2d(D.render_factors(f, 64, 64), 2) - D.render_factors(f, 32, 64)   # a 2x2 average cancels them
    assert flat.permute(1, 0, 2, 3)[:, pooled_inside].abs().max() < 1e-5
    assert torch.equal(coarse.load_batch(idx[:8], 32), D.ShapesSource('test', max_res=32).load_batch(idx[:8], 32))
    with pytest.raises(ValueError, match='no 128x128 images'):
        fine.load_batch([0], 128)


def test_fade_blend_endpoints_and_pairs():
    x = D.ShapesSource().load_batch(list(range(4)), 16)
    real = x.float() / 127.5 - 1
    assert torch.equal(D.prepare_batch(x, 1.0, flip=False), real)
    low = F.interpolate(F.avg_pool2d(real, 2), scale_factor=2, mode='nearest')
    assert torch.allclose(D.prepare_batch(x, 0.0, flip=False), low)
    assert torch.allclose(D.prepare_batch(x, 0.3, flip=False), 0.3 * real + 0.7 * low, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    flipped = D.prepare_batch(x, 1.0, generator=g)
    assert all(torch.equal(f, r) or torch.equal(f, r.flip(-1)) for f, r in zip(flipped, real))
    pairs = D.prepare_batch(x, 1.0, flip=False, pairs=True)
    assert torch.equal(pairs[:2], real[:2]) and torch.equal(pairs[2:], real[:2].flip(-1))


def test_shards_are_disjoint_and_resumable():
    s0, s1 = D.ShardSampler(10, 5, rank=0, world=2, seed=7), D.ShardSampler(10, 5, rank=1, world=2, seed=7)
    a, b = next(iter(s0)), next(iter(s1))
    assert not set(a) & set(b) and sorted(a + b) == list(range(10))
    assert next(iter(D.ShardSampler(10, 10, seed=7))) == a + b        # = one process, double batch
    stream = iter(D.ShardSampler(10, 3, seed=7))
    flat = [i for _ in range(5) for i in next(stream)]          # 15 samples, across an epoch end
    resumed = iter(D.ShardSampler(10, 3, seed=7, start=6))
    assert [i for _ in range(3) for i in next(resumed)] == flat[6:15]
    assert next(iter(D.ShardSampler(10, 5, seed=8))) != a


# ---------------------------------------------------------------------------------------------
# train.py

TINY_TRAIN = dict(max_res=16, width=1 / 16, nz=32, phase_kimg={4: 0.032, 8: 0.064, 16: 0.064},
                  batch_size={4: 8, 8: 8, 16: 8}, log_every=0.001, sample_every=0.064, ckpt_every=1.0)


def run_train(out_dir, **over):
    """train.py with TINY_TRAIN and `over` given as on its command line; returns the checkpoint."""
    import train as T
    T.main(T.settings({**TINY_TRAIN, 'out_dir': str(out_dir), **over}))
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)


def _cli(*args, cwd=HERE, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    """One tiny run shared by the tests that read a finished run: 15 steps of batch 8, 4x4, then
    8x8 fading in over 4 steps, then 16x16 stopping mid-fade (alpha < 1); decoder beta1 0.5."""
    out = tmp_path_factory.mktemp('run')
    run_train(out, total_kimg=0.12, beta1_dec=0.5)
    return out


def test_train_grows_through_the_phases_with_the_fade_in(tiny_ckpt):
    log = _log(tiny_ckpt)
    assert all(math.isfinite(r[k]) for r in log for k in ('loss_enc', 'loss_dec', 'kl_real', 'recon', 'dcos', 'layer'))
    assert [r['res'] for r in log] == [4] * 4 + [8] * 8 + [16] * 3
    alphas = [r['alpha'] for r in log if r['res'] == 8]
    assert alphas[0] == 0 and all(b > a for a, b in zip(alphas[:4], alphas[1:4])) and alphas[-1] == 1.0
    assert log[-1]['alpha'] < 1
    assert all(r['layer'] == 0 for r in log if r['res'] == 4) and any(r['layer'] > 0 for r in log if r['res'] > 4)


def test_train_checkpoint_holds_the_grown_state(tiny_ckpt):
    ck = torch.load(tiny_ckpt / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ck['res'] == 16 and ck['images_seen'] == 120 and ck['step'] == 15
    robust = L.AdaptiveRobustLoss(16)
    robust.load_state_dict(ck['robust'])
    assert robust.res == 16
    betas = [tuple(ck[k]['param_groups'][0]['betas']) for k in ('opt_enc', 'opt_dec')]
    assert betas == [(0.0, 0.99), (0.5, 0.99)]                # beta1 per network (paper: 0 for both)
    # the optimizers kept their state across growth: 4x4 block parameters still have their moments
    block0 = sum(1 for _ in M.Decoder(M.ModelConfig(**ck['model_config'])).blocks[0].parameters())
    assert len(ck['opt_dec']['state']) > block0


def test_train_writes_grids_by_images_seen_and_a_model_that_loads(tiny_ckpt):
    grids = sorted(f for f in os.listdir(tiny_ckpt) if f.startswith('grid_'))
    assert grids == ['grid_000000064.png', 'grid_000000120.png']
    net = M.load_checkpoint(str(tiny_ckpt / 'ckpt.pt'))
    assert net.res == 16 and net.decode(net.encode(torch.zeros(2, 3, 16, 16))).shape == (2, 3, 16, 16)
    assert json.load(open(tiny_ckpt / 'config.json'))['model_config']['nz'] == 32


def test_train_eta_counts_a_total_beyond_the_schedule():
    import train as T
    table, end = T.phase_table(8, {4: 1, 8: 1}, total_kimg=5)  # 8x8 runs on from 2 to 5 kimg
    assert end == 5 and T.phase_end(table, 1, end) == 5
    assert T.remaining_seconds(table, end, 3.0, 8, 1000) == 2.0   # 2 kimg left at 1000 img/s
    table, end = T.phase_table(8, {4: 1, 8: 1}, total_kimg=1.5)  # stops halfway through 8x8
    assert T.phase_end(table, 0, end) == 1 and T.phase_end(table, 1, end) == 1.5
    # 0.5 kimg at 4x4, then 0.5 kimg at 8x8 costing 2^1.5 times as much per image
    assert T.remaining_seconds(table, end, 0.5, 4, 1000) == pytest.approx(0.5 + 0.5 * 2 ** 1.5)


def test_train_resume_is_bit_identical(tmp_path):
    straight = run_train(tmp_path / 'a', total_kimg=0.112)     # 14 steps, across the 4 -> 8 boundary
    run_train(tmp_path / 'b', total_kimg=0.056)                 # 7 steps ...
    resumed = run_train(tmp_path / 'b', total_kimg=0.112, init_from='resume')   # ... + 7 more
    assert resumed['step'] == straight['step'] == 14
    for key in ('encoder', 'decoder', 'decoder_ema', 'robust'):
        for name, value in straight[key].items():
            if torch.is_tensor(value):
                assert torch.equal(value, resumed[key][name]), (key, name)
    for key in ('opt_enc', 'opt_dec'):
        for pid, state in straight[key]['state'].items():
            assert all(torch.equal(v, resumed[key]['state'][pid][k]) for k, v in state.items())


def _same_weights(a, b, keys=('encoder', 'decoder', 'decoder_ema', 'robust')):
    return all(torch.equal(v, b[k][n]) for k in keys for n, v in a[k].items() if torch.is_tensor(v))


def test_train_resume_on_a_folder_with_layer_noise_is_bit_identical(tmp_path):
    from PIL import Image
    root = tmp_path / 'imgs'
    root.mkdir()
    for k in range(40):
        Image.new('RGB', (16, 16), (6 * k, 255 - 6 * k, 40)).save(root / f'{k:02d}.png')
    run = dict(dataset='folder', data_root=str(root), noise='channel', num_workers=0)
    straight = run_train(tmp_path / 'a', **run, total_kimg=0.112)        # 14 steps, across 4 -> 8
    run_train(tmp_path / 'b', **run, total_kimg=0.056)
    resumed = run_train(tmp_path / 'b', total_kimg=0.112, init_from='resume')   # the folder etc. from the file
    assert resumed['config']['noise'] == 'channel' and resumed['config']['data_root'] == str(root)
    assert _same_weights(straight, resumed)


def test_train_resume_float16_keeps_the_loss_scale(tmp_path):
    straight = run_train(tmp_path / 'a', dtype='float16', total_kimg=0.064)
    run_train(tmp_path / 'b', dtype='float16', total_kimg=0.032)
    resumed = run_train(tmp_path / 'b', total_kimg=0.064, init_from='resume')
    for key in ('scaler_enc', 'scaler_dec'):
        assert straight[key] and straight[key] == resumed[key], (straight[key], resumed[key])
    assert _same_weights(straight, resumed)


def test_dtype_auto_is_bfloat16_only_where_the_cpu_has_it_in_hardware(monkeypatch):
    import train as T
    cpu, cfg = torch.device('cpu'), {**T.DEFAULTS, **T.PRESETS['shapes'], 'dtype': 'auto'}
    for caps, want in (({'amx_bf16': True}, 'bfloat16'), ({'avx512_bf16': True}, 'bfloat16'),
                       ({'amx_bf16': False, 'avx512_bf16': False, 'avx2': True}, 'float32')):
        monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda caps=caps: caps)
        assert M.resolve_dtype('auto', cpu) == want
        t = T.Trainer(cfg, T.model_config_from(cfg), cpu)
        assert t.dtype == want
        assert getattr(t.autocast, 'fast_dtype', torch.float32) == M.DTYPES[want]
    assert M.resolve_dtype('float16', cpu) == 'float16'
    with pytest.raises(ValueError, match=r"--dtype='fp16' is not valid; expected auto or one of float32"):
        M.resolve_dtype('fp16', cpu)


def test_train_resume_keeps_the_runs_settings_and_refuses_what_would_change_it(tmp_path, capsys):
    import train as T
    run_train(tmp_path, authors=False, lambda_j=5.0, invariance='flip', max_res=8, total_kimg=0.04)
    ck = tmp_path / 'ckpt.pt'
    resume = dict(out_dir=str(tmp_path), init_from='resume')          # as a user types it: nothing else
    T.main(T.settings({**resume, 'total_kimg': 0.064, 'cache_dir': str(tmp_path / 'moved')}))
    out = capsys.readouterr().out
    assert 'resume: total_kimg 0.04 -> 0.064' in out and 'resume: cache_dir' in out
    resumed = torch.load(ck, weights_only=True)
    cfg = resumed['config']
    assert (cfg['authors'], cfg['lambda_j'], cfg['invariance'], cfg['max_res'], cfg['nz']) == (False, 5.0, 'flip', 8, 32)
    assert resumed['model_config']['extra_8x8'] and resumed['model_config']['residual'] is True
    assert resumed['images_seen'] == 64
    before = ck.read_bytes()
    for given, message in ((dict(nz=64), r'--nz=64 but the checkpoint was trained with nz=32'),
                           (dict(invariance=''), r"--invariance='' but .*invariance='flip'"),
                           (dict(dataset='folder', data_root=str(tmp_path)), r"--dataset='folder'"),
                           (dict(phase_kimg={4: 0.01, 8: 1}), r'at 0.064 kimg, 8x8 alpha 1.00; .* at 8x8 alpha 0.11'),
                           (dict(total_kimg=0.05), r'--total_kimg=0.05 but the checkpoint is at 0.064 kimg')):
        with pytest.raises(SystemExit, match=message) as e:
            T.settings({**resume, **given})
        assert '\n' not in str(e.value)
    assert ck.read_bytes() == before


def test_train_new_run_refuses_an_out_dir_that_holds_one(tmp_path):
    import train as T
    run_train(tmp_path, total_kimg=0.016)
    files = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    with pytest.raises(SystemExit, match=r'ckpt.pt holds a run already; continue it with --init_from=resume, '
                                         r'or start a new one with --out_dir='):
        T.settings({**TINY_TRAIN, 'out_dir': str(tmp_path)})
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == files


def test_train_keeps_numbered_ema_snapshots_that_load_everywhere(tmp_path):
    import metrics as MT
    import sample as S
    ck = run_train(tmp_path, total_kimg=0.12, snapshot_every=0.048)
    snaps = sorted(f for f in os.listdir(tmp_path) if f.startswith('snapshot_'))
    # phase ends at 32 and 96 images, every 48 kimg-thousandths, and the end of the run
    assert snaps == [f'snapshot_{n:09d}.pt' for n in (32, 48, 96, 120)], snaps
    last = tmp_path / snaps[-1]
    net, full = M.load_checkpoint(str(last)), M.load_checkpoint(str(tmp_path / 'ckpt.pt'))
    z = M.sample_prior(2, 32, generator=torch.Generator().manual_seed(0))
    assert net.res == 16 and torch.equal(net.decode(z, noise=False), full.decode(z, noise=False))
    assert M.load_checkpoint(str(tmp_path / snaps[0])).res == 4
    with pytest.raises(ValueError, match='snapshot.*ema=True'):
        M.load_checkpoint(str(last), ema=False)
    cfg = {k: getattr(S, k) for k in S.CONFIG_KEYS}
    assert os.path.exists(S.main({**cfg, 'ckpt': str(last), 'out_dir': str(tmp_path), 'mode': 'recon', 'n': 2}))
    cfg = {k: getattr(MT, k) for k in MT.CONFIG_KEYS}
    assert MT.main({**cfg, 'ckpt': str(last), 'out_dir': str(tmp_path), 'metric': 'mix', 'mix_count': 4,
                    'batch': 4})['metric'] == 'mix4'
    assert ck['images_seen'] == 120 and 'decoder' not in torch.load(last, weights_only=True)


def test_train_refuses_a_folder_smaller_than_one_batch_naming_batch_size(tmp_path):
    import train as T
    root = tmp_path / 'imgs'
    _write_images(root, n_plain=1)                             # 6 readable, 1 unreadable
    with pytest.raises(SystemExit, match=r'--batch_size: 6 training images \(1 unreadable files skipped\) are '
                                         r'fewer than one global batch at 4x4 \(8 x 1 process\); pass --batch_size=6'), \
            pytest.warns(UserWarning):
        T.main(T.settings({**TINY_TRAIN, 'out_dir': str(tmp_path / 'out'), 'dataset': 'folder', 'data_root': str(root)}))
    assert not (tmp_path / 'out').exists()


def _close(a, b, atol=1e-7):
    """State dicts equal to atol, but for spectral norm's power-iteration vectors (a forward moves them)."""
    return all(torch.allclose(v, b[k], atol=atol) for k, v in a.items()
               if torch.is_tensor(v) and v.is_floating_point() and not k.endswith(('._u', '._v')))


def test_train_fine_tunes_from_a_checkpoint_at_its_resolution(tiny_ckpt, tmp_path):
    from PIL import Image
    import train as T
    root = tmp_path / 'imgs'
    root.mkdir()
    for k in range(16):
        Image.new('RGB', (16, 16), (16 * k, 90, 200 - 8 * k)).save(root / f'{k:02d}.png')
    src = torch.load(tiny_ckpt / 'ckpt.pt', weights_only=True)
    out = tmp_path / 'ft'
    ft = dict(init_from=str(tiny_ckpt / 'ckpt.pt'), dataset='folder', data_root=str(root), out_dir=str(out),
              batch_size=8, lr=1e-12, total_kimg=0.008, log_every=0.008)       # one step that moves nothing
    said = []
    cfg = T.settings(ft, say=said.append)
    assert (cfg['max_res'], cfg['nz'], cfg['width'], cfg['authors']) == (16, 32, 1 / 16, True)
    # each training setting that differs from the source run's, and where the new value comes from
    for line in ('lambda_x_dec 10.0 -> 0.0 (the folder preset)', 'ema_decay 0.9 -> 0.999 (the folder preset)',
                 'lambda_j 0.0 -> 10.0 (the folder preset)', 'beta1_dec 0.5 -> 0.0 (the folder preset)',
                 "dataset 'shapes' -> 'folder' (--dataset)", 'total_kimg 0.12 -> 0.008 (--total_kimg)'):
        assert f'fine-tune: {line}' in said, line
    assert not any(line.startswith(('fine-tune: nz', 'fine-tune: width', 'fine-tune: max_res')) for line in said)
    T.main(cfg)
    ck = torch.load(out / 'ckpt.pt', weights_only=True)
    assert [r['res'] for r in _log(out)] == [16] and ck['start_res'] == 16 and ck['step'] == 1
    assert ck['started_from']['checkpoint'] == str(tiny_ckpt / 'ckpt.pt') and ck['started_from']['res'] == 16
    assert _close(ck['encoder'], src['encoder']) and _close(ck['decoder'], src['decoder'])
    decay = cfg['ema_decay']                                   # no ramp: the EMA starts trained
    assert _close(ck['decoder_ema'], {k: decay * v + (1 - decay) * src['decoder'][k]
                                      for k, v in src['decoder_ema'].items()}, atol=1e-6)
    assert _close(ck['robust'], src['robust']) and ck['robust']['_extra_state'] == {'res': 16}   # the trained d_rho
    assert all(s['step'] == 1 for s in ck['opt_enc']['state'].values())       # fresh optimizers
    T.main(T.settings(dict(out_dir=str(out), init_from='resume', total_kimg=0.016)))
    assert [r['res'] for r in _log(out)] == [16, 16]           # the resumed schedule still starts at 16x16
    for given, message in ((dict(width=0.125), r'--width=0.125 but .* was trained with width=0.0625'),
                           (dict(max_res=8), r'--max_res=8 is below the 16x16 of'),
                           (dict(init_from=str(root / '00.png')), r'--init_from=.*00.png.* could not read')):
        with pytest.raises(SystemExit, match=message):
            T.settings({**ft, 'out_dir': str(tmp_path / 'never'), **given})
    assert not (tmp_path / 'never').exists()


def test_train_fine_tunes_an_authors_checkpoint(tmp_path):
    import train as T
    path = tmp_path / '34740000_state.pth'
    write_authors_checkpoint(str(path), phase=1)               # 8x8, their large widths
    theirs = M.load_checkpoint(str(path))
    said = []
    T.main(T.settings(dict(init_from=str(path), out_dir=str(tmp_path / 'ft'), batch_size=2, lr=1e-12,
                           total_kimg=0.002, log_every=0.002), say=said.append))
    assert said == [f"fine-tune: {path} records no training settings (the authors' files do not); the shapes "
                    f"preset and the command line give them"]
    ck = torch.load(tmp_path / 'ft' / 'ckpt.pt', weights_only=True)
    assert ck['res'] == 8 and ck['config']['authors'] and ck['model_config']['nz'] == 512
    assert _close(ck['encoder'], theirs.encoder.state_dict())


def test_train_pixel_distance_switch(tmp_path):
    r = torch.randn(2, 3, 4, 4)
    robust = L.AdaptiveRobustLoss(4)
    assert L.pixel_distance('robust', robust) is robust
    assert torch.equal(L.pixel_distance('l1', robust)(r), r.abs().mean())
    assert torch.equal(L.pixel_distance('l2', robust)(r), r.pow(2).mean())
    # L1 for L_phi while d_rho's alpha and scale fit the same residuals (for a d_rho decoder term)
    fitted, ref = L.pixel_distance('l1', robust, fit_robust=True), L.AdaptiveRobustLoss(4)
    r.requires_grad_(True)
    value = fitted(r)
    value.backward()
    ref(r.detach()).backward()
    assert torch.equal(value.detach(), r.abs().mean()) and torch.allclose(r.grad, r.sign() / r.numel())
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(robust.parameters(), ref.parameters()) if q.grad is not None)
    ck = run_train(tmp_path / 'both', recon='l1', total_kimg=0.016)
    fresh = L.AdaptiveRobustLoss(16).state_dict()            # d_rho unused: its alpha and scale never move
    assert all(torch.equal(v, fresh[k]) for k, v in ck['robust'].items() if torch.is_tensor(v))
    ck = run_train(tmp_path / 'encoder', recon='l1', recon_dec='robust', total_kimg=0.016)
    assert not torch.equal(ck['robust']['alpha_latent.0'], fresh['alpha_latent.0'])


def test_train_gives_back_the_signal_handlers(tmp_path):
    import signal
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run_train(tmp_path, total_kimg=0.008)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_train_stops_on_non_finite_loss_and_keeps_checkpoint(tmp_path):
    run_train(tmp_path, total_kimg=0.016)
    before = (tmp_path / 'ckpt.pt').read_bytes()
    with pytest.raises(SystemExit, match=r'non-finite between 0.016 and 0.024 kimg, in loss_enc .its terms are finite: check the loss weights'):
        run_train(tmp_path, total_kimg=0.032, init_from='resume', lambda_x_stable=1e39)  # inf in float32
    assert (tmp_path / 'ckpt.pt').read_bytes() == before


def test_a_full_disk_during_a_checkpoint_write_keeps_the_one_before(tmp_path, monkeypatch):
    # checkpoints are written by a background thread: its failure stops the run with one line
    import errno
    import train as T
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:                                   # ckpt.pt at 0.016 kimg, then the disk is full
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(SystemExit) as e:
        T.main(T.settings({**TINY_TRAIN, 'out_dir': str(tmp_path), 'ckpt_every': 0.016, 'total_kimg': 0.064}))
    text = str(e.value)
    assert re.fullmatch(r"error: could not write .*ckpt.pt \(OSError: \[Errno 28\] No space left on device\); the file "
                        r"before it is intact: free space or pick another --out_dir, then --init_from=resume", text), text
    ck = torch.load(tmp_path / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ck['images_seen'] == 16 and not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_train_fast_path_bf16_channels_last(tmp_path):
    ck = run_train(tmp_path, total_kimg=0.048, dtype='bfloat16', channels_last=True)
    log = _log(tmp_path)
    assert ck['step'] == 6 and all(math.isfinite(r['loss_enc']) and math.isfinite(r['loss_dec']) for r in log)
    assert all(v.dtype == torch.float32 for v in ck['decoder'].values() if v.is_floating_point())


def test_train_invariance_flip_trains_resumes_and_samples(tmp_path):
    import sample as S
    over = dict(invariance='flip', max_res=8, phase_kimg={4: 0.2, 8: 2.0}, fade=0.05, batch_size={4: 16, 8: 16},
                sample_every=2.2, log_every=0.2)
    ck = run_train(tmp_path, **over, total_kimg=1.6)
    assert ck['config']['invariance'] == 'flip' and ck['model_config']['extra_8x8'] and ck['model_config']['noise'] == 'none'
    log = _log(tmp_path)
    inv = [r['inv'] for r in log if r['res'] == 8 and r['alpha'] >= 1 and 'inv' in r]
    assert len(inv) >= 5 and all(math.isfinite(v) for v in inv)
    assert not any('inv' in r for r in log if r['res'] == 4)                 # off before the split exists
    assert np.mean(inv[-2:]) < np.mean(inv[:2]) - 0.05, inv                   # it drops over the run
    ck2 = run_train(tmp_path, **over, total_kimg=2.2, init_from='resume')
    assert ck2['kimg'] > ck['kimg'] and ck2['model_config']['extra_8x8']
    cfg = {k: getattr(S, k) for k in S.CONFIG_KEYS}
    path = S.main({**cfg, 'out_dir': str(tmp_path), 'mode': 'invariance', 'n': 2})
    assert _png(path).shape == grid_shape(3, 3)


def test_train_presets_resolve(tmp_path, capsys):
    import train as T
    for name in T.PRESETS:
        cfg = T.settings(dict(dataset=name, dry_run=True, data_root=str(tmp_path)))
        T.main(cfg)
        out = capsys.readouterr().out
        assert f"{cfg['max_res']}x{cfg['max_res']}" in out and 'end at' in out
        if name == 'celebahq':                                    # the paper's CelebA-HQ margin at 256x256
            assert re.search(r'256x256 .* margin 0.4\n', out), out
    cfg = T.settings(dict(batch_size=8, lr=0.002))                # one number: every resolution
    assert set(cfg['batch_size'].values()) == {8} and set(cfg['lr'].values()) == {0.002} and 32 in cfg['batch_size']


def test_every_preset_resolves_to_its_frozen_values():
    import train as T
    with open(os.path.join(HERE, 'assets', 'resolved_presets.json')) as f:
        frozen = json.load(f)                  # every preset as it resolved before PAPER became one table
    assert sorted(frozen) == sorted(T.PRESETS)
    for name, want in frozen.items():
        got = json.loads(json.dumps(T.resolve(dict(dataset=name))))        # the JSON spelling: str keys
        if want['num_workers'] == 'min(4, cpus)':
            want = {**want, 'num_workers': min(4, os.cpu_count() or 1)}
        assert sorted(got) == sorted(want), name
        assert [k for k in want if got[k] != want[k]] == [], name


def test_train_globals_are_what_python_train_py_runs():
    import train as T
    assert T.resolve({}) == T.DEFAULTS and T.PRESETS['shapes'] == {}
    assert all(T.PRESETS[name] == {**T.PAPER, **T.PRESETS[name]} for name in T.PRESETS if name != 'shapes')


def test_train_help_shows_the_values_dry_run_resolves(tmp_path, capsys):
    import train as T
    given = dict(dataset='ffhq', data_root=str(tmp_path), lr=0.002)
    args = [f'--{k}={v}' for k, v in given.items()]
    shown = _cli('train.py', *args, '--help').stdout
    T.main(T.settings({**given, 'dry_run': True}))
    printed = capsys.readouterr().out
    dry = json.loads(printed[printed.index('{\n'):printed.index('\n}\n') + 2])
    assert dry['max_res'] == 256 and dry['lr']['4'] == 0.002                  # the preset, then the command line
    for key in T.CONFIG_KEYS:
        if key != 'dry_run':
            value = T.resolve(given)[key]
            assert re.search(rf'^  --{key} +{re.escape(repr(value))}  ', shown, re.M), key
            assert json.loads(json.dumps(value)) == dry[key], key


def test_progress_line_prints_every_logged_term():
    import train as T
    line = T.progress_line(12.5, 16, 0.5, {'kl_real': 1.25, 'a_new_term': 0.0625}, 400.0, 60.0, -5.0,
                           torch.device('cpu'))
    assert 'kl_real 1.25 a_new_term 0.0625' in line and 'run ~0m' in line         # a late ETA is not negative
    cfg = T.resolve({})
    weights = T.loss_weights(cfg, fading=True)
    assert {k for k in T.CONFIG_KEYS if k.startswith('lambda_')} < set(weights) and weights['lambda_x'] == 2.0


def test_every_setting_of_every_script_has_a_rule():
    import demo
    import metrics as MT
    import sample as S
    import train as T
    for script in (T, S, MT, demo):
        assert set(script.RULES) == set(script.CONFIG_KEYS), script.__name__


def test_every_path_setting_expands_home_and_variables(tmp_path, monkeypatch, tiny_ckpt):
    import configurator as C
    import metrics as MT
    import sample as S
    import train as T
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv('RUNS', str(tiny_ckpt.parent))
    assert C.PATH.clean('~/a') == str(tmp_path / 'a') and C.PATH.clean('$RUNS/b') == str(tiny_ckpt.parent / 'b')
    assert C.PATHS.clean('~/a.png,$RUNS/b.png') == f'{tmp_path / "a.png"},{tiny_ckpt.parent / "b.png"}'
    import demo
    for script in (T, S, MT, demo):  # a string setting that is not a path would be listed here
        loose = [k for k in script.CONFIG_KEYS if isinstance(getattr(script, k), str) and script.RULES[k] is C.ANY]
        assert set(loose) <= {'device', 'wandb_project', 'host'}, (script.__name__, loose)
    (tmp_path / 'photos').mkdir()
    cfg = T.settings({'dataset': 'folder', 'data_root': '~/photos', 'out_dir': '$RUNS/new', 'cache_dir': '~/c'})
    assert (cfg['data_root'], cfg['out_dir'], cfg['cache_dir']) == (
        str(tmp_path / 'photos'), str(tiny_ckpt.parent / 'new'), str(tmp_path / 'c'))
    out = _sample(out_dir=f'$RUNS/{tiny_ckpt.name}', mode='random', n=2, out='~/r.png')
    assert out == str(tmp_path / 'r.png') and os.path.exists(out)


TRAIN_BAD = [   # (what a user gives, what the one-line error must say)
    (dict(dtype='fp16'), "--dtype='fp16' is not valid; expected one of 'auto', 'float32', 'bfloat16', 'float16'"),
    (dict(max_res=20), '--max_res=20 is not valid; expected a power of two in 4..1024'),
    (dict(dataset='ffhq', max_res=1024, data_root=HERE), 'the presets go up to 512x512'),
    (dict(fade=2.0), '--fade=2.0 is not valid; expected a number in [0, 1]'),
    (dict(total_kimg=-1.0), 'expected a number >= 0'),
    (dict(batch_size=0), 'expected a whole number >= 1 at every resolution (got 0 at 4x4)'),
    (dict(lr={4: 0.1, 8: -1.0, 16: 0.1, 32: 0.1}), 'got -1.0 at 8x8'),
    (dict(batch_size={4: 8}), '--batch_size has no entry for 8x8'),
    (dict(dataset='folder', data_root=''), '--dataset=folder needs --data_root=PATH'),
    (dict(dataset='folder', data_root='/no/such/folder'), "--data_root='/no/such/folder' does not exist"),
    (dict(dataset='imagenet'), "--dataset='imagenet' is not valid; expected one of 'shapes', 'folder'"),
    (dict(device='cuda:99'), '--device=cuda:99 but'),
    (dict(device='tpu'), "--device='tpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    (dict(init_from='resum'), "--init_from='resum' is not scratch or resume, so it names a checkpoint to fine-tune, "
                              "and: no checkpoint at resum"),
    (dict(invariance='flop'), "expected one of '', 'flip'"),
    (dict(invariance='flip', batch_size=7), '--batch_size must be even, got 7 at 8x8'),
    (dict(test_fraction=1.0), 'expected a number in [0, 1)'),
    (dict(nz=1), '--nz=1 is not valid; expected a whole number >= 2'),
    (dict(width=0.0), '--width=0.0 is not valid'),
    (dict(mix_ratio=1.5), '--mix_ratio=1.5 is not valid'),
    (dict(beta1=1.0), '--beta1=1.0 is not valid; expected a number in [0, 1)'),
    (dict(log_every=0.0), '--log_every=0.0 is not valid; expected a number > 0'),
    (dict(arch='huge'), "expected one of 'large', 'small'"),
    (dict(max_resolution=64), "unknown setting 'max_resolution'"),
]


@pytest.mark.parametrize('given, message', TRAIN_BAD, ids=[next(iter(g)) for g, _ in TRAIN_BAD])
def test_train_bad_values_stop_with_one_line_before_anything_runs(tmp_path, given, message):
    import train as T
    out = tmp_path / 'never'
    with pytest.raises(SystemExit) as e:
        T.settings({'out_dir': str(out), **given})
    text = str(e.value)
    assert text.startswith('error: ') and message in text and '\n' not in text, text
    assert not out.exists()


def test_train_wandb_missing_is_named_before_the_data_is_loaded(tmp_path, monkeypatch):
    import importlib.util
    import train as T
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'wandb' else real(name, *a))
    with pytest.raises(SystemExit, match='--wandb_log=True needs the wandb package: pip install wandb'):
        T.settings(dict(out_dir=str(tmp_path / 'never'), wandb_log=True))


def test_train_command_line_errors_exit_without_out_dir(tmp_path):
    out = tmp_path / 'never'                      # the command line reaches the same checks (in-process above)
    r = _cli('train.py', f'--out_dir={out}', '--fade=2')
    assert r.returncode != 0 and r.stderr.strip() == 'error: --fade=2.0 is not valid; expected a number in [0, 1]'
    assert not out.exists()


def _train_args(out_dir, batch):
    return ['train.py', f'--out_dir={out_dir}', '--max_res=16', '--width=0.0625', '--nz=32',
            '--phase_kimg={4: 0.016, 8: 0.016, 16: 0.016}', f'--batch_size={{4: {batch}, 8: {batch}, 16: {batch}}}',
            '--log_every=0.001', '--sample_every=0', '--total_kimg=0.048']


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_torchrun_two_nodes_with_their_own_caches_match_one_node(tmp_path):
    # two "nodes" on this machine, each with a node-local --cache_dir, train as one node of 4 processes,
    # and as one process with their global batch
    root = tmp_path / 'imgs'
    _noisy_folder(root, n=32, size=16)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}     # torchrun sets it only for nproc_per_node > 1: fix it for both

    def args(out, cache):
        return ['train.py', '--dataset=folder', f'--data_root={root}', f'--cache_dir={cache}', f'--out_dir={out}',
                '--max_res=8', '--width=0.0625', '--nz=32', '--phase_kimg={4: 0.008, 8: 0.016}',
                '--batch_size=2', '--log_every=0.008', '--sample_every=0', '--num_workers=0']
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={k}',
                               '--nproc_per_node=2', '--master_addr=127.0.0.1', f'--master_port={port}',
                               *args(tmp_path / 'two', tmp_path / f'cache{k}')], cwd=HERE, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs[0][1][-2000:] + outs[1][1][-2000:]
    one = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=4',
                          *args(tmp_path / 'one', tmp_path / 'cache_one')], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert 'all 4 ranks hold identical weights' in outs[0][0] and 'batch 2 x 4 = 8' in outs[0][0]
    alone = subprocess.run([sys.executable, *args(tmp_path / 'alone', tmp_path / 'cache_one'), '--batch_size=8'],
                           cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    first_two, first_alone = _log(tmp_path / 'two')[0], _log(tmp_path / 'alone')[0]
    for k in ('loss_enc', 'loss_dec', 'kl_real', 'kl_fake', 'recon', 'kl_dec', 'dcos'):
        assert abs(first_two[k] - first_alone[k]) <= 1e-5 * max(1, abs(first_alone[k])), k
    assert all(sorted(os.listdir(tmp_path / c)) == ['4x4.u8', '8x8.u8', 'build.lock', 'index.json']
               for c in ('cache0', 'cache1'))                                  # each node built its own
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', map_location='cpu', weights_only=True) for d in ('two', 'one'))
    assert a['images_seen'] == b['images_seen'] == 24
    for net in ('encoder', 'decoder', 'decoder_ema'):
        worst = max((a[net][k] - b[net][k]).abs().max().item() for k in a[net] if a[net][k].is_floating_point())
        assert worst < 1e-6, (net, worst)


def test_a_rank_that_cannot_reach_the_master_names_it(tmp_path):
    port = _free_port()
    env = {**os.environ, 'RANK': '1', 'LOCAL_RANK': '0', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1',
           'MASTER_PORT': str(port), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, 'train.py', f'--out_dir={tmp_path}', '--dist_timeout=0.05'], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith(f'error: rank 1 could not join the process group at 127.0.0.1:{port}')
    assert '--master_addr' in last


def _children(pid):
    kids = []
    for d in os.listdir('/proc'):
        try:
            with open(f'/proc/{d}/stat') as f:
                if d.isdigit() and int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                    kids.append(int(d))
        except OSError:
            pass
    return kids


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the workers through /proc (Linux)')
def test_torchrun_restarts_a_killed_worker_from_its_checkpoint(tmp_path):
    # torchrun --max-restarts restarts every worker when one dies; --init_from=auto resumes them all
    import signal
    args = _train_args(tmp_path, 4)[:-1] + ['--total_kimg=0.4', '--ckpt_every=0.04', '--init_from=auto']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             '--max-restarts=1', *args], cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / 'ckpt.pt').exists() and time.time() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert workers and (tmp_path / 'ckpt.pt').exists()
    os.kill(workers[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert '--init_from=auto: a new run' in out and '--init_from=auto: resuming' in out, out[-2000:]
    ck = torch.load(tmp_path / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ck['images_seen'] == 400 and ck['config']['init_from'] == 'resume'
    kimgs = [r['kimg'] for r in _log(tmp_path)]
    assert kimgs == sorted(kimgs) and kimgs[-1] == 0.4        # one trajectory: no lines past the resumed checkpoint
    M.load_checkpoint(str(tmp_path / 'ckpt.pt'))


def test_train_sigint_finishes_the_step_and_checkpoints(tmp_path):
    import signal
    args = _train_args(tmp_path, 8)[:-1] + ['--total_kimg=1000']
    proc = subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / 'log.jsonl').exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert 'stopped by SIGINT' in out
    ck = torch.load(tmp_path / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ck['step'] >= 1 and ck['images_seen'] == 8 * ck['step']


def test_compile_raises_the_recompile_limit_and_reports_a_fallback():
    import torch._dynamo as dynamo
    m = tiny()
    M.compile_blocks(m.encoder, m.decoder)
    assert dynamo.config.recompile_limit >= M.COMPILE_VARIANTS * m.decoder.n_blocks
    assert all(getattr(b, '_compiled_call_impl', None) is not None for b in [*m.encoder.blocks, *m.decoder.blocks])

    def double(x):
        return x * 2
    fn = torch.compile(double, backend='eager', dynamic=False)
    with dynamo.config.patch(recompile_limit=1):              # a real fallback: dynamo's own warning
        for n in (1, 2, 3):
            assert torch.equal(fn(torch.ones(n)), torch.full((n,), 2.0))   # past the limit: eager, same values
    lines = M.compile_fallbacks()
    assert len(lines) == 1 and lines[0].startswith('compile: hit config.recompile_limit (1)'), lines
    assert "'double'" in lines[0] and 'test_all.py' in lines[0] and 'runs eager from here' in lines[0]
    assert M.compile_fallbacks() == []


def test_compiled_run_over_three_resolutions_stays_compiled_and_equals_eager(tmp_path, capsys):
    # inductor from a cold cache: README runs this test as a command of its own (minutes on 2 cores).
    # lr 1e-5: with beta1 = 0 an early Adam step is about lr * sign(gradient), so a rounding difference
    # that flips a near-zero gradient moves a weight by lr, and training amplifies it (at lr 1e-3 the two
    # runs part by 3e-3 in 15 steps); at a small lr they stay on one path and the losses compare the graphs
    from torch._dynamo.utils import counters
    run_train(tmp_path / 'eager', total_kimg=0.12, lr=1e-5)
    eager, _ = _log(tmp_path / 'eager'), capsys.readouterr()
    graphs = counters['stats']['unique_graphs']
    run_train(tmp_path / 'compiled', total_kimg=0.12, lr=1e-5, compile=True)
    out, compiled = capsys.readouterr().out, _log(tmp_path / 'compiled')
    assert counters['stats']['unique_graphs'] - graphs >= 10 and 'compile:' not in out    # compiled, no fallback
    assert [r['res'] for r in compiled] == [4] * 4 + [8] * 8 + [16] * 3
    for a, b in zip(eager, compiled):
        for k in ('loss_enc', 'kl_real', 'kl_fake', 'recon', 'loss_dec', 'kl_dec', 'dcos', 'layer'):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a['kimg'], k)


# ---------------------------------------------------------------------------------------------
# sample.py

def test_sample_every_mode_writes_a_grid_of_the_expected_size(tiny_ckpt):
    import sample as S
    cfg = {k: getattr(S, k) for k in S.CONFIG_KEYS}
    cfg.update(out_dir=str(tiny_ckpt), n=3, draws=2, steps=3)
    for mode, (rows, cols) in dict(mix=(4, 4), recon=(2, 3), random=(1, 3), cond=(3, 3), interp=(3, 3),
                                   invariance=(4, 4)).items():
        path = S.main({**cfg, 'mode': mode})
        img = _png(path)
        assert img.shape == grid_shape(rows, cols), (mode, img.shape)    # 16 px tiles enlarged x4
        assert img.std() > 1, mode                              # not a blank picture


def test_sample_mix_cell_equals_the_per_block_mix(tiny_ckpt, tmp_path):
    import sample as S
    path = tmp_path / 'mix.png'
    r = _cli('sample.py', '--mix', 'coarse', f'--out_dir={tiny_ckpt}', '--n=2', f'--out={path}')
    assert r.returncode == 0 and str(path) in r.stdout, r.stderr
    net = M.load_checkpoint(str(tiny_ckpt / 'ckpt.pt'))
    x = S.test_images({'dataset': 'shapes'}, 16, 4)
    z = net.encode(x)
    with torch.no_grad():
        want = net.decode(M.mix_latents(z[0:1], z[3:4], range(0, 2), net.decoder.n_blocks), noise=False)
    want = F.interpolate(want, scale_factor=4, mode='nearest').clamp(-1, 1).add(1).div(2).mul(255)[0]
    got = grid_cell(_png(path), 1, 2)                          # row A_0 (under the B row), column B_1
    assert (got - want).abs().max() <= 1.0
    rows = S.mix_grid(net, x[:2], x[2:4], range(0, 2))
    assert torch.allclose(rows[1][2], net.decode(M.mix_latents(z[0:1], z[3:4], range(0, 2), net.decoder.n_blocks),
                                                 noise=False)[0], atol=1e-6)


def _sample(**over):
    import sample as S
    return S.main({**{k: getattr(S, k) for k in S.CONFIG_KEYS}, **over})


def _error_of(fn, **over):
    with pytest.raises(SystemExit) as e:
        fn(**over)
    text = str(e.value)
    assert text.startswith('error: ') and '\n' not in text, text
    return text


def test_shapes_at_64_mixes_and_scores_all_three_groups(tmp_path):
    import metrics as MT
    short = {r: 0.008 for r in (4, 8, 16, 32, 64)}                     # one step of 8 images each
    ck = run_train(tmp_path / 'run', max_res=64, phase_kimg=short, batch_size={r: 8 for r in short})
    assert ck['res'] == 64
    net = M.load_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'))
    scores = MT.mixing(net, 8, 8)
    assert list(scores) == ['reconstruction', 'coarse', 'intermediate', 'fine']
    assert scores['fine']['texture']['pairs'] > 0
    out = _sample(out_dir=str(tmp_path / 'run'), mode='mix', mix='fine', n=3, out=str(tmp_path / 'fine.png'))
    assert _png(out).shape == grid_shape(4, 4)                      # B row over A column, 3 x 3 mixes


def test_sample_bad_input(tiny_ckpt, tmp_path):
    from PIL import Image
    run = dict(out_dir=str(tiny_ckpt))
    assert "'0:0'" in _error_of(_sample, **run, mix='0:0') and 'coarse (0:2)' in _error_of(_sample, **run, mix='0:0')
    assert 'intermediate (2:4)' in _error_of(_sample, **run, mix='fine')     # a 16x16 model has no 64+ blocks
    assert "--mix='big' is not valid; expected coarse, intermediate, fine, all or a:b" in _error_of(_sample, **run, mix='big')
    assert "--mode='mixx' is not valid; expected one of 'mix', 'recon'" in _error_of(_sample, **run, mode='mixx')
    assert '--n=0 is not valid; expected a whole number >= 1' in _error_of(_sample, **run, n=0)
    assert "--device='tpu' is not a device" in _error_of(_sample, **run, device='tpu')
    text = _error_of(_sample, out_dir=str(tmp_path))
    assert str(tmp_path / 'ckpt.pt') in text and 'python train.py' in text
    small = tmp_path / 'small'
    run_train(small, total_kimg=0.016)                                       # a 4x4 checkpoint
    text = _error_of(_sample, out_dir=str(small), mode='invariance')
    assert 'needs blocks after them: a checkpoint at 16x16 or more' in text and '4x4' in text
    inputs = tmp_path / 'inputs'
    inputs.mkdir()
    (inputs / 'bad.png').write_bytes(b'junk')
    Image.new('RGB', (20, 30), (200, 10, 10)).save(inputs / 'ok.png')
    with pytest.warns(UserWarning, match='bad.png'):
        _sample(**run, mode='recon', inputs=str(inputs), out=str(tmp_path / 'r.png'))
    assert _png(tmp_path / 'r.png').shape == grid_shape(2, 1)
    (inputs / 'ok.png').unlink()
    with pytest.warns(UserWarning):
        assert '--inputs: none of the images could be read' in _error_of(_sample, **run, mode='recon', inputs=str(inputs))
    empty, good = tmp_path / 'empty', tmp_path / 'good'
    empty.mkdir()
    (empty / 'notes.txt').write_text('no images here')
    good.mkdir()
    Image.new('RGB', (16, 16), (10, 200, 10)).save(good / 'g.png')
    for mode, flag in (('encode', 'inputs'), ('project', 'inputs'), ('direction', 'negative')):
        text = _error_of(_sample, **run, mode=mode, lpips=0.0, **{flag: str(empty)}, positive=str(good))
        assert f'--{flag}: no images' in text and str(empty) in text
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'not a torch file')
    assert f'--direction={junk} is not a torch file' in _error_of(_sample, **run, mode='edit', direction=str(junk))
    assert f'--latents={junk} is not a torch file' in _error_of(_sample, **run, mode='decode', latents=str(junk))
    text = _error_of(_sample, **run, mode='project', vgg_backbone=str(junk), lpips_vgg=str(tmp_path / 'no.pth'))
    assert '2 weight files are missing' in text and f'--vgg_backbone={junk}' in text and '--lpips_vgg=' in text


def test_what_a_new_user_hit_reads_sensibly(tiny_ckpt, tmp_path, capsys):
    import configurator as C
    import train as T
    from PIL import Image
    line = T.progress_line(0.12, 16, 0.25, {'recon': 1.0}, 75.0, 0.0, 0.0, torch.device('cpu'), digits=3)
    assert line.startswith('kimg    0.120 |')                 # --log_every=0.001: lines 0.001 kimg apart differ
    plan = []
    T.print_plan(T.resolve({}), T.phase_table(16, {4: 0.032, 8: 0.064, 16: 0.064})[0], 0.16, 1, plan.append)
    assert '    0.032 kimg, batch' in plan[0] and plan[-1] == '  end at 0.160 kimg'   # short phases are not '0.0 kimg'
    with pytest.raises(SystemExit, match="expected an integer like 128"):
        C._parse('nz', 128, '1.5')
    with pytest.raises(SystemExit):
        C.configure(vars(T), T.CONFIG_KEYS, ['--help'])
    assert 'float32 | bfloat16 | float16 (+ GradScaler) | auto (bfloat16 where native, else float32)' in capsys.readouterr().out
    folder = tmp_path / 'four'
    folder.mkdir()
    for k in range(4):
        Image.new('RGB', (16, 16), (60 * k, 90, 30)).save(folder / f'{k}.png')
    out = _sample(out_dir=str(tiny_ckpt), mode='recon', inputs=str(folder), n=2, out=str(tmp_path / 'r.png'))
    assert _png(out).shape == grid_shape(2, 2)                 # --n of the inputs, not all of them
    capsys.readouterr()
    two = f'{folder / "0.png"},{folder / "1.png"}'
    out = _sample(out_dir=str(tiny_ckpt), mode='mix', inputs=two, out=str(tmp_path / 'm.png'))
    assert 'the grid mixes them with each other' in capsys.readouterr().out and _png(out).shape == grid_shape(3, 3)


def test_authors_directions_load_by_name_through_the_hub_cache(tiny_ckpt, tmp_path, monkeypatch):
    import sample as S
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))

    def offline(url, dst, progress=True):
        raise OSError('network is unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    run = dict(out_dir=str(tiny_ckpt), mode='edit', n=2, strength=(0.0, 1.0))
    cached = tmp_path / 'hub' / 'checkpoints' / 'smile_delta2'
    text = _error_of(_sample, **run, direction='smile')
    assert S.ATTRIB_URL.format('smile_delta2') in text and str(cached) in text and '--direction=/path/to/smile_delta2' in text
    delta = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))         # their layout: (1, nz)
    torch.save(delta, cached)
    net = M.load_checkpoint(str(tiny_ckpt / 'ckpt.pt'))
    assert torch.equal(S.load_direction('smile', net), delta[0])
    assert torch.equal(S.load_direction(str(cached), net), delta[0])             # the file itself, by path
    assert _sample(**run, direction='smile').endswith('edit_smile_coarse_s0_1.png')


def test_sample_latents_as_files_encode_then_decode(tiny_ckpt, tmp_path):
    import sample as S
    from torchvision.utils import save_image
    folder = tmp_path / 'in'
    (folder / 'sub').mkdir(parents=True)
    x, _ = D.render_shapes(torch.arange(D.SHAPES_TRAIN, D.SHAPES_TRAIN + 3), 16)
    for i, name in enumerate(('a.png', 'b.png', 'sub/c.png')):
        save_image(x[i].add(1).div(2), folder / name)
    (folder / 'broken.png').write_bytes(b'junk')
    z_file = tmp_path / 'z.pt'
    with pytest.warns(UserWarning, match='broken.png'):
        _sample(out_dir=str(tiny_ckpt), mode='encode', inputs=str(folder), latents=str(z_file))
    z = torch.load(z_file, weights_only=True)
    net = M.load_checkpoint(str(tiny_ckpt / 'ckpt.pt'))
    files = S.read_images([str(folder / n) for n in ('a.png', 'b.png', 'sub/c.png')], 16)[0]
    assert list(z) == ['a.png', 'b.png', os.path.join('sub', 'c.png')]
    assert torch.allclose(torch.stack(list(z.values())), net.encode(files), atol=1e-6)
    assert torch.allclose(torch.stack(list(z.values())).norm(dim=1), torch.ones(3))
    # per-block latents beside plain ones: a's blocks 0-1 from b
    z['mixed'] = M.mix_latents(z['a.png'][None], z['b.png'][None], range(0, 2), net.decoder.n_blocks)[0]
    S.save_latents(z, str(z_file))
    out = tmp_path / 'dec.png'
    _sample(out_dir=str(tiny_ckpt), mode='decode', latents=str(z_file), out=str(out), singles=True)
    assert _png(out).shape == grid_shape(1, 4)
    with torch.no_grad():
        want = net.decode(z['mixed'][None], noise=False)[0]
    got = _png(tiny_ckpt / 'decode' / 'mixed.png')
    assert (got - want.clamp(-1, 1).add(1).div(2).mul(255)).abs().max() <= 1.0
    assert (tiny_ckpt / 'decode' / 'sub_c.png').exists()
    torch.save({'a': torch.ones(7)}, tmp_path / 'wrong.pt')
    text = _error_of(_sample, out_dir=str(tiny_ckpt), mode='decode', latents=str(tmp_path / 'wrong.pt'))
    assert "latent 'a' has shape (7,); this checkpoint takes (32,) or per block (3, 32)" in text
    torch.save([1, 2], tmp_path / 'list.pt')
    assert 'is not a latents file' in _error_of(_sample, out_dir=str(tiny_ckpt), mode='decode',
                                                latents=str(tmp_path / 'list.pt'))
    assert 'needs --inputs' in _error_of(_sample, out_dir=str(tiny_ckpt), mode='encode')


def test_sample_direction_edit_and_projection(tiny_ckpt, tmp_path):
    from PIL import Image
    import sample as S
    net = M.load_checkpoint(str(tiny_ckpt / 'ckpt.pt'))
    for name, colour in (('pos', (230, 40, 40)), ('neg', (40, 40, 230))):
        (tmp_path / name).mkdir()
        for k in range(4):
            Image.new('RGB', (16, 16), tuple(c + 5 * k for c in colour)).save(tmp_path / name / f'{k}.png')
    path = _sample(out_dir=str(tiny_ckpt), mode='direction', positive=str(tmp_path / 'pos'),
                   negative=str(tmp_path / 'neg'), out=str(tmp_path / 'red.pt'))
    d = torch.load(path, weights_only=True)
    z_pos, z_neg = (net.encode(S.read_images(str(tmp_path / n), 16)[0]) for n in ('pos', 'neg'))
    assert torch.allclose(d, z_pos.mean(0) - z_neg.mean(0), atol=1e-6)
    assert (z_pos @ d).min() > (z_neg @ d).max()                  # the direction points from neg to pos
    x = S.read_images(str(tmp_path / 'neg'), 16)[0][:2]
    coarse = S.blocks_of(net, 'coarse')
    moved = S.move_along(net.encode(x), d, 1.0, coarse, net.decoder.n_blocks)
    assert torch.allclose(moved.norm(dim=-1), torch.ones(2, net.decoder.n_blocks))   # on the sphere
    assert torch.equal(moved[:, 2:], net.encode(x)[:, None].expand(-1, net.decoder.n_blocks - 2, -1))
    assert not torch.allclose(moved[:, :2], net.encode(x)[:, None].expand(-1, 2, -1))
    rows = S.edit_grid(net, x, d, (0.0, 2.0), coarse)
    with torch.no_grad():
        assert torch.allclose(rows[0][1], net.reconstruct(x[:1], noise=False)[0], atol=1e-5)   # strength 0
    out = _sample(out_dir=str(tiny_ckpt), mode='edit', direction=path, inputs=str(tmp_path / 'neg'), n=2,
                  strength=(0.0, 1.0, 2.0))
    c, h, w = grid_shape(2, 4)                                 # --n of the 4 inputs, a row each: itself, 3 strengths
    image = _png(out)
    assert image.shape == (c, h + S.LABEL_HEIGHT, w) and out.endswith('_s0_1_2.png')   # the strengths name the file
    strip = image[:, :S.LABEL_HEIGHT] < 128                    # ... and label the columns: text in each column's strip
    assert all(strip[:, :, 2 + j * 66:2 + (j + 1) * 66].any() for j in range(4)) and (image[:, :S.LABEL_HEIGHT] > 200).any()
    torch.save(torch.ones(5), tmp_path / 'short.pt')
    assert 'expected a tensor of shape (32,), got (5,)' in _error_of(
        _sample, out_dir=str(tiny_ckpt), mode='edit', direction=str(tmp_path / 'short.pt'))
    # projection: the loss falls, and the refined latents decode closer to the inputs than the encoder's
    x = S.test_images({'dataset': 'shapes'}, 16, 4)
    refined, history = S.project(net, x, 30, lpips=None, lr=0.01, report=(0, 10))
    assert [h[0] for h in history] == [0, 10, 30] and history[-1][2] < history[0][2]

    class Seen(Exception):
        pass

    def stop_at_first(line):                                   # the first line comes at step 0, not after the last
        raise Seen(line)
    with pytest.raises(Seen, match=r'^step     0 \|'):
        S.project(net, x, 30, lpips=None, say=stop_at_first)
    with torch.no_grad():
        l1_enc = (net.reconstruct(x, noise=False) - x).abs().mean()
        l1_refined = (net.decode(refined, noise=False) - x).abs().mean()
    assert l1_refined < l1_enc and history[0][3] == pytest.approx(float(l1_enc), rel=1e-5)
    assert refined.shape == (4, net.decoder.n_blocks, 32) and torch.allclose(refined.norm(dim=-1), torch.ones(4, 3))
    latents = tmp_path / 'proj.pt'
    _sample(out_dir=str(tiny_ckpt), mode='project', lpips=0.0, steps=5, n=2, latents=str(latents))
    assert list(torch.load(latents, weights_only=True)) == ['test_00000', 'test_00001']
    assert _sample(out_dir=str(tiny_ckpt), mode='decode', latents=str(latents)).endswith('decode_proj.png')


# ---------------------------------------------------------------------------------------------
# demo.py

def test_demo_callbacks_mix_edit_and_say_what_went_wrong(tiny_ckpt, tmp_path):
    import demo
    import sample as S
    from PIL import Image
    ck = str(tiny_ckpt / 'ckpt.pt')
    for name, colour in (('a.png', (220, 60, 40)), ('b.png', (40, 60, 220))):
        Image.new('RGB', (40, 30), colour).save(tmp_path / name)
    a, b = str(tmp_path / 'a.png'), str(tmp_path / 'b.png')
    seen_a, seen_b, rec_a, rec_b, mixed, latents = demo.mix(ck, 'auto', a, b, 'coarse', [])   # shapes: no alignment
    net = demo.load(ck)
    z = torch.load(latents, weights_only=True)
    assert set(z) == {'A', 'B', 'mix'} and z['mix'].shape == (net.decoder.n_blocks, 32)
    want = S.decode_mixed(net, z['A'][None], z['B'][None], range(0, 2))
    assert np.array_equal(np.asarray(mixed), np.asarray(demo.picture(want)))        # A with B's coarse blocks
    assert mixed.size == rec_a.size == seen_a.size == (256, 256)
    picked = demo.mix(ck, 'off', a, b, 'fine', ['2'])[4]                             # block by block wins
    assert np.array_equal(np.asarray(picked), np.asarray(demo.picture(S.decode_mixed(net, z['A'][None], z['B'][None], [2]))))
    (tmp_path / 'junk.png').write_bytes(b'not an image')
    Image.new('RGB', (64, 64), (10, 10, 10)).save(tmp_path / 'dark.png')
    for call, message in ((lambda: demo.mix(ck, 'off', None, b, 'coarse', []), 'upload image A first'),
                          (lambda: demo.mix(ck, 'off', a, str(tmp_path / 'junk.png'), 'coarse', []),
                           'image B could not be read as a picture (UnidentifiedImageError)'),
                          (lambda: demo.mix(ck, 'off', a, b, 'coarse', ['5']), 'block 5 is not in this 16x16 checkpoint'),
                          (lambda: demo.mix(ck, 'ffhq', str(tmp_path / 'dark.png'), b, 'coarse', []), 'no face found in image A'),
                          (lambda: demo.mix(str(tmp_path / 'none.pt'), 'off', a, b, 'coarse', []), 'no checkpoint at'),
                          (lambda: demo.edit(ck, 'off', a, str(tmp_path / 'junk.png'), 1.0, 'coarse', []), 'is not a torch file')):
        with pytest.raises(demo.DemoError, match=re.escape(message)):
            call()
    d = torch.zeros(32)
    d[0] = 1.0
    torch.save(d, tmp_path / 'd.pt')
    moved = demo.edit(ck, 'off', a, str(tmp_path / 'd.pt'), 2.0, 'coarse', [])
    assert not np.array_equal(np.asarray(moved), np.asarray(rec_a))
    assert np.array_equal(np.asarray(demo.edit(ck, 'off', a, str(tmp_path / 'd.pt'), 0.0, 'coarse', [])), np.asarray(rec_a))

    class PageError(Exception):
        pass
    for fault in (demo.DemoError('upload image A first'), ZeroDivisionError('x\ny')):
        def broken(fault=fault):
            raise fault
        with pytest.raises(PageError) as e:
            demo.guarded(broken, PageError)()
        assert '\n' not in str(e.value) and str(e.value) in ('upload image A first', 'ZeroDivisionError: x')


def test_demo_in_a_real_browser_mixes_two_uploads(tiny_ckpt, tmp_path):
    import shutil
    import urllib.request
    from PIL import Image
    from playwright.sync_api import sync_playwright
    browser_path = shutil.which('chromium') or shutil.which('chromium-browser')
    assert browser_path, 'the browser test needs Chromium: apt-get install -y chromium'
    for name, colour in (('a.png', (220, 60, 40)), ('b.png', (40, 60, 220))):
        Image.new('RGB', (40, 30), colour).save(tmp_path / name)
    port = _free_port()
    (tmp_path / 'junk.png').write_bytes(b'not an image')
    (tmp_path / 'huge.png').write_bytes(os.urandom(1_200_000))
    server = subprocess.Popen([sys.executable, 'demo.py', f'--ckpt={tiny_ckpt / "ckpt.pt"}', f'--port={port}', '--max_mb=1'],
                              cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(240):                                   # up to a minute for the server
            try:
                urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.25)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, headless=True, args=['--no-sandbox'])
            page = browser.new_page(viewport={'width': 1200, 'height': 1000})
            page.goto(f'http://127.0.0.1:{port}/', wait_until='networkidle')
            upload_a, upload_b = (page.locator(f'#image_{k} input[type=file]') for k in 'ab')
            upload_a.set_input_files(str(tmp_path / 'huge.png'))          # bad uploads: a message in the page
            page.get_by_text('exceed the maximum allowed size of 1.0 Mb').wait_for(timeout=30000)
            upload_a.set_input_files(str(tmp_path / 'junk.png'))
            upload_b.set_input_files(str(tmp_path / 'b.png'))
            page.locator('#mix').click()
            page.get_by_text('image A could not be read as a picture').wait_for(timeout=30000)
            page.locator('#image_a button[aria-label="Clear"]').first.click()
            upload_a.set_input_files(str(tmp_path / 'a.png'))
            page.get_by_label('coarse').first.check()
            page.locator('#mix').click()
            page.locator('#mixed img').wait_for(timeout=60000)                # the mixed image appears
            src = page.locator('#mixed img').get_attribute('src')
            page.screenshot(path=str(tmp_path / 'demo.png'), full_page=True)
            browser.close()
        assert src and os.path.getsize(tmp_path / 'demo.png') > 10000 and server.poll() is None   # still serving
    finally:
        server.terminate()
        said = server.communicate(timeout=30)[0]
    assert f'serving http://127.0.0.1:{port}' in said and 'Traceback' not in said   # the loopback unless --host


# ---------------------------------------------------------------------------------------------
# metrics.py

def _torchvision_inception_state():
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    with torch.no_grad():                     # non-trivial batch-norm statistics
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return tv.eval()


def test_inception_loads_the_standard_layout_and_differs_only_where_the_tf_graph_does():
    import metrics as MT
    tv = _torchvision_inception_state()
    net = MT.InceptionV3()
    net.load_state_dict(tv.state_dict())                         # strict: same names and shapes
    with torch.no_grad():
        x = torch.rand(2, 3, 80, 80)
        assert net(x).shape == (2, 2048)
        h = torch.randn(1, 288, 17, 17)
        assert torch.allclose(net.Mixed_6a(h), tv.Mixed_6a(h), atol=1e-5)     # identical blocks agree
        h5 = torch.randn(1, 192, 9, 9)
        mine, theirs = net.Mixed_5b(h5), tv.Mixed_5b(h5)
        assert torch.allclose(mine[:, :224], theirs[:, :224], atol=1e-5)      # conv branches agree ...
        assert not torch.allclose(mine[:, 224:], theirs[:, 224:], atol=1e-4)  # ... the pool branch does not
        h7 = torch.randn(1, 1280, 5, 5)
        assert not torch.allclose(net.Mixed_7b(h7), tv.Mixed_7b(h7), atol=1e-4)
        net.Mixed_7b.max_pool = True
        ones = torch.ones(1, 2048, 4, 4)
        assert torch.equal(MT._avg3(ones), ones)                                # padding not counted


def test_frechet_distance():
    import metrics as MT
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 16))
    mu, sigma = MT.statistics(f)
    assert abs(MT.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    shift = rng.normal(size=16)
    assert abs(MT.frechet_distance(mu + shift, sigma, mu, sigma) - shift @ shift) < 1e-8
    few = rng.normal(size=(10, 64))                             # rank-deficient: 10 samples, 64 features
    mu2, sigma2 = MT.statistics(few)
    d = MT.frechet_distance(mu2, sigma2, mu2, sigma2)
    assert math.isfinite(d) and abs(d) < 1e-4        # vs a trace of 63: round-off of the null space only
    assert math.isfinite(MT.frechet_distance(mu2, sigma2, mu2 + 1, sigma2 * 2))


def _lpips_weights(net):
    torch.manual_seed(0)
    feats = L._vgg16_features() if net == 'vgg' else L._alexnet_features()
    backbone = {f'features.{k}': v for k, v in feats.state_dict().items()}
    backbone['classifier.0.weight'] = torch.zeros(1)             # ignored, as in the real file
    heads = {f'lin{k}.model.1.weight': torch.rand(1, c, 1, 1) for k, c in enumerate(L._TAPS[net][1])}
    return backbone, heads


def test_lpips_zero_on_identical_and_symmetric(tmp_path):
    for net in ('vgg', 'alex'):
        backbone, heads = _lpips_weights(net)
        torch.save(heads, tmp_path / 'heads.pth')
        lp = L.LPIPS(net, backbone=backbone, heads=str(tmp_path / 'heads.pth'))
        x, y = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
        assert torch.equal(lp(x, x), torch.zeros(3))
        assert torch.allclose(lp(x, y), lp(y, x)) and (lp(x, y) > 0).all()
        assert lp(x, y).shape == (3,)
    with pytest.raises(L.MissingWeights, match='vgg16-397923af.pth'):
        L.LPIPS('vgg', backbone=str(tmp_path / 'missing.pth'), heads=heads)


def test_mix_score_reads_layout_from_a_and_appearance_from_b():
    import metrics as MT
    fa, fb = D.shapes_factors(torch.arange(300)), D.shapes_factors(torch.arange(300, 600))
    mixed = {k: (fa if k in ('shape', 'x', 'y', 'size') else fb)[k] for k in fa}
    score = MT.mix_score(D.render_factors(mixed, 32), fa, fb)
    for k in MT.LAYOUT:
        assert score[k]['a'] > 0.95 and score[k]['b'] < 0.1, (k, score[k])
    for k in MT.APPEARANCE:
        assert score[k]['b'] > 0.95 and score[k]['a'] < 0.1, (k, score[k])
    assert all(score[k]['b_nearer'] < 0.05 for k in ('x', 'y', 'size'))
    assert all(score[k]['b_nearer'] > 0.95 for k in ('color', 'background'))
    # colours 60% of the way from A's to B's: the strict share misses most, the relative one does not
    mixed = {**mixed, 'color': torch.lerp(fa['color'], fb['color'], 0.6)}
    score = MT.mix_score(D.render_factors(mixed, 32), fa, fb)
    assert score['color']['b'] < 0.4 and score['color']['b_nearer'] > 0.95, score['color']


def test_reconstruction_score_reads_a_perfect_a_mirroring_and_a_circle_drawing_autoencoder():
    import metrics as MT

    class Stub:                          # E and G as the identity, G as a left-right mirror, or G drawing circles
        res = 32

        def __init__(self, mirror=False, circles=False):
            self.mirror, self.circles = mirror, circles

        def const_device(self):
            return torch.device('cpu')

        def encode(self, x):
            return x

        def decode(self, z, noise):
            if self.circles:                           # the same scene with a circle of the same area
                f = D.estimate_factors(z)
                return D.render_factors({**f, 'shape': torch.zeros_like(f['shape']), 'phase': torch.zeros(len(z))}, 32)
            return z.flip(-1) if self.mirror else z
    test = D.ShapesSource('test')
    exact = MT.reconstruction_score(Stub(), test, 40, 16)
    assert exact['l1'] == 0 and exact['shape'] == 1 and exact['x'] == 1 and exact['color'] == 1
    assert exact['shape_by_class'] == dict(circle=1.0, square=1.0, triangle=1.0)
    mirrored = MT.reconstruction_score(Stub(mirror=True), test, 40, 16)
    assert mirrored['l1'] > 0.05 and mirrored['x'] < 0.3 and mirrored['y'] == 1 and mirrored['background'] == 1
    circles = MT.reconstruction_score(Stub(circles=True), test, 40, 16)
    assert circles['shape_by_class'] == dict(circle=1.0, square=0.0, triangle=0.0), circles['shape_by_class']


def test_metrics_on_a_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    import metrics as MT
    net = M.load_checkpoint(str(tiny_ckpt / 'ckpt.pt'))
    backbone, heads = _lpips_weights('vgg')
    ppl = MT.path_length(net, L.LPIPS('vgg', backbone, heads), count=8, batch=4, dataset='shapes')
    assert math.isfinite(ppl) and ppl > 0
    torch.save(_torchvision_inception_state().state_dict(), tmp_path / 'inception.pth')
    cfg = {**{k: getattr(MT, k) for k in MT.CONFIG_KEYS}, 'out_dir': str(tiny_ckpt), 'batch': 8,
           'inception': f'{tmp_path}/inception.pth', 'stats_dir': f'{tmp_path}/stats'}
    MT.main({**cfg, 'metric': 'fid', 'fid_count': 16})
    assert os.listdir(tmp_path / 'stats') == ['shapes_train_16px_16.npz']
    capsys.readouterr()
    MT.main({**cfg, 'metric': 'mix', 'mix_count': 32})
    said = capsys.readouterr().out                             # the table and where the record went, not the JSON
    assert f'appended to {tiny_ckpt / "metrics.jsonl"}' in said and '{"' not in said and 'coarse' in said
    records = [json.loads(line) for line in open(tiny_ckpt / 'metrics.jsonl')]
    assert [rec['metric'] for rec in records[-2:]] == ['fid16', 'mix32']
    assert math.isfinite(records[-2]['value']) and set(records[-1]['value']) == {'reconstruction', 'coarse', 'intermediate'}
    report = MT.main({**cfg, 'metric': 'mix', 'mix_count': 32, 'shapes_range': 'report'})   # other scenes
    assert 'report range' in report['protocol'] and report['value'] != records[-1]['value']
    with pytest.raises(L.MissingWeights, match='--inception=/nonexistent.pth does not exist; download .*pt_inception-2015-12-05-6726825d.pth'):
        MT.main({**cfg, 'metric': 'fid_rec', 'inception': '/nonexistent.pth'})
    inv = MT.invariance_score(net, count=24, batch=12)
    assert set(inv) == {'swap', 'recon', 'pixels'} and all(0 <= v <= 1 for row in ('swap', 'recon') for v in inv[row].values())
    same = MT.invariance_score(net, count=24, batch=12, k=0)                  # no blocks swapped: the own decode
    assert same['pixels']['l1_to_own'] == 0 and same['pixels']['closer_to_mirrored'] == 0 and same['swap']['y'] == same['recon']['y']


def test_precision_recall_equals_a_direct_count():
    import metrics as MT
    g = np.random.default_rng(0)
    real, fake = g.normal(size=(40, 5)), g.normal(0.7, 1.3, size=(30, 5))

    def radius(points, i, k=3):
        return sorted(np.linalg.norm(points - points[i], axis=1))[k]       # [0] is the point itself
    precision = np.mean([any(np.linalg.norm(f - r) <= radius(real, j) for j, r in enumerate(real)) for f in fake])
    recall = np.mean([any(np.linalg.norm(r - f) <= radius(fake, j) for j, f in enumerate(fake)) for r in real])
    got = MT.precision_recall(real, fake, k=3)
    assert 0 < precision < 1 and 0 < recall < 1
    assert got == pytest.approx(dict(precision=precision, recall=recall), abs=1e-12)
    assert MT.precision_recall(real, real) == dict(precision=1.0, recall=1.0)


def test_metrics_between_two_folders(tiny_ckpt, tmp_path, capsys):
    from PIL import Image
    import metrics as MT
    from losses import MissingWeights
    folder = tmp_path / 'imgs'
    folder.mkdir()
    g = np.random.default_rng(1)
    for k in range(6):
        Image.fromarray(g.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f'{k}.png')
    (folder / 'broken.png').write_bytes(b'junk')
    torch.save(_torchvision_inception_state().state_dict(), tmp_path / 'inception.pth')
    cfg = {**{k: getattr(MT, k) for k in MT.CONFIG_KEYS}, 'out_dir': str(tmp_path / 'out'), 'batch': 4,
           'folder_a': str(folder), 'folder_b': str(folder), 'folder_res': 32, 'inception': str(tmp_path / 'inception.pth')}
    with pytest.warns(UserWarning) as caught:
        fid = MT.main({**cfg, 'metric': 'fid'})
    assert fid['metric'] == 'fid6' and abs(fid['value']) < 1e-6 and fid['images_a'] == fid['images_b'] == 6
    said = [str(w.message) for w in caught]
    assert any('broken.png' in m for m in said)
    assert any('holds 7 images; FID and precision/recall from fewer than 2048' in m for m in said)
    assert re.search(r'features of .*: 7/7 ', capsys.readouterr().err)      # progress counts the folder, not 50,000
    with pytest.warns(UserWarning):
        pr = MT.main({**cfg, 'metric': 'pr'})
    assert pr['value'] == dict(precision=1.0, recall=1.0)
    lines = [json.loads(line) for line in open(tmp_path / 'out' / 'metrics.jsonl')]
    assert [r['metric'] for r in lines] == ['fid6', 'pr6']
    assert MT.main({**cfg, 'metric': 'pr', 'folder_a': '', 'folder_b': '', 'out_dir': str(tiny_ckpt),
                    'fid_count': 4, 'batch': 4})['metric'] == 'pr4'          # a checkpoint's samples against its data
    empty = tmp_path / 'bad'
    empty.mkdir()
    (empty / 'broken.png').write_bytes(b'junk')

    def measure(**over):
        return MT.main({**cfg, **over})
    with pytest.warns(UserWarning):
        assert 'none of the 1 images under' in _error_of(measure, folder_b=str(empty))
    assert 'needs both --folder_a=DIR' in _error_of(measure, folder_b='')
    (empty / 'broken.png').unlink()                            # both folders are checked before any weights load
    with pytest.warns(UserWarning, match='holds 7 images'):   # folder_a is fine, if small
        text = _error_of(measure, folder_b=str(empty), inception=str(tmp_path / 'missing.pth'))
    assert text.startswith('error: --folder_b: no images')
    assert _error_of(measure, folder_a=str(tmp_path / 'nope')) == f'error: --folder_a={tmp_path / "nope"} is not a folder'
    other = tmp_path / 'other.pth'
    torch.save({'conv.weight': torch.ones(1)}, other)
    with pytest.raises(MissingWeights, match=f'--inception={other} does not hold the weights expected here'):
        MT.load_inception({'inception': str(other)}, torch.device('cpu'))
    assert '--metric=ppl needs a checkpoint' in _error_of(measure, metric='ppl')


def test_metrics_edit_and_projection_scores_on_shapes(tiny_ckpt):
    import metrics as MT
    net = M.load_checkpoint(str(tiny_ckpt / 'ckpt.pt'))
    edit = MT.edit_score(net, count=12, batch=12, strengths=(1.0, 3.0))
    assert set(edit) == {'0', '1', '3', 'images', 'direction_length'} and edit['images'] == 12
    assert edit['0']['moved_xy'] == 0 and all(0 <= edit[s]['triangle'] <= 1 for s in ('0', '1', '3'))
    curve = MT.projection_curve(net, count=4, steps=10)
    assert list(curve) == ['0', '10'] and curve['10']['pixel_l1'] < curve['0']['pixel_l1']


def test_metrics_bad_input(tiny_ckpt):
    import metrics as MT

    def measure(**over):
        return MT.main({**{k: getattr(MT, k) for k in MT.CONFIG_KEYS}, 'out_dir': str(tiny_ckpt), **over})
    assert "--metric='fidd' is not valid; expected fid (fid50k, fid5k, ...), fid_rec" in _error_of(measure, metric='fidd')
    assert '--batch=0 is not valid' in _error_of(measure, batch=0)
    assert "--lpips_net='squeeze' is not valid; expected one of 'alex', 'vgg'" in _error_of(measure, lpips_net='squeeze')
    assert "--crop='maybe' is not valid" in _error_of(measure, crop='maybe')
    assert "--dataset='imagenet' is not valid" in _error_of(measure, dataset='imagenet')
    assert '--epsilon=0.0 is not valid; expected a number > 0' in _error_of(measure, epsilon=0.0)


# ---------------------------------------------------------------------------------------------
# bench.py

def test_bench_runs_every_part_and_writes_json(tmp_path):
    import bench as B
    out = tmp_path / 'bench.json'
    B.main({**{k: getattr(B, k) for k in B.CONFIG_KEYS}, 'res': 8, 'width': 0.0625, 'batch': 4, 'encoder_res': 8,
            'warmup': 0, 'repeat': 1, 'channels_last': True, 'out': str(out)})     # bfloat16: the train fast-path test
    results = json.load(open(out))['results']
    assert set(results) == {'train_iteration', 'encoder_8_batch1', 'encoder_8_batch16', 'decoder_8_batch4',
                            'data_shapes_64', 'data_folder_64', 'data_lsun_record'}
    assert results['train_iteration']['flops'] > 0 and 0 < results['train_iteration']['utilisation'] < 1


def test_bench_gpu_suite_walks_the_schedule_and_compares_the_options(tmp_path):
    import bench as B
    out, defaults = tmp_path / 'bench.json', {k: getattr(B, k) for k in B.CONFIG_KEYS}
    B.main({**defaults, 'suite': 'gpu', 'preset': 'shapes', 'max_res': 8, 'compare': 'float32,channels_last',
            'warmup': 1, 'repeat': 1, 'out': str(out)})
    got = json.load(open(out))
    assert [r['res'] for r in got['resolutions']] == [4, 8] and [r['batch'] for r in got['resolutions']] == [32, 32]
    for row in got['resolutions'] + list(got['options'].values()):
        assert row['ms_per_step'] > 0 and row['tflop_per_step'] > 0 and row['launches'] > 0
    four, eight = got['resolutions']
    assert eight['tflop_per_step'] > 3 * four['tflop_per_step'] and eight['launches'] > four['launches']
    steps = {4: 12_000 / 32, 8: 30_000 / 32}                   # the shapes preset's kimg per phase / batch
    want = sum(steps[r['res']] * r['ms_per_step'] / 1000 for r in got['resolutions']) / 3600
    assert got['schedule_hours'] == pytest.approx(want)
    assert set(got['options']) == {'float32', 'channels_last'} and got['options']['float32']['res'] == 8
    assert set(got['data_loader']) == {'4', '8'} and got['not_run'] == [] and got['peak_flops']['float32'] > 0
    B.main({**defaults, 'suite': 'gpu', 'preset': 'shapes', 'max_res': 8, 'compare': 'float32', 'budget_minutes': 0,
            'out': str(out)})
    got = json.load(open(out))
    assert got['not_run'] == ['4x4', '8x8', 'float32 at 8x8', 'data loader'] and got['resolutions'] == []
    with pytest.raises(SystemExit, match='--compare takes float32, bfloat16, channels_last, compile, got fp8'):
        B.main({**defaults, 'suite': 'gpu', 'compare': 'float32,fp8'})
    with pytest.raises(SystemExit, match="--preset='cifar' is not a preset; choose one of shapes, celebahq"):
        B.main({**defaults, 'suite': 'gpu', 'preset': 'cifar'})


# ---------------------------------------------------------------------------------------------
# configurator.py

def _globals():
    return {'__file__': os.path.join(HERE, 'configurator_demo.py'), 'max_res': 256, 'lr': 0.001,
            'compile': False, 'dataset': 'shapes', 'batch': (128, 64)}


def test_configurator_both_forms_and_types():
    g = _globals()
    keys = [k for k in g if k != '__file__']
    done = configurator.configure(g, keys, ['--max_res=64', '--lr', '2e-4', '--compile', '0',
                                            '--dataset', 'ffhq', '--batch=(4, 2)'])
    assert g == {**_globals(), 'max_res': 64, 'lr': 2e-4, 'compile': False, 'dataset': 'ffhq', 'batch': (4, 2)}
    assert set(done) == {'max_res', 'lr', 'compile', 'dataset', 'batch'}
    for text, want in (('True', True), ('1', True), ('false', False), ('0', False)):
        configurator.configure(g, keys, [f'--compile={text}'])
        assert g['compile'] is want
    configurator.configure(g, keys, ['--compile', '--max_res', '128'])    # bare flag means True
    assert g['compile'] is True and g['max_res'] == 128
    g['table'] = {4: 128, 8: 64}                                             # a per-resolution setting ...
    configurator.configure(g, keys + ['table'], ['--table=8'])               # ... takes one number, which
    assert g['table'] == 8                                                   # the script spreads (train.expand)
    g['table'] = {4: 128, 8: 64}
    configurator.configure(g, keys + ['table'], ['--table={4: 2, 8: 1}'])
    assert g['table'] == {4: 2, 8: 1}


def test_configurator_rejects_unknown_and_badly_typed(capsys):
    g = _globals()
    keys = [k for k in g if k != '__file__']
    with pytest.raises(SystemExit, match=r'unknown option --max_reso.*--max_res'):
        configurator.configure(g, keys, ['--max_reso=64'])
    with pytest.raises(SystemExit, match=r"--max_res='big'.*int"):
        configurator.configure(g, keys, ['--max_res=big'])
    with pytest.raises(SystemExit, match=r'--compile=.*True/False'):
        configurator.configure(g, keys, ['--compile=maybe'])
    assert g['max_res'] == 256


def test_configurator_help_lists_globals_with_defaults_and_comments(tmp_path):
    script = tmp_path / 'demo.py'
    script.write_text(
        'import sys\nsys.path.insert(0, %r)\nfrom configurator import configure\n'
        '_before = set(globals())\n'
        'max_res = 256     # last resolution\n'
        "mix = 'coarse'    # blocks to take from B\n"
        "CONFIG_KEYS = sorted(set(globals()) - _before - {'_before'})\n"
        'configure(globals(), CONFIG_KEYS)\nprint("mix is", mix)\n' % HERE)
    out = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True)
    assert out.returncode == 0
    assert re.search(r'--max_res\s+256\s+last resolution', out.stdout)
    assert re.search(r"--mix\s+'coarse'\s+blocks to take from B", out.stdout)
    out = subprocess.run([sys.executable, str(script), '--mix', 'fine'], capture_output=True, text=True)
    assert out.returncode == 0 and 'mix is fine' in out.stdout
    out = subprocess.run([sys.executable, str(script), '--mixx=fine'], capture_output=True, text=True)
    assert out.returncode != 0 and '--mix' in out.stderr


# ---------------------------------------------------------------------------------------------
# The repository itself

def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(HERE, '.ci', 'run')).read()
    readme = open(os.path.join(HERE, 'README.md')).read()
    for command in ('pip install -r requirements.txt -r requirements-extra.txt pytest lmdb playwright',
                    "python -m pytest -q test_all.py -k 'not compiled_run'", 'python -m pytest -q test_all.py -k compiled_run'):
        assert command in ci and command in readme


def _top_level_files():
    return sorted(f[:-3] for f in os.listdir(HERE) if f.endswith('.py') and f != 'test_all.py')


def test_top_level_files_import_each_other_without_a_loop():
    import ast
    names = _top_level_files()
    imports = {}
    for name in names:
        with open(os.path.join(HERE, name + '.py')) as f:
            tree = ast.parse(f.read())
        found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imports[name] = found & set(names) - {name}
    assert 'sample' in imports['metrics'] and 'losses' in imports['sample']          # the reader sees the real graph
    placed = []                  # peel off files that import only files already placed: a stack, or a loop left
    while len(placed) < len(names):
        ready = [n for n in names if n not in placed and imports[n] <= set(placed)]
        assert ready, f'import loop among {sorted(set(names) - set(placed))}'
        placed += ready


def test_no_function_of_the_scripts_is_over_100_lines():
    import ast
    for name in ('train', 'sample', 'metrics'):
        with open(os.path.join(HERE, name + '.py')) as f:
            tree = ast.parse(f.read())
        long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 100]
        assert long == [], name


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
