"""The latent space of EDM2's ImageNet-512 models (Karras et al. 2024): Stable Diffusion's VAE
(``stabilityai/sd-vae-ft-mse``, diffusers' ``AutoencoderKL``) with EDM2's own conventions
(NVlabs/edm2 ``training/encoders.py``, class ``StabilityVAEEncoder``):

- pixels enter the VAE in [0, 1] (uint8 / 255), not [−1, 1];
- the *raw latents* stored in a dataset are the posterior's mean and standard deviation,
  concatenated over channels ([2·4, 64, 64] for a 512² RGB image);
- the *final latents* the networks see are a fresh posterior draw, whitened per channel:
  x = (mean + ε·std)·scale + bias with scale = final_std/raw_std and bias = final_mean −
  raw_mean·scale (raw_mean [5.81, 3.25, 0.12, −2.15], raw_std [4.17, 4.62, 3.71, 3.28],
  final_mean 0, final_std 0.5, all in float32) — diffusers' scaling_factor 0.18215 is not used;
- decoding inverts the whitening, runs the VAE decoder and returns uint8 pixels
  clamp(p, 0, 1)·255, truncated.

The VAE is only read from local files (a diffusers folder, a Hugging Face cache folder, or a
weights file); nothing is downloaded. Training on a dataset of raw latents never needs it
(``gdistill.data.latents``); sampling and evaluation decode through it
(``gdistill.samplers.decoded.DecodedSampler``).
"""
import glob
import json
import os
import os.path as osp

import numpy as np
import torch
from torch import nn

from ..registry import MODELS

__all__ = ['SD_VAE_CONFIG', 'SD_VAE_RAW_MEAN', 'SD_VAE_RAW_STD', 'latent_scale_bias', 'draw_latents',
           'undo_whitening', 'StabilityVAE', 'load_autoencoder_kl', 'clear_vae_cache']

#: EDM2's assumed statistics of sd-vae-ft-mse's raw latents (training/encoders.py:80-84)
SD_VAE_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
SD_VAE_RAW_STD = (4.17, 4.62, 3.71, 3.28)

#: the architecture of stabilityai/sd-vae-ft-mse (its config.json), for a bare weights file
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn='silu', norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=256,
    down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4)

WEIGHT_EXTENSIONS = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt')
_HOW_TO_GET = ('sd-vae-ft-mse is not downloaded by gdistill: fetch it once, e.g. '
               '`huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir DIR`, and give DIR')


def latent_scale_bias(raw_mean=SD_VAE_RAW_MEAN, raw_std=SD_VAE_RAW_STD, final_mean=0.0, final_std=0.5):
    """(scale, bias) as float32 numpy arrays [C], computed in float32 as EDM2 does
    (``encoders.py:89-90``): scale = final_std/raw_std, bias = final_mean − raw_mean·scale."""
    raw_mean = np.asarray(raw_mean, dtype=np.float32).reshape(-1)
    raw_std = np.asarray(raw_std, dtype=np.float32).reshape(-1)
    if raw_mean.shape != raw_std.shape or raw_mean.size == 0:
        raise ValueError(f'raw_mean and raw_std must be non-empty and of one length (one value per latent '
                         f'channel); got {raw_mean.tolist()} and {raw_std.tolist()}')
    if not np.all(np.isfinite(raw_std)) or np.any(raw_std <= 0) or not final_std > 0:
        raise ValueError(f'raw_std and final_std must be positive; got raw_std={raw_std.tolist()}, '
                         f'final_std={final_std}')
    scale = np.float32(final_std) / raw_std
    bias = np.float32(final_mean) - raw_mean * scale
    return scale.astype(np.float32), bias.astype(np.float32)


def _per_channel(values, like):
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


def draw_latents(moments, scale, bias, generator=None):
    """Final latents from raw ones: ``moments`` [N, 2C, H, W] = cat(posterior mean, posterior std)
    over channels; one fresh draw x = (mean + ε·std)·scale + bias (EDM2 ``encode_latents``,
    ``encoders.py:119-125``), computed in float32 on ``moments``' device."""
    if moments.ndim != 4 or moments.shape[1] % 2:
        raise ValueError(f'raw latents must be [N, 2C, H, W] (posterior mean and std concatenated over '
                         f'channels, EDM2\'s layout); got shape {tuple(moments.shape)}')
    mean, std = moments.to(torch.float32).chunk(2, dim=1)
    if mean.shape[1] != len(scale):
        raise ValueError(f'raw latents have {mean.shape[1]} channels (of mean) but the whitening constants '
                         f'are for {len(scale)}; give raw_mean/raw_std of the VAE that made this dataset')
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + eps * std) * _per_channel(scale, mean) + _per_channel(bias, mean)


def undo_whitening(latents, scale, bias):
    """Final latents → the VAE's own latents: (x − bias)/scale (``encoders.py:129-130``)."""
    x = latents.to(torch.float32)
    return (x - _per_channel(bias, x)) / _per_channel(scale, x)


# --- reading the VAE from local files -------------------------------------------------------
_VAE_CACHE = {}


