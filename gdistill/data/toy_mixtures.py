"""Gaussian mixtures whose noised densities, denoisers and scores are known exactly.

A mixture p(x₀) = Σ_k w_k·N(x₀; μ_k, diag(s_k²)) stays a mixture under Gaussian noise: with
x = x₀ + σ·n (EDM's variable, n ~ N(0, I))

    p_σ(x) = Σ_k w_k·N(x; μ_k, diag(s_k² + σ²)),

and the posterior of x₀ given x is again a mixture, with responsibilities and per-component
posterior means

    r_k(x, σ) = w_k·N(x; μ_k, s_k² + σ²) / p_σ(x),
    m_k(x, σ) = μ_k + s_k² / (s_k² + σ²) ⊙ (x − μ_k),

so the optimal denoiser is D(x; σ) = E[x₀ | x] = Σ_k r_k·m_k (everything per coordinate for a
diagonal s_k). Any schedule x_t = a(t)·x₀ + σ(t)·ε is served at equal SNR: x_t/a(t) is EDM's x at
σ_e = σ(t)/a(t), and the score is Tweedie's (a·D − x_t)/σ(t)² (``schedule.score_from_x0``).

All parameters are held in float64 and every density/denoiser evaluation runs in float64 with
log-sum-exp over components, so σ ∈ [0.002, 80] and points far from every mode are safe.

Named mixtures (``TOY_MIXTURES``, built by ``make_mixture(name, **kw)``):
``ring8`` (8 equal modes on a circle), ``grid25`` (5×5 grid), ``weighted_ring`` (ring8's
geometry, 4–8 modes, weights alternating light/heavy with max/min = 4) and ``random_mixture``
(seeded random mixture in d ≥ 16 with distinct weights and well separated means).
"""
import difflib
import hashlib
import math

import torch

