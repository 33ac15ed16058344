"""EDM teachers (Karras et al. 2022): an official EDM network, loaded without executing the
pickle's code, or a gdistill EDM network built from a config."""
import os.path as osp

import torch
import torch.nn.functional as F

from ..networks.edm import Preconditioner, TwoTimePrecond
from ..networks.edm2 import EDM2Precond, EDM2TwoTimePrecond
from ..registry import MODELS, TEACHERS, build
from .base import Teacher
from .edm_pickle import load_edm_pickle


@TEACHERS.register_module()
class EDMTeacher(Teacher):
    """A frozen EDM denoiser D(x; σ) (a preconditioned SongUNet or DhariwalUNet).

    Give exactly one of

    - ``path``: an official EDM pickle (``edm-*.pkl`` or a training snapshot); the network under
      ``key`` (default ``'ema'``) is read by :mod:`gdistill.teachers.edm_pickle`, which maps it
      onto gdistill's classes and never runs code from the file;
    - ``network``: a MODELS config (e.g. ``dict(type='EDMPrecond', img_resolution=32,
      img_channels=3, model_type='SongUNet', ...)``) or a built module — random weights unless
      ``checkpoint`` names a plain state_dict file (``torch.save``d, e.g. by
      ``tools/convert_edm.py``; read with ``weights_only=True``; ``{'state_dict': ...}`` also
      accepted) or a training checkpoint of gdistill's runner (e.g. ``iter_5000.pth`` of a
      ``DenoisingTrainer`` run), read with ``torch.load(weights_only=True)`` and checked against
      its digest (``gdistill.engine.checkpoint.read_checkpoint``), and the network's entries taken: those under ``checkpoint_prefix``, by default
      ``'network_ema.'`` (the trainer's EMA) if present, else ``'network.'``.

    ``class_labels`` may be one-hot [N, label_dim] or integer class indices [N].
    """

    def __init__(self, path=None, network=None, checkpoint=None, key='ema', checkpoint_prefix=None):
        super().__init__()
        if (path is None) == (network is None):
            raise ValueError('EDMTeacher needs exactly one of path= (an EDM pickle) or network= '
                             f'(a MODELS config); got path={path!r}, network={network!r}')
        if path is not None:
            if checkpoint is not None:
                raise ValueError('EDMTeacher: checkpoint= goes with network=; an EDM pickle '
                                 '(path=) already holds its weights')
            if not osp.isfile(path):
                raise FileNotFoundError(f'EDMTeacher: EDM pickle {path!r} does not exist')
            self.network = load_edm_pickle(path, key=key)
        else:
            self.network = build(MODELS, network)
            if checkpoint is not None:
                self._load_checkpoint(checkpoint, checkpoint_prefix)
        if not isinstance(self.network, (Preconditioner, TwoTimePrecond, EDM2Precond,
                                         EDM2TwoTimePrecond)):
            raise TypeError(f'EDMTeacher needs a preconditioned network (EDMPrecond, VPPrecond, '
                            f'VEPrecond, iDDPMPrecond, EDM2Precond); got {type(self.network).__name__}, which '
                            'is a raw F(x, c_noise) rather than a denoiser D(x; σ)')
        self.sigma_data = float(getattr(self.network, 'sigma_data', 0.5))
        self.label_dim = int(self.network.label_dim or 0)
        self.data_shape = (self.network.img_channels, self.network.img_resolution,
                           self.network.img_resolution)
        self.freeze()

    def _load_checkpoint(self, checkpoint, prefix=None):
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'EDMTeacher: checkpoint {checkpoint!r} does not exist')
        from ..engine.checkpoint import read_checkpoint  # weights_only=True, digest checked
        state = read_checkpoint(checkpoint)
        if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
            state = state['state_dict']
        if prefix is None:
            prefix = next((p for p in ('network_ema.', 'network.') if any(k.startswith(p) for k in state)), '')
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise KeyError(f'EDMTeacher: no entries under {prefix!r} in {checkpoint}')
        self.network.load_state_dict(state, strict=True)

    def one_hot(self, class_labels, batch):
        """Labels as EDM's networks take them: None (unconditional) or float [N, label_dim]."""
        if self.label_dim == 0 or class_labels is None:
            return None
        class_labels = torch.as_tensor(class_labels)
        if not class_labels.is_floating_point():
            if class_labels.ndim != 1:
                raise ValueError(f'integer class labels must be [N]; got shape '
                                 f'{tuple(class_labels.shape)}')
            return F.one_hot(class_labels.long(), self.label_dim).float()
        return class_labels

    # The network's noise range and levels, which EDM's sampler follows (see
    # gdistill.samplers.edm): VE nets 0.02–100, iDDPM nets their discrete levels.
    sigma_min = property(lambda self: float(getattr(self.network, 'sigma_min', 0.0) or 0.0))
    sigma_max = property(lambda self: float(getattr(self.network, 'sigma_max', float('inf'))))

    def reference_sampler(self, num_steps=None):
        """EDM2's sampler for an EDM2 network (its generate_images.py: 32 steps, NFE 63), EDM's
        Heun sampler otherwise."""
        if isinstance(self.network, (EDM2Precond, EDM2TwoTimePrecond)):
            return dict(type='EDM2Sampler', num_steps=num_steps or 32)
        return super().reference_sampler(num_steps)

    def round_sigma(self, sigma):
        """The network's ``round_sigma`` (iDDPM: the nearest of its discrete levels); every σ
        for a network without one (EDM2)."""
        rnd = getattr(self.network, 'round_sigma', None)
        return torch.as_tensor(sigma) if rnd is None else rnd(sigma)

    def edm_denoise(self, x, sigma, class_labels=None, augment_labels=None):
        """D(x; σ, labels) of the network. ``augment_labels`` [N, augment_dim] are passed to a
        network trained with augmentation conditioning (EDM's ``augment_dim``; zeros = no
        augmentation, which is what the network sees when they are not given)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        labels = self.one_hot(class_labels, x.shape[0])
        if labels is not None:
            labels = labels.to(x.device)
        kwargs = {}
        if augment_labels is not None:
            kwargs['augment_labels'] = torch.as_tensor(augment_labels).to(x.device, torch.float32)
        return self.network(x, sigma.reshape(-1), labels, **kwargs).to(x.dtype)
