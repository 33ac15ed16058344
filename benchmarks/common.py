"""What the benchmarks share: the method table, one benchmark network for every method, the
config changes that put a method's config on it, a bare replay of a step's network work, peak
memory, and medians of interleaved repetitions.

Every method runs on the same small image network: the digits teacher's EDMPrecond SongUNet
(configs/teachers/edm_digits.py: 8×8×1, 32 channels, 10 classes, ~0.31 M parameters) with random
weights (throughput does not depend on them) and dropout 0. A method is a config path plus
``--cfg-options``; add one by name in ``METHODS`` or on the command line as ``name=CONFIG``.
"""
import copy
import ctypes
import os
import os.path as osp
import re
import statistics
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.join(ROOT, 'tools'))

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402

# name -> (config, options). A method whose config does not exist (yet) is skipped with a note.
METHODS = {
    'cosim': ('projects/cosim/digits.py', {}),
    'sid': ('configs/sid/cifar10.py', {}),
    # 2 f_ψ-updates per layer update instead of the config's 20, so that a benchmark step stays
    # seconds long on a CPU; the overhead share of an iteration is what is compared
    'hsivi': ('configs/hsivi/cifar10.py', {'model.aux_steps': 2}),
    'scm': ('configs/scm/cifar10_scd.py', {}),
    # SIDDM has no teacher: the benchmark network is its generator; its discriminator is its own,
    # sized to the benchmark images
    'siddm': ('configs/siddm/cifar10.py', {'model.discriminator.img_resolution': 8,
                                           'model.discriminator.img_channels': 1,
                                           'model.discriminator.label_dim': 10,
                                           'model.discriminator.model_channels': 32,
                                           'model.discriminator.channel_mult': [1, 2]}),
    'edm': ('configs/teachers/edm_digits.py', {}),     # the DenoisingTrainer (teacher training)
}
NETWORK_CONFIG = 'configs/teachers/edm_digits.py'


def bench_network():
    """The benchmark network: the digits teacher's, with dropout 0."""
    net = copy.deepcopy(Config.fromfile(osp.join(ROOT, NETWORK_CONFIG)).network.to_dict())
    net['dropout'] = 0.0
    return net


def parse_methods(specs):
    """``['cosim', 'mine=configs/x.py']`` -> [(name, config path, options)]; unknown names fail
    with the known ones, configs that do not exist are returned in ``missing``."""
    chosen, missing = [], []
    for spec in specs:
        if '=' in spec:
            name, path = spec.split('=', 1)
            options = {}
        elif spec in METHODS:
            name, (path, options) = spec, METHODS[spec]
        else:
            raise KeyError(f'unknown method {spec!r}: known {sorted(METHODS)}, or give NAME=CONFIG')
        full = path if osp.isabs(path) else osp.join(ROOT, path)
        (chosen if osp.isfile(full) else missing).append((name, full, dict(options)))
    return chosen, missing


