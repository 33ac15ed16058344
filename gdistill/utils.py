"""Small tensor helpers shared across the package."""
import torch


def append_dims(v, ndim):
    """Give a per-sample tensor of shape [B] trailing singleton dims up to ``ndim``."""
    v = torch.as_tensor(v)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def per_sample_sum(x):
    """Sum over every dim but the first (batch)."""
    return x.flatten(1).sum(1)


def per_sample_mean(x):
    return x.flatten(1).mean(1)
