"""Improved precision and recall of Kynkäänniemi et al. 2019 ("Improved Precision and Recall
Metric for Assessing Generative Models", Sec. 2, eqs. 1–2).

The manifold of a feature set Φ is the union of the balls around its points whose radius is the
distance to the point's k-th nearest neighbour in Φ (itself excluded):

    f(φ, Φ) = 1  if ‖φ − φ'‖₂ ≤ ‖φ' − NN_k(φ', Φ)‖₂ for some φ' ∈ Φ,  else 0;
    precision(Φ_r, Φ_g) = (1/|Φ_g|) Σ_{φ_g ∈ Φ_g} f(φ_g, Φ_r)   (generated samples on the real manifold),
    recall(Φ_r, Φ_g)    = (1/|Φ_r|) Σ_{φ_r ∈ Φ_r} f(φ_r, Φ_g)   (real samples on the generated manifold).

Distances are computed in float64 in tiles of ``block_size`` rows, so memory is
O(block_size · n) whatever the set sizes.
"""
import torch

__all__ = ['knn_radii', 'manifold_membership', 'precision_recall']


def _points(x, name):
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f'precision_recall: {name} must be a non-empty [N, D] feature matrix, '
                         f'got shape {tuple(x.shape)}')
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f'precision_recall: {name} has non-finite features')
    return x.to(torch.float64)


def _sq_dists(a, b):
    """‖a_i − b_j‖² for rows of a [n, D] and b [m, D], clamped at 0 against rounding."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_(min=0.0)


def knn_radii(x, k=3, block_size=1024):
    """Distance from every row of ``x`` to its k-th nearest other row (k < len(x))."""
    x = _points(x, 'features')
    if not 1 <= k < x.shape[0]:
        raise ValueError(f'knn_radii: need 1 <= k < number of points, got k={k} for {x.shape[0]} points')
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], block_size):
        d = _sq_dists(x[i:i + block_size], x)
        # the row's own zero distance is the first order statistic, so the k-th neighbour is the (k+1)-th
        out[i:i + block_size] = d.kthvalue(k + 1, dim=1).values.sqrt()
    return out


def manifold_membership(query, support, radii, block_size=1024):
    """f(φ, Φ) of every query row: True when it lies in some ball B(support_j, radii_j)."""
    query, support = _points(query, 'query'), _points(support, 'support')
    if query.shape[1] != support.shape[1]:
        raise ValueError(f'precision_recall: feature dimensions differ ({query.shape[1]} vs {support.shape[1]})')
    r2 = torch.as_tensor(radii, dtype=torch.float64, device=support.device) ** 2
    out = torch.empty(query.shape[0], dtype=torch.bool, device=query.device)
    for i in range(0, query.shape[0], block_size):
        out[i:i + block_size] = (_sq_dists(query[i:i + block_size], support) <= r2[None]).any(1)
    return out


def precision_recall(real, fake, k=3, block_size=1024):
    """``{'precision', 'recall'}`` of generated features ``fake`` against real features ``real``
    ([N, D] each) with k-NN manifolds (Kynkäänniemi et al. 2019, k = 3 by default)."""
    real, fake = _points(real, 'real'), _points(fake, 'fake')
    precision = manifold_membership(fake, real, knn_radii(real, k, block_size), block_size)
    recall = manifold_membership(real, fake, knn_radii(fake, k, block_size), block_size)
    return dict(precision=float(precision.double().mean()), recall=float(recall.double().mean()))
