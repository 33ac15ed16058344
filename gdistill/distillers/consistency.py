"""Continuous-time consistency models, sCD and sCT (Lu & Song 2024, "Simplifying, stabilizing and
scaling continuous-time consistency models", arXiv 2410.11081, Algorithm 1), on TrigFlow."""
import contextlib

import torch

from ..divergences.scm import jvp_tangents
from ..networks.trigflow import TrigFlowStudent, student_F_and_logvar, trigflow_F
from ..registry import DIVERGENCES, MODELS, TIME_SAMPLERS, build
from ..schedules.trigflow import TrigFlowSchedule
from ..utils import append_dims
from .base import BaseDistiller, unwrap

MODES = ('scd', 'sct')
TANGENTS = ('jvp', 'finite_difference')


@contextlib.contextmanager
def same_randomness(seed, device):
    """Run the block on a private RNG stream seeded with ``seed`` (the global streams are left as
    they were), so two forward passes under the same seed draw the same dropout masks."""
    devices = [device] if torch.device(device).type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def jvp_tangent(F, x_in, t, dxt_dt, sigma_data):
    """(F(x_in, t), cos t sin t·σ_d·dF/dt) by one forward-mode product (``torch.func.jvp``) with
    the rearranged tangents (cos t sin t·dx_t/dt, cos t sin t·σ_d) (Lu & Song 2024, §4.2)."""
    tx, tt = jvp_tangents(t, dxt_dt, sigma_data)
    return torch.func.jvp(F, (x_in, t), (tx, tt))


def finite_difference_tangent(F, x_in, t, dxt_dt, sigma_data, step=1e-3):
    """The same product by a central difference along the rearranged tangents (v_x, v_t),
    [F(x + h·v_x, t + h·v_t) − F(x − h·v_x, t − h·v_t)]/(2h), evaluated in float64 (``F`` is
    called with float64 inputs and must run in float64 to profit). Error O(h²) plus the
    network's rounding over h."""
    tx, tt = jvp_tangents(t, dxt_dt, sigma_data)
    x64, t64 = x_in.to(torch.float64), torch.as_tensor(t).to(torch.float64)
    tx, tt = tx.to(torch.float64), tt.to(torch.float64)
    plus = F(x64 + step * tx, t64 + step * tt)
    minus = F(x64 - step * tx, t64 - step * tt)
    return ((plus - minus) / (2 * step)).to(x_in.dtype)


