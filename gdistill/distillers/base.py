"""What every distiller shares: a frozen teacher, trained networks, an EMA of the generator,
and a ``train_step`` that runs the phases the method asks for, each through its own
optimiser wrapper of an ``OptimWrapperDict`` (mmengine's "the model owns its optimisation")."""
import contextlib
import copy
import math

import torch
from mmengine.model import BaseModel, is_model_wrapper

from ..registry import MODELS, SAMPLERS, SCHEDULES, TEACHERS, build
from ..utils import append_dims


@contextlib.contextmanager
def frozen(module):
    """Parameters of ``module`` take no gradient inside the block (its input still does)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def unwrap(module):
    return module.module if is_model_wrapper(module) else module


def world_size():
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def ema_step(ema, net, batch_size, half_life, images_seen, rampup=None):
    """One EMA update of ``ema`` towards ``net``: β = 0.5^(batch/half-life), the half-life in
    images, capped at rampup·(images seen) when ``rampup`` is set (EDM's training)."""
    if rampup is not None:
        half_life = min(half_life, images_seen * rampup)
    beta = 0.5 ** (batch_size / max(half_life, 1e-8))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


class BaseDistiller(BaseModel):
    """``teacher``: a TEACHERS config (frozen; no gradients, no optimiser state).
    ``ema_half_life_images``: the EMA of the generator has β = 0.5^(batch/half-life) per step;
    with ``ema_rampup`` r the half-life is capped at r·(images seen), as in EDM's training.
    ``sampler``: the default SAMPLERS config for ``sample``.
    ``student_dropout``: if given, the dropout rate of the students copied from the teacher
    (every sub-module with a float ``dropout`` attribute, e.g. EDM's UNet blocks); the frozen
    teacher runs in eval mode, so its own rate never matters. Needed because an EDM pickle
    (``teacher.path``) brings its training dropout (0.13 on CIFAR-10), not the distillation one."""

    #: names of the trained sub-networks, each with an optimiser wrapper of the same name
    trained = ('generator',)

    def __init__(self, teacher, schedule=dict(type='EDMSchedule'), sampler=None,
                 ema_half_life_images=None, ema_rampup=None, student_dropout=None,
                 data_preprocessor=dict(type='DistillDataPreprocessor'), init_cfg=None):
        # built here so that gdistill's scope applies without a runner's default scope
        super().__init__(data_preprocessor=build(MODELS, data_preprocessor), init_cfg=init_cfg)
        self.teacher = build(TEACHERS, teacher).freeze()
        self.schedule = build(SCHEDULES, schedule)
        self.sampler = build(SAMPLERS, sampler)
        self.ema_half_life_images = ema_half_life_images
        self.ema_rampup = ema_rampup
        if student_dropout is not None and not 0 <= student_dropout < 1:
            raise ValueError(f'student_dropout must be in [0, 1), got {student_dropout}')
        self.student_dropout = student_dropout
        self.register_buffer('images_seen', torch.zeros((), dtype=torch.float64))

    # --- networks -------------------------------------------------------------------------
    def student_from_teacher(self):
        """A trainable copy of the teacher's network (Algorithm 2: students start from it)."""
        net = getattr(self.teacher, 'network', None)
        if net is None:
            raise ValueError(f'{type(self.teacher).__name__} has no network to initialise the '
                             'students from; give the distiller an explicit generator config')
        net = copy.deepcopy(net).requires_grad_(True)
        if self.student_dropout is not None:
            blocks = [m for m in net.modules() if isinstance(getattr(m, 'dropout', None), (int, float))
                      and not isinstance(m.dropout, bool)]
            if not blocks:
                raise ValueError(f'student_dropout={self.student_dropout}: {type(net).__name__} '
                                 'has no sub-module with a float `dropout` rate to set')
            for m in blocks:
                m.dropout = float(self.student_dropout)
        net.train()
        return net

    def make_ema(self):
        if self.ema_half_life_images is None:
            self.generator_ema = None
            return
        self.generator_ema = copy.deepcopy(unwrap(self.generator)).requires_grad_(False).eval()

    @torch.no_grad()
    def update_ema(self, batch_size):
        self.images_seen += batch_size
        if self.generator_ema is not None:
            ema_step(self.generator_ema, unwrap(self.generator), batch_size, self.ema_half_life_images,
                     float(self.images_seen), self.ema_rampup)

    def train(self, mode=True):
        super().train(mode)
        if getattr(self, 'generator_ema', None) is not None:
            self.generator_ema.eval()
        return self

    # --- calling networks in the schedule's variables ------------------------------------
    def denoise(self, net, x, t, labels=None, cond_t=None):
        """E[x₀ | x_t] from an EDM-form network D(x; σ) (x_t / a(t) at σ_e(t))."""
        s = self.schedule
        xe = x / append_dims(s.alpha(t), x.ndim).to(x.dtype)
        kw = {} if cond_t is None else dict(cond_sigma=s.edm_sigma(cond_t).to(x.dtype))
        return net(xe, s.edm_sigma(t).to(x.dtype), labels, **kw)

    # --- data --------------------------------------------------------------------------------
    @property
    def data_shape(self):
        return tuple(self.teacher.data_shape)

    def batch_labels(self, data, n):
        """Class labels of the batch: the data's if it has them, else uniform draws."""
        labels = data.get('labels')
        k = self.teacher.label_dim
        if k == 0:
            return None
        if labels is not None and labels.numel() and labels.shape[-1] == k:
            return labels.to(self.device_)
        idx = torch.randint(k, (n,), device=self.device_)
        return torch.nn.functional.one_hot(idx, k).float()

    @property
    def device_(self):
        return self.images_seen.device

    # --- the loop ----------------------------------------------------------------------------
    def phases(self):
        """The updates of one ``train_step``, in order (names of optimiser wrappers)."""
        return self.trained

    def train_step(self, data, optim_wrapper):
        data = self.data_preprocessor(data, True)
        n = data['batch_size']
        labels = self.batch_labels(data, n)
        log_vars = {}
        for phase in self.phases():
            wrapper = optim_wrapper[phase]
            with wrapper.optim_context(getattr(self, phase)):
                losses = getattr(self, f'{phase}_losses')(n, labels, data)
            loss, logs = self.parse_losses(losses)
            wrapper.update_params(loss)
            log_vars.update(logs)
        self.update_ema(n * world_size())
        log_vars.pop('loss', None)
        return log_vars

    # --- sampling ----------------------------------------------------------------------------
    def sampling_network(self, use_ema=True):
        if use_ema and self.generator_ema is not None:
            return self.generator_ema
        return unwrap(self.generator)

    @torch.no_grad()
    def sample(self, noise, labels=None, sampler=None, use_ema=True, generator=None):
        """Samples of the student: ``sampler`` (a SAMPLERS config or object, default the
        distiller's own) run on the (EMA) generator."""
        sampler = build(SAMPLERS, sampler) if sampler is not None else self.sampler
        if sampler is None:
            raise ValueError(f'{type(self).__name__}.sample needs a sampler: none configured')
        return sampler(self.sampling_network(use_ema), noise, labels, generator=generator)

    def forward(self, inputs=None, data_samples=None, mode='tensor'):
        """``mode='loss'``: this batch's loss terms without an update; otherwise samples for
        ``inputs`` (standard-normal latents)."""
        if mode == 'loss':
            data = self.data_preprocessor(inputs, False)
            n = data['batch_size']
            labels = self.batch_labels(data, n)
            out = {}
            for phase in self.phases():
                out.update(getattr(self, f'{phase}_losses')(n, labels, data))
            return out
        return self.sample(inputs, data_samples)