def clear_vae_cache():
    """Forget the VAEs read from files (they are kept so that evaluations during training do not
    re-read the weights every time)."""
    _VAE_CACHE.clear()


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError('the latent pipeline runs the VAE through diffusers\' AutoencoderKL: '
                          'pip install "gdistill[latent]" (or diffusers and safetensors)') from None
    return diffusers


def _snapshot_folder(path):
    """A diffusers folder inside ``path``: ``path`` itself when it holds ``config.json``, else the
    snapshot of a Hugging Face cache folder (``models--stabilityai--sd-vae-ft-mse`` or its parent
    hub folder), the one ``refs/main`` names when there are several."""
    if osp.isfile(osp.join(path, 'config.json')):
        return path
    roots = [path] + sorted(glob.glob(osp.join(path, 'models--*--sd-vae-ft-mse')))
    for root in roots:
        snaps = sorted(d for d in glob.glob(osp.join(root, 'snapshots', '*')) if osp.isfile(osp.join(d, 'config.json')))
        ref = osp.join(root, 'refs', 'main')
        if len(snaps) > 1 and osp.isfile(ref):
            with open(ref) as f:
                named = osp.join(root, 'snapshots', f.read().strip())
            if named in snaps:
                return named
        if snaps:
            return snaps[-1]
    return None


def _read_state_dict(path):
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path, device='cpu')
    else:
        state = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f'{path}: expected a state_dict of tensors (an AutoencoderKL in diffusers\' key '
                         'layout); got something else')
    if any(k.startswith(('first_stage_model.', 'encoder.down.', 'decoder.up.')) for k in state):
        raise ValueError(f'{path}: this is an original-format (CompVis/LDM) checkpoint such as '
                         'vae-ft-mse-840000-ema-pruned; give the diffusers folder of stabilityai/sd-vae-ft-mse '
                         '(config.json + diffusion_pytorch_model.safetensors) instead')
    return state


def load_autoencoder_kl(path, config=None):
    """diffusers' ``AutoencoderKL`` from local files only, in eval mode without gradients:

    - a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``),
      e.g. ``huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir DIR``;
    - a Hugging Face cache folder holding such a snapshot (``…/models--stabilityai--sd-vae-ft-mse``);
    - a weights file (``.safetensors``, or a ``torch.save``d state_dict read with
      ``weights_only=True``) in diffusers' key layout, built with ``config`` (default
      ``SD_VAE_CONFIG``, sd-vae-ft-mse's architecture) and loaded strictly.

    A path that does not exist is an error that says how to get the files; nothing is downloaded.
    """
    diffusers = _import_diffusers()
    path = osp.expanduser(os.fspath(path))
    if not osp.exists(path):
        raise FileNotFoundError(f'VAE {path!r} does not exist. Expected a diffusers folder '
                                f'(config.json + weights), a Hugging Face cache folder of it, or a weights file '
                                f'({", ".join(WEIGHT_EXTENSIONS)}). {_HOW_TO_GET}')
    if osp.isdir(path):
        folder = _snapshot_folder(path)
        if folder is None:
            raise FileNotFoundError(f'VAE folder {path!r} holds no config.json (nor a Hugging Face snapshot '
                                    f'with one). {_HOW_TO_GET}')
        if config is not None:
            raise ValueError('StabilityVAE: config= goes with a weights file; a diffusers folder brings '
                             'its own config.json')
        vae = diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True)
    else:
        if not path.lower().endswith(WEIGHT_EXTENSIONS):
            raise ValueError(f'VAE file {path!r}: expected one of {", ".join(WEIGHT_EXTENSIONS)} '
                             '(or a diffusers folder)')
        state = _read_state_dict(path)
        with torch.device('meta'):  # no random initialisation of weights about to be replaced
            vae = diffusers.AutoencoderKL(**dict(config or SD_VAE_CONFIG))
        arch = 'SD_VAE_CONFIG (sd-vae-ft-mse)' if config is None else config
        what = f'{path} does not fit the AutoencoderKL config {arch}'
        try:
            missing, unexpected = vae.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:  # shapes: name the first mismatch
            lines = str(e).splitlines()
            raise ValueError(f'{what}: {lines[1].strip() if len(lines) > 1 else e}') from None
        left = [n for n, t in list(vae.named_parameters()) + list(vae.named_buffers()) if t.is_meta]
        if missing or unexpected or left:
            raise ValueError(f'{what}: missing {sorted(set(missing) | set(left))[:5]}, '
                             f'unexpected {sorted(unexpected)[:5]}')
        vae = vae.float()
    return vae.eval().requires_grad_(False)


def _cached_vae(path, config):
    path = osp.realpath(osp.expanduser(os.fspath(path)))
    stamp = osp.getmtime(path) if osp.exists(path) else None
    key = (path, stamp, json.dumps(config, sort_keys=True, default=str))
    if key not in _VAE_CACHE:
        _VAE_CACHE[key] = load_autoencoder_kl(path, config)
    return _VAE_CACHE[key]


