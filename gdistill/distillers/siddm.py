"""SIDDM (Xu et al. 2023, "Semi-Implicit Denoising Diffusion Models"): a few-step generator trained
from data by a GAN on x_{t−1} plus the auxiliary-forward-diffusion term, on the shared loop."""
import torch

from ..registry import DIVERGENCES, KERNELS, MODELS, SAMPLERS, build
from ..utils import append_dims
from .base import BaseDistiller, frozen, unwrap


def network_data_shape(net):
    """The sample shape a generator network makes: (C, H, W) for EDM image networks, (d,) for MLPs."""
    net = unwrap(net)
    if getattr(net, 'img_resolution', None) and getattr(net, 'img_channels', None):
        return (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    if getattr(net, 'dim', None):
        return (int(net.dim),)
    raise ValueError(f'cannot tell the data shape of {type(net).__name__}; give SIDDM data_shape=...')


@MODELS.register_module()
class SIDDM(BaseDistiller):
    """The posterior kernel p_θ(x_{t−1} | x_t) = q(x_{t−1} | x_t, G_θ(x_t, t)) on a T-step grid of
    the schedule, trained from real x₀ (no teacher) by alternating updates:

    - ``discriminator`` (``discriminator_steps`` per iteration): for k ~ U{1..T}, x_t ~ q(x_t | x₀)
      and the real x_{t−1} ~ q(x_{t−1} | x_t, x₀); the fake x_{t−1} through the kernel from the
      same x_t. Loss: GAN (real vs fake x_{t−1}, conditioned on t_{k−1}) + reg_weight × the
      auxiliary head's denoising error ‖D_aux(x_{t−1}) − x₀‖² on real pairs (+ optional R1).
    - ``generator``: the non-saturating GAN loss of the fake x_{t−1} (gradients through the
      reparameterised posterior sample into G) + λ_AFD × the AFD term ‖x_t − a_{t|t−1}·x_{t−1}‖²/(2σ²_{t|t−1}).

    The divergence (``GANAFDDivergence``) holds the weights, so the ablations are
    ``model.divergence.afd_weight`` and ``model.divergence.reg_weight``.

    No teacher: the model describes its data itself — ``data_shape`` (from the generator, or
    given), ``label_dim`` (the generator's) — and, for the hooks that ask a distiller's teacher
    for them, ``teacher`` is the model itself (as for ``DenoisingTrainer``).

    ``generator``: a MODELS config of an EDM-form network D(x; σ_e, labels) (``MLPDenoiser``,
    ``EDMPrecond``); ``discriminator``: ``MLPDiscriminator`` or ``ConvDiscriminator``.
    ``sampler`` defaults to the ``PosteriorSampler`` of this kernel and schedule."""

    trained = ('discriminator', 'generator')

    def __init__(self, generator, discriminator, schedule=dict(type='CosineSchedule'),
                 kernel=dict(type='PosteriorKernel', num_steps=4), divergence=dict(type='GANAFDDivergence'),
                 sampler=None, discriminator_steps=1, data_shape=None, **kwargs):
        super().__init__(None, schedule=schedule, sampler=sampler, **kwargs)
        self.kernel = build(KERNELS, kernel)
        self.divergence = build(DIVERGENCES, divergence)
        self.kernel.times(self.schedule)   # the kernel's grid must lie inside the schedule's range
        self.generator = build(MODELS, generator)
        self.discriminator = build(MODELS, discriminator)
        if isinstance(discriminator_steps, bool) or not isinstance(discriminator_steps, int) or discriminator_steps < 1:
            raise ValueError(f'SIDDM: discriminator_steps must be an int >= 1, got {discriminator_steps!r}')
        self.discriminator_steps = discriminator_steps
        self._data_shape = tuple(data_shape) if data_shape is not None else network_data_shape(self.generator)
        gen_labels = int(getattr(self.generator, 'label_dim', 0) or 0)
        disc_labels = int(getattr(self.discriminator, 'label_dim', 0) or 0)
        if gen_labels != disc_labels:
            raise ValueError(f'SIDDM: the generator has label_dim={gen_labels} but the discriminator '
                             f'{disc_labels}; both must see the same classes')
        self._label_dim = gen_labels
        if self.sampler is None:
            self.sampler = build(SAMPLERS, dict(type='PosteriorSampler', kernel=self.kernel, schedule=self.schedule))
        self.make_ema()

    # --- what the model says about its data (a teacher's role elsewhere) ----------------------------
    @property
    def teacher(self):
        return self

    @property
    def data_shape(self):
        return self._data_shape

    @property
    def label_dim(self):
        return self._label_dim

    def phases(self):
        return ('discriminator',) * self.discriminator_steps + ('generator',)

    # --- one draw of (k, x₀, x_t) ------------------------------------------------------------------
    def real_data(self, data, n):
        x0 = data.get('inputs')
        if x0 is None:
            raise ValueError("SIDDM trains from data: the dataset items need an 'img' (real samples x₀, e.g. "
                             'EDMImageDataset or MixtureSampleDataset), but the batch has none')
        if x0.shape[0] != n:
            raise ValueError(f'SIDDM: {x0.shape[0]} real samples for a batch of {n}')
        return x0.to(self.device_)

    def draw(self, x0):
        """Step indices k ~ U{1..T}, their times (s, t) = (t_{k−1}, t_k) in float64 and x_t ~ q(x_t | x₀)."""
        n, sched = x0.shape[0], self.schedule
        k = torch.randint(1, self.kernel.num_steps + 1, (n,), device=self.device_)
        s, t = self.kernel.step_times(k, sched, device=self.device_)
        a, sig = (append_dims(v, x0.ndim).to(x0.dtype) for v in (sched.alpha(t), sched.sigma(t)))
        x_t = a * x0 + sig * torch.randn_like(x0)
        return s, t, x_t

    def discriminate(self, net, x_s, s, labels, aux):
        """The discriminator in EDM variables: x_s/a(s) at σ_e(s)."""
        sched = self.schedule
        x = x_s / append_dims(sched.alpha(s), x_s.ndim).to(x_s.dtype)
        return net(x, sched.edm_sigma(s).to(x_s.dtype), labels, aux=aux)

    # --- the two updates --------------------------------------------------------------------------
    def discriminator_losses(self, n, labels, data):
        x0 = self.real_data(data, n)
        s, t, x_t = self.draw(x0)
        real = self.kernel.sample(x_t, x0, s, t, self.schedule, torch.randn_like(x0))
        with torch.no_grad():
            x0_fake = self.kernel.predict_x0(unwrap(self.generator), x_t, t, self.schedule, labels)
            fake = self.kernel.sample(x_t, x0_fake, s, t, self.schedule, torch.randn_like(x0))
        div = self.divergence
        if div.uses_r1:
            real = real.detach().requires_grad_(True)
        # one forward for real and fake (the auxiliary head's output is used on the real half only)
        both_labels = torch.cat([labels, labels]) if labels is not None else None
        logits, x0_pred = self.discriminate(self.discriminator, torch.cat([real, fake]), torch.cat([s, s]),
                                            both_labels, aux=div.uses_aux)
        return div.discriminator_losses(logits[:n], logits[n:], x0_pred[:n] if x0_pred is not None else None,
                                        x0, real if div.uses_r1 else None)

    def generator_losses(self, n, labels, data):
        x0 = self.real_data(data, n)
        s, t, x_t = self.draw(x0)
        x0_hat = self.kernel.predict_x0(self.generator, x_t, t, self.schedule, labels)
        fake = self.kernel.sample(x_t, x0_hat, s, t, self.schedule, torch.randn_like(x0))
        with frozen(unwrap(self.discriminator)) as disc:
            logits, _ = self.discriminate(disc, fake, s, labels, aux=False)
        a_ts, var_ts = self.kernel.forward_coefficients(s, t, self.schedule)
        return self.divergence.generator_losses(logits, x_t, fake, a_ts, var_ts)
