"""torch.hub entry points: the authors' five released models, and any checkpoint.

    net = torch.hub.load('OWNER/automodulator', 'ffhq256', trust_repo=True)   # OWNER: the GitHub account of the clone
    net = torch.hub.load('path/to/clone', 'automodulator', source='local', checkpoint='out/ckpt.pt')

Each returns what `model.load_checkpoint` returns: an `Automodulator` in eval mode with the EMA
decoder, at the resolution its file reached (`net.encode`, `net.decode`, `net.mix`; see README).
The released files (Zenodo record 4298894) are fetched once into torch.hub's cache. A relative
`checkpoint` path is relative to the caller's current directory, not to the clone.
"""
import model

dependencies = ['torch', 'torchvision', 'numpy', 'scipy']


def automodulator(checkpoint='out/ckpt.pt', ema=True, device='cpu'):
    """Any checkpoint: this repo's ckpt.pt or snapshot_*.pt, an authors' <samples>_state.pth, or a
    released model's name; a relative path is relative to the current directory (the caller's).
    ema=False takes the live decoder instead of its running average."""
    try:
        return model.load_checkpoint(checkpoint, ema=ema, device=device)
    except model.NotCached as e:                     # offline: name the file and the hub call that takes it
        raise FileNotFoundError(e.advice("torch.hub.load(..., 'automodulator', checkpoint='")) from None


def ffhq256(device='cpu'):
    """The authors' FFHQ model at 256x256 (34.7M images seen; large widths). Inputs: aligned faces."""
    return automodulator('ffhq256', device=device)


def ffhq512(device='cpu'):
    """The authors' FFHQ model at 512x512 (42.4M images seen; large widths). Inputs: aligned faces."""
    return automodulator('ffhq512', device=device)


def celebahq256(device='cpu'):
    """The authors' CelebA-HQ model at 256x256 (31.9M images seen; small widths). Inputs: aligned faces."""
    return automodulator('celebahq256', device=device)


def lsuncars256(device='cpu'):
    """The authors' LSUN Cars model at 256x256 (32.1M images seen; large widths)."""
    return automodulator('lsuncars256', device=device)


def lsunbedrooms256(device='cpu'):
    """The authors' LSUN Bedrooms model at 256x256 (27.6M images seen; large widths)."""
    return automodulator('lsunbedrooms256', device=device)
