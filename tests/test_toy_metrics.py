"""Toy-mixture metrics (gdistill.metrics.toy): exact values on constructed sample sets,
agreement with naive reference computations, and separation of exact from degraded samplers."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdistill.data.toy_mixtures import GaussianMixture, chi_coverage, grid25, ring8, weighted_ring
from gdistill.metrics.toy import (ToyMixtureMetric, coverage_radius, default_bandwidth, mean_nll, mmd,
                                  mode_tv, near_mode_fraction, near_mode_tv, sliced_w2, toy_floor,
                                  toy_metrics)
from gdistill.registry import METRICS

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def naive_mmd2(x, y, h):
    """Unbiased MMD² from the full kernel matrices (small sets only)."""
    k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * h * h))
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * k(x, y).mean())


# --- sliced W2 -------------------------------------------------------------------------------------
def test_sw2_point_masses_1d_equal_and_unequal_counts():
    assert sliced_w2(torch.full((10,), 1.0), torch.full((10,), 3.5)) == pytest.approx(2.5, rel=1e-12)
    assert sliced_w2(torch.full((7, 1), -1.0), torch.full((3, 1), 2.0)) == pytest.approx(3.0, rel=1e-12)
    # two point masses in 2-D: SW2 = |c| · sqrt(mean (θ·u)²) ≈ |c|/√2
    x, y = torch.zeros(5, 2), torch.tensor([[3.0, 4.0]]).expand(5, 2)
    assert sliced_w2(x, y, num_projections=20000, generator=gen(0)) == pytest.approx(5 / math.sqrt(2), rel=0.01)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), m=st.integers(1, 9), seed=st.integers(0, 1000))
def test_sw2_1d_exact_for_unequal_counts(n, m, seed):
    """Against W2 of the lcm-replicated sets, which have equal counts and the same laws."""
    g = gen(seed)
    x = torch.randn(n, dtype=F64, generator=g)
    y = torch.randn(m, dtype=F64, generator=g) + 0.5
    L = math.lcm(n, m)
    xs = x.repeat(L // n).sort().values
    ys = y.repeat(L // m).sort().values
    want = float(((xs - ys) ** 2).mean().sqrt())
    assert sliced_w2(x, y) == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert sliced_w2(y, x) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_sw2_identity_translation_and_replication():
    x = ring8().sample(3000, generator=gen(0))
    assert sliced_w2(x, x, generator=gen(1)) == 0.0
    assert sliced_w2(x, torch.cat([x, x]), generator=gen(1)) < 1e-7   # same empirical law
    # a translation by c moves every projection by θ·c: SW2 = sqrt(mean_θ (θ·c)²) ≈ |c|/√d
    c = torch.tensor([0.6, -0.8])
    assert sliced_w2(x, x + c, num_projections=4000, generator=gen(2)) == pytest.approx(1 / math.sqrt(2), rel=0.03)
    # same generator → same directions → symmetric
    y = ring8().sample(3000, generator=gen(3))
    assert sliced_w2(x, y, generator=gen(4)) == pytest.approx(sliced_w2(y, x, generator=gen(4)), rel=1e-12)


def test_sw2_separates_shift_from_floor():
    gm = ring8()
    x, y = gm.sample(4000, generator=gen(0)), gm.sample(4000, generator=gen(1))
    floor = sliced_w2(x, y, generator=gen(2))
    shifted = sliced_w2(x, y + torch.tensor([1.0, 0.0]), generator=gen(2))
    assert floor < 0.35 and shifted > 2 * floor


# --- MMD -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('block_size', [3, 16, 4096])
def test_mmd_matches_naive_dense(block_size):
    g = gen(0)
    x = torch.randn(37, 3, dtype=F64, generator=g)
    y = torch.randn(29, 3, dtype=F64, generator=g) * 1.3 + 0.4
    want = naive_mmd2(x, y, 0.9)
    assert mmd(x, y, 0.9, block_size=block_size, dtype=F64) == pytest.approx(want, rel=1e-10, abs=1e-13)
    assert mmd(x, y, 0.9, block_size=block_size) == pytest.approx(want, rel=1e-4, abs=1e-6)   # float32 tiles
    assert mmd(y, x, 0.9, block_size=block_size, dtype=F64) == pytest.approx(want, rel=1e-10, abs=1e-13)


def test_mmd_of_identical_sets_and_translation_invariance():
    x = torch.randn(200, 2, dtype=F64, generator=gen(1))
    v = mmd(x, x, 1.0, dtype=F64)
    # unbiased within-set terms exclude i = j, the cross term does not: exactly −(2/n)(1 − mean k)
    assert v == pytest.approx(naive_mmd2(x, x, 1.0), rel=1e-10)
    assert -2 / 200 < v < 0
    y = torch.randn(150, 2, dtype=F64, generator=gen(2))
    c = torch.tensor([1e3, -2e3], dtype=F64)
    assert mmd(x + c, y + c, 1.0, dtype=F64) == pytest.approx(mmd(x, y, 1.0, dtype=F64), rel=1e-9, abs=1e-12)


def test_mmd_unbiased_mean_zero_across_seeds():
    """Same law: the mean over seeds is 0 within 3 standard errors, while the biased (V-statistic)
    version sits clearly above 0 on the same draws."""
    n, reps, h = 30, 300, 1.0
    vals, biased = [], []
    for s in range(reps):
        g = gen(100 + s)
        x = torch.randn(n, 2, dtype=F64, generator=g)
        y = torch.randn(n, 2, dtype=F64, generator=g)
        vals.append(mmd(x, y, h, dtype=F64))
        k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * h * h)).mean()
        biased.append(float(k(x, x) + k(y, y) - 2 * k(x, y)))
    v, b = torch.tensor(vals), torch.tensor(biased)
    se = float(v.std() / math.sqrt(reps))
    assert abs(float(v.mean())) < 3 * se
    assert float(b.mean()) > 10 * float(b.std() / math.sqrt(reps))


def test_mmd_separates_shift_and_validates():
    gm = ring8()
    x, y = gm.sample(3000, generator=gen(0)), gm.sample(3000, generator=gen(1))
    floor = mmd(x, y, 0.15)
    shifted = mmd(x, y + torch.tensor([0.15, 0.0]), 0.15)
    assert abs(floor) < 2e-4 and shifted > 20 * max(abs(floor), 1e-5)
    with pytest.raises(ValueError, match='bandwidth'):
        mmd(x, y, 0.0)
    with pytest.raises(ValueError, match='2 points'):
        mmd(x[:1], y, 1.0)
    with pytest.raises(ValueError, match='dimensions'):
        mmd(x, torch.zeros(5, 3), 1.0)


def test_default_bandwidth():
    assert default_bandwidth(ring8()) == pytest.approx(0.15)
    gm = GaussianMixture(torch.zeros(2, 8), [0.2, 0.4])
    assert default_bandwidth(gm) == pytest.approx(0.3 * 2.0)


# --- mixture-aware metrics -------------------------------------------------------------------------
def test_near_mode_fraction_constructed():
    gm = ring8()
    mu = gm.means.float()
    at_modes = mu.repeat(3, 1)
    assert near_mode_fraction(at_modes, gm) == 1.0
    u = torch.tensor([0.6, 0.8])
    inside = mu + 0.99 * 3 * 0.15 * u
    outside = mu + 1.01 * 3 * 0.15 * u
    both = torch.cat([inside, outside, outside, torch.full((8, 2), float('nan'))])
    assert near_mode_fraction(both, gm) == pytest.approx(8 / 32)
    assert near_mode_fraction(outside, gm, n_std=3.1) == 1.0
    # diagonal stds: the ellipsoid Σ_j (x_j − μ_j)²/s_j² ≤ n²
    diag = GaussianMixture([[0.0, 0.0]], [[1.0, 0.1]])
    pts = torch.tensor([[2.0, 0.2], [2.2, 0.22], [0.0, 0.299], [2.9, 0.0]])
    # radii: √(4+4)=2.83, √(4.84+4.84)=3.11, 2.99, 2.9
    assert near_mode_fraction(pts, diag) == pytest.approx(3 / 4)


def test_near_mode_fraction_of_exact_samples_is_chi_coverage():
    gm = ring8()
    frac = near_mode_fraction(gm.sample(20000, generator=gen(0)), gm)
    p = chi_coverage(2, 3.0)
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / 20000)


def test_mode_tv_constructed():
    gm = GaussianMixture([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], [0.3, 0.3, 0.3], [0.5, 0.3, 0.2])
    mu = gm.means.float()
    assert mode_tv(mu[:1].repeat(10, 1), gm) == pytest.approx(1 - 0.5)
    assert mode_tv(mu[2:3].repeat(10, 1), gm) == pytest.approx(1 - 0.2)
    exact = torch.cat([mu[0:1].repeat(5, 1), mu[1:2].repeat(3, 1), mu[2:3].repeat(2, 1)])
    assert mode_tv(exact, gm) == pytest.approx(0.0, abs=1e-12)
    # far-off samples are still assigned, to the nearest mean
    far = torch.tensor([[100.0, 1.0]]).repeat(10, 1)                       # nearest is mode 1
    assert mode_tv(far, gm) == pytest.approx(1 - 0.3)
    assert math.isnan(mode_tv(torch.tensor([[float('nan'), 0.0]]), gm))


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 20), min_size=4, max_size=4).filter(lambda c: sum(c) > 0),
       weights=st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4))
def test_mode_tv_matches_formula(counts, weights):
    gm = GaussianMixture([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]], [0.2] * 4, weights)
    pts = torch.cat([gm.means[k].float().repeat(c, 1) + 0.5 for k, c in enumerate(counts)])
    w = torch.tensor(weights, dtype=F64) / sum(weights)
    share = torch.tensor(counts, dtype=F64) / sum(counts)
    assert mode_tv(pts, gm) == pytest.approx(0.5 * float((w - share).abs().sum()), abs=1e-12)


def test_mean_nll():
    gm = ring8()
    x = gm.sample(500, generator=gen(0))
    assert mean_nll(x, gm) == pytest.approx(-float(gm.log_prob(x).mean()), rel=1e-12)
    # the exact sampler's NLL estimates the entropy: for well separated equal modes
    # H = log K + log(2πe s²)
    h = math.log(8) + math.log(2 * math.pi * math.e * 0.15 ** 2)
    assert mean_nll(gm.sample(20000, generator=gen(1)), gm) == pytest.approx(h, abs=0.03)


# --- bundles -------------------------------------------------------------------------------------------
def _inflated(gm, n, g, factor):
    x, comp = gm.sample(n, generator=g, return_components=True)
    mu = gm.means.float()[comp]
    return mu + factor * (x - mu)


def test_toy_metrics_floor_and_degraded_samplers_separate():
    gm, n = ring8(), 5000
    floor = toy_floor(gm, n, generator=gen(0))
    assert set(floor) == {'sw2', 'mmd', 'near_mode', 'mode_tv', 'near_mode_tv', 'nll'}
    assert abs(floor['near_mode'] - chi_coverage(2, 3.0)) < 0.008
    assert floor['mode_tv'] < 0.03 and abs(floor['mmd']) < 2e-4 and floor['sw2'] < 0.35
    wide = toy_metrics(_inflated(gm, n, gen(1), 1.5), gm, generator=gen(2))
    x = gm.sample(2 * n, generator=gen(3), return_components=True)
    dropped = x[0][x[1] != 0][:n]
    drop = toy_metrics(dropped, gm, generator=gen(4))
    # std ×1.5: fewer samples near modes, higher NLL and MMD; weights still right
    assert wide['near_mode'] < floor['near_mode'] - 0.1
    assert wide['mmd'] > 10 * max(abs(floor['mmd']), 1e-5)
    assert wide['nll'] > floor['nll'] + 0.2
    assert wide['mode_tv'] < 0.03
    # one mode dropped: TV ≈ 1/8, the other metrics see it too (except near-mode)
    assert drop['mode_tv'] == pytest.approx(1 / 8, abs=0.01)
    assert drop['mmd'] > 10 * max(abs(floor['mmd']), 1e-5)
    assert drop['sw2'] > floor['sw2']
    assert abs(drop['near_mode'] - floor['near_mode']) < 0.01


def test_toy_metrics_reproducible_names_and_nonfinite():
    a = toy_floor('ring8', 500, generator=gen(7))
    b = toy_floor(dict(name='ring8'), 500, generator=gen(7))
    assert a == b
    gm = ring8()
    x = gm.sample(100, generator=gen(0))
    x[0, 0] = float('inf')
    m = toy_metrics(x, gm, generator=gen(1))
    assert math.isnan(m['sw2']) and math.isnan(m['mmd']) and math.isnan(m['nll']) and math.isnan(m['mode_tv'])
    assert math.isnan(m['near_mode_tv'])
    assert m['near_mode'] <= 99 / 100
    with pytest.raises(ValueError, match='dim'):
        toy_metrics(torch.zeros(10, 3), gm)


def test_toy_mixture_metric_mmengine():
    metric = METRICS.build(dict(type='ToyMixtureMetric', mixture=dict(name='ring8'), seed=3))
    assert isinstance(metric, ToyMixtureMetric)
    gm = ring8()
    x = gm.sample(600, generator=gen(0))
    metric.process(None, x[:200])                                   # a tensor
    metric.process(None, [dict(samples=r) for r in x[200:400]])    # dicts of rows
    metric.process(None, [x[400:500], x[500:600]])                 # list of tensors
    out = metric.evaluate(600)
    assert set(out) == {f'toy/{k}' for k in ('sw2', 'mmd', 'near_mode', 'mode_tv', 'near_mode_tv', 'nll')}
    ref = gm.sample(600, generator=gen(3))
    want = toy_metrics(x, gm, reference=ref, generator=None)
    assert out['toy/near_mode'] == want['near_mode'] and out['toy/mmd'] == pytest.approx(want['mmd'])
    assert metric.results == []


# --- TV with an off-mode bin ------------------------------------------------------------------------------
def test_coverage_radius_closed_forms():
    # 2-D: P(χ²₂ ≤ r²) = 1 − exp(−r²/2), so r = √(−2 ln(1 − c))
    assert coverage_radius(2, 0.99) == pytest.approx(math.sqrt(-2 * math.log(0.01)), abs=1e-8)
    # 1-D: P(|z| ≤ r) = erf(r/√2); 1.959964 for 0.95
    assert coverage_radius(1, 0.95) == pytest.approx(1.959963985, abs=1e-7)
    assert chi_coverage(16, coverage_radius(16, 0.99)) == pytest.approx(0.99, abs=1e-9)
    with pytest.raises(ValueError, match='coverage'):
        coverage_radius(2, 1.0)


def test_near_mode_tv_exact_blur_and_wrong_weights():
    c = 0.99
    # exact samples: only sampling noise
    gm = grid25()
    assert near_mode_tv(gm.sample(40000, generator=gen(0)), gm) < 0.02
    # the uniform square [−5, 5]²: every nearest-mean cell has area 4 (mode_tv ≈ 0), but each mode's
    # disk of radius r·0.1 holds π(0.1 r)²/100 of it, against c/25 for exact samples
    u = 10 * torch.rand(40000, 2, generator=gen(1), dtype=F64) - 5
    p = math.pi * (0.1 * coverage_radius(2, c)) ** 2 / 100
    want = 0.5 * 25 * (c / 25 - p) + 0.5 * abs(1 - 25 * p - (1 - c))
    assert want == pytest.approx(0.918, abs=1e-3)
    assert near_mode_tv(u, gm) == pytest.approx(want, abs=0.01)
    assert mode_tv(u, gm) < 0.03
    # sharp modes with the wrong weights: exactly c·TV(w, ŵ) in expectation
    wr = weighted_ring()
    x = ring8().sample(40000, generator=gen(2))          # equal weights, same means and stds
    tv = 0.5 * float((wr.weights - 1 / 8).abs().sum())
    assert near_mode_tv(x, wr) == pytest.approx(c * tv, abs=0.012)
    assert mode_tv(x, wr) == pytest.approx(tv, abs=0.012)
    # modes inflated ×2: weights right, but a quarter of the mass leaves the 99 % discs
    z = wr.sample(40000, generator=gen(3), return_components=True)
    mu = wr.means.float()[z[1]]
    wide = mu + 2 * (z[0] - mu)
    inside = 1 - math.exp(-coverage_radius(2, c) ** 2 / 8)  # P(‖2s·n‖ ≤ r s) in 2-D
    assert near_mode_tv(wide, wr) == pytest.approx(c - inside, abs=0.012)
    bad = x.clone()
    bad[0, 1] = float('nan')
    assert math.isnan(near_mode_tv(bad, wr))