from ..utils import append_dims

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixture:
    """p(x₀) = Σ_k w_k·N(x₀; μ_k, diag(s_k²)).

    Args:
        means: [K, d] component means μ_k.
        stds: [K] (isotropic, s_k·I) or [K, d] (diagonal) component standard deviations, > 0.
        weights: [K] positive weights; normalised to sum to one. ``None`` = equal weights.

    Attributes ``means`` [K, d], ``stds`` (as given: [K] or [K, d]), ``weights`` [K] are float64;
    ``dim`` = d, ``num_modes`` = K, ``isotropic`` tells which form ``stds`` has.
    """

    def __init__(self, means, stds, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64).detach().cpu()
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f'GaussianMixture: means must be [K, d] with K, d >= 1, got shape '
                             f'{tuple(means.shape)}')
        K, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64).detach().cpu()
        if stds.ndim == 0:
            stds = stds.expand(K).clone()
        if stds.shape not in ((K,), (K, d)):
            raise ValueError(f'GaussianMixture: stds must be [K]={K} or [K, d]=[{K}, {d}], got '
                             f'shape {tuple(stds.shape)}')
        if not bool((stds > 0).all()) or not bool(torch.isfinite(stds).all()):
            raise ValueError('GaussianMixture: stds must be finite and > 0')
        if not bool(torch.isfinite(means).all()):
            raise ValueError('GaussianMixture: means must be finite')
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        if weights.shape != (K,):
            raise ValueError(f'GaussianMixture: weights must be [K]={K}, got shape {tuple(weights.shape)}')
        if not bool((weights > 0).all()) or not bool(torch.isfinite(weights).all()):
            raise ValueError('GaussianMixture: weights must be finite and > 0')
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()
        self.isotropic = stds.ndim == 1
        # per-coordinate variances [K, d], used by every formula
        self._var = (stds[:, None] if self.isotropic else stds).expand(K, d) ** 2
        self._cache = {}

    # --- description -------------------------------------------------------------------------
    @property
    def dim(self):
        return self.means.shape[1]

    @property
    def num_modes(self):
        return self.means.shape[0]

    @property
    def std_matrix(self):
        """[K, d] per-coordinate standard deviations (isotropic stds broadcast)."""
        return self._var.sqrt()

    def mean(self):
        """E[x₀] = Σ_k w_k μ_k, [d] float64."""
        return self.weights @ self.means

    def covariance(self):
        """Cov[x₀] = Σ_k w_k (diag(s_k²) + μ_k μ_kᵀ) − E[x₀]E[x₀]ᵀ, [d, d] float64."""
        m = self.mean()
        second = torch.einsum('k,ki,kj->ij', self.weights, self.means, self.means)
        return second + torch.diag(self.weights @ self._var) - torch.outer(m, m)

    def fingerprint(self):
        """12 hex digits of SHA-1 over the float64 bytes of (means, stds, weights): equal for
        equal mixtures, different otherwise (used in ``repr``, so caches keyed on it are safe)."""
        h = hashlib.sha1()
        for t in (self.means, self.stds, self.weights):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def __repr__(self):
        kind = 'isotropic' if self.isotropic else 'diagonal'
        return (f'GaussianMixture(num_modes={self.num_modes}, dim={self.dim}, {kind} stds, '
                f'params={self.fingerprint()})')

    # --- internals ---------------------------------------------------------------------------
    def _params(self, device):
        """(means, var, log_weights) on ``device`` in float64 (cached per device)."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.means.to(device), self._var.to(device),
                                self.weights.log().to(device))
        return self._cache[key]

    def _check_x(self, x):
        x = torch.as_tensor(x)
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f'expected points of shape [..., {self.dim}], got {tuple(x.shape)}')
        return x

    def _sigma2(self, sigma, x):
        """σ² in float64 shaped [..., 1, 1] to broadcast against [..., K, d]."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        if s.ndim > 0:
            lead = x.ndim - 1
            if s.ndim > lead:  # e.g. [B, 1] for x of [B, d]
                s = s.reshape(s.shape[:lead])
            s = s.reshape(s.shape + (1,) * (lead - s.ndim))
        return (s ** 2)[..., None, None]

    def _component_log_density(self, x64, sigma2):
        """log w_k + log N(x; μ_k, diag(s_k² + σ²)) → [..., K], and the [..., K, d] pieces."""
        means, var, logw = self._params(x64.device)
        v = var + sigma2                                   # [..., K, d]
        diff = x64[..., None, :] - means                   # [..., K, d]
        logn = -0.5 * (diff ** 2 / v + torch.log(v) + _LOG_2PI).sum(-1)
        return logw + logn, diff, v

    # --- densities ---------------------------------------------------------------------------
    def log_prob(self, x, sigma=None):
        """Exact log-density, float64, shape x.shape[:-1].

        log p_σ(x) = logsumexp_k [log w_k − ½ Σ_j ((x_j − μ_kj)²/v_kj + log(2π v_kj))],
        v_kj = s_kj² + σ². ``sigma=None`` (or 0) is the data density p(x₀); a scalar or
        per-point σ gives the density of x = x₀ + σ·n."""
        x = self._check_x(x)
        x64 = x.to(torch.float64)
        sigma2 = self._sigma2(0.0 if sigma is None else sigma, x64)
        logc, _, _ = self._component_log_density(x64, sigma2)
        return torch.logsumexp(logc, dim=-1)

    def responsibilities(self, x, sigma=None):
        """Posterior component probabilities r_k(x, σ) = P(k | x₀ + σn = x), float64 [..., K]."""
        x = self._check_x(x)
        x64 = x.to(torch.float64)
        logc, _, _ = self._component_log_density(x64, self._sigma2(0.0 if sigma is None else sigma, x64))
        return torch.softmax(logc, dim=-1)

    # --- denoiser and score ------------------------------------------------------------------
    def edm_denoise(self, x, sigma):
        """D(x; σ) = E[x₀ | x₀ + σ·n = x] = Σ_k r_k(x, σ)·(μ_k + s_k²/(s_k²+σ²) ⊙ (x − μ_k)).

        ``x`` is [..., d]; ``sigma`` a scalar or one σ per point (shape x.shape[:-1], or with a
        trailing 1). Computed in float64 (responsibilities by softmax = log-sum-exp), returned
        in x's dtype."""
        x = self._check_x(x)
        x64 = x.to(torch.float64)
        sigma2 = self._sigma2(sigma, x64)
        logc, diff, v = self._component_log_density(x64, sigma2)
        r = torch.softmax(logc, dim=-1)                   # [..., K]
        means, var, _ = self._params(x64.device)
        post_means = means + (var / v) * diff             # [..., K, d]
        out = (r[..., None] * post_means).sum(-2)
        return out.to(x.dtype) if x.is_floating_point() else out

    def edm_score(self, x, sigma):
        """∇_x log p_σ(x) = (D(x; σ) − x)/σ², float64 internally, returned in x's dtype."""
        x = self._check_x(x)
        x64 = x.to(torch.float64)
        s2 = self._sigma2(sigma, x64)[..., 0, :]          # [..., 1]
        out = (self.edm_denoise(x64, sigma) - x64) / s2
        return out.to(x.dtype) if x.is_floating_point() else out

    def denoise(self, x_t, t, schedule):
        """E[x₀ | x_t] for x_t = a(t)·x₀ + σ(t)·ε: the EDM denoiser at x_t/a(t), σ_e = σ(t)/a(t)."""
        x_t = self._check_x(x_t)
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
        a = append_dims(schedule.alpha(t64), x_t.ndim)
        out = self.edm_denoise(x_t.to(torch.float64) / a, schedule.edm_sigma(t64))
        return out.to(x_t.dtype) if x_t.is_floating_point() else out

    def score(self, x_t, t, schedule):
        """∇ log p_t(x_t) = (a(t)·E[x₀|x_t] − x_t)/σ(t)² via ``schedule.score_from_x0``
        (float64 internally, returned in x_t's dtype)."""
        x_t = self._check_x(x_t)
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
        x64 = x_t.to(torch.float64)
        out = schedule.score_from_x0(x64, self.denoise(x64, t64, schedule), t64)
        return out.to(x_t.dtype) if x_t.is_floating_point() else out

    # --- sampling ----------------------------------------------------------------------------
    def sample(self, n, generator=None, return_components=False):
        """``n`` exact samples x₀ = μ_c + s_c ⊙ z, c ~ Categorical(w), z ~ N(0, I), drawn in
        float64 on the CPU with ``generator`` and returned as float32 [n, d] (and the component
        ids c, int64 [n], if ``return_components``)."""
        n = int(n)
        if n < 0:
            raise ValueError(f'sample: n must be >= 0, got {n}')
        if n == 0:
            comp = torch.zeros(0, dtype=torch.long)
        else:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = (self.means[comp] + self._var.sqrt()[comp] * z).to(torch.float32)
        return (x, comp) if return_components else x

    # --- modes -------------------------------------------------------------------------------
    def mode_distances(self, x):
        """Scaled distance of every point to every mode, ρ_k(x) = ‖(x − μ_k) ⊘ s_k‖₂, float64
        [..., K] (s_k per coordinate; for isotropic s_k this is ‖x − μ_k‖/s_k)."""
        x = self._check_x(x)
        means, var, _ = self._params(x.device)
        return ((x.to(torch.float64)[..., None, :] - means) ** 2 / var).sum(-1).sqrt()

    def nearest_mode(self, x):
        """Index of the nearest mean in Euclidean distance, argmin_k ‖x − μ_k‖₂ (int64 [...])."""
        x = self._check_x(x)
        means = self._params(x.device)[0]
        return ((x.to(torch.float64)[..., None, :] - means) ** 2).sum(-1).argmin(-1)

    def near_mode_mask(self, x, n_std=3.0):
        """True where min_k ρ_k(x) ≤ n_std, ρ_k the scaled distance of ``mode_distances``: the
        point lies within n_std standard deviations of some mode (for diagonal s_k, inside the
        ellipsoid Σ_j (x_j − μ_kj)²/s_kj² ≤ n_std²). Non-finite points are never near.

        For an exact sample the chance is P(χ²_d ≤ n_std²) (see ``chi_coverage``), e.g. 0.9889
        in d = 2 with n_std = 3, but only 0.087 in d = 16: pick n_std with the dimension."""
        return self.mode_distances(x).min(-1).values <= n_std


