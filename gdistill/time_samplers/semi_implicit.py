"""Time samplers of the semi-implicit family: pairs (s, t) with s the time the kernel lands
on and t the mixing time it starts from.

All of them draw noise levels on EDM's ρ-ramp σ(u) = (σ_max^{1/ρ} + u·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,
u ∈ [0, 1] (Karras et al. 2022, eq. 5), and hand back times of the distiller's schedule
(by equal SNR, in float64)."""
import torch

from ..registry import TIME_SAMPLERS


def rho_ramp(u, sigma_min, sigma_max, rho):
    """EDM's ρ-ramp: u = 0 ↦ σ_max, u = 1 ↦ σ_min (Karras et al. 2022, eq. 5)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + u * (b - a)) ** rho


def _check(sigma_min, sigma_max, rho):
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
    if rho <= 0:
        raise ValueError(f'rho must be > 0, got {rho}')


class TimePairs(dict):
    """What a semi-implicit time sampler returns: ``s``, ``t`` (schedule times, [B]),
    ``sigma_s``, ``sigma_t`` (EDM noise levels, [B]) and ``from_prior`` ([B] bool: the mixing
    sample x_t is pure prior noise, i.e. t is the start of sampling)."""
    __getattr__ = dict.__getitem__


@TIME_SAMPLERS.register_module()
class CoSIMTimeSampler:
    """π(s) and π(t | s) of CoSIM (Yu et al. 2025, App. A.1), written on the ρ-ramp:

    - s: u_s ~ U[u_lo, 1] (u_lo = 0 covers the whole ramp), σ_s = ramp(u_s);
    - t | s: with probability γ, t = t_max (the mixing sample is the prior, as at the first
      sampling step); otherwise u_t ~ U[max(0, u_s − 1/R), u_s], i.e. t lies above s by at most
      1/R of the ramp — R bounds how far one kernel jump reaches.

    γ = 1 makes every pair start from the prior; with R = 1 the window spans the whole ramp
    above s. ``aux_lognormal`` (P_mean, P_std) optionally draws the ψ-stage's s from EDM's
    training distribution ln σ ~ N(P_mean, P_std²) instead (SiD's fake-score step).

    ``window`` chooses the law of t | s:

    - ``'fixed'`` (the default, as above): one window of 1/R of the ramp, cut at its top;
    - ``'paper'``: App. A.1 of the paper exactly. With r = 1 − u (r = 0 at σ_min, r = 1 at
      σ_max), r_t = min(r_s + Γ, 1), Γ = B·U[0, 1]·U{1, ½, …, 1/R} + (1 − B), where the paper's
      B ~ Bernoulli(½) is 1 with probability 1 − ``gamma`` (the paper's ½ is ``gamma=0.5``):
      a mixture of the window sizes 1, ½, …, 1/R, and every pair whose r_t reaches 1 (B = 0,
      or the window runs past the top) starts at t_max from the prior. R must be an integer;
    - ``'sampler'`` (not in the paper; a departure measured in docs/digits.md): the mixing times
      of the pairs that do not start from the prior are the sampler's own, ``sampler_sigmas``
      = (σ_max, σ_1, …, σ_{K−1}) as in ``MultistepSampler(sigmas=…)``: t = σ_i with i ~ U{1, …,
      K−1}, and s | t uniform on the ramp between σ_i and the next level σ_{i+1} (σ_min after
      the last), i.e. on the stretch the chain's jump from σ_i covers. The pairs from the prior
      (probability γ) keep s ~ U over the ramp, as for the other windows. R is not used, and
      the other windows do not read ``sampler_sigmas``."""

    WINDOWS = ('fixed', 'paper', 'sampler')

    def __init__(self, sigma_min=0.002, sigma_max=80.0, rho=7.0, gamma=0.5, R=4, u_lo=0.0,
                 aux_lognormal=None, window='fixed', sampler_sigmas=None):
        _check(sigma_min, sigma_max, rho)
        if not 0 <= gamma <= 1:
            raise ValueError(f'CoSIMTimeSampler: gamma is a probability in [0, 1], got {gamma}')
        if R < 1:
            raise ValueError(f'CoSIMTimeSampler: R must be >= 1, got {R}')
        if not 0 <= u_lo < 1:
            raise ValueError(f'CoSIMTimeSampler: u_lo must lie in [0, 1), got {u_lo}')
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.gamma, self.R, self.u_lo = float(gamma), float(R), float(u_lo)
        self.aux_lognormal = tuple(aux_lognormal) if aux_lognormal is not None else None
        if window not in self.WINDOWS:
            raise ValueError(f"CoSIMTimeSampler: window is 'fixed' (one window of 1/R), 'paper' "
                             f"(App. A.1's mixture of windows 1, 1/2, ..., 1/R) or 'sampler' (the "
                             f"sampler's own levels, sampler_sigmas), got {window!r}")
        if window == 'paper' and R != int(R):
            raise ValueError(f"CoSIMTimeSampler: window='paper' draws the window size from "
                             f"U{{1, 1/2, ..., 1/R}}, so R must be an integer, got {R}")
        self.window = window
        self.sampler_sigmas = self._check_sampler_sigmas(window, sampler_sigmas)

    def _check_sampler_sigmas(self, window, sigmas):
        if window == 'sampler' and self.aux_lognormal is not None:
            raise ValueError("CoSIMTimeSampler: window='sampler' draws s from the sampler's stretches; "
                             "it cannot be combined with aux_lognormal")
        if window != 'sampler':  # kept but unread, so that a grid can switch the window alone
            return None if sigmas is None else tuple(float(x) for x in sigmas)
        sigmas = [float(x) for x in (sigmas or [])]
        ok = (len(sigmas) >= 2 and sigmas[0] == self.sigma_max
              and all(a > b for a, b in zip(sigmas, sigmas[1:])) and sigmas[-1] > self.sigma_min)
        if not ok:
            raise ValueError(f"CoSIMTimeSampler: window='sampler' needs sampler_sigmas = the sampler's "
                             f"levels (σ_max={self.sigma_max:g}, σ_1, ..., σ_(K-1)), at least two, strictly "
                             f"decreasing, all above sigma_min={self.sigma_min:g}; got {sigmas}")
        return tuple(sigmas)

    @property
    def prior_sigma(self):
        """σ of the pairs marked ``from_prior``: the one-step generator's input is prior_sigma·z."""
        return self.sigma_max

    def ramp(self, u):
        return rho_ramp(u, self.sigma_min, self.sigma_max, self.rho)

    def sample(self, n, schedule, device=None, generator=None, stage='generator'):
        f64 = dict(dtype=torch.float64, device=device)
        u_s = self.u_lo + (1 - self.u_lo) * torch.rand(n, generator=generator, **f64)
        sigma_s = self.ramp(u_s)
        if stage == 'aux' and self.aux_lognormal is not None:
            p_mean, p_std = self.aux_lognormal
            sigma_s = (p_mean + p_std * torch.randn(n, generator=generator, **f64)).exp()
            u_s = self.u_of_sigma(sigma_s.clamp(self.sigma_min, self.sigma_max))
        from_prior = torch.rand(n, generator=generator, **f64) < self.gamma
        if self.window == 'paper':
            # Γ = U[0, 1]/k with k ~ U{1, …, R}; r_t = min(r_s + Γ, 1) in u = 1 − r
            k = torch.randint(1, int(self.R) + 1, (n,), generator=generator, device=device)
            u_t = u_s - torch.rand(n, generator=generator, **f64) / k
            from_prior = from_prior | (u_t <= 0)
            u_t = u_t.clamp(min=0)
        elif self.window == 'sampler':
            # t = σ_i (i ≥ 1) and s on the stretch [σ_{i+1}, σ_i] of the ramp; prior pairs keep u_s
            levels = torch.tensor(self.sampler_sigmas + (self.sigma_min,), **f64)
            u_lv = self.u_of_sigma(levels)
            i = torch.randint(1, len(self.sampler_sigmas), (n,), generator=generator, device=device)
            u_t = u_lv[i]
            u_in = u_t + (u_lv[i + 1] - u_t) * torch.rand(n, generator=generator, **f64)
            u_s = torch.where(from_prior, u_s, u_in)
            sigma_s = torch.where(from_prior, sigma_s, self.ramp(u_s))
        else:
            lo = (u_s - 1 / self.R).clamp(min=0)
            u_t = lo + (u_s - lo) * torch.rand(n, generator=generator, **f64)
        sigma_t = torch.where(from_prior, torch.full_like(u_t, self.sigma_max), self.ramp(u_t))
        return TimePairs(s=schedule.t_from_edm_sigma(sigma_s), t=schedule.t_from_edm_sigma(sigma_t),
                         sigma_s=sigma_s, sigma_t=sigma_t, from_prior=from_prior)

    def u_of_sigma(self, sigma):
        a, b = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return (sigma ** (1 / self.rho) - a) / (b - a)

    def __repr__(self):
        return (f'CoSIMTimeSampler(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, '
                f'rho={self.rho}, gamma={self.gamma}, R={self.R}, u_lo={self.u_lo}, window={self.window!r}'
                + (f', sampler_sigmas={list(self.sampler_sigmas)})' if self.window == 'sampler' else ')'))


@TIME_SAMPLERS.register_module()
class FixedMixingTimeSampler(CoSIMTimeSampler):
    """SiD's times (Zhou et al. 2024): the mixing time is fixed at σ_init (the generator sees
    x_t = σ_init·z), and s runs over the ρ-ramp restricted to its last ``t_max/1000`` share
    (SiD's t_max = 800 ⇒ σ_s ∈ [0.002, ≈24.4]). The ψ stage draws ln σ_s ~ N(−1.2, 1.2²) as
    EDM's denoising loss does. This is CoSIMTimeSampler with γ = 1 and a fixed start."""

    def __init__(self, sigma_init=2.5, sigma_min=0.002, sigma_max=80.0, rho=7.0, t_max=800,
                 aux_lognormal=(-1.2, 1.2)):
        if not 0 < t_max <= 1000:
            raise ValueError(f'FixedMixingTimeSampler: t_max is out of 1000 steps, got {t_max}')
        super().__init__(sigma_min, sigma_max, rho, gamma=1.0, R=1, u_lo=1 - t_max / 1000,
                         aux_lognormal=aux_lognormal)
        if sigma_init <= 0:
            raise ValueError(f'FixedMixingTimeSampler: sigma_init must be > 0, got {sigma_init}')
        self.sigma_init = float(sigma_init)

    @property
    def prior_sigma(self):
        return self.sigma_init

    def sample(self, n, schedule, device=None, generator=None, stage='generator'):
        pairs = super().sample(n, schedule, device, generator, stage)
        pairs['sigma_t'] = torch.full_like(pairs['sigma_t'], self.sigma_init)
        pairs['t'] = schedule.t_from_edm_sigma(pairs['sigma_t'])
        return pairs
