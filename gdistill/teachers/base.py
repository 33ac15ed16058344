"""Teachers: a pretrained denoiser D(x; σ) ≈ E[x₀ | x₀ + σ·n = x] in EDM form.

Every teacher implements ``edm_denoise(x, sigma, class_labels)`` in EDM's variable
(a = 1, σ = noise level). ``denoise`` serves any registered schedule by equal SNR:
x_t / a(t) is EDM's x at σ_e(t) = σ(t)/a(t). Scores come from the schedule's Tweedie identity.
"""
import torch
from torch import nn

from ..utils import append_dims


class Teacher(nn.Module):
    """A frozen denoiser. ``sigma_data``, ``label_dim`` and ``data_shape`` describe what it
    was trained on (checked against the data and the students)."""

    sigma_data: float = 0.5
    label_dim: int = 0
    data_shape: tuple = ()

    def reference_sampler(self, num_steps=None):
        """The SAMPLERS config of the teacher's own paper, which the tools use for its rows:
        EDM's Heun sampler (Karras et al. 2022, Alg. 1; 18 steps, NFE 35)."""
        return dict(type='EDMHeunSampler', num_steps=num_steps or 18)

    def edm_denoise(self, x, sigma, class_labels=None):
        raise NotImplementedError(f'{type(self).__name__} must define edm_denoise')

    def denoise(self, x_t, t, schedule, class_labels=None):
        """E[x₀ | x_t] in ``schedule``'s variables."""
        a = schedule.alpha(t)
        return self.edm_denoise(x_t / append_dims(a, x_t.ndim).to(x_t.dtype),
                                schedule.edm_sigma(t).to(x_t.dtype), class_labels)

    def score(self, x_t, t, schedule, class_labels=None):
        return schedule.score_from_x0(x_t, self.denoise(x_t, t, schedule, class_labels), t)

    def forward(self, x, sigma, class_labels=None):
        return self.edm_denoise(x, sigma, class_labels)

    def freeze(self):
        """A teacher holds no gradients or optimiser state."""
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode=True):  # a teacher stays in eval mode (no dropout) inside a training model
        return super().train(False)
