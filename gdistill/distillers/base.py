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
from .phema import _check_sigma_rel, power_ema_step


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
def ema_step(ema, net, batch_size, half_life, images_seen, rampup=None, sigma_rel=None):
    """One EMA update of ``ema`` towards ``net``: β = 0.5^(batch/half-life), the half-life in
    images, capped at rampup·(images seen) when ``rampup`` is set (EDM's training); or, with
    ``sigma_rel``, EDM2's power-function EMA β = (1 − batch/images seen)^(γ+1)
    (``gdistill.distillers.phema``). The EMA is a whole copy on every process, also when
    ``net`` is sharded by FSDP."""
    if sigma_rel is not None:
        power_ema_step(ema, net, batch_size, images_seen, sigma_rel, gather=full_tensor)
        return
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


def nonfinite_status(term_ok, wrapper):
    """Everything the non-finite guard decides on, as device tensors and no host read: a bool
    vector ``ok`` — one entry per loss term of each micro-batch (``term_ok``, already stacked),
    then one per parameter with a gradient — and those parameters. A gradient's entry is the
    finiteness of its max-norm, one fused reduction per tensor: finite exactly when every entry
    is (NaN propagates through a maximum, and unlike the 2-norm it cannot overflow)."""
    params = [p for group in wrapper.optimizer.param_groups for p in group['params'] if p.grad is not None]
    parts = [term_ok.reshape(-1)]
    if params:
        norms = torch._foreach_norm([local_tensor(p.grad) for p in params], float('inf'))
        parts.append(torch.stack([n.to(torch.float32) for n in norms]).isfinite().to(term_ok.device))
    return torch.cat(parts), params


def nonfinite_problem(ok, term_names, params, terms, module, phase):
    """What was not finite in this update, read off the host copy ``ok`` (a list of bools from
    ``nonfinite_status``; ``term_names`` names its first entries) — the loss terms that were not
    finite, else the first parameter with a non-finite gradient of the loss (the sum of
    ``terms``) — or None."""
    bad_terms = sorted({name for name, good in zip(term_names, ok) if not good})
    if bad_terms:
        return f'non-finite {", ".join(bad_terms)}'
    bad = [i for i, good in enumerate(ok[len(term_names):len(term_names) + len(params)]) if not good]
    if bad:
        names = {p: name for name, p in unwrap(module).named_parameters()}
        return f'non-finite gradient of {" + ".join(terms)} in {phase}.{names.get(params[bad[0]], "?")}'
    return None


