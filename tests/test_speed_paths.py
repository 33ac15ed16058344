"""The fast paths of a training step keep its results: the written-out forward-mode derivatives
of the EDM layers (two convolutions per convolution under a JVP), whole-network bfloat16 and
channels-last, SiD's ψ-stage without the teacher's forward pass, and the non-finite guard with
one host read per update (or none, deferred on the device)."""
import collections
import contextlib
import os.path as osp
import sys

import pytest
import torch
from mmengine.logging import MessageHub
from torch.utils._python_dispatch import TorchDispatchMode

import gdistill.data  # noqa: F401
import gdistill.distillers  # noqa: F401
import gdistill.engine  # noqa: F401
import gdistill.networks  # noqa: F401
from gdistill.distillers.base import NonFiniteError
from gdistill.distillers.consistency import tangent_terms
from gdistill.engine.optim import MultiOptimWrapperConstructor
from gdistill.networks.edm import EDMPrecond, TwoTimePrecond
from gdistill.networks.edm import layers as L
from gdistill.networks.trigflow import TrigFlowStudent
from gdistill.registry import DIVERGENCES, MODELS, build

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
from train import load_config  # noqa: E402

ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[8], dropout=0.0),
    'ncsnpp': dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[8], dropout=0.0, embedding_type='fourier', encoder_type='residual',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    'adm': dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], dropout=0.0),
}


