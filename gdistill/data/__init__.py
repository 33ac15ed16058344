from .image_folder import DatasetFormatError, EDMImageDataset  # noqa: F401
from .preprocessor import ImageDataPreprocessor  # noqa: F401
from .distill import DistillDataPreprocessor, DistillationDataset  # noqa: F401
from .toy_mixtures import TOY_MIXTURES, GaussianMixture, chi_coverage, grid25, make_mixture, random_mixture, ring8  # noqa: F401
from .digits import DigitsDataset, load_digits_split  # noqa: F401
from .toy_dataset import MixtureSampleDataset  # noqa: F401
from .latents import EDM2LatentDataset, LatentDataPreprocessor  # noqa: F401
from .augment import AugmentPipe  # noqa: F401
