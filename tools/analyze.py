"""Parameters and FLOPs of every network a config's model calls, counted on the calls it makes.

    python tools/analyze.py CONFIG [--batch N] [--cfg-options k=v ...] [--json OUT]

The model is built from CONFIG (random weights), one batch of N items is drawn from the config's
training dataset, and the model's losses are computed once (``model(batch, mode='loss')``, every
phase of a training step, no update) while ``NetworkCallRecorder`` records each call of a network
(the outermost module with parameters: the teacher, the generator, f_ψ, ...) with its inputs.
Each recorded call is then counted by fvcore's ``FlopCountAnalysis`` on those same inputs. The
losses are then backpropagated once, which marks the calls a gradient goes through. The
table gives per network: parameters (trainable / frozen), calls per step, forward GFLOPs per
sample of one call, and the forward GFLOPs per sample of a whole step (backward passes, about
twice a forward, are not counted). fvcore counts one multiply-add as one FLOP; attention
(``scaled_dot_product_attention``, also inside gdistill's ``SoftmaxAttention`` function) is
counted here as the two matrix products q·kᵀ and P·v, which fvcore skips by itself.

``NetworkCallRecorder`` is also what ``benchmarks/train_throughput.py`` replays as its bare loop.
"""
import argparse
import json
import os.path as osp
import sys
import time
from collections import Counter, OrderedDict

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402


# --- recording the network calls of a step --------------------------------------------------------
def _functorch_level_tensor(t):
    return torch.is_tensor(t) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def _plain(t):
    """The plain value of a (possibly functorch-wrapped or dual) tensor, detached."""
    while _functorch_level_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    primal = torch.autograd.forward_ad.unpack_dual(t).primal if t.layout == torch.strided else t
    with torch._C._DisableFuncTorch():   # inside a transform, a copy would be wrapped again
        return primal.detach().clone()


def _has_tangent(t):
    if _functorch_level_tensor(t):
        return True
    return t.layout == torch.strided and torch.autograd.forward_ad.unpack_dual(t).tangent is not None


class NetworkCall:
    """One recorded call: the module, copies of its inputs, and how it ran — under grad or not,
    which inputs required grad, which parameters were trainable, whether a forward-mode
    derivative (JVP) went through it, and whether a gradient came back through its output."""

    def __init__(self, name, module, args, kwargs):
        self.name, self.module = name, module
        self.grad_enabled = torch.is_grad_enabled()
        flat, _ = tree_flatten((args, kwargs))
        self.jvp = any(_has_tangent(t) for t in flat if torch.is_tensor(t))
        self.tangent_mask = tree_map(lambda t: _has_tangent(t) if torch.is_tensor(t) else False, (args, kwargs))
        self.inputs_grad = tree_map(lambda t: bool(t.requires_grad) if torch.is_tensor(t) else False, (args, kwargs))
        self.inputs = tree_map(lambda t: _plain(t) if torch.is_tensor(t) else t, (args, kwargs))
        self.param_flags = [p.requires_grad for p in module.parameters()]
        self.grad_outputs = set()      # outputs a gradient reached (set by hooks on them) ...
        self.double_outputs = set()    # ... and those it reached with create_graph (R1 penalties)
        self.output_shapes = []

    @property
    def backward(self):
        return bool(self.grad_outputs)

    def batch_size(self):
        flat, _ = tree_flatten(self.inputs)
        tensors = [t for t in flat if torch.is_tensor(t) and t.ndim]
        return int(tensors[0].shape[0]) if tensors else 1

    def __repr__(self):
        kind = 'jvp' if self.jvp else ('fwd+bwd' if self.backward else ('fwd(grad)' if self.grad_enabled else 'fwd'))
        return f'NetworkCall({self.name}, {kind}, batch {self.batch_size()})'


