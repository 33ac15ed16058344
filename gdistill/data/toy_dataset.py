"""Real samples of a toy mixture, for methods that train from data (SIDDM) rather than a teacher."""
import torch
from torch.utils.data import Dataset

from ..registry import DATASETS
from .toy_mixtures import make_mixture


@DATASETS.register_module()
class MixtureSampleDataset(Dataset):
    """``length`` exact samples x₀ of a toy mixture (``make_mixture``: a name, a config dict
    ``dict(name=..., **kw)`` or a built ``GaussianMixture``), drawn once with ``seed`` by the
    mixture's own sampler. Item i is ``{'img': x_i (float32 [d]), 'idx': i}`` — 'img' is the key
    the data preprocessor turns into the batch's ``inputs``.

    A fixed pool rather than fresh draws per item keeps an epoch, and a resumed run, repeatable;
    at the default 2²⁰ samples a 4 000-iteration run of batch 1 024 sees each one about 4 times."""

    def __init__(self, mixture=dict(name='grid25'), length=1 << 20, seed=0):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f'MixtureSampleDataset: length must be an int >= 1, got {length!r}')
        self.mixture = make_mixture(mixture)
        self.length, self.seed = length, int(seed)
        self.samples = self.mixture.sample(length, generator=torch.Generator().manual_seed(self.seed))

    @property
    def data_shape(self):
        return (self.mixture.dim,)

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        return {'img': self.samples[idx], 'idx': idx}