@MODELS.register_module()
class StabilityVAE(nn.Module):
    """EDM2's ``StabilityVAEEncoder`` on gdistill's side: pixels ⇄ latents.

    Args:
        path (str, optional): the VAE's local files (see ``load_autoencoder_kl``); for
            ImageNet-512 the folder of ``stabilityai/sd-vae-ft-mse``.
        config (dict, optional): diffusers ``AutoencoderKL`` keyword arguments. Without ``path``
            the VAE is built from it with random weights drawn from ``seed`` (tests and toys);
            with a weights file it is the file's architecture.
        raw_mean, raw_std, final_mean, final_std: the whitening of the latents (EDM2's defaults
            for sd-vae-ft-mse); one raw value per latent channel.
        batch_size (int): images per VAE call (EDM2 uses 8).
        seed (int): the seed of a randomly initialised VAE.

    ``encode_pixels`` (uint8 → raw latents [N, 2C, h, w]), ``encode_latents`` (raw → final, a
    fresh posterior draw), ``encode`` (both), ``decode`` (final latents → uint8 pixels). A VAE
    read from a path is shared between instances (read once per process).
    """

    def __init__(self, path=None, config=None, raw_mean=SD_VAE_RAW_MEAN, raw_std=SD_VAE_RAW_STD,
                 final_mean=0.0, final_std=0.5, batch_size=8, seed=0):
        super().__init__()
        if path is None and config is None:
            raise ValueError('StabilityVAE needs path= (the local files of sd-vae-ft-mse or another '
                             'AutoencoderKL) or config= (an AutoencoderKL config, random weights)')
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'StabilityVAE: batch_size must be a positive int, got {batch_size!r}')
        self.path, self.batch_size = path, int(batch_size)
        if path is not None:
            vae = _cached_vae(path, config)
        else:
            diffusers = _import_diffusers()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                vae = diffusers.AutoencoderKL(**dict(config)).eval().requires_grad_(False)
        # held outside the module tree: never part of a checkpoint, never trained
        self.__dict__['vae'] = vae
        scale, bias = latent_scale_bias(raw_mean, raw_std, final_mean, final_std)
        self.latent_channels = int(vae.config.latent_channels)
        if len(scale) != self.latent_channels:
            raise ValueError(f'StabilityVAE: {len(scale)} raw_mean/raw_std values for a VAE with '
                             f'{self.latent_channels} latent channels')
        self.scale, self.bias = scale, bias
        self.image_channels = int(vae.config.in_channels)
        self.out_channels = int(vae.config.out_channels)
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() also move the VAE held outside the tree
        self.vae._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self):
        return next(self.vae.parameters()).device

    def _batches(self, x, fn):
        return torch.cat([fn(b) for b in x.split(self.batch_size)])

    @torch.no_grad()
    def encode_pixels(self, images):
        """uint8 pixels [N, C, H, W] → raw latents [N, 2·latent_channels, H/f, W/f] (float32):
        the posterior mean and standard deviation, concatenated (EDM2 ``encode_pixels``)."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f'StabilityVAE.encode_pixels takes uint8 images [N, C, H, W] (0…255); got '
                             f'{images.dtype} of shape {tuple(images.shape)}')
        if images.shape[1] != self.image_channels:
            raise ValueError(f'StabilityVAE: images have {images.shape[1]} channels, the VAE takes '
                             f'{self.image_channels}')
        if images.shape[-1] % self.downsampling or images.shape[-2] % self.downsampling:
            raise ValueError(f'StabilityVAE: image size {tuple(images.shape[-2:])} is not divisible by the '
                             f'VAE\'s downsampling factor {self.downsampling}')
        x = images.to(self.device, torch.float32) / 255

        def run(b):
            d = self.vae.encode(b)['latent_dist']
            return torch.cat([d.mean, d.std], dim=1)
        return self._batches(x, run).to(images.device)

    def encode_latents(self, moments, generator=None):
        """Raw latents → final latents: a fresh posterior draw, whitened (``draw_latents``)."""
        return draw_latents(moments, self.scale, self.bias, generator)

    def encode(self, images, generator=None):
        return self.encode_latents(self.encode_pixels(images), generator)

    @torch.no_grad()
    def decode_float(self, latents):
        """Final latents → the decoder's pixels in (about) [0, 1], float32, unclamped."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f'StabilityVAE.decode takes latents [N, {self.latent_channels}, h, w]; got '
                             f'shape {tuple(latents.shape)}')
        x = undo_whitening(latents.to(self.device), self.scale, self.bias)
        return self._batches(x, lambda b: self.vae.decode(b)['sample']).to(latents.device)

    def decode(self, latents):
        """Final latents → uint8 pixels: clamp(p, 0, 1)·255, truncated (EDM2 ``decode``)."""
        return self.decode_float(latents).clamp(0, 1).mul(255).to(torch.uint8)

    def extra_repr(self):
        return (f'path={self.path!r}, latent_channels={self.latent_channels}, downsampling={self.downsampling}, '
                f'scale={self.scale.tolist()}, bias={self.bias.tolist()}')