def net(arch, label_dim=0, seed=0, **kw):
    torch.manual_seed(seed)
    m = EDMPrecond(16, 3, label_dim=label_dim, **ARCHS[arch], **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():           # no zero-initialised layer may hide a difference
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.eval()


builtin_forward_ad = L.builtin_forward_ad


class OpLog(TorchDispatchMode):
    """Counts aten ops by name, and records (op, dtype of the first tensor argument) of those on
    images or attention tokens (3-D and 4-D tensors; the embeddings are 2-D)."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.count[name] += 1
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and first.ndim >= 3:
            self.dtypes.add((name, first.dtype))
        return func(*args, **(kwargs or {}))


# --- forward-mode derivatives -------------------------------------------------------------------
@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_written_out_jvp_equals_torch_rules_in_float64(arch):
    """On the raw UNet in float64 (the preconditioner runs F in float32): tangents in the input
    and in every weight equal torch's built-in forward-mode rules to float64 rounding."""
    unet = net(arch).model.double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    c_noise = torch.tensor([0.3, -1.1], dtype=torch.float64)
    params = dict(unet.named_parameters())
    g = torch.Generator().manual_seed(1)
    dparams = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    dx = torch.randn(x.shape, generator=g, dtype=x.dtype)

    def f_x(x):
        return unet(x, c_noise)

    def f_p(p):
        return torch.func.functional_call(unet, p, (x, c_noise))

    out, tangent = torch.func.jvp(f_x, (x,), (dx,))
    _, tangent_p = torch.func.jvp(f_p, (params,), (dparams,))
    with builtin_forward_ad():
        ref_out, ref = torch.func.jvp(f_x, (x,), (dx,))
        _, ref_p = torch.func.jvp(f_p, (params,), (dparams,))
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(tangent, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tangent_p, ref_p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_jvp_runs_two_convolutions_per_convolution(arch):
    """torch's rule runs a third convolution per layer, with a zero tangent for the weight; the
    written-out one runs the primal and conv(ẋ, W) only, and no GroupNorm decomposition."""
    m = net(arch)
    x, sigma, dx = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.randn(2, 3, 16, 16)
    counts = {}
    for name, ctx, fn in [('forward', torch.no_grad(), lambda: m(x, sigma)),
                          ('jvp', torch.no_grad(), lambda: torch.func.jvp(lambda x: m(x, sigma), (x,), (dx,))),
                          ('builtin', builtin_forward_ad(), lambda: torch.func.jvp(lambda x: m(x, sigma), (x,), (dx,)))]:
        with ctx, OpLog() as log:
            fn()
        counts[name] = log.count
    convs = counts['forward']['convolution']
    assert convs > 10
    assert counts['jvp']['convolution'] == 2 * convs
    assert counts['builtin']['convolution'] == 3 * convs
    assert counts['jvp']['mul'] < counts['builtin']['mul']


def test_backward_through_the_written_out_layers_is_torch_backward():
    """A backward pass taken inside a forward-AD region (the layers switch to their Functions
    there) gives torch's gradients."""
    import torch.autograd.forward_ad as fwAD
    m = net('ncsnpp').model.double().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    c = torch.tensor([0.1, 0.9], dtype=torch.float64)
    ref = torch.autograd.grad(m(x, c).square().sum(), list(m.parameters()))
    with fwAD.dual_level():
        assert L.forward_ad_active()
        got = torch.autograd.grad(m(x, c).square().sum(), list(m.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_scd_step_with_written_out_jvp_equals_builtin():
    """One sCD tangent (F⁻ and its time derivative) on the student: equal to float32 rounding."""
    student = TrigFlowStudent(net('adm', label_dim=4), sigma_data=0.5).train()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.2, 0.8, 1.3])
    dxdt = torch.randn_like(x)
    labels = torch.eye(4)[:3]
    F1, term1 = tangent_terms(student, x, t, dxdt, 0.5, labels, seed=3)
    with builtin_forward_ad():
        F0, term0 = tangent_terms(student, x, t, dxdt, 0.5, labels, seed=3)
    torch.testing.assert_close(F1, F0, rtol=0, atol=0)
    torch.testing.assert_close(term1, term0, rtol=1e-5, atol=1e-5 * float(term0.abs().max()))


# --- bf16 end to end, channels-last ---------------------------------------------------------------
def _backbone_dtypes(m, *args, ctx=contextlib.nullcontext()):
    """D's output and the (op, dtype) pairs of F's convolutions, GroupNorms, SiLUs on images
    and of the attention's inputs (what reaches ``scaled_dot_product_attention``; how a CPU
    kernel computes inside it is the kernel's affair)."""
    seen = set()
    real = L.SoftmaxAttention.apply

    def apply(q, k, v):
        seen.add(('attention', q.dtype))
        return real(q, k, v)
    L.SoftmaxAttention.apply = apply
    try:
        with ctx, torch.no_grad(), OpLog() as log:
            out = m(*args)
    finally:
        L.SoftmaxAttention.apply = real
    return out, seen | {(op, d) for op, d in log.dtypes if op in ('convolution', 'native_group_norm', 'silu')}


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_bf16_network_stays_bf16_through_groupnorm_silu_attention(arch):
    m = net(arch, use_bf16=True)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    out, seen = _backbone_dtypes(m, x, sigma)
    ops = {op for op, _ in seen}
    assert {'convolution', 'native_group_norm', 'silu'} <= ops
    assert 'attention' in ops
    assert {d for _, d in seen} == {torch.bfloat16}, seen        # no float32 round trip on images
    assert out.dtype == torch.float32                            # D itself is float32, as EDM's
    # under a bf16 autocast region the default ('cast') runs F the same way; 'ops' is torch's
    # per-op autocast, which takes GroupNorm back to float32
    m32 = net(arch)
    auto = torch.autocast('cpu', dtype=torch.bfloat16)
    out_cast, seen_cast = _backbone_dtypes(m32, x, sigma, ctx=auto)
    assert {d for _, d in seen_cast} == {torch.bfloat16}
    torch.testing.assert_close(out_cast, out, rtol=0, atol=0)
    m32.autocast_mode = 'ops'
    _, seen_ops = _backbone_dtypes(m32, x, sigma, ctx=torch.autocast('cpu', dtype=torch.bfloat16))
    assert ('native_group_norm', torch.float32) in seen_ops


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_bf16_output_and_tangent_within_tolerance_of_fp32(arch):
    """Stated tolerance: relative L2 error ≤ 3 % for D and ≤ 5 % for its JVP (bf16 has 8
    mantissa bits, 2⁻⁸ ≈ 0.4 % per rounding)."""
    m32, m16 = net(arch), net(arch, use_bf16=True)
    x, sigma, dx = torch.randn(4, 3, 16, 16), torch.tensor([0.05, 0.5, 2.0, 20.0]), torch.randn(4, 3, 16, 16)
    (o32, t32), (o16, t16) = (torch.func.jvp(lambda x: m(x, sigma), (x,), (dx,)) for m in (m32, m16))
    assert o16.dtype == t16.dtype == torch.float32
    assert float((o16 - o32).norm() / o32.norm()) < 0.03
    assert float((t16 - t32).norm() / t32.norm()) < 0.05
    assert float((o16 - o32).norm() / o32.norm()) > 1e-4      # it did run in bf16
    # force_fp32 switches bf16 off per call
    torch.testing.assert_close(m16(x, sigma, force_fp32=True), o32, rtol=0, atol=0)


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_channels_last_same_values_same_state_dict(arch):
    ref = net(arch, label_dim=3)
    cl = net(arch, label_dim=3, channels_last=True)
    assert list(cl.state_dict()) == list(ref.state_dict())
    for (k, a), b in zip(cl.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in cl.parameters())
    x, sigma, dx, lab = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 4.0]), torch.randn(2, 3, 16, 16), torch.eye(3)[:2]
    o1, t1 = torch.func.jvp(lambda x: ref(x, sigma, lab), (x,), (dx,))
    o2, t2 = torch.func.jvp(lambda x: cl(x, sigma, lab), (x,), (dx,))
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t2, t1, rtol=1e-4, atol=1e-4)
    ref.load_state_dict(cl.state_dict())            # a checkpoint goes both ways
    cl.set_channels_last(False)
    assert all(p.is_contiguous() for p in cl.parameters())


