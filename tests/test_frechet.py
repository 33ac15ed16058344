"""Fréchet distance, streaming feature statistics, precision/recall and the detectors' loaders."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gdistill.metrics.detectors import (DetectorFormatError, DINOv2Detector, DINOv2ViT, InceptionDetector,
                                        load_torchscript)
from gdistill.metrics.frechet import (FeatureStats, frechet_distance, load_reference, save_reference,
                                      trace_sqrt_product)
from gdistill.metrics.precision_recall import knn_radii, precision_recall


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def random_cov(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


# --- the Fréchet distance against closed forms --------------------------------------------------
def test_commuting_covariances_give_the_sum_of_squared_root_differences():
    # Σ₁, Σ₂ diagonal in one (rotated) basis: (Σ₁Σ₂)^{1/2} = Q diag(√(ab)) Qᵀ, so
    # FD = ‖Δμ‖² + Σ_i (√a_i − √b_i)²
    rng = np.random.default_rng(0)
    d = 6
    q = random_rotation(d, rng)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    fd = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fd == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_two_dimensional_closed_form():
    # for 2×2 PSD M, Tr √M = √(tr M + 2√det M); with M = Σ₁^{1/2}Σ₂Σ₁^{1/2}: tr M = tr Σ₁Σ₂,
    # det M = det Σ₁ · det Σ₂ — a formula that shares nothing with the eigendecomposition
    rng = np.random.default_rng(1)
    for _ in range(20):
        s1, s2 = random_cov(2, rng), random_cov(2, rng)
        tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
        assert trace_sqrt_product(s1, s2) == pytest.approx(tr_sqrt, rel=1e-10)
        mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_rank_one_covariances():
    # Σ₁ = uuᵀ, Σ₂ = vvᵀ: Σ₁Σ₂ = (uᵀv)·uvᵀ has the single non-zero eigenvalue (uᵀv)², so
    # FD = ‖Δμ‖² + ‖u‖² + ‖v‖² − 2|uᵀv|. Singular in 7 of 8 directions: sqrtm(Σ₁Σ₂) breaks here.
    rng = np.random.default_rng(2)
    for _ in range(10):
        u, v = rng.standard_normal(8), rng.standard_normal(8)
        mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
        expected = ((mu1 - mu2) ** 2).sum() + u @ u + v @ v - 2 * abs(u @ v)
        assert frechet_distance(mu1, np.outer(u, u), mu2, np.outer(v, v)) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_near_singular_covariances():
    # eigenvalues spanning 1 … 1e−14 and exact zeros, in a dense rotated basis (the situation of
    # detector features with fewer samples than dimensions)
    rng = np.random.default_rng(3)
    d = 32
    q = random_rotation(d, rng)
    a = np.concatenate([np.logspace(0, -14, 16), np.zeros(16)])
    b = np.concatenate([np.logspace(-1, -13, 12), np.zeros(20)])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(np.zeros(d), s1, np.zeros(d), s2) == pytest.approx(expected, abs=1e-7)
    # a singular covariance against itself: 0, not the rounding noise of a matrix square root
    assert frechet_distance(np.zeros(d), s1, np.zeros(d), s1) < 1e-7
    feats = rng.standard_normal((10, d))  # 10 samples in 32 dimensions: rank 9
    cov = np.cov(feats, rowvar=False)
    assert frechet_distance(feats.mean(0), cov, feats.mean(0), cov) < 1e-9 * np.trace(cov)


def test_agrees_with_the_matrix_square_root_when_well_conditioned():
    scipy_linalg = pytest.importorskip('scipy.linalg')
    rng = np.random.default_rng(4)
    s1, s2 = random_cov(10, rng) + 0.1 * np.eye(10), random_cov(10, rng) + 0.1 * np.eye(10)
    root = scipy_linalg.sqrtm(s1 @ s2)
    assert trace_sqrt_product(s1, s2) == pytest.approx(float(np.trace(root).real), rel=1e-9)


def test_invariant_under_a_common_rigid_motion_and_symmetric():
    rng = np.random.default_rng(5)
    d = 5
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), random_cov(d, rng), random_cov(d, rng, 2)
    r, c = random_rotation(d, rng), rng.standard_normal(d)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(r @ mu1 + c, r @ s1 @ r.T, r @ mu2 + c, r @ s2 @ r.T) == pytest.approx(fd, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-10)


def test_bad_inputs_are_refused():
    eye = np.eye(3)
    with pytest.raises(ValueError, match='not symmetric'):
        frechet_distance(np.zeros(3), eye + np.triu(np.ones((3, 3)), 1), np.zeros(3), eye)
    with pytest.raises(ValueError, match='negative eigenvalue'):
        frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match=r'\[3, 3\]'):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), eye)
    with pytest.raises(ValueError, match='vectors of one length'):
        frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))


# --- streaming statistics --------------------------------------------------------------------
def integer_features(n=900, d=12, seed=0):
    # small integers: every product and partial sum is exact in float64, so any order of
    # accumulation must give bit-identical statistics
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (n, d), generator=g).float()


def accumulate(x, splits):
    stats = FeatureStats()
    for part in torch.split(x, splits):
        stats.update(part)
    return stats


def test_statistics_match_numpy():
    x = torch.randn(500, 7, dtype=torch.float64)
    stats = FeatureStats().update(x)
    np.testing.assert_allclose(stats.mean, x.numpy().mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.cov, np.cov(x.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_one_batch_or_many_is_identical():
    x = integer_features()
    one = accumulate(x, [900])
    for splits in ([1] * 900, [450, 450], [7, 300, 1, 592], [899, 1]):
        many = accumulate(x, splits)
        assert many.n == one.n
        assert torch.equal(many.sum, one.sum) and torch.equal(many.sum_outer, one.sum_outer)
        assert np.array_equal(many.mean, one.mean) and np.array_equal(many.cov, one.cov)
    # float features: equal up to the rounding of float64 sums
    y = torch.randn(1000, 16)
    a, b = accumulate(y, [1000]), accumulate(y, [3, 97, 400, 500])
    np.testing.assert_allclose(a.cov, b.cov, rtol=1e-12, atol=1e-13)
    mu, sigma = np.zeros(16), np.eye(16)
    assert a.frechet_distance(mu, sigma) == pytest.approx(b.frechet_distance(mu, sigma), rel=1e-12)


def test_merge_equals_joint_accumulation_and_max_items():
    x = integer_features()
    merged = accumulate(x[:300], [100, 200]).merge(accumulate(x[300:], [600]))
    joint = accumulate(x, [900])
    assert torch.equal(merged.sum_outer, joint.sum_outer) and merged.n == 900
    capped = FeatureStats(max_items=250)
    for part in torch.split(x, 100):
        capped.update(part)
    assert capped.n == 250 and capped.is_full
    assert np.array_equal(capped.cov, accumulate(x[:250], [250]).cov)


def test_statistics_refuse_bad_features():
    with pytest.raises(ValueError, match=r'\[N, D\]'):
        FeatureStats().update(torch.zeros(3))
    with pytest.raises(ValueError, match='dimension 4'):
        FeatureStats(3).update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match='non-finite'):
        FeatureStats().update(torch.tensor([[0.0, float('nan')]]))
    with pytest.raises(ValueError, match='at least 2'):
        FeatureStats().update(torch.zeros(1, 2)).cov


def _two_process_worker(rank, init_file, out_dir):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        x, y = integer_features(), torch.randn(1000, 16, generator=torch.Generator().manual_seed(7))
        # rank 0 takes batches 0, 2, 4, …; rank 1 the others (how the evaluation shares out samples)
        si, sf = FeatureStats(12), FeatureStats(16)
        for stats, data in ((si, x), (sf, y)):
            for j, batch in enumerate(torch.split(data, 100)):
                if j % 2 == rank:
                    stats.update(batch)
        si.all_reduce()
        sf.all_reduce()
        torch.save(dict(n=si.n, sum=si.sum, sum_outer=si.sum_outer, cov_f=torch.from_numpy(sf.cov),
                        mean_f=torch.from_numpy(sf.mean)), os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_reduce_to_the_one_process_statistics(tmp_path):
    mp.start_processes(_two_process_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2,
                       start_method='spawn')
    one = accumulate(integer_features(), [900])
    y = torch.randn(1000, 16, generator=torch.Generator().manual_seed(7))
    onef = accumulate(y, [1000])
    for rank in (0, 1):  # every rank holds the reduced statistics
        r = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        assert r['n'] == 900
        assert torch.equal(r['sum'], one.sum) and torch.equal(r['sum_outer'], one.sum_outer)
        np.testing.assert_allclose(r['cov_f'].numpy(), onef.cov, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(r['mean_f'].numpy(), onef.mean, rtol=1e-12, atol=1e-14)


def test_reference_file_round_trip(tmp_path):
    stats = FeatureStats().update(torch.randn(50, 4))
    stats.save(tmp_path / 'ref.npz')
    mu, sigma = load_reference(tmp_path / 'ref.npz')
    assert mu.dtype == np.float64 and np.array_equal(mu, stats.mean) and np.array_equal(sigma, stats.cov)
    np.savez(tmp_path / 'bad.npz', mean=mu)
    with pytest.raises(ValueError, match='mu'):
        load_reference(tmp_path / 'bad.npz')
    with pytest.raises(ValueError, match='.npz'):
        save_reference(tmp_path / 'ref.txt', mu, sigma)


# --- precision / recall ------------------------------------------------------------------------
def test_precision_recall_by_hand():
    # real {0,1,2,3}: 1-NN radii 1; fake {0.5, 10}: 1-NN radii 9.5. Precision: 0.5 lies in a real
    # ball, 10 in none → ½. Recall: every real point lies within 9.5 of 0.5 → 1.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    assert torch.equal(knn_radii(real, k=1), torch.ones(4, dtype=torch.float64))
    assert precision_recall(real, fake, k=1) == dict(precision=0.5, recall=1.0)
    assert precision_recall(real, real, k=3) == dict(precision=1.0, recall=1.0)
    assert precision_recall(real, fake + 100, k=1) == dict(precision=0.0, recall=0.0)


def test_precision_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 5, generator=g, dtype=torch.float64)
    fake = 0.6 * torch.randn(200, 5, generator=g, dtype=torch.float64) + 0.5  # narrower: recall < 1
    k = 3

    def brute(support, query):
        d = torch.cdist(support, support)
        radii = d.sort(1).values[:, k]
        return (torch.cdist(query, support) <= radii[None]).any(1).double().mean().item()

    pr = precision_recall(real, fake, k=k, block_size=64)  # several tiles
    assert pr['precision'] == pytest.approx(brute(real, fake), abs=1e-12)
    assert pr['recall'] == pytest.approx(brute(fake, real), abs=1e-12)
    assert 0.9 < pr['precision'] < 1 and 0.2 < pr['recall'] < 0.7  # a case that is not trivial


# --- detector files ----------------------------------------------------------------------------
class TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x, return_features: bool = False):
        pooled = x.float().mean((2, 3))
        return self.proj(pooled) if return_features else pooled


class Payload:
    """A pickle that runs code when loaded: creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_a_torchscript_detector_loads_and_other_files_are_refused(tmp_path, monkeypatch):
    good = tmp_path / 'inception.pt'
    torch.jit.save(torch.jit.script(TinyFeatures()), str(good))
    det = InceptionDetector(str(good))
    feats = det(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))  # grey → RGB
    assert feats.shape == (4, 2048) and feats.dtype == torch.float32

    marker = tmp_path / 'code_ran'
    state_dict = tmp_path / 'state_dict.pth'
    torch.save(TinyFeatures().state_dict(), state_dict)
    evil = tmp_path / 'inception-2015-12-05.pkl'
    with open(evil, 'wb') as f:
        pickle.dump(Payload(str(marker)), f)
    calls = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, 'load', lambda *a, **k: calls.append(a) or real_load(*a, **k))
    with pytest.raises(DetectorFormatError, match='not a TorchScript module.*not even a zip'):
        InceptionDetector(str(evil))
    with pytest.raises(DetectorFormatError, match='zip archive without TorchScript code'):
        load_torchscript(str(state_dict))
    assert calls == [] and not marker.exists()   # refused before anything read the file as a model
    with pytest.raises(FileNotFoundError):
        InceptionDetector(str(tmp_path / 'missing.pt'))
    with pytest.raises(ValueError, match='uint8'):
        det(torch.zeros(2, 3, 8, 8))