class NetworkCallRecorder:
    """Records every call of a network inside ``model`` — the outermost called sub-module that owns
    parameters, so a network's own layers are not counted again — while the context is open::

        with NetworkCallRecorder(model) as rec:
            model.train_step(data, optim_wrapper)
        rec.calls    # [NetworkCall, ...] in call order
    """

    def __init__(self, model):
        self.model = model
        self.names = {m: n or type(model).__name__ for n, m in model.named_modules()}
        self.calls, self._stack, self._handles = [], [], []

    def __enter__(self):
        for module in self.names:
            if module is self.model:
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, module, args, kwargs):
        inside = any(entry is not None for entry in self._stack)
        owns = next(module.parameters(), None) is not None
        if inside or not owns:
            self._stack.append(None)
            return
        call = NetworkCall(self.names[module], module, args, kwargs)
        self.calls.append(call)
        self._stack.append(call)

    def _post(self, module, args, kwargs, output):
        call = self._stack.pop()
        if call is None:
            return
        flat, _ = tree_flatten(output)
        tensors = [t for t in flat if torch.is_tensor(t)]
        call.output_shapes = [tuple(t.shape) for t in tensors]
        for i, t in enumerate(tensors):
            if t.requires_grad and not call.jvp:
                def mark(grad, call=call, i=i):
                    call.grad_outputs.add(i)
                    if torch.is_grad_enabled():   # autograd runs create_graph backwards under grad mode
                        call.double_outputs.add(i)
                t.register_hook(mark)


# --- FLOPs --------------------------------------------------------------------------------------
def _attention_flops(inputs, outputs):
    """q·kᵀ and P·v of attention on [..., L, C] q, k, v: L·S·(C + C_v) multiply-adds per batch
    entry (the softmax is not counted, as fvcore counts no elementwise work)."""
    from fvcore.nn.jit_handles import get_shape
    shapes = [get_shape(v) for v in inputs[:3]]
    if len(shapes) < 3 or any(s is None or len(s) < 2 for s in shapes):
        return Counter()
    (q, k, v) = shapes
    batch = 1
    for d in q[:-2]:
        batch *= d
    return Counter({'attention': batch * q[-2] * k[-2] * (q[-1] + v[-1])})


class _Call(torch.nn.Module):
    """Positional-only wrapper so fvcore's tracer can pass keyword inputs."""

    def __init__(self, module, kwargs, keys):
        super().__init__()
        self.module, self.kwargs, self.keys = module, kwargs, keys

    def forward(self, *tensors):
        n = len(tensors) - len(self.keys)
        kw = dict(self.kwargs, **dict(zip(self.keys, tensors[n:])))
        out = self.module(*tensors[:n], **kw)
        flat, _ = tree_flatten(out)
        return tuple(t for t in flat if torch.is_tensor(t))


def call_flops(call):
    """fvcore's forward FLOPs of one recorded call on its recorded inputs (eval mode, no grad)."""
    import logging

    from fvcore.nn import FlopCountAnalysis
    args, kwargs = call.inputs
    keys = [k for k, v in kwargs.items() if torch.is_tensor(v)]
    const = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
    if not all(torch.is_tensor(a) or a is None for a in args):
        raise TypeError(f'{call.name}: non-tensor positional inputs are not supported by the FLOP counter')
    while args and args[-1] is None:
        args = args[:-1]
    if any(a is None for a in args):
        raise TypeError(f'{call.name}: a None positional input before a tensor one')
    wrapper = _Call(call.module, const, keys)
    was_training = call.module.training
    call.module.eval()
    try:
        with torch.no_grad():
            counter = FlopCountAnalysis(wrapper, tuple(args) + tuple(kwargs[k] for k in keys))
            counter.set_op_handle('aten::scaled_dot_product_attention', _attention_flops)
            # fvcore names a custom autograd.Function in the trace after its class
            counter.set_op_handle('prim::PythonOp.SoftmaxAttention', _attention_flops)
            counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
            logging.getLogger('fvcore').setLevel(logging.ERROR)
            return int(counter.total())
    finally:
        call.module.train(was_training)


# --- the tool -----------------------------------------------------------------------------------
def first_batch(cfg, n):
    """n items of the config's training dataset, collated as its loader would."""
    from mmengine.dataset import pseudo_collate

    from gdistill.registry import DATASETS
    try:
        dataset = DATASETS.build(cfg.train_dataloader.dataset)
    except Exception as err:
        raise RuntimeError(f'analyze needs one batch of the config\'s training data, and building '
                           f'{cfg.train_dataloader.dataset.get("type")} failed: {err}. Point it at data with '
                           '--cfg-options train_dataloader.dataset.path=...') from err
    if len(dataset) < n:
        raise ValueError(f'the training dataset has {len(dataset)} items, fewer than --batch {n}')
    return pseudo_collate([dataset[i] for i in range(n)])


