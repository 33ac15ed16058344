"""Sample-quality metrics."""
from .toy import ToyMixtureMetric, default_bandwidth, mean_nll, mmd, mode_tv, near_mode_fraction, sliced_w2, toy_floor, toy_metrics  # noqa: F401
from .frechet import FeatureStats, frechet_distance, load_reference, save_reference  # noqa: F401
from . import detectors  # noqa: F401  (registers the detectors and DigitClassifier)
from .precision_recall import precision_recall  # noqa: F401
from .image import FrechetDistance, ImageEvaluator, LabelAccuracy, PrecisionRecall  # noqa: F401
