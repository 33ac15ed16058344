"""tools/analyze.py (network-call recording, FLOPs) and the benchmarks' bare replay
(benchmarks/common.py): recorded calls match what the method does, FLOPs match closed forms, the
replay repeats exactly the recorded network work, peak memory sees an allocation."""
import os.path as osp
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
import analyze  # noqa: E402
import common  # noqa: E402

TINY = osp.join(ROOT, 'tests', 'configs', 'toy_tiny.py')


def tiny_cfg(tmp_path, **options):
    from train import load_config
    return load_config(TINY, cfg_options={'model.teacher.fit.cache_dir': str(tmp_path / 'cache'), **options})


def mlp_macs(dim, hidden, depth, emb_dim=64, second_time=False):
    """Multiply-adds per sample of MLPDenoiser: time MLP, input, blocks, output layers."""
    macs = emb_dim * hidden + hidden * hidden + dim * hidden + depth * hidden * hidden + hidden * dim
    return macs + (emb_dim * hidden + hidden * hidden if second_time else 0)


def test_cosim_step_calls_and_flops(tmp_path):
    # toy_tiny: CoSIM with share_batch — one kernel draw for both updates
    rows = analyze.analyze(tiny_cfg(tmp_path), batch=4)
    by = {r['network']: r for r in rows}
    # G: once without grad for the mixing sample x_t, once with grad in the kernel pass
    assert (by['generator']['calls'], by['generator']['with_backward']) == (2, 1)
    # the teacher once, on x_s (which depends on G): a gradient goes through it to G
    assert (by['teacher.network']['calls'], by['teacher.network']['with_backward']) == (1, 1)
    # f_ψ: trained in its update, frozen but differentiated through x_s in G's update
    assert (by['aux']['calls'], by['aux']['with_backward']) == (2, 2)
    assert by['generator']['gflops_per_sample'] * 1e9 == mlp_macs(2, 32, 2)
    assert by['aux']['gflops_per_sample'] * 1e9 == mlp_macs(2, 32, 2, second_time=True)
    assert by['teacher.network']['frozen_params'] == by['generator']['trainable_params'] > 0
    # the EMA copy is listed with its parameters but no calls
    assert by['generator_ema']['calls'] == 0 and by['generator_ema']['frozen_params'] == by['generator']['trainable_params']
    total = 2 * mlp_macs(2, 32, 2) + mlp_macs(2, 32, 2) + 2 * mlp_macs(2, 32, 2, second_time=True)
    assert sum(r['step_gflops_per_sample'] for r in rows) * 1e9 == pytest.approx(total)


def test_without_shared_batch_the_teacher_and_generator_run_twice(tmp_path):
    rows = analyze.analyze(tiny_cfg(tmp_path, **{'model.share_batch': False}), batch=4)
    by = {r['network']: r for r in rows}
    # each update draws its own kernel sample: G 2 + 2 calls (one with grad), teacher twice
    assert (by['generator']['calls'], by['generator']['with_backward']) == (4, 1)
    assert (by['teacher.network']['calls'], by['teacher.network']['with_backward']) == (2, 1)


def test_attention_flops_are_counted():
    from gdistill.networks.edm.layers import attention

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, q, k, v):
            return attention(q * self.scale, k, v)
    n, c, length = 3, 8, 16
    q, k, v = (torch.randn(n, c, length) for _ in range(3))
    rec = analyze.NetworkCallRecorder(torch.nn.ModuleDict(dict(attn=Attn())))
    with rec:
        rec.model['attn'](q, k, v)
    # q·kᵀ and P·v: n·L·L·C multiply-adds each
    assert analyze.call_flops(rec.calls[0]) == 2 * n * length * length * c