def test_two_time_network_follows_the_precision_options():
    base = net('adm', label_dim=3)
    two = TwoTimePrecond(base)
    x, sigma, lab = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 4.0]), torch.eye(3)[:2]
    o32 = two(x, sigma, lab, cond_sigma=torch.tensor([1.0, 9.0]))
    _, seen = _backbone_dtypes(lambda *a: two(*a, cond_sigma=torch.tensor([1.0, 9.0])), x, sigma, lab,
                               ctx=torch.autocast('cpu', dtype=torch.bfloat16))
    assert {d for _, d in seen} == {torch.bfloat16}
    two.net.use_bf16 = True
    o16 = two(x, sigma, lab, cond_sigma=torch.tensor([1.0, 9.0]))
    assert float((o16 - o32).norm() / o32.norm()) < 0.03
    with pytest.raises(ValueError, match="autocast_mode is 'cast'"):
        net('adm', autocast_mode='fp8')


# --- the training step ------------------------------------------------------------------------------
def sid_toy(tmp_path, fused=None, **options):
    cfg_options = {'model.teacher.fit.cache_dir': str(tmp_path), 'model.teacher.network.hidden': 32,
                   'model.teacher.network.depth': 2, 'model.teacher.fit.iters': 20, **options}
    if fused is not None:           # the toy configs' Adam is fused already
        cfg_options.update({'optim_wrapper.generator.optimizer.fused': fused, 'optim_wrapper.aux.optimizer.fused': fused})
    cfg = load_config(osp.join(ROOT, 'configs', 'sid', 'toy2d.py'), cfg_options=cfg_options)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    ow = dict(cfg.optim_wrapper)
    ow.pop('constructor')
    return model, MultiOptimWrapperConstructor(ow)(model)


BATCH = dict(idx=list(range(64)))


