"""T-step sampling through the posterior kernel (SIDDM, Xu et al. 2023; DDGAN, Xiao et al. 2022)."""
import torch

from ..registry import KERNELS, SAMPLERS, SCHEDULES, build
from ..utils import append_dims


@SAMPLERS.register_module()
class PosteriorSampler:
    """The generative chain of a posterior-kernel model on the kernel's grid t_0 < … < t_T:

        x_{t_T} = σ(t_T)·z;   for k = T, …, 1:  x̂₀ = G(x_{t_k}, t_k),
                                               x_{t_{k−1}} = μ + σ̃·ε ~ q(x_{t_{k−1}} | x_{t_k}, x̂₀),

    and the sample is the last x̂₀ (DDGAN's convention; at a t_0 with σ(t_0) = 0 it equals
    x_{t_0}). NFE = T. The start σ(t_T)·z drops a(t_T)·x₀, which the schedule's t_max must make
    negligible (a(t_T) ≈ 0.0016 for the cosine schedule's default t_max).

    ``kernel``/``schedule``: KERNELS/SCHEDULES configs (or built objects), the ones the model
    was trained with: the generator has only learnt the kernel's own time points."""

    def __init__(self, kernel=dict(type='PosteriorKernel', num_steps=4), schedule=dict(type='CosineSchedule')):
        self.kernel = build(KERNELS, kernel)
        self.schedule = build(SCHEDULES, schedule)
        for name in ('times', 'sample', 'predict_x0'):
            if not callable(getattr(self.kernel, name, None)):
                raise TypeError(f'PosteriorSampler needs a posterior kernel (with {name}()), got '
                                f'{type(self.kernel).__name__}')
        self.kernel.times(self.schedule)   # fails now if the kernel's times leave the schedule's range

    @property
    def nfe(self):
        return self.kernel.num_steps

    @torch.no_grad()
    def __call__(self, generator_net, noise, class_labels=None, generator=None):
        sched, grid = self.schedule, self.kernel.times(self.schedule).to(noise.device)
        n = noise.shape[0]
        x = append_dims(sched.sigma(grid[-1]), noise.ndim).to(noise.dtype) * noise
        for k in range(self.kernel.num_steps, 0, -1):
            t = grid[k].expand(n)
            x0 = self.kernel.predict_x0(generator_net, x, t, sched, class_labels)
            if k == 1:
                return x0
            eps = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            x = self.kernel.sample(x, x0, grid[k - 1].expand(n), t, sched, eps)

    def __repr__(self):
        return f'PosteriorSampler(kernel={self.kernel!r}, schedule={self.schedule!r})'
