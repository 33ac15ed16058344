"""scikit-learn's bundled 8×8 handwritten digits (UCI "optdigits" test set: 1 797 grey images,
10 classes, pixel values 0…16) as an image dataset for a benchmark that needs no download.

The images are scaled to uint8 (v·255/16, rounded) and split once, per class, into a
training part and a held-out part (``held_out`` of each class, chosen with ``seed``), so the
real-vs-real floor of a metric (held-out against training statistics) is measured on images
the teacher never saw. Items have the layout of ``EDMImageDataset``:

    {'img': uint8 [1, 8, 8], 'label': float32 one-hot [10], 'idx': int}
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import DATASETS

__all__ = ['DigitsDataset', 'load_digits_split', 'DIGITS_SPLITS']

DIGITS_SPLITS = ('train', 'held_out', 'all')


def _load_sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # scikit-learn is an optional dependency of gdistill
        raise ImportError('the digits benchmark reads scikit-learn\'s bundled digits: '
                          'pip install "gdistill[digits]" (or scikit-learn)') from None
    d = load_digits()
    return d.images, d.target


def load_digits_split(split='train', held_out=0.25, seed=0):
    """(images uint8 [N, 1, 8, 8], labels int64 [N]) of ``split``: 'train', 'held_out' or 'all'.

    The held-out part holds round(held_out·n_c) images of each class c, drawn with
    ``numpy.random.RandomState(seed)``; both parts keep the file's order."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f'digits: split must be one of {DIGITS_SPLITS}, got {split!r}')
    if not 0 < held_out < 1:
        raise ValueError(f'digits: held_out must be a fraction in (0, 1), got {held_out}')
    images, labels = _load_sklearn_digits()
    images = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = labels.astype(np.int64)
    if split != 'all':
        rng = np.random.RandomState(seed)
        test = np.zeros(len(labels), dtype=bool)
        for c in range(int(labels.max()) + 1):
            idx = np.flatnonzero(labels == c)
            test[rng.permutation(idx)[:int(round(held_out * len(idx)))]] = True
        keep = test if split == 'held_out' else ~test
        images, labels = images[keep], labels[keep]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


@DATASETS.register_module()
class DigitsDataset(Dataset):
    """The 8×8 digits (``load_digits_split``) as a dataset of ``EDMImageDataset``-style items.

    Args:
        split (str): 'train', 'held_out' or 'all'.
        held_out (float): fraction of each class kept out of 'train'.
        seed (int): seed of the split.
        use_labels (bool): when False every label has length 0 (unconditional training).
    """

    num_classes = 10

    def __init__(self, split='train', held_out=0.25, seed=0, use_labels=True):
        self.split, self.held_out, self.seed = split, float(held_out), int(seed)
        self.images, self.labels = load_digits_split(split, held_out, seed)
        self.use_labels = bool(use_labels)

    def __len__(self):
        return self.images.shape[0]

    @property
    def label_dim(self):
        return self.num_classes if self.use_labels else 0

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    def __getitem__(self, idx):
        idx = int(idx)
        if not -len(self) <= idx < len(self):
            raise IndexError(f'index {idx} out of range for {len(self)} digits ({self.split})')
        idx %= len(self)
        label = torch.zeros(self.label_dim, dtype=torch.float32)
        if self.use_labels:
            label[self.labels[idx]] = 1.0
        return {'img': self.images[idx].clone(), 'label': label, 'idx': idx}