class HostReads(TorchDispatchMode):
    """Counts what reads a tensor's value back to the host: ``aten._local_scalar_dense`` (behind
    .item(), bool(), int(), float()) and ``Tensor.tolist``."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.reads += 1
            return counter._tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_host_reads_per_step(tmp_path):
    """'sync': one read per update (the guard's flags, all at once; before, one per loss term
    and two for the gradients); 'deferred' with fused optimisers: none inside the step."""
    model, wrappers = sid_toy(tmp_path)     # fused Adam (the toy's): the optimiser reads nothing back
    model.train_step(BATCH, wrappers)
    with HostReads() as reads:
        model.train_step(BATCH, wrappers)
    assert reads.reads == len(model.phases()) == 2
    model, wrappers = sid_toy(tmp_path, fused=True, **{'model.nonfinite_check': 'deferred'})
    model.train_step(BATCH, wrappers)
    with HostReads() as reads:
        model.train_step(BATCH, wrappers)
    assert reads.reads == 0


def test_deferred_guard_decides_on_the_device_like_sync(tmp_path):
    runs = {}
    for mode in ('sync', 'deferred'):
        model, wrappers = sid_toy(tmp_path, fused=True, **{'model.nonfinite_check': mode, 'model.nonfinite_patience': 2})
        real = model.aux_losses
        poison = lambda n, labels, data: {k: v * float('nan') for k, v in real(n, labels, data).items()}  # noqa: E731
        model.train_step(BATCH, wrappers)
        aux_before = [p.detach().clone() for p in model.aux.parameters()]
        adam_before = {k: v.clone() for k, v in wrappers['aux'].optimizer.state_dict()['state'][0].items()}
        model.aux_losses = poison
        out = model.train_step(BATCH, wrappers)
        assert torch.isnan(out['loss_aux'])
        assert model.nonfinite_guard.skipped == 1 and model.nonfinite_guard.in_a_row['aux'][0] == 1
        assert all(torch.equal(a, b) for a, b in zip(model.aux.parameters(), aux_before))
        state = wrappers['aux'].optimizer.state_dict()['state'][0]
        assert all(torch.equal(state[k], v) for k, v in adam_before.items())   # step count and moments
        model.aux_losses = real
        model.train_step(BATCH, wrappers)
        assert 'aux' not in model.nonfinite_guard.in_a_row
        runs[mode] = [p.detach().clone() for p in list(model.aux.parameters()) + list(model.generator.parameters())]
        model.aux_losses = poison
        hub = MessageHub.get_current_instance()
        hub.update_info('iter', 10)
        model.train_step(BATCH, wrappers)
        hub.update_info('iter', 11)
        with pytest.raises(NonFiniteError, match='iteration 12: non-finite loss_aux. The aux update was skipped 2 times'):
            model.train_step(BATCH, wrappers)
        hub.update_info('iter', None)
    for a, b in zip(runs['sync'], runs['deferred']):
        assert torch.equal(a, b)


def test_deferred_guard_needs_a_fused_optimiser(tmp_path):
    model, wrappers = sid_toy(tmp_path, fused=False, **{'model.nonfinite_check': 'deferred'})
    with pytest.raises(ValueError, match='fused=True'):
        model.train_step(BATCH, wrappers)
    with pytest.raises(ValueError, match="nonfinite_check is one of"):
        sid_toy(tmp_path, **{'model.nonfinite_check': 'later'})


def test_images_seen_host_copy_follows_the_buffer(tmp_path):
    model, wrappers = sid_toy(tmp_path)
    model.train_step(BATCH, wrappers)
    state = model.state_dict()
    state['images_seen'] = torch.tensor(1000.0, dtype=torch.float64)
    model.load_state_dict(state)
    model.train_step(BATCH, wrappers)
    assert float(model.images_seen) == model._images_seen_host == 1064.0


def test_sid_aux_stage_skips_the_teacher_with_equal_loss_and_gradients(tmp_path, monkeypatch):
    """coef = ½: the ψ-loss is ½·w·‖x̂₀ − f_ψ‖², free of f_φ; skipping the teacher's forward pass
    leaves loss and gradients equal to float32 rounding (same random draws)."""
    model, _ = sid_toy(tmp_path)
    assert not model.divergence.aux_needs_teacher
    calls = []
    real_denoise = model.teacher.denoise
    model.teacher.denoise = lambda *a, **k: calls.append(1) or real_denoise(*a, **k)
    results = {}
    for skip in (True, False):
        if not skip:        # the path with the teacher's forward pass
            monkeypatch.setattr(type(model.divergence), 'aux_needs_teacher', property(lambda self: True))
        torch.manual_seed(5)
        calls.clear()
        model.aux.zero_grad()
        loss = model.aux_losses(64, None, {})['loss_aux']
        loss.backward()
        results[skip] = (loss.detach(), [p.grad.clone() for p in model.aux.parameters()], len(calls))
    monkeypatch.undo()
    assert results[True][2] == 0 and results[False][2] == 1
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    cosim = load_config(osp.join(ROOT, 'projects', 'cosim', 'toy2d.py'))
    assert build(DIVERGENCES, dict(cosim.model.divergence, type='GFIDivergence')).aux_needs_teacher   # coef = 1 needs f_φ


def test_bf16_sampling_option_runs_only_the_network_in_bf16():
    """``tools/sample.py``/``tools/eval.py --precision bf16``: the sampler's network calls run in
    bf16 (EDM networks wholly), its arithmetic and outputs stay float32, within 3 % of fp32."""
    from gdistill.networks.edm.precond import InPrecision, in_precision
    from gdistill.registry import SAMPLERS
    import gdistill.samplers  # noqa: F401
    m = net('adm', label_dim=3)
    assert in_precision(m, 'fp32', 'cpu') is m
    wrapped = in_precision(m, 'bf16', 'cpu')
    assert isinstance(wrapped, InPrecision) and wrapped.sigma_min == m.sigma_min
    sampler = build(SAMPLERS, dict(type='MultistepSampler', num_steps=2))
    noise, labels = torch.randn(4, 3, 16, 16), torch.eye(3)[[0, 1, 2, 0]]
    ref = sampler(m, noise, labels, generator=torch.Generator().manual_seed(0))
    _, seen = _backbone_dtypes(lambda *a: wrapped(*a), noise, torch.full((4,), 2.0), labels)
    assert {d for _, d in seen} == {torch.bfloat16}
    out = sampler(wrapped, noise, labels, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
    assert 1e-4 < float((out - ref).norm() / ref.norm()) < 0.03
    with pytest.raises(ValueError, match='precision is one of'):
        in_precision(m, 'fp16', 'cpu')
