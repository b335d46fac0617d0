"""Fast CPU tests: python -m pytest -q test_all.py (or python test_all.py)."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import configurator
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


def z_of(m, b=3, seed=1):
    return M.sample_prior(b, m.cfg.nz, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# model.py

@pytest.mark.parametrize('variant', [{}, M.AUTHORS, dict(noise='shared'), dict(noise='none')])
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
    assert torch.equal(enc(x, 32, 0.0), enc(F.avg_pool2d(x, 2), 16, 1.0))
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


def test_used_parameters_are_exactly_those_with_gradients():
    m = tiny()
    z = z_of(m)
    for res in (4, 16):
        m.zero_grad(set_to_none=True)
        m.encoder(m.decoder(z, res), res).sum().backward()
        with_grad = {id(p) for p in m.parameters() if p.grad is not None}
        used = {id(p) for p in m.decoder.used_parameters(res) + m.encoder.used_parameters(res)}
        assert with_grad == used


def test_large_preset_parameter_counts():
    # authors' measured counts at 256 (reference doc 1.5); no forward pass, construction only
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
    M.save_checkpoint(path, model_config=M.asdict(m.cfg), res=32, alpha=1.0, encoder=m.encoder.state_dict(),
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
    for command in ('pip install -r requirements.txt pytest', 'python -m pytest -q test_all.py'):
        assert command in ci and command in readme


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
