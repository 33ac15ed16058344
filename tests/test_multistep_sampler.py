"""Tests of gdistill.samplers.multistep.MultistepSampler (CoSIM Algorithm 1 in EDM variables)."""
import pytest
import torch

from gdistill.samplers.multistep import MultistepSampler

F64 = torch.float64



def ramp(i, n, smin=0.002, smax=80.0, rho=7.0):
    """Point i of an n-point ρ-ramp from smax to smin (Karras et al. eq. 5)."""
    return (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


class Recorder:
    """A denoiser that records its calls; returns ``fn(x, sigma)``."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append((x.clone(), sigma.clone(), class_labels))
        return self.fn(x, sigma)


def gaussian_denoiser(mu, s):
    """E[x₀ | x] for x₀ ~ N(μ, s²), x = x₀ + σε: (s²x + σ²μ)/(s² + σ²)."""
    def D(x, sigma, class_labels=None):
        sig2 = sigma.to(x.dtype)[:, None] ** 2
        return (s ** 2 * x + sig2 * mu) / (s ** 2 + sig2)
    return D


@pytest.mark.parametrize('K', [1, 2, 4, 7])
def test_nfe_equals_num_steps_and_denoiser_calls(K):
    sampler = MultistepSampler(num_steps=K)
    assert sampler.nfe == K
    rec = Recorder(lambda x, sigma: 0.5 * x)
    out = sampler(rec, torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
                  generator=torch.Generator().manual_seed(1))
    assert len(rec.calls) == K
    assert out.shape == (3, 2) and out.dtype == torch.float32
    # the denoiser is called at the sampler's noise levels, one per sample, in order
    sig = sampler.sigmas()
    for (x, sigma, _), s in zip(rec.calls, sig.tolist()):
        assert sigma.shape == (3,) and sigma.dtype == torch.float32
        assert bool((sigma == torch.tensor(s, dtype=torch.float32)).all())


@pytest.mark.parametrize('K', [1, 2, 3, 5, 10])
@pytest.mark.parametrize('scale', [1.0, 1.5])
def test_sigmas_follow_the_rho_ramp(K, scale):
    sampler = MultistepSampler(num_steps=K, scale=scale)
    sig = sampler.sigmas()
    assert sig.dtype == F64 and sig.shape == (K,)
    assert float(sig[0]) == pytest.approx(80.0, rel=1e-13)
    for i in range(1, K):  # the K−1 interior points of a (K+1)-point ramp, scaled
        assert float(sig[i]) == pytest.approx(min(scale * ramp(i, K + 1), 80.0), rel=1e-12)
    assert bool((sig[1:] < sig[:-1]).all())
    if K > 1:  # σ_min itself is never a level: the last one is the ramp's second-to-last point
        assert float(sig[-1]) > 0.002 * scale


def test_scale_is_clamped_at_sigma_max():
    sig = MultistepSampler(num_steps=4, scale=10.0).sigmas()
    assert float(sig[0]) == 80.0
    assert float(sig[1]) == 80.0  # 10 × 17.4… > σ_max
    assert float(sig[3]) == pytest.approx(10 * ramp(3, 5), rel=1e-12)


def test_custom_ramp_parameters():
    sig = MultistepSampler(num_steps=3, sigma_min=0.01, sigma_max=2.5, rho=3.0).sigmas()
    assert sig.tolist() == pytest.approx([2.5, ramp(1, 4, 0.01, 2.5, 3.0), ramp(2, 4, 0.01, 2.5, 3.0)],
                                         rel=1e-12)


def test_explicit_sigmas_are_honoured():
    sampler = MultistepSampler(num_steps=9, sigmas=[5, 1.0, 0.25])
    assert sampler.num_steps == 3 and sampler.nfe == 3
    assert sampler.sigmas().tolist() == [5.0, 1.0, 0.25]
    rec = Recorder(lambda x, sigma: torch.zeros_like(x))
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    sampler(rec, z, generator=torch.Generator().manual_seed(0))
    assert [float(c[1][0]) for c in rec.calls] == [5.0, 1.0, 0.25]
    assert torch.equal(rec.calls[0][0], 5.0 * z)  # x = σ_0·z


@pytest.mark.parametrize('dtype', [F64, torch.float32])
def test_one_step_with_exact_gaussian_denoiser(dtype):
    mu, s = 1.3, 0.4
    D = gaussian_denoiser(mu, s)
    z = torch.randn(64, 1, generator=torch.Generator().manual_seed(3), dtype=dtype)
    out = MultistepSampler(num_steps=1)(D, z)
    smax = torch.full((64,), 80.0, dtype=dtype)
    assert torch.equal(out, D(80.0 * z, smax))
    # K = 1 is deterministic given the noise: the generator is never used
    out2 = MultistepSampler(num_steps=1)(D, z, generator=torch.Generator().manual_seed(99))
    assert torch.equal(out, out2)


def test_two_steps_follow_algorithm_1():
    """x₁ = D(σ₀z; σ₀) + σ₁ε, output D(x₁; σ₁), with ε the generator's next normal draw."""
    mu, s = -0.7, 0.9
    D = gaussian_denoiser(mu, s)
    sampler = MultistepSampler(num_steps=2)
    z = torch.randn(16, 1, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = sampler(D, z, generator=torch.Generator().manual_seed(5))
    s0, s1 = sampler.sigmas().tolist()
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    x1 = D(s0 * z, torch.full((16,), s0, dtype=F64)) + s1 * eps
    torch.testing.assert_close(out, D(x1, torch.full((16,), s1, dtype=F64)), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize('K', [1, 2, 5])
def test_constant_denoiser_gives_its_constant(K):
    mu = torch.tensor([[0.25, -1.5, 3.0]])
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(6))
    out = MultistepSampler(num_steps=K)(lambda x, sigma, labels: mu.expand_as(x), z,
                                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, mu.expand(5, 3))


def test_class_labels_reach_the_denoiser():
    rec = Recorder(lambda x, sigma: x)
    labels = torch.eye(3)[[0, 2]]
    MultistepSampler(num_steps=3)(rec, torch.zeros(2, 4), class_labels=labels,
                                  generator=torch.Generator().manual_seed(0))
    assert all(c[2] is labels for c in rec.calls)


@pytest.mark.parametrize('K', [2, 4])
def test_generator_reproducibility(K):
    D = gaussian_denoiser(0.0, 1.0)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    sampler = MultistepSampler(num_steps=K)
    a = sampler(D, z, generator=torch.Generator().manual_seed(1))
    b = sampler(D, z, generator=torch.Generator().manual_seed(1))
    c = sampler(D, z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize('kw,match', [
    (dict(num_steps=0), r'MultistepSampler: num_steps must be >= 1, got 0'),
    (dict(sigmas=[]), r'MultistepSampler: sigmas must be a non-empty list of positive noise levels, got \[\]'),
    (dict(sigmas=[1.0, -0.5]), r'sigmas must be a non-empty list of positive'),
    (dict(sigmas=[1.0, 0.0]), r'got \[1.0, 0.0\]'),
    (dict(sigma_min=1.0, sigma_max=1.0), r'need 0 < sigma_min < sigma_max, rho > 0, scale > 0; got 1.0, 1.0'),
    (dict(sigma_min=0.0), r'need 0 < sigma_min < sigma_max'),
    (dict(rho=0.0), r'rho > 0'),
    (dict(scale=0.0), r'scale > 0; got 0.002, 80.0, 7.0, 0.0'),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MultistepSampler(**kw)


def test_steps_override_keeps_listed_levels_honest():
    """A tool's --steps sets num_steps of a ρ-ramp sampler, but cannot change a sampler that
    lists its levels: the error names the levels and the way to give others."""
    from gdistill.samplers import config_with_steps
    ramp = dict(type='MultistepSampler', num_steps=4, scale=4.0)
    assert config_with_steps(ramp, 2) == dict(ramp, num_steps=2)
    assert config_with_steps(ramp, None) == ramp and config_with_steps(ramp, 2) is not ramp
    listed = dict(type='MultistepSampler', sigmas=[80.0, 70.0, 20.0, 0.4])
    assert MultistepSampler(**{k: v for k, v in config_with_steps(listed, 4).items() if k != 'type'}).nfe == 4
    with pytest.raises(ValueError, match=r"sigmas=\[80.0, 70.0, 20.0, 0.4\] \(4 steps\), so --steps 2 .*"
                                         r"--sampler \"dict\(type='MultistepSampler', sigmas=\[...\]\)\""):
        config_with_steps(listed, 2)