def global_ok_flag(ok):
    """1.0 where every process's ``ok`` is all true, else 0.0 (a float tensor [1] on this process's
    device): all-reduced, so every process skips or steps together (FSDP's gradient shards differ
    between processes). No host read."""
    device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
    flag = ok.all().to(device=device, dtype=torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.to(ok.device)


def supports_found_inf(wrapper):
    """Whether the wrapper's optimiser skips its own step on a device flag (``found_inf`` of
    torch's fused Adam/AdamW/SGD, the mechanism ``GradScaler`` uses), so the guard's decision can
    stay on the device."""
    opt = wrapper.optimizer
    return bool(getattr(opt, '_step_supports_amp_scaling', False)) and all(
        g.get('fused') for g in opt.param_groups)


NONFINITE_CHECKS = ('sync', 'deferred')


def _forget_images_seen_host(module, incompatible_keys):
    """After a state_dict load the host copy of ``images_seen`` is re-read once."""
    module._images_seen_host = None


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
    ``ema_sigma_rel``: instead, EDM2's power-function EMA of relative width σ_rel (e.g. 0.05;
    ``gdistill.distillers.phema``); give one of the two.
    ``sampler``: the default SAMPLERS config for ``sample``.
    ``student_dropout``: if given, the dropout rate of the students copied from the teacher
    (every sub-module with a float ``dropout`` attribute, e.g. EDM's UNet blocks); the frozen
    teacher runs in eval mode, so its own rate never matters. Needed because an EDM pickle
    (``teacher.path``) brings its training dropout (0.13 on CIFAR-10), not the distillation one.
    ``nonfinite_patience``: an update with a non-finite loss or gradient is skipped (weights and
    optimiser state untouched); this many skips in a row of one network stop the run.
    ``nonfinite_check``: ``'sync'`` reads the guard's flags (every loss term, every gradient) in
    one host read per update and decides there; ``'deferred'`` keeps the decision on the device
    (the optimiser must take torch's ``found_inf`` flag: ``fused=True`` Adam/AdamW/SGD), so a step
    reads nothing back: the flags are copied to the host asynchronously and recorded one step
    later on CUDA (at once on a CPU), the error naming the iteration it happened in. An update
    after the ``patience``-th skip in a row is skipped on the device too, so the weights at the
    error are those before the streak, as with ``'sync'``."""

    #: names of the trained sub-networks, each with an optimiser wrapper of the same name
    trained = ('generator',)

    def __init__(self, teacher, schedule=dict(type='EDMSchedule'), sampler=None,
                 ema_half_life_images=None, ema_rampup=None, student_dropout=None, nonfinite_patience=10,
                 nonfinite_check='sync',
                 ema_sigma_rel=None,
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
        if ema_sigma_rel is not None:
            if ema_half_life_images is not None:
                raise ValueError('give one EMA: ema_half_life_images (traditional) or ema_sigma_rel '
                                 f'(power function), not both; got {ema_half_life_images} and {ema_sigma_rel}')
            _check_sigma_rel(ema_sigma_rel, f'{type(self).__name__}: ema_sigma_rel')
        self.ema_sigma_rel = ema_sigma_rel
        if student_dropout is not None and not 0 <= student_dropout < 1:
            raise ValueError(f'student_dropout must be in [0, 1), got {student_dropout}')
        self.student_dropout = student_dropout
        self.register_buffer('images_seen', torch.zeros((), dtype=torch.float64))
        self.nonfinite_guard = NonFiniteGuard(nonfinite_patience)
        if nonfinite_check not in NONFINITE_CHECKS:
            raise ValueError(f'nonfinite_check is one of {NONFINITE_CHECKS}, got {nonfinite_check!r}')
        self.nonfinite_check = nonfinite_check
        self._nonfinite_pending, self._nonfinite_streak = [], {}
        self._images_seen_host = None   # float(images_seen) kept on the host (no read per step)
        self.register_load_state_dict_post_hook(_forget_images_seen_host)
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
        if self.ema_half_life_images is None and self.ema_sigma_rel is None:
            self.generator_ema = None
            return
        self.generator_ema = copy.deepcopy(unwrap(self.generator)).requires_grad_(False).eval()

    @torch.no_grad()
    def update_ema(self, batch_size):
        if self._images_seen_host is None:    # after construction or a load: one read
            self._images_seen_host = float(self.images_seen)
        self.images_seen += batch_size
        self._images_seen_host += batch_size    # the same float64 sum, on the host
        if self.generator_ema is not None:
            ema_step(self.generator_ema, unwrap(self.generator), batch_size, self.ema_half_life_images,
                     self._images_seen_host, self.ema_rampup, self.ema_sigma_rel)

    def train(self, mode=True):
        super().train(mode)
        if getattr(self, 'generator_ema', None) is not None:
            self.generator_ema.eval()
        return self

    # --- calling networks in the schedule's variables ------------------------------------
    def denoise(self, net, x, t, labels=None, cond_t=None, **model_kwargs):
        """E[x₀ | x_t] from an EDM-form network D(x; σ) (x_t / a(t) at σ_e(t)); ``model_kwargs``
        (e.g. EDM's ``augment_labels``) go to the network."""
        s = self.schedule
        xe = x / append_dims(s.alpha(t), x.ndim).to(x.dtype)
        kw = {} if cond_t is None else dict(cond_sigma=s.edm_sigma(cond_t).to(x.dtype))
        return net(xe, s.edm_sigma(t).to(x.dtype), labels, **kw, **model_kwargs)

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
        # deferred guard: record what the host already has (on CUDA the flags of earlier steps,
        # whose copies are done by now; on a CPU all of them)
        self.resolve_nonfinite(wait_all=self.device_.type == 'cpu')
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
        logs, terms, term_names, term_ok = {}, [], [], []
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
            term_names += terms     # finiteness stays on the device until the one read below
            term_ok += [torch.isfinite(part_logs[name]).all() for name in terms]
            wrapper.backward(loss / k)  # backward even when non-finite: DDP's collectives must match
            for name, value in part_logs.items():
                logs[name] = logs.get(name, 0) + value.detach() / k
        self.micro_batch = (0, 1)
        device = loss.device
        ok, params = nonfinite_status(torch.stack(term_ok) if term_ok else torch.ones(0, dtype=torch.bool, device=device),
                                      wrapper)
        flag = global_ok_flag(ok) if distributed() else None
        if self.nonfinite_check == 'deferred':
            self._deferred_update(phase, wrapper, ok, flag, (term_names, params, terms, module))
        else:
            # the one host read of this update: every flag at once
            host = torch.cat([ok.to(torch.float32), flag]) if flag is not None else ok
            host = [bool(v) for v in host.tolist()]
            problem = nonfinite_problem(host, term_names, params, terms, module, phase)
            if problem is None and flag is not None and not host[-1]:
                problem = 'a non-finite loss or gradient on another process'
            if problem is None:
                wrapper.step()
            wrapper.zero_grad()
            self.nonfinite_guard.record(phase, problem, self.current_iteration())
        logs.pop('loss', None)
        return logs

    def _deferred_update(self, phase, wrapper, ok, flag, names):
        """``nonfinite_check='deferred'``: step or skip on the device, copy the flags to the host
        without waiting (read by ``resolve_nonfinite``)."""
        if not supports_found_inf(wrapper):
            raise ValueError(f"nonfinite_check='deferred' decides on the device, through the optimiser's "
                             f'found_inf flag, which only fused optimisers take; the {phase} optimiser is '
                             f'{type(wrapper.optimizer).__name__} without fused=True (give it fused=True, '
                             "or use nonfinite_check='sync')")
        good = ok.all() if flag is None else ok.all() & (flag[0] > 0)
        streak = self._nonfinite_streak.get(phase)
        if streak is None:      # start from the host's count (a resumed run)
            streak = torch.tensor(self.nonfinite_guard.in_a_row.get(phase, (0,))[0], device=ok.device)
        step_ok = good & (streak < self.nonfinite_guard.patience)   # no step once the run must stop
        self._nonfinite_streak[phase] = torch.where(good, torch.zeros_like(streak), streak + 1)
        if hasattr(wrapper, 'loss_scaler'):
            # mmengine's AmpOptimWrapper: its GradScaler sets found_inf from the gradients itself,
            # so a skip is handed to it as non-finite gradients (x 1 leaves them exact otherwise)
            grads = [p.grad for g in wrapper.optimizer.param_groups for p in g['params'] if p.grad is not None]
            torch._foreach_mul_(grads, torch.where(step_ok, 1.0, float('nan')).to(ok.device))
            wrapper.step()
        else:
            wrapper.optimizer.found_inf = (~step_ok).to(torch.float32)
            try:
                wrapper.step()
            finally:
                del wrapper.optimizer.found_inf
        wrapper.zero_grad()
        vec = torch.cat([ok, good.reshape(1)])
        if vec.device.type == 'cuda':
            host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
            host.copy_(vec, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = vec, None
        self._nonfinite_pending.append(dict(phase=phase, iteration=self.current_iteration(), step=self.train_steps,
                                            host=host, event=event, names=names))

    def resolve_nonfinite(self, wait_all=True):
        """Record the deferred updates' flags in the guard, oldest first (it raises there when a
        network has been skipped ``patience`` times in a row). ``wait_all=False`` leaves the
        updates of the step just run (their copies may still be in flight)."""
        pending, self._nonfinite_pending = self._nonfinite_pending, []
        for i, item in enumerate(pending):
            if not wait_all and item['step'] == self.train_steps - 1:
                self._nonfinite_pending = pending[i:]
                return
            if item['event'] is not None:
                item['event'].synchronize()
            host = [bool(v) for v in item['host'].numpy()]   # a host tensor: nothing is read back here
            term_names, params, terms, module = item['names']
            problem = nonfinite_problem(host[:-1], term_names, params, terms, module, item['phase'])
            if problem is None and not host[-1]:
                problem = 'a non-finite loss or gradient on another process'
            self._nonfinite_pending = pending[i + 1:]
            self.nonfinite_guard.record(item['phase'], problem, item['iteration'])
        self._nonfinite_pending = []

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
        self.resolve_nonfinite()
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