def bench_config(path, options, batch, work_dir, name='bench', network=None):
    """The method's config on the benchmark network: its teacher (or the network a
    ``DenoisingTrainer`` trains, or SIDDM's generator) replaced, the batch set (one micro-batch: no
    gradient accumulation), the data loaded in the main process — the index-only
    ``DistillationDataset`` for data-free distillers, the benchmark network's own images (the
    digits) for methods that read data — and no sample pictures, evaluation or checkpoints.
    Everything else — losses, optimisers, schedulers, EMA, logging — is the method's own."""
    from train import load_config
    cfg = load_config(path, work_dir=work_dir, cfg_options=options)
    net = network or bench_network()
    model = cfg.model
    if model.get('teacher') is not None:
        model.teacher = dict(type='EDMTeacher', network=net)
    elif model.get('network') is not None:          # a DenoisingTrainer
        model.network = net
    elif model.get('generator') is not None:        # a model trained from data alone (SIDDM)
        model.generator = net
    else:
        raise ValueError(f'{path}: no model.teacher, model.network or model.generator to put the benchmark '
                         'network in; give the method options that set its networks')
    data_free = cfg.train_dataloader.dataset.get('type') == 'DistillationDataset'
    dataset = dict(type='DistillationDataset', label_dim=net['label_dim']) if data_free else \
        Config.fromfile(osp.join(ROOT, NETWORK_CONFIG)).train_dataloader.dataset.to_dict()
    cfg.train_dataloader = dict(batch_size=batch, num_workers=0, persistent_workers=False,
                                sampler=dict(type='InfiniteSampler', shuffle=not data_free), dataset=dataset)
    for entry in cfg.optim_wrapper.values():
        if isinstance(entry, dict) and 'accumulative_counts' in entry:
            entry['accumulative_counts'] = 1
    cfg.custom_hooks = [dict(type='SpeedHook'), dict(type='ResumeStateHook')]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=10 ** 9, save_last=False)
    cfg.experiment_name = f'{name}_{time.time_ns()}'
    cfg.randomness = dict(seed=0, diff_rank_seed=True)
    cfg.pop('torch_threads', None)
    cfg.log_level = 'WARNING'   # the log is still kept and processed; only the console stays quiet
    return cfg


# --- the bare loop -------------------------------------------------------------------------------
class BareStep:
    """A step's network work in plain PyTorch, replayed from the calls ``NetworkCallRecorder``
    saw in one real step: each network called on the same inputs, under grad where it was, with
    the same trainable parameters; a backward pass through each output a gradient reached (and
    into the inputs that required one), through the input-gradient as well where the real step
    took it with ``create_graph`` (an R1 penalty); ``torch.func.jvp`` for calls under forward-mode AD; then
    each optimiser's step as many times as the real step took it (with the same gradient
    clipping), and the EMA as one fused lerp. What the real step does beyond this — data, time
    and noise draws, kernels, losses, checks, hooks, logging — is the framework overhead."""

    def __init__(self, calls, optimizers, ema_pairs):
        self.plan = []
        for c in calls:
            args, kwargs = c.inputs
            leaves = _leaves(c.inputs, c.inputs_grad)
            flip = [p for p, f in zip(c.module.parameters(), c.param_flags) if p.requires_grad != f]
            grads = {i: torch.randn(c.output_shapes[i], device=_device(c.module)) for i in sorted(c.grad_outputs)}
            self.plan.append((c, leaves, flip, grads))
        self.optimizers = optimizers          # [(optimizer, steps, clip kwargs or None)]
        self.ema_pairs = ema_pairs            # [(ema params, params)]

    def __call__(self):
        for call, (args, kwargs), flip, grads in self.plan:
            for p in flip:
                p.requires_grad_(not p.requires_grad)
            with torch.set_grad_enabled(call.grad_enabled):
                if call.jvp:
                    out = _jvp(call, args, kwargs)
                else:
                    out = call.module(*args, **kwargs)
                if grads:
                    outs = [t for t in _flat(out) if torch.is_tensor(t)]
                    ends, end_grads = [outs[i] for i in grads], list(grads.values())
                    if call.double_outputs:    # a gradient penalty: d(out)/d(input) kept in the graph
                        wrt = [t for t in _flat((args, kwargs)) if torch.is_tensor(t) and t.requires_grad]
                        dx = torch.autograd.grad([outs[i] for i in call.double_outputs],
                                                 wrt, [grads[i] for i in call.double_outputs], create_graph=True)
                        ends += list(dx)
                        end_grads += [torch.ones_like(d) for d in dx]
                    torch.autograd.backward(ends, end_grads)
            for p in flip:
                p.requires_grad_(not p.requires_grad)
            for t in _flat((args, kwargs)):
                if torch.is_tensor(t) and t.grad is not None:
                    t.grad = None
        for opt, steps, clip in self.optimizers:
            for _ in range(steps):
                if clip:
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g['params']
                                                    if p.grad is not None], **clip)
                opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for ema, params in self.ema_pairs:
                torch._foreach_lerp_(ema, params, 1e-3)