def chi_coverage(dim, n_std=3.0):
    """P(‖z‖₂ ≤ n_std) for z ~ N(0, I_dim) = P(χ²_dim ≤ n_std²) = γ(dim/2, n_std²/2)/Γ(dim/2):
    the near-mode fraction of exact samples of well separated modes."""
    return float(torch.special.gammainc(torch.tensor(dim / 2, dtype=torch.float64),
                                        torch.tensor(n_std ** 2 / 2, dtype=torch.float64)))


# --- named mixtures ------------------------------------------------------------------------
TOY_MIXTURES = {}


def register_mixture(fn):
    """Add a factory ``fn(**kw) -> GaussianMixture`` to ``TOY_MIXTURES`` under its name."""
    if fn.__name__ in TOY_MIXTURES:
        raise KeyError(f'toy mixture {fn.__name__!r} is already registered')
    TOY_MIXTURES[fn.__name__] = fn
    return fn


def make_mixture(name, **kw):
    """Build the named mixture; ``name`` may also be a dict ``dict(name=..., **kw)`` or an
    already-built ``GaussianMixture`` (returned as is)."""
    if isinstance(name, GaussianMixture):
        if kw:
            raise TypeError('make_mixture: keyword arguments given with an already built mixture')
        return name
    if isinstance(name, dict):
        cfg = dict(name)
        if 'name' not in cfg:
            raise KeyError(f'make_mixture: a mixture config needs a "name" key; got keys {sorted(cfg)}. '
                           f'Known: {", ".join(sorted(TOY_MIXTURES))}.')
        cfg.update(kw)
        return make_mixture(cfg.pop('name'), **cfg)
    if name not in TOY_MIXTURES:
        close = difflib.get_close_matches(str(name), list(TOY_MIXTURES), n=1, cutoff=0.5)
        hint = f' Did you mean {close[0]!r}?' if close else ''
        raise KeyError(f'unknown toy mixture {name!r}.{hint} Known: {", ".join(sorted(TOY_MIXTURES))}.')
    return TOY_MIXTURES[name](**kw)