def test_dinov2_detector_from_a_state_dict(tmp_path):
    torch.manual_seed(0)
    vit = DINOv2ViT(embed_dim=64, depth=2, num_heads=1, patch_size=14, grid=4, mlp_hidden=128,
                    num_register_tokens=2)
    for p in vit.parameters():  # released weights are not zero: give every tensor values
        torch.nn.init.normal_(p, std=0.05)
    torch.save(vit.state_dict(), tmp_path / 'dinov2.pth')
    det = DINOv2Detector(tmp_path / 'dinov2.pth')
    assert det.feature_dim == 64 and det.model.register_tokens.shape == (1, 2, 64)
    assert len(det.model.blocks) == 2 and det.model.blocks[0].attn.num_heads == 1
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = det.preprocess(images)
    assert x.shape == (3, 3, 224, 224)  # the protocol's resolution
    # the normalisation: a constant grey image maps to (v/255 − mean)/std in every pixel
    grey = det.preprocess(torch.full((1, 1, 8, 8), 128, dtype=torch.uint8))
    want = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(grey[0, :, 100, 100], want, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(det(images), vit(x), atol=1e-5)
    # position embeddings: kept on the native grid; resized to the 16×16 grid of a 224 input,
    # where a constant embedding stays constant (bicubic weights sum to one)
    assert torch.equal(vit.position_embedding(4, 4), vit.pos_embed)
    with torch.no_grad():
        vit.pos_embed.fill_(0.25)
    assert torch.allclose(vit.position_embedding(16, 16), torch.full((1, 257, 64), 0.25), atol=1e-6)
    torch.save({k: v for k, v in vit.state_dict().items() if k != 'norm.weight'}, tmp_path / 'bad.pth')
    with pytest.raises(DetectorFormatError, match='norm.weight'):
        DINOv2Detector(tmp_path / 'bad.pth')