def test_jvp_calls_are_recorded_with_plain_inputs():
    net = torch.nn.Linear(3, 2)
    holder = torch.nn.ModuleDict(dict(net=net))
    x, dx = torch.randn(5, 3), torch.randn(5, 3)
    with analyze.NetworkCallRecorder(holder) as rec:
        with torch.no_grad():
            torch.func.jvp(net, (x,), (dx,))
    (call,) = rec.calls
    assert call.jvp and not call.backward
    assert torch.equal(call.inputs[0][0], x) and not analyze._functorch_level_tensor(call.inputs[0][0])

    def step():
        with torch.no_grad():
            torch.func.jvp(net, (x,), (dx,))
    record_and_replay(holder, step)        # the replay runs it as a jvp again


def record_and_replay(model, step):
    with analyze.NetworkCallRecorder(model) as rec:
        step()
    bare = common.BareStep(rec.calls, [], [])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    with analyze.NetworkCallRecorder(model) as again:
        bare()
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}   # toggles undone
    summary = [(c.name, c.grad_enabled, c.jvp, sorted(c.grad_outputs), sorted(c.double_outputs)) for c in rec.calls]
    assert summary == [(c.name, c.grad_enabled, c.jvp, sorted(c.grad_outputs), sorted(c.double_outputs))
                       for c in again.calls]
    return rec.calls


def test_bare_replay_repeats_a_distillers_network_work(tmp_path):
    from mmengine.registry import DefaultScope

    from gdistill.registry import MODELS
    DefaultScope.get_instance('test_bare_replay', scope_name='gdistill')
    model = MODELS.build(tiny_cfg(tmp_path).model)
    data = dict(inputs=None, labels=None, batch_size=8)

    def step():  # both phases' losses and their backward, as train_step takes them
        n, labels = 8, None
        model.aux_losses(n, labels, data)['loss_aux'].backward()
        model.generator_losses(n, labels, data)['loss_generator'].backward()
    calls = record_and_replay(model, step)
    assert len(calls) == 5
    # the replay's backward passes reach the trained networks and never the frozen teacher
    assert all(p.grad is not None for p in model.generator.parameters())
    assert all(p.grad is not None for p in model.aux.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


def test_bare_replay_keeps_a_gradient_penalty():
    disc = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    holder = torch.nn.ModuleDict(dict(disc=disc))

    def step():   # an R1 penalty: the input-gradient enters the loss (create_graph)
        x = torch.randn(6, 4, requires_grad=True)
        out = disc(x)
        g, = torch.autograd.grad(out.sum(), x, create_graph=True)
        (out.mean() + g.pow(2).sum()).backward()
    calls = record_and_replay(holder, step)
    assert calls[0].double_outputs == {0} and calls[0].grad_outputs == {0}
    # the penalty's second-order path reaches the first layer's weights through tanh''
    assert disc[0].weight.grad is not None and disc[0].weight.grad.abs().sum() > 0


def test_optimizer_steps_are_counted_and_the_wrapper_restored():
    from mmengine.optim import OptimWrapper, OptimWrapperDict
    net = torch.nn.Linear(2, 1)
    wrapper = OptimWrapper(torch.optim.SGD(net.parameters(), lr=0.1))
    counts, restore = common.optimizer_steps(OptimWrapperDict(net=wrapper))
    net(torch.ones(1, 2)).sum().backward()
    wrapper.step()
    wrapper.update_params(net(torch.ones(1, 2)).sum())
    assert counts == {'net': 2}
    restore()
    assert 'step' not in vars(wrapper)


@pytest.mark.skipif(not osp.exists('/proc/self/clear_refs') or torch.cuda.is_available(), reason='Linux CPU only')
def test_peak_memory_sees_a_transient_allocation():
    common.fix_malloc()
    with common.PeakMemory() as small:
        torch.zeros(1000)
    with common.PeakMemory() as big:
        t = torch.ones(64 * 2 ** 20 // 4)   # 64 MiB, touched
        del t
    assert big.peak >= 60 * 2 ** 20 and small.peak < 16 * 2 ** 20
