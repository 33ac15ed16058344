"""Fréchet distance between Gaussian fits of detector features (FID, FD-DINOv2, FD-digits).

Heusel et al. 2017 ("GANs trained by a two time-scale update rule converge to a local Nash
equilibrium", eq. 6 with the Fréchet/Wasserstein-2 distance of Dowson & Landau 1982):

    FD = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}).

``FeatureStats`` accumulates the count, the sum and the sum of outer products of features in
float64, so its mean and covariance do not depend on how the features were split into
batches or over processes (``all_reduce`` sums the three over a process group). Reference
statistics are EDM's ``.npz`` format: arrays ``mu`` [D] and ``sigma`` [D, D] (float64).
"""
import os
import os.path as osp

import numpy as np
import torch

__all__ = ['frechet_distance', 'trace_sqrt_product', 'FeatureStats', 'load_reference', 'save_reference']


def _covariance(sigma, name, dim):
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (dim, dim):
        raise ValueError(f'frechet_distance: {name} must be [{dim}, {dim}] to match the mean, '
                         f'got shape {sigma.shape}')
    if not np.isfinite(sigma).all():
        raise ValueError(f'frechet_distance: {name} has non-finite entries')
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise ValueError(f'frechet_distance: {name} is not symmetric (max |Σ − Σᵀ| = '
                         f'{float(np.abs(sigma - sigma.T).max()):.3g}); expected a covariance matrix')
    return 0.5 * (sigma + sigma.T)


def _rounding_floor(w):
    """Eigenvalues below d·ε·λ_max are rounding noise of the decomposition (the cut-off of
    ``numpy.linalg.matrix_rank``): they are set to 0, else their square roots (≈ 1e−8 for a
    noise of 1e−16) would add to a trace of square roots."""
    top = max(float(w.max()), 0.0)
    return np.where(w > w.shape[0] * np.finfo(np.float64).eps * top, w, 0.0)


