"""What every distiller shares: a frozen teacher, trained networks, an EMA of the generator,
and a ``train_step`` that runs the phases the method asks for, each through its own
optimiser wrapper of an ``OptimWrapperDict`` (mmengine's "the model owns its optimisation")."""
import contextlib
import copy
import logging
import math

import torch
import torch.distributed as dist
from mmengine.logging import MessageHub, print_log
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


def distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if distributed() else 1


def full_tensor(t):
    """The whole tensor of a parameter sharded by FSDP2 (a DTensor; a collective), else ``t``."""
    return t.full_tensor() if hasattr(t, 'full_tensor') else t


def local_tensor(t):
    """This process's shard of an FSDP2 DTensor, else ``t``."""
    return t.to_local() if hasattr(t, 'to_local') else t


@torch.no_grad()
def ema_step(ema, net, batch_size, half_life, images_seen, rampup=None):
    """One EMA update of ``ema`` towards ``net``: β = 0.5^(batch/half-life), the half-life in
    images, capped at rampup·(images seen) when ``rampup`` is set (EDM's training). The EMA
    is a whole copy on every process, also when ``net`` is sharded by FSDP."""
    if rampup is not None:
        half_life = min(half_life, images_seen * rampup)
    beta = 0.5 ** (batch_size / max(half_life, 1e-8))
    # one fused update over all tensors (a Python loop of lerp_ is a visible share of a small step)
    torch._foreach_lerp_(list(ema.parameters()), [full_tensor(p.detach()) for p in net.parameters()], 1 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(full_tensor(b))


# --- what train_step needs: accumulation and the non-finite guard ------------------------------
def accumulation_steps(wrapper):
    """k of an optimiser wrapper's ``accumulative_counts`` (1 for wrappers without it)."""
    return int(getattr(wrapper, '_accumulative_counts', 1))


def micro_batch(labels, data, n, i, k):
    """The i-th of k equal slices of the batch: labels and every per-sample tensor of ``data``."""
    if k == 1:
        return labels, data
    m = n // k

    def cut(v):
        return v[i * m:(i + 1) * m] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v
    part = {key: cut(v) for key, v in data.items()}
    part['batch_size'] = m
    return (cut(labels) if labels is not None else None), part


def nonfinite_problem(bad_terms, terms, wrapper, module, phase):
    """What was not finite in this update — the loss terms ``bad_terms``, else the first
    parameter with a non-finite gradient of the loss (the sum of ``terms``) — or None. A flag is
    all-reduced so every process skips or steps together (FSDP's gradient shards differ between
    processes)."""
    problem = f'non-finite {", ".join(bad_terms)}' if bad_terms else None
    if problem is None:
        params = [p for group in wrapper.optimizer.param_groups for p in group['params'] if p.grad is not None]
        if params:
            grads = [local_tensor(p.grad) for p in params]
            # one fused norm per tensor: finite whenever every entry is; an entry-wise check
            # confirms a non-finite norm (a huge finite gradient can overflow its norm)
            ok = torch.stack(torch._foreach_norm(grads)).isfinite()
            if not bool(ok.all()):
                ok = torch.stack([torch.isfinite(g).all() for g in grads])
            if not bool(ok.all()):
                names = {p: name for name, p in unwrap(module).named_parameters()}
                first = params[int((~ok).nonzero()[0, 0])]
                problem = f'non-finite gradient of {" + ".join(terms)} in {phase}.{names.get(first, "?")}'
    if distributed():
        device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
        flag = torch.tensor([0.0 if problem else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if problem is None and flag.item() == 0:
            problem = 'a non-finite loss or gradient on another process'
    return problem


class NonFiniteError(FloatingPointError):
    """One network's update was skipped ``patience`` times in a row for non-finite values."""


class NonFiniteGuard:
    """Counts updates skipped for a non-finite loss or gradient: ``skipped`` over the run (logged
    as ``nonfinite_skips``) and, per network, how many in a row; the ``patience``-th skip in a row
    stops the run with a :class:`NonFiniteError` naming the loss term and the iteration."""

    def __init__(self, patience):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f'nonfinite_patience must be an int >= 1, got {patience!r}')
        self.patience = patience
        self.skipped = 0
        self.in_a_row = {}   # phase -> (count, first iteration of the streak)

    def record(self, phase, problem, iteration):
        if problem is None:
            self.in_a_row.pop(phase, None)
            return
        self.skipped += 1
        count, first = self.in_a_row.get(phase, (0, iteration))
        count += 1
        self.in_a_row[phase] = (count, first)
        print_log(f'iteration {iteration}: skipped the {phase} update ({problem}); {count} in a row '
                  f'(the run stops at nonfinite_patience={self.patience})', logger='current',
                  level=logging.WARNING)
        if count >= self.patience:
            raise NonFiniteError(
                f'iteration {iteration}: {problem}. The {phase} update was skipped {count} times in a row '
                f'(model.nonfinite_patience={self.patience}), so the run stops; the {phase} weights and '
                f'optimiser state are as they were before iteration {first}. Resume from the last '
                'checkpoint, e.g. with a lower learning rate.')

    def state_dict(self):
        return dict(skipped=self.skipped, in_a_row={k: list(v) for k, v in self.in_a_row.items()})

    def load_state_dict(self, state):
        self.skipped = int(state['skipped'])
        self.in_a_row = {k: tuple(v) for k, v in state['in_a_row'].items()}


def describe_shape(shape):
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        return f'{shape} ({shape[0]} channels, {shape[1]}x{shape[2]})'
    return str(shape)


class BaseDistiller(BaseModel):
    """``teacher``: a TEACHERS config (frozen; no gradients, no optimiser state); None only for a
    model trained from data whose class defines a ``teacher`` property describing that data
    (``data_shape``, ``label_dim``), as ``SIDDM`` does.
    ``ema_half_life_images``: the EMA of the generator has β = 0.5^(batch/half-life) per step;
    with ``ema_rampup`` r the half-life is capped at r·(images seen), as in EDM's training.
    ``sampler``: the default SAMPLERS config for ``sample``.
    ``student_dropout``: if given, the dropout rate of the students copied from the teacher
    (every sub-module with a float ``dropout`` attribute, e.g. EDM's UNet blocks); the frozen
    teacher runs in eval mode, so its own rate never matters. Needed because an EDM pickle
    (``teacher.path``) brings its training dropout (0.13 on CIFAR-10), not the distillation one.
    ``nonfinite_patience``: an update with a non-finite loss or gradient is skipped (weights and
    optimiser state untouched); this many skips in a row of one network stop the run."""

    #: names of the trained sub-networks, each with an optimiser wrapper of the same name
    trained = ('generator',)

    def __init__(self, teacher, schedule=dict(type='EDMSchedule'), sampler=None,
                 ema_half_life_images=None, ema_rampup=None, student_dropout=None, nonfinite_patience=10,
                 data_preprocessor=dict(type='DistillDataPreprocessor'), init_cfg=None):
        # built here so that gdistill's scope applies without a runner's default scope
        super().__init__(data_preprocessor=build(MODELS, data_preprocessor), init_cfg=init_cfg)
        if teacher is not None:
            self.teacher = build(TEACHERS, teacher).freeze()
        elif not isinstance(getattr(type(self), 'teacher', None), property):
            # only a model trained from data (SIDDM), whose class describes its data itself
            raise ValueError(f'{type(self).__name__} needs a teacher (a TEACHERS config)')
        self.schedule = build(SCHEDULES, schedule)
        self.sampler = build(SAMPLERS, sampler)
        self.ema_half_life_images = ema_half_life_images
        self.ema_rampup = ema_rampup
        if student_dropout is not None and not 0 <= student_dropout < 1:
            raise ValueError(f'student_dropout must be in [0, 1), got {student_dropout}')
        self.student_dropout = student_dropout
        self.register_buffer('images_seen', torch.zeros((), dtype=torch.float64))
        self.nonfinite_guard = NonFiniteGuard(nonfinite_patience)
        self.train_steps = 0  # completed train_steps (restored on resume with the checkpoint)
        self.micro_batch = (0, 1)  # (i, k): the update being computed is micro-batch i of k

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
        """One update of every network in ``phases()`` order. Each update accumulates its
        wrapper's ``accumulative_counts`` k micro-batches (the batch split in k) before its one
        optimiser step, so the alternation is exactly that of one step on the whole batch. An
        update whose loss or gradient is not finite is skipped (see ``NonFiniteGuard``)."""
        data = self.data_preprocessor(data, True)
        self.check_batch(data)
        n = data['batch_size']
        labels = self.batch_labels(data, n)
        log_vars = {}
        for phase in self.phases():
            log_vars.update(self.update_network(phase, optim_wrapper[phase], n, labels, data))
        self.update_ema(n * world_size())
        self.train_steps += 1
        # the running count of skipped updates, logged beside the losses
        MessageHub.get_current_instance().update_scalar('train/nonfinite_skips', self.nonfinite_guard.skipped)
        return log_vars

    def update_network(self, phase, wrapper, n, labels, data):
        """Backward of ``<phase>_losses`` over k micro-batches, then one optimiser step unless a
        loss or a gradient is non-finite (all processes take the same decision)."""
        k = accumulation_steps(wrapper)
        if n % k:
            raise ValueError(f'{phase}: a batch of {n} does not split into accumulative_counts={k} '
                             f'equal micro-batches; make the per-process batch size a multiple of {k}')
        module = getattr(self, phase)
        # the wrapper's counters cover one update: no gradient sync before the last micro-batch,
        # and should_update() after it (mmengine counts iterations; here an update is one iteration)
        wrapper._inner_count, wrapper._max_counts, wrapper._remainder_counts = 0, k, 0
        logs, bad_terms, terms = {}, [], []
        fsdp_sync = getattr(unwrap(module), 'set_requires_gradient_sync', None)  # FSDP2's no_sync
        for i in range(k):
            part_labels, part = micro_batch(labels, data, n, i, k)
            if fsdp_sync is not None:
                fsdp_sync(i == k - 1)
            self.micro_batch = (i, k)
            with wrapper.optim_context(module):
                losses = getattr(self, f'{phase}_losses')(n // k, part_labels, part)
            loss, part_logs = self.parse_losses(losses)
            terms = [name for name in part_logs if name != 'loss']
            bad_terms += [name for name in terms if not bool(torch.isfinite(part_logs[name]).all())]
            wrapper.backward(loss / k)  # backward even when non-finite: DDP's collectives must match
            for name, value in part_logs.items():
                logs[name] = logs.get(name, 0) + value.detach() / k
        self.micro_batch = (0, 1)
        problem = nonfinite_problem(sorted(set(bad_terms)), terms, wrapper, module, phase)
        if problem is None:
            wrapper.step()
        wrapper.zero_grad()
        self.nonfinite_guard.record(phase, problem, self.current_iteration())
        logs.pop('loss', None)
        return logs

    def current_iteration(self):
        """The 1-based iteration being run, as mmengine's log counts it."""
        it = MessageHub.get_current_instance().get_info('iter')
        return (int(it) if it is not None else self.train_steps) + 1

    def check_batch(self, data):
        """The data must be what the teacher was trained on: image shape and label count."""
        x, labels = data.get('inputs'), data.get('labels')
        teacher = type(self.teacher).__name__
        if x is not None and tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f'the data does not fit the teacher: the dataset gives samples of shape '
                             f'{describe_shape(x.shape[1:])} but {teacher} makes '
                             f'{describe_shape(self.data_shape)}; use data of the teacher\'s resolution '
                             'and channels (or a teacher trained on this data)')
        k = self.teacher.label_dim
        if labels is not None and labels.ndim == 2 and labels.shape[1] and labels.shape[1] != k:
            raise ValueError(f'the labels do not fit the teacher: the dataset has {labels.shape[1]} classes '
                             f'but {teacher} has label_dim={k}' + (
                                 ' (it is unconditional; drop the labels, e.g. use_labels=False)' if k == 0
                                 else f'; give the dataset label_dim={k}'))

    # --- state a resumed run needs besides the weights ------------------------------------
    def train_state_dict(self):
        """Counters of the loop (saved in every checkpoint by ``ResumeStateHook``)."""
        return dict(train_steps=self.train_steps, phases=list(self.phases()),
                    nonfinite=self.nonfinite_guard.state_dict())

    def load_train_state_dict(self, state):
        self.train_steps = int(state['train_steps'])
        self.nonfinite_guard.load_state_dict(state['nonfinite'])

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
