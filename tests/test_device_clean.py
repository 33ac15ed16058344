"""Device cleanliness on the CPU: no gdistill code creates a tensor without a device during a
training step or a sampler call of any image method (such a tensor lands on the CPU while a
GPU run's data is on the GPU), and every model builds with a non-CPU default device (a
generator or buffer pinned to the CPU fails there). See tests/device_check.py."""
import pytest
import torch

from device_check import METHODS, FactoryGuard, batch, build_method, method_config, optim_wrappers
from gdistill.registry import MODELS
from gdistill.samplers import EDM2Sampler, EDMHeunSampler, EulerSampler


def test_guard_catches_a_generator_on_another_device():
    """The CPU generator of the old sCD log-variance head under a non-CPU default device (on a
    GPU: "Expected a 'cuda' device type for generator but found 'cpu'"; meta itself ignores the
    generator, so the guard checks it)."""
    from gdistill.networks import trigflow
    src = trigflow.LogVarianceHead.__init__

    def old_init(self, channels=128, seed=0):
        torch.nn.Module.__init__(self)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer('freqs', torch.randn(channels // 2, generator=g))
    old_init.__code__ = old_init.__code__.replace(co_filename=src.__code__.co_filename)
    for init, bad in ((old_init, True), (src, False)):
        guard = FactoryGuard(missing_device=False)
        with torch.device('meta'), guard:
            init(trigflow.LogVarianceHead.__new__(trigflow.LogVarianceHead), 8)
        assert bool(guard.calls) == bad, guard.calls
        assert not bad or 'a cpu generator for a meta tensor' in guard.calls[0]


def test_guard_catches_a_factory_call_without_device():
    """The guard itself: a gdistill function that calls torch.tensor without a device is
    caught with its file and line; the same call with the data's device is not."""
    from gdistill.schedules.edm import EDMSchedule
    guard = FactoryGuard()
    with guard:
        EDMSchedule().alpha(0.5)          # torch.as_tensor(0.5): no device
    assert guard.calls and 'gdistill/schedules/edm.py' in guard.calls[0], guard.calls
    guard = FactoryGuard()
    with guard:
        EDMSchedule().alpha(torch.tensor([0.5]))   # a tensor keeps its device
        torch.zeros(3)                             # made here, not by gdistill
    assert not guard.calls, guard.report()


@pytest.mark.parametrize('name', sorted(METHODS))
def test_train_step_and_sampler_create_no_tensor_without_device(name):
    torch.manual_seed(0)
    model, cfg, ow = build_method(name)
    wrappers = optim_wrappers(model, ow)
    guard = FactoryGuard()
    with guard:
        out = model.train_step(batch(name), wrappers)
        samples = model.sample(torch.randn(2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert not guard.calls, guard.report()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values()), out
    assert samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all()


def test_teacher_samplers_create_no_tensor_without_device():
    model, _, _ = build_method('cosim')
    noise = torch.randn(2, 3, 8, 8)
    guard = FactoryGuard()
    with guard, torch.no_grad():
        for sampler in (EDMHeunSampler(3), EDMHeunSampler(3, S_churn=5.0), EulerSampler(3),
                        EDM2Sampler(3), EDM2Sampler(3, guidance=1.4, guide=model.teacher)):
            x = sampler(model.teacher, noise, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(x).all()
    assert not guard.calls, guard.report()


@pytest.mark.parametrize('name', sorted(METHODS))
def test_model_builds_under_a_non_cpu_default_device(name):
    """Under ``with torch.device('meta')`` every parameter and buffer must follow the default
    device: a CPU generator (``torch.randn(..., generator=torch.Generator())``) or a tensor
    pinned with ``device='cpu'`` fails or stays behind — what happens under
    ``with torch.device('cuda')``."""
    cfg = method_config(name)
    guard = FactoryGuard(missing_device=False)   # in a constructor the default device is right
    with torch.device('meta'), guard:
        model = MODELS.build(cfg.model)
    assert not guard.calls, guard.report()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device.type != 'meta']
    assert not left, f'{name}: built outside the default device: {left[:5]}'
