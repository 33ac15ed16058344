"""Sampling in a latent space, measuring in pixels: any sampler followed by the VAE decoder."""
import numpy as np
import torch

from ..networks.vae import StabilityVAE, latent_scale_bias
from ..registry import MODELS, SAMPLERS, build

__all__ = ['DecodedSampler', 'with_decoder', 'check_whitening']


@SAMPLERS.register_module()
class DecodedSampler:
    """Runs ``sampler`` (a SAMPLERS config or object) on the latent denoiser, then ``decoder`` (a
    MODELS config or module with ``decode(latents) -> uint8 pixels``, e.g. ``StabilityVAE``; built
    on the first call, so a run that never samples never reads the VAE) and returns the pixels q
    in gdistill's image convention, q/127.5 − 1 (the inverse of ``ImageDataPreprocessor.scale``).
    Both of gdistill's uint8 conversions (``images_to_uint8``, truncating; the picture grids,
    rounding) then give back exactly the decoder's uint8 pixels, which are EDM2's
    (``generate_images.py:228``: ``encoder.decode(sampler output)``), so FD-DINOv2 is measured on
    the images EDM2 would write. ``nfe`` is the inner sampler's."""

    def __init__(self, sampler, decoder):
        self.sampler = build(SAMPLERS, sampler) if isinstance(sampler, dict) else sampler
        if isinstance(decoder, dict):
            self._decoder_cfg, self._decoder = dict(decoder), None
        else:
            if not callable(getattr(decoder, 'decode', None)):
                raise TypeError(f'DecodedSampler: decoder must have decode(latents) -> uint8 pixels; got '
                                f'{type(decoder).__name__}')
            self._decoder_cfg, self._decoder = None, decoder

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = build(MODELS, self._decoder_cfg)
        return self._decoder

    @property
    def nfe(self):
        return self.sampler.nfe

    @torch.no_grad()
    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        latents = self.sampler(denoiser, noise, class_labels, generator=generator)
        decoder = self.decoder
        if hasattr(decoder, 'to'):
            decoder.to(latents.device)
        pixels = decoder.decode(latents)
        if pixels.dtype != torch.uint8:
            raise TypeError(f'DecodedSampler: {type(decoder).__name__}.decode returned {pixels.dtype}; '
                            'expected uint8 pixels')
        return pixels.to(latents.dtype) / 127.5 - 1

    def __repr__(self):
        dec = self._decoder_cfg.get('type') if self._decoder is None else type(self._decoder).__name__
        return f'DecodedSampler({self.sampler!r}, decoder={dec})'


def _whitening(obj):
    """(scale, bias) float32 arrays of a ``StabilityVAE`` config or module, or of a
    ``LatentDataPreprocessor``; None for anything else."""
    if isinstance(obj, dict):
        if obj.get('type') not in ('StabilityVAE', StabilityVAE):
            return None
        keys = ('raw_mean', 'raw_std', 'final_mean', 'final_std')
        return latent_scale_bias(**{k: obj[k] for k in keys if k in obj})
    scale, bias = getattr(obj, 'scale', None), getattr(obj, 'bias', None)
    return None if scale is None or bias is None else (np.asarray(scale), np.asarray(bias))


def check_whitening(decoder, model):
    """The decoder must undo the whitening the model was trained with: ``decoder`` (a
    ``StabilityVAE`` config or module) and ``model``'s ``LatentDataPreprocessor`` must have equal
    scale and bias, else a ValueError says which values to give the decoder."""
    pre = getattr(getattr(model, 'module', model), 'data_preprocessor', None)
    want, got = _whitening(pre) if pre is not None else None, _whitening(decoder)
    if want is None or got is None:
        return
    if want[0].shape != got[0].shape or not (np.allclose(want[0], got[0]) and np.allclose(want[1], got[1])):
        raise ValueError(f'the decoder un-whitens latents with scale {got[0].tolist()} and bias {got[1].tolist()}, '
                         f'but the model was trained on latents whitened with scale {want[0].tolist()} and bias '
                         f'{want[1].tolist()} (its LatentDataPreprocessor); give the decoder the same raw_mean/raw_std')


def with_decoder(sampler, decoder, model=None):
    """``sampler`` followed by ``decoder`` (a MODELS config, e.g. a latent config's top-level
    ``decoder`` key), or ``sampler`` itself when ``decoder`` is None or it already decodes. With
    ``model``, the decoder's whitening is checked against the model's (``check_whitening``)."""
    if decoder is None or isinstance(sampler, DecodedSampler):
        return sampler
    if model is not None:
        check_whitening(decoder, model)
    return DecodedSampler(sampler, decoder)
