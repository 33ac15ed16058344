"""Sample-quality metrics."""
from .toy import ToyMixtureMetric, default_bandwidth, mean_nll, mmd, mode_tv, near_mode_fraction, sliced_w2, toy_floor, toy_metrics  # noqa: F401
