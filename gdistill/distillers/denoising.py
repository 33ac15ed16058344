"""Training an EDM denoiser on images with the same runner as the distillers: the loss of
Karras et al. 2022 (eq. 2 with Table 1's "ours" column), so a user can fit a small teacher to
their own EDM-format image folder and then distil it."""
import copy

import torch
from mmengine.model import BaseModel

from ..registry import MODELS, SAMPLERS, build
from ..utils import append_dims
from .base import ema_step, unwrap, world_size
from .phema import _check_sigma_rel


@MODELS.register_module()
class DenoisingTrainer(BaseModel):
    """Fits ``network`` (a MODELS config of a preconditioned denoiser D(x; σ, labels), e.g.
    ``EDMPrecond``) by EDM's denoising score matching:

        σ = exp(P_mean + P_std·ξ),  ξ ~ N(0, 1),   n ~ N(0, σ²I),
        loss = λ(σ)·‖D(y + n; σ, labels) − y‖²,   λ(σ) = (σ² + σ_d²)/(σ·σ_d)²,

    on the images y (in [−1, 1]) of ``data['inputs']``; the squared error is averaged over
    pixels and samples (EDM sums it: a constant factor that Adam does not see).

    The optimiser wrapper is named ``'network'`` (``trained``), for ``MultiOptimWrapperConstructor``.
    ``ema_half_life_images``: EMA of the network, β = 0.5^(batch/half-life) per step (with
    ``ema_rampup`` r the half-life is capped at r·images seen, as in EDM); or
    ``ema_sigma_rel``: EDM2's power-function EMA of that relative width (``distillers.phema``).
    ``sampler``: the SAMPLERS config ``sample`` runs on the (EMA) network.

    For ``SampleVisualizationHook`` the trainer offers the distillers' interface: ``data_shape``,
    ``device_``, ``sampler``, ``sample(noise, labels, generator=)`` and ``teacher`` — the trainer
    itself, whose ``label_dim`` is the network's.
    """

    trained = ('network',)

    def __init__(self, network, sigma_data=0.5, P_mean=-1.2, P_std=1.2, ema_half_life_images=None,
                 ema_rampup=None, sampler=dict(type='EDMHeunSampler', num_steps=18),
                 data_preprocessor=dict(type='DistillDataPreprocessor'), init_cfg=None,
                 ema_sigma_rel=None):
        super().__init__(data_preprocessor=build(MODELS, data_preprocessor), init_cfg=init_cfg)
        if ema_sigma_rel is not None:
            if ema_half_life_images is not None:
                raise ValueError('DenoisingTrainer: give one EMA, ema_half_life_images or '
                                 f'ema_sigma_rel; got {ema_half_life_images} and {ema_sigma_rel}')
            _check_sigma_rel(ema_sigma_rel, 'DenoisingTrainer: ema_sigma_rel')
        self.ema_sigma_rel = ema_sigma_rel
        if sigma_data <= 0 or P_std <= 0:
            raise ValueError(f'DenoisingTrainer: need sigma_data > 0 and P_std > 0, got {sigma_data}, {P_std}')
        self.network = build(MODELS, network)
        net_sd = getattr(self.network, 'sigma_data', None)
        if net_sd is not None and abs(float(net_sd) - sigma_data) > 1e-12:
            raise ValueError(f'DenoisingTrainer: sigma_data={sigma_data} but the network is '
                             f'preconditioned for sigma_data={net_sd}')
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)
        self.sampler_cfg = dict(sampler)
        self.sampler = build(SAMPLERS, sampler)
        self.ema_half_life_images, self.ema_rampup = ema_half_life_images, ema_rampup
        self.network_ema = (copy.deepcopy(self.network).requires_grad_(False).eval()
                            if ema_half_life_images is not None or ema_sigma_rel is not None else None)
        self.register_buffer('images_seen', torch.zeros((), dtype=torch.float64))

    # --- the distillers' interface, for hooks -----------------------------------------------
    @property
    def teacher(self):
        return self

    def reference_sampler(self, num_steps=None):
        """The configured ``sampler`` (as a teacher's is its paper's), ``num_steps`` overridden."""
        return dict(self.sampler_cfg, **({'num_steps': num_steps} if num_steps else {}))

    @property
    def label_dim(self):
        return int(getattr(unwrap(self.network), 'label_dim', 0) or 0)

    @property
    def data_shape(self):
        net = unwrap(self.network)
        return (net.img_channels, net.img_resolution, net.img_resolution)

    @property
    def device_(self):
        return self.images_seen.device

    # --- the loss ----------------------------------------------------------------------------
    def sample_sigma(self, n):
        return (self.P_mean + self.P_std * torch.randn(n, device=self.device_)).exp()

    def loss_weight(self, sigma):
        sd = self.sigma_data
        return (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2

    def denoising_loss(self, images, labels=None, sigma=None, noise=None):
        """Per-sample EDM loss; ``sigma`` [N] and ``noise`` (standard normal, images' shape)
        are drawn when not given."""
        n = images.shape[0]
        sigma = self.sample_sigma(n) if sigma is None else sigma.to(images)
        noise = torch.randn_like(images) if noise is None else noise
        s = append_dims(sigma, images.ndim)
        denoised = self.network(images + s * noise, sigma, labels)
        err = (denoised - images) ** 2
        return self.loss_weight(sigma) * err.flatten(1).mean(1)

    def _batch(self, data):
        images = data.get('inputs')
        if images is None:
            raise ValueError('DenoisingTrainer needs images: the dataset items must have an '
                             "'img' (e.g. EDMImageDataset)")
        if tuple(images.shape[1:]) != self.data_shape:
            raise ValueError(f'DenoisingTrainer: images of shape {tuple(images.shape[1:])}, but the '
                             f'network makes {self.data_shape}')
        labels = None
        if self.label_dim:
            labels = data.get('labels')
            if labels is None or labels.ndim != 2 or labels.shape[1] != self.label_dim:
                got = None if labels is None else tuple(labels.shape)
                raise ValueError(f'DenoisingTrainer: the network is conditional on {self.label_dim} '
                                 f'classes but the batch labels have shape {got} (use_labels / '
                                 'dataset.json?)')
        return images, labels

    def train_step(self, data, optim_wrapper):
        data = self.data_preprocessor(data, True)
        images, labels = self._batch(data)
        wrapper = optim_wrapper['network']
        with wrapper.optim_context(self.network):
            losses = dict(loss_denoise=self.denoising_loss(images, labels).mean())
        loss, log_vars = self.parse_losses(losses)
        wrapper.update_params(loss)
        self.update_ema(images.shape[0] * world_size())
        log_vars.pop('loss', None)
        return log_vars

    @torch.no_grad()
    def update_ema(self, batch_size):
        self.images_seen += batch_size
        if self.network_ema is not None:
            ema_step(self.network_ema, unwrap(self.network), batch_size, self.ema_half_life_images,
                     float(self.images_seen), self.ema_rampup, self.ema_sigma_rel)

    def train(self, mode=True):
        super().train(mode)
        if getattr(self, 'network_ema', None) is not None:
            self.network_ema.eval()
        return self

    # --- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise, labels=None, sampler=None, use_ema=True, generator=None):
        sampler = build(SAMPLERS, sampler) if sampler is not None else self.sampler
        net = self.network_ema if use_ema and self.network_ema is not None else unwrap(self.network)
        was_training = net.training
        net.eval()
        try:
            return sampler(net, noise, labels, generator=generator)
        finally:
            net.train(was_training)

    def forward(self, inputs=None, data_samples=None, mode='tensor'):
        """``mode='loss'``: the batch's loss without an update; otherwise samples from the
        standard-normal latents ``inputs`` (labels ``data_samples``)."""
        if mode == 'loss':
            images, labels = self._batch(self.data_preprocessor(inputs, False))
            return dict(loss_denoise=self.denoising_loss(images, labels).mean())
        return self.sample(inputs, data_samples)