def _psd_sqrt(sigma, name):
    """Symmetric square root of a covariance through its eigendecomposition; eigenvalues at
    the level of rounding (or slightly negative from it) are set to 0, a clearly negative one
    is an input error."""
    w, v = np.linalg.eigh(sigma)
    top = max(float(w.max()), 0.0)
    if w.min() < -1e-6 * max(top, 1e-300):
        raise ValueError(f'frechet_distance: {name} has the negative eigenvalue {w.min():.3g} '
                         f'(largest {top:.3g}); a covariance matrix is positive semi-definite')
    return (v * np.sqrt(_rounding_floor(w))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
    """Tr((Σ₁Σ₂)^{1/2}) for positive semi-definite Σ₁, Σ₂ (float64).

    Σ₁Σ₂ = Σ₁^{1/2}·(Σ₁^{1/2}Σ₂Σ₁^{1/2})·Σ₁^{-1/2} on the range of Σ₁, so its eigenvalues are those
    of the symmetric PSD matrix M = Σ₁^{1/2}Σ₂Σ₁^{1/2} (also when Σ₁ is singular, by continuity)
    and Tr((Σ₁Σ₂)^{1/2}) = Σᵢ √λᵢ(M). Two symmetric eigendecompositions, no inverse and no
    complex arithmetic, eigenvalues at rounding level treated as the zeros they stand for:
    accurate for rank-deficient covariances, where the usual
    ``scipy.linalg.sqrtm(Σ₁Σ₂)`` returns complex or inaccurate values and needs an ε·I offset."""
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    d = sigma1.shape[0]
    s1 = _covariance(sigma1, 'sigma1', d)
    s2 = _covariance(sigma2, 'sigma2', d)
    r1 = _psd_sqrt(s1, 'sigma1')
    _psd_sqrt(s2, 'sigma2')  # checks Σ₂ is PSD too
    m = r1 @ s2 @ r1
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(_rounding_floor(lam)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FD = ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2·Tr((Σ₁Σ₂)^{1/2}) (Heusel et al. 2017, eq. 6): the
    squared Wasserstein-2 distance between N(μ₁, Σ₁) and N(μ₂, Σ₂). Float64 throughout;
    ``trace_sqrt_product`` keeps it exact for near-singular covariances. A result below zero
    by rounding only is returned as 0. Returns a Python float."""
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f'frechet_distance: the means must be vectors of one length, got shapes '
                         f'{mu1.shape} and {mu2.shape}')
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise ValueError('frechet_distance: a mean has non-finite entries')
    d = mu1.shape[0]
    s1, s2 = _covariance(sigma1, 'sigma1', d), _covariance(sigma2, 'sigma2', d)
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(fd, 0.0)


class FeatureStats:
    """Streaming statistics of feature vectors: n, Σx and Σxxᵀ, in float64.

    ``update(features)`` adds a batch [N, D] (any float dtype, any device); ``merge`` adds
    another ``FeatureStats``; ``all_reduce`` sums over the default process group (a no-op
    without one). The mean is Σx/n and the covariance (Σxxᵀ − n·μμᵀ)/(n − 1), as EDM's
    ``fid.py`` computes them, so they are the same whether the features came in one batch or
    many, on one process or several (up to float64 rounding of the sums; exactly when the
    partial sums are exact). ``max_items`` stops counting after that many rows (features
    past it in a batch are ignored), as reference statistics over a subset do."""

    def __init__(self, dim=None, max_items=None):
        self.dim = None if dim is None else int(dim)
        self.max_items = None if max_items is None else int(max_items)
        self.n = 0
        self.sum = None
        self.sum_outer = None
        if self.dim is not None:
            self._allocate(self.dim, 'cpu')

    def _allocate(self, dim, device):
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @property
    def is_full(self):
        return self.max_items is not None and self.n >= self.max_items

    def update(self, features):
        x = torch.as_tensor(features)
        if x.ndim != 2 or not x.is_floating_point():
            raise ValueError(f'FeatureStats.update: expected float features [N, D], got '
                             f'{x.dtype} of shape {tuple(x.shape)}')
        if self.sum is None:
            self._allocate(x.shape[1], x.device)
        if x.shape[1] != self.dim:
            raise ValueError(f'FeatureStats.update: features have dimension {x.shape[1]}, '
                             f'the statistics {self.dim}')
        if self.max_items is not None:
            x = x[:max(self.max_items - self.n, 0)]
        if x.shape[0] == 0:
            return self
        if not bool(torch.isfinite(x).all()):
            raise ValueError('FeatureStats.update: non-finite features (the generator produced '
                             'NaN/inf images, or the detector failed on them)')
        x = x.to(device=self.sum.device, dtype=torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other):
        if other.n == 0:
            return self
        if self.sum is None:
            self._allocate(other.dim, other.sum.device)
        if other.dim != self.dim:
            raise ValueError(f'FeatureStats.merge: dimensions differ ({self.dim} vs {other.dim})')
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum.device)
        return self

    def all_reduce(self, group=None):
        """Sum n, Σx and Σxxᵀ over the processes of ``group`` (every rank must hold statistics
        of the same dimension; ranks that saw no features contribute zeros)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        if self.sum is None:
            raise ValueError('FeatureStats.all_reduce: give `dim` to statistics that may see no '
                             'features, so every rank reduces tensors of one shape')
        # one flat float64 buffer: the count (exact in float64 below 2⁵³), the sum, the outer sums
        device = self.sum.device
        if dist.get_backend(group) == 'nccl' and device.type != 'cuda':
            device = torch.device('cuda', torch.cuda.current_device())
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device),
                          self.sum, self.sum_outer.flatten()]).to(device)
        dist.all_reduce(flat, group=group)
        flat = flat.to(self.sum.device)
        self.n = int(round(float(flat[0])))
        self.sum = flat[1:1 + self.dim].clone()
        self.sum_outer = flat[1 + self.dim:].reshape(self.dim, self.dim).clone()
        return self

    @property
    def mean(self):
        self._need(1)
        return (self.sum / self.n).cpu().numpy()

    @property
    def cov(self):
        self._need(2)
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return (0.5 * (cov + cov.T)).cpu().numpy()

    def _need(self, k):
        if self.n < k:
            raise ValueError(f'FeatureStats: {self.n} feature vectors seen; need at least {k}')

    def frechet_distance(self, mu, sigma):
        """FD between these statistics and a reference (μ, Σ)."""
        return frechet_distance(self.mean, self.cov, mu, sigma)

    def save(self, path):
        """Write EDM's reference format (``mu``, ``sigma``) plus the count ``n``."""
        save_reference(path, self.mean, self.cov, n=self.n)


def save_reference(path, mu, sigma, **extra):
    """``np.savez`` of ``mu`` [D], ``sigma`` [D, D] (float64) and any extra arrays, written to a
    temporary file and renamed so a reader never sees half a file."""
    path = os.fspath(path)
    if not path.endswith('.npz'):
        raise ValueError(f'reference statistics go in a .npz file, got {path!r}')
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = path[:-4] + '.tmp.npz'
    np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             **{k: np.asarray(v) for k, v in extra.items()})
    os.replace(tmp, path)


def load_reference(path):
    """(μ, Σ) from an EDM-format ``.npz`` (arrays ``mu``, ``sigma``); no pickled objects are
    read (``allow_pickle=False``)."""
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'reference statistics {path!r} do not exist; compute them with '
                                '`python tools/eval.py ref ...`')
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ('mu', 'sigma') if k not in f.files]
        if missing:
            raise ValueError(f'{path}: not an EDM reference file; arrays {missing} are missing '
                             f'(found {f.files}; expected mu [D] and sigma [D, D])')
        mu, sigma = f['mu'].astype(np.float64), f['sigma'].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected [D] '
                         'and [D, D]')
    return mu, sigma