def _flat(tree):
    from torch.utils._pytree import tree_flatten
    return tree_flatten(tree)[0]


def _device(module):
    return next(module.parameters()).device


def _leaves(inputs, needs_grad):
    from torch.utils._pytree import tree_map
    args, kwargs = inputs
    flags_a, flags_k = needs_grad
    args = tuple(t.detach().requires_grad_(bool(f)) if torch.is_tensor(t) else t for t, f in zip(args, flags_a))
    kwargs = {k: (v.detach().requires_grad_(bool(flags_k[k])) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    return tree_map(lambda x: x, (args, kwargs))


def _jvp(call, args, kwargs):
    """The call as a forward-mode product: random tangents on the inputs that had one."""
    mask_a, mask_k = call.tangent_mask
    pos = [i for i, m in enumerate(mask_a) if m]
    keys = [k for k, m in mask_k.items() if m]
    primals = tuple(args[i] for i in pos) + tuple(kwargs[k] for k in keys)

    def f(*xs):
        a, kw = list(args), dict(kwargs)
        for i, x in zip(pos, xs[:len(pos)]):
            a[i] = x
        for k, x in zip(keys, xs[len(pos):]):
            kw[k] = x
        return call.module(*a, **kw)
    tangents = tuple(torch.randn_like(p) for p in primals)
    return torch.func.jvp(f, primals, tangents)


def optimizer_steps(optim_wrapper):
    """Counts each wrapper's optimiser steps while the returned ``restore`` is not called."""
    counts = {}
    patched = []
    for name, wrapper in optim_wrapper.items():
        counts[name] = 0
        original = wrapper.step

        def step(*a, _orig=original, _name=name, **kw):
            counts[_name] += 1
            return _orig(*a, **kw)
        wrapper.step = step
        patched.append(wrapper)

    def restore():
        for w in patched:
            del w.step       # back to the class's method
    return counts, restore


def ema_pairs(model):
    """(EMA parameters, parameters) of every ``<name>_ema`` copy of a sub-network ``<name>``."""
    from mmengine.model import is_model_wrapper
    pairs = []
    for name, module in model.named_children():
        if name.endswith('_ema') and module is not None and hasattr(model, name[:-4]):
            net = getattr(model, name[:-4])
            net = net.module if is_model_wrapper(net) else net
            pairs.append((list(module.parameters()), [p.detach() for p in net.parameters()]))
    return pairs


# --- memory --------------------------------------------------------------------------------------
def fix_malloc():
    """Make glibc return large blocks to the system when freed (a fixed mmap threshold; the
    default one grows and keeps freed blocks), so resident memory follows the tensors alive."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)   # M_TRIM_THRESHOLD
    except OSError:
        pass


class PeakMemory:
    """Peak memory of a block: on CUDA ``max_memory_allocated`` above the memory allocated at its
    start; on a Linux CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) above
    the resident set at its start. ``None`` where neither can be read."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()

    def __enter__(self):
        self.peak = None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self.start = _status('VmRSS')
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            self.peak = _status('VmHWM') - self.start


def _status(key):
    with open('/proc/self/status') as f:
        return int(re.search(key + r':\s+(\d+) kB', f.read()).group(1)) * 1024


# --- timing --------------------------------------------------------------------------------------
def now():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def median(xs):
    return statistics.median(xs) if xs else float('nan')


def spread(xs):
    """(25th, 75th) percentiles, to print beside a median."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float('nan'), float('nan'))
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def machine_note():
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'
    return (f'{dev}, {cores} cores visible, torch {torch.__version__}, {torch.get_num_threads()} torch '
            f'thread(s), load average {load:.1f} at the start')