def analyze(cfg, batch=2, seed=0):
    """Rows per network: name, type, trainable and frozen parameters, calls per step, forward
    FLOPs per sample of one call (the first) and of all its calls in a step."""
    from mmengine.registry import DefaultScope

    from gdistill.registry import MODELS
    DefaultScope.get_instance(f'gdistill_analyze_{time.time_ns()}', scope_name='gdistill')
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.train()
    data = first_batch(cfg, batch)
    with NetworkCallRecorder(model) as rec:
        losses = model(data, mode='loss')
        # one backward of every phase's loss, so the table shows which calls a gradient goes through
        total = sum(v.sum() for v in losses.values() if torch.is_tensor(v) and v.requires_grad)
        if torch.is_tensor(total):
            total.backward()
    if not rec.calls:
        raise RuntimeError(f'{type(model).__name__} called no network with parameters in its losses')
    per = OrderedDict()
    for call in rec.calls:
        entry = per.setdefault(call.name, dict(calls=[], module=call.module))
        entry['calls'].append(call)
    rows = []
    for name, entry in per.items():
        module = entry['module']
        params = list(module.parameters())
        flops = [call_flops(c) / c.batch_size() for c in entry['calls']]
        calls = entry['calls']
        rows.append(dict(
            network=name, type=type(module).__name__,
            trainable_params=sum(p.numel() for p in params if p.requires_grad),
            frozen_params=sum(p.numel() for p in params if not p.requires_grad),
            calls=len(calls), with_backward=sum(c.backward for c in calls), jvp=sum(c.jvp for c in calls),
            gflops_per_sample=flops[0] / 1e9, step_gflops_per_sample=sum(flops) / 1e9))
    # networks the model holds but did not call in a step (EMA copies): parameters only
    called = {id(e['module']) for e in per.values()}
    for name, module in model.named_children():
        if id(module) in called or next(module.parameters(), None) is None:
            continue
        if any(id(m) in called for m in module.modules()):   # e.g. a teacher whose network was called
            continue
        rows.append(dict(network=name, type=type(module).__name__,
                         trainable_params=sum(p.numel() for p in module.parameters() if p.requires_grad),
                         frozen_params=sum(p.numel() for p in module.parameters() if not p.requires_grad),
                         calls=0, with_backward=0, jvp=0, gflops_per_sample=None, step_gflops_per_sample=0.0))
    return rows


def format_rows(rows):
    head = ['network', 'type', 'params (trainable / frozen)', 'calls per step (backward, jvp)',
            'GFLOPs / sample / call', 'GFLOPs / sample / step']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        per_call = '—' if r['gflops_per_sample'] is None else f"{r['gflops_per_sample']:.4f}"
        lines.append(f"| {r['network']} | {r['type']} | {r['trainable_params']:,} / {r['frozen_params']:,} | "
                     f"{r['calls']} ({r['with_backward']}, {r['jvp']}) | {per_call} | "
                     f"{r['step_gflops_per_sample']:.4f} |")
    total = sum(r['step_gflops_per_sample'] for r in rows)
    lines.append(f'| **step, forward passes** | | | {sum(r["calls"] for r in rows)} | | {total:.4f} |')
    return '\n'.join(lines)


def main(argv=None):
    from mmengine.config import DictAction

    import gdistill.data  # noqa: F401  (registers everything a config may name)
    import gdistill.distillers  # noqa: F401
    import gdistill.engine  # noqa: F401
    import gdistill.metrics  # noqa: F401
    import gdistill.networks  # noqa: F401
    from train import load_config
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config')
    p.add_argument('--batch', type=int, default=2, help='items of the batch the calls are recorded on')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    p.add_argument('--json', help='also write the rows to this JSON file')
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f'--batch must be >= 1, got {args.batch}')
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(args.config, cfg_options=args.cfg_options)
    rows = analyze(cfg, args.batch)
    print(f'{args.config}: one training step\'s network calls (recorded on a batch of {args.batch})\n')
    print(format_rows(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == '__main__':
    main()