@register_mixture
def ring8(radius=4.0, std=0.15, num_modes=8):
    """``num_modes`` (8) equal-weight isotropic modes at radius·(cos 2πk/K, sin 2πk/K)."""
    if radius <= 0 or num_modes < 1:
        raise ValueError(f'ring8: need radius > 0 and num_modes >= 1, got {radius}, {num_modes}')
    ang = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return GaussianMixture(means, torch.full((num_modes,), float(std), dtype=torch.float64))


@register_mixture
def grid25(spacing=2.0, std=0.1, size=5):
    """size×size (5×5) equal-weight isotropic modes at spacing·(i − (size−1)/2, j − (size−1)/2)."""
    if spacing <= 0 or size < 1:
        raise ValueError(f'grid25: need spacing > 0 and size >= 1, got {spacing}, {size}')
    c = spacing * (torch.arange(size, dtype=torch.float64) - (size - 1) / 2)
    gx, gy = torch.meshgrid(c, c, indexing='ij')
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    return GaussianMixture(means, torch.full((size * size,), float(std), dtype=torch.float64))


@register_mixture
def weighted_ring(num_modes=8, radius=4.0, std=0.15, weight_ratio=4.0):
    """ring8's geometry with unequal weights: ``num_modes`` isotropic modes at
    radius·(cos 2πk/K, sin 2πk/K), weights w ∝ weight_ratio^{r_k/(K−1)} where the ranks r_k
    alternate light and heavy around the ring (0, K−1, 1, K−2, …), so the heaviest mode sits next
    to the lightest and max/min = ``weight_ratio`` exactly. For K = 8, ratio 4: weights
    ∝ 1, 4, 1.22, 3.28, 1.49, 2.69, 1.81, 2.21 (sum-normalised)."""
    if radius <= 0 or num_modes < 2:
        raise ValueError(f'weighted_ring: need radius > 0 and num_modes >= 2, got {radius}, {num_modes}')
    if weight_ratio < 1:
        raise ValueError(f'weighted_ring: need weight_ratio >= 1, got {weight_ratio}')
    base = ring8(radius=radius, std=std, num_modes=num_modes)
    lo, hi, ranks = 0, num_modes - 1, []
    while lo <= hi:
        ranks.append(lo)
        if hi != lo:
            ranks.append(hi)
        lo, hi = lo + 1, hi - 1
    ranks = torch.tensor(ranks, dtype=torch.float64)
    weights = float(weight_ratio) ** (ranks / (num_modes - 1))
    return GaussianMixture(base.means, base.stds, weights)


@register_mixture
def random_mixture(dim=16, num_modes=8, seed=0, radius=4.0, min_separation=None,
                   std_range=(0.2, 0.5), weight_ratio=4.0, diagonal=False, max_tries=1000):
    """A seeded random mixture in ``dim`` dimensions.

    Means: μ_k = radius·u_k with u_k uniform on the unit sphere, redrawn until every pair is at
    least ``min_separation`` apart (default = radius, i.e. ≥ 60° apart). Stds: uniform in
    ``std_range`` per mode ([K]) or per mode and coordinate ([K, d], ``diagonal=True``).
    Weights: w_k ∝ weight_ratio^{π(k)/(K−1)} for a random permutation π, so all weights differ
    and max/min = weight_ratio. The same arguments always give the same mixture."""
    if dim < 1 or num_modes < 1:
        raise ValueError(f'random_mixture: need dim, num_modes >= 1, got {dim}, {num_modes}')
    lo, hi = (float(v) for v in std_range)
    if not 0 < lo <= hi:
        raise ValueError(f'random_mixture: need 0 < std_range[0] <= std_range[1], got {std_range}')
    if weight_ratio < 1:
        raise ValueError(f'random_mixture: need weight_ratio >= 1, got {weight_ratio}')
    sep = float(radius) if min_separation is None else float(min_separation)
    g = torch.Generator().manual_seed(int(seed))
    for _ in range(max_tries):
        u = torch.randn(num_modes, dim, dtype=torch.float64, generator=g)
        means = radius * u / u.norm(dim=1, keepdim=True)
        if num_modes == 1:
            break
        dist = torch.cdist(means, means).fill_diagonal_(float('inf'))
        if bool(dist.min() >= sep):
            break
    else:
        raise ValueError(f'random_mixture: no draw of {num_modes} means in dim {dim} with pairwise '
                         f'distance >= {sep} in {max_tries} tries; lower min_separation')
    shape = (num_modes, dim) if diagonal else (num_modes,)
    stds = lo + (hi - lo) * torch.rand(shape, dtype=torch.float64, generator=g)
    if num_modes == 1:
        weights = torch.ones(1, dtype=torch.float64)
    else:
        perm = torch.randperm(num_modes, generator=g).to(torch.float64)
        weights = float(weight_ratio) ** (perm / (num_modes - 1))
    return GaussianMixture(means, stds, weights)