class _CallF(torch.nn.Module):
    """``forward`` = the student's F, so ``torch.func.functional_call`` can run F on float64
    copies of the weights."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, x_in, t, class_labels):
        return self.student.F(x_in, t, class_labels)


def tangent_terms(student, x_in, t, dxt_dt, sigma_data, class_labels=None, seed=0, method='jvp', fd_step=1e-3):
    """(F⁻, cos t sin t·σ_d·dF⁻/dt) of the stop-gradient ``student`` (a ``TrigFlowStudent``) at
    x_in = x_t/σ_d, by ``method`` 'jvp' (one forward-mode pass gives both) or
    'finite_difference' (F⁻ in the network's dtype, the derivative from two evaluations on
    float64 copies of the weights), every evaluation under the dropout masks of ``seed``."""
    if method not in TANGENTS:
        raise ValueError(f'tangent method is one of {TANGENTS}, got {method!r}')

    def F(x, tt):
        return student.F(x, tt, class_labels)
    with torch.no_grad(), same_randomness(seed, x_in.device):
        if method == 'jvp':
            return jvp_tangent(F, x_in, t, dxt_dt, sigma_data)
        F_minus = F(x_in, t)
    call = _CallF(student)
    state = {name: (v.detach().to(torch.float64) if v.is_floating_point() else v)
             for name, v in list(call.named_parameters()) + list(call.named_buffers())}

    def F64(x, tt):
        with same_randomness(seed, x_in.device):
            return torch.func.functional_call(call, state, (x, tt, class_labels))
    with torch.no_grad():
        term = finite_difference_tangent(F64, x_in, t, dxt_dt, sigma_data, fd_step)
    return F_minus, term


@MODELS.register_module()
class ConsistencyDistiller(BaseDistiller):
    """sCD (``mode='scd'``, consistency distillation: dx_t/dt from the teacher's PF-ODE,
    σ_d·F_teacher(x_t/σ_d, t)) and sCT (``mode='sct'``, consistency training: dx_t/dt = cos t·z −
    sin t·x₀ from the sample pair) — Algorithm 1 of Lu & Song 2024:

        x₀ ~ data, z ~ N(0, σ_d² I), t from ``time_sampler``, x_t = cos t·x₀ + sin t·z,
        (F⁻, cos t sin t·σ_d·dF⁻/dt) by one JVP of the stop-gradient student,
        g = tangent (``divergence``: warm-up r, normalisation, clipping),
        L = e^{−w(t)}/D·‖F_θ − F⁻ − g‖² + w(t).

    One trained module, ``generator`` (a ``TrigFlowStudent``: the network, by default a copy of
    the teacher's, and the log-variance head w_φ); its EMA is what samples. The schedule must be
    TrigFlow; the teacher may live in any schedule (it is read through ``trigflow_F``).

    Data x₀: the batch's ``inputs`` (images of a dataset); a data-free loader (no images) is
    accepted only when the teacher carries the exact distribution it models
    (``teacher.mixture``, the toy mixtures), which is then the data.

    ``tangent``: ``'jvp'`` (forward-mode AD) or ``'finite_difference'`` (a central difference in
    float64 with step ``fd_step``, for networks without forward-mode AD). Both evaluate F⁻ and its
    derivative with the dropout masks of the trained forward pass (one seed for all three)."""

    trained = ('generator',)

    def __init__(self, teacher, mode='scd', schedule=dict(type='TrigFlowSchedule'),
                 divergence=dict(type='SCMDivergence'), time_sampler=dict(type='TrigFlowLogNormalTimeSampler'),
                 sampler=dict(type='ConsistencySampler', num_steps=1), generator=None, tangent='jvp',
                 fd_step=1e-3, logvar_channels=128, **kwargs):
        super().__init__(teacher, schedule=schedule, sampler=sampler, **kwargs)
        if mode not in MODES:
            raise ValueError(f"ConsistencyDistiller: mode is 'scd' (distillation) or 'sct' (training), got {mode!r}")
        if tangent not in TANGENTS:
            raise ValueError(f'ConsistencyDistiller: tangent is one of {TANGENTS}, got {tangent!r}')
        if not fd_step > 0:
            raise ValueError(f'ConsistencyDistiller: fd_step must be > 0, got {fd_step}')
        if not isinstance(self.schedule, TrigFlowSchedule):
            raise TypeError(f'ConsistencyDistiller works in TrigFlow time: schedule must be a '
                            f'TrigFlowSchedule, got {type(self.schedule).__name__}')
        self.sigma_data = self.schedule.sigma_data
        if abs(self.teacher.sigma_data - self.sigma_data) > 1e-12:
            raise ValueError(f'ConsistencyDistiller: the TrigFlow schedule has sigma_data={self.sigma_data} but the '
                             f'teacher was trained on data of std {self.teacher.sigma_data}; set '
                             f'schedule.sigma_data={self.teacher.sigma_data}')
        self.mode, self.tangent, self.fd_step = mode, tangent, float(fd_step)
        self.divergence = build(DIVERGENCES, divergence)
        self.time_sampler = build(TIME_SAMPLERS, time_sampler)
        if generator is None:
            net = TrigFlowStudent(self.student_from_teacher(), self.sigma_data, logvar_channels)
        else:
            net = build(MODELS, generator)
            if not isinstance(net, TrigFlowStudent):
                net = TrigFlowStudent(net, self.sigma_data, logvar_channels)
        if abs(net.sigma_data - self.sigma_data) > 1e-12:
            raise ValueError(f'ConsistencyDistiller: the generator has sigma_data={net.sigma_data}, the '
                             f'schedule {self.sigma_data}; they must agree')
        self.generator = net
        self.make_ema()

    # --- data ----------------------------------------------------------------------------------
    def training_data(self, n, data):
        """x₀ for this batch: the loader's images, else samples of the teacher's exact mixture."""
        x0 = data.get('inputs')
        if x0 is not None:
            return x0.to(self.device_)
        mixture = getattr(self.teacher, 'mixture', None)
        if mixture is None:
            raise ValueError(f'{self.mode}: sCM trains on data samples x₀, but the batch has no images '
                             f"('inputs' is None: a data-free loader such as DistillationDataset) and the "
                             f'teacher ({type(self.teacher).__name__}) carries no exact distribution to draw '
                             'from; give the train dataloader an image dataset (e.g. EDMImageDataset)')
        return mixture.sample(n).to(self.device_, torch.get_default_dtype())

    # --- the two pieces of the tangent -----------------------------------------------------------
    def velocity(self, x_t, t, x0, z, labels):
        """dx_t/dt: the teacher's PF-ODE σ_d·F_teacher(x_t/σ_d, t) (sCD) or cos t·z − sin t·x₀ (sCT)."""
        if self.mode == 'sct':
            t64 = torch.as_tensor(t).to(torch.float64)
            return (append_dims(t64.cos(), z.ndim).to(z.dtype) * z
                    - append_dims(t64.sin(), x0.ndim).to(x0.dtype) * x0)
        with torch.no_grad():
            return self.sigma_data * trigflow_F(self.teacher.edm_denoise, x_t / self.sigma_data, t,
                                                self.sigma_data, labels)

    # --- the one update -----------------------------------------------------------------------
    def generator_losses(self, n, labels, data):
        x0 = self.training_data(n, data)
        draw = self.time_sampler.sample(n, self.schedule, device=self.device_)
        t64 = draw['t']
        t = t64.to(x0.dtype)
        z = self.sigma_data * torch.randn_like(x0)
        x_t = (append_dims(t64.cos(), x0.ndim).to(x0.dtype) * x0
               + append_dims(t64.sin(), x0.ndim).to(x0.dtype) * z)
        x_in = x_t / self.sigma_data
        dxt_dt = self.velocity(x_t, t, x0, z, labels)
        seed = int(torch.randint(0, 2 ** 62, (), device='cpu'))
        F_minus, term = tangent_terms(unwrap(self.generator), x_in, t, dxt_dt, self.sigma_data, labels, seed,
                                      self.tangent, self.fd_step)
        g, raw_norm = self.divergence.tangent(F_minus, term, x_t, dxt_dt, t64, self.sigma_data, self.train_steps)
        with same_randomness(seed, x_in.device):
            F, logvar = student_F_and_logvar(self.generator, x_in, t, self.sigma_data, labels)
        loss = self.divergence.loss(F, F_minus.detach(), g.detach(), logvar)
        return dict(loss_scm=loss.mean(), tangent_norm=raw_norm.mean().detach(),
                    logvar=logvar.mean().detach(),
                    warmup=torch.tensor(self.divergence.warmup_ratio(self.train_steps), device=self.device_))
