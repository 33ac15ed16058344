"""Metrics of generated images, fed batch by batch and reduced over processes.

An ``ImageMetric`` sees, per batch, the features of its detector (``DETECTORS`` config; the
``ImageEvaluator`` runs each distinct detector once per batch and hands its output to every
metric that asked for it), the class labels the images were drawn for, and the global indices
of the samples. After the last batch ``reduce`` combines the processes' shares and ``compute``
returns floats. These metrics keep streaming statistics (float64 sums, counts) rather than
mmengine's per-sample result lists, so 50 000 Inception features never have to be gathered.

Registered metrics:

- ``FrechetDistance``: FD of the features against reference statistics (EDM ``.npz``), and
  optionally the mean ± std of FD over disjoint blocks of ``block_size`` samples (to compare
  with a real-vs-real floor measured on a set of that size);
- ``PrecisionRecall``: k-NN precision and recall against reference features (the
  ``features`` array that ``tools/eval.py ref --save-features`` adds to the ``.npz``);
- ``LabelAccuracy``: how often a classifier assigns a sample the class it was drawn for.
"""
import math

import numpy as np
import torch

from ..registry import DETECTORS, METRICS, build
from .frechet import FeatureStats, frechet_distance, load_reference
from .precision_recall import precision_recall

__all__ = ['ImageMetric', 'FrechetDistance', 'PrecisionRecall', 'LabelAccuracy', 'ImageEvaluator']


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() and d.get_world_size() > 1 else None


class ImageMetric:
    """Interface: ``detector`` (the DETECTORS config whose output ``update`` receives), ``name``
    (prefix of the result keys), ``reset(num_samples)``, ``update(features, labels, indices)``,
    ``reduce()``, ``compute() -> dict``."""

    detector = None
    name = 'metric'

    def reset(self, num_samples):
        raise NotImplementedError(f'{type(self).__name__} must define reset(num_samples)')

    def update(self, features, labels, indices):
        raise NotImplementedError(f'{type(self).__name__} must define update(features, labels, indices)')

    def reduce(self):
        pass

    def compute(self):
        raise NotImplementedError(f'{type(self).__name__} must define compute()')


@METRICS.register_module()
class FrechetDistance(ImageMetric):
    """Fréchet distance (``frechet.frechet_distance``) of the detector features of all samples
    against ``reference`` (an EDM ``.npz`` with ``mu``, ``sigma``). Keys: ``name``; with
    ``block_size`` also ``{name}_block_mean`` and ``{name}_block_std`` over the complete
    blocks of consecutive sample indices [0, b), [b, 2b), …"""

    def __init__(self, detector, reference, name='fd', block_size=None):
        self.detector, self.name = detector, name
        self.mu, self.sigma = load_reference(reference)
        self.block_size = None if block_size is None else int(block_size)

    def reset(self, num_samples):
        d = self.mu.shape[0]
        self.stats = FeatureStats(d)
        nb = num_samples // self.block_size if self.block_size else 0
        self.blocks = [FeatureStats(d) for _ in range(nb)]

    def update(self, features, labels, indices):
        self.stats.update(features)
        if self.blocks:
            block = indices.cpu() // self.block_size
            for b in block.unique().tolist():
                if b < len(self.blocks):
                    self.blocks[b].update(features[(block == b).to(features.device)])

    def reduce(self):
        for s in [self.stats] + self.blocks:
            s.all_reduce()

    def compute(self):
        out = {self.name: frechet_distance(self.stats.mean, self.stats.cov, self.mu, self.sigma)}
        if self.blocks:
            fds = [frechet_distance(b.mean, b.cov, self.mu, self.sigma) for b in self.blocks]
            out[f'{self.name}_block_mean'] = float(np.mean(fds))
            if len(fds) > 1:
                out[f'{self.name}_block_std'] = float(np.std(fds, ddof=1))
        return out


@METRICS.register_module()
class PrecisionRecall(ImageMetric):
    """k-NN precision and recall (``precision_recall.precision_recall``) of the detector
    features against the ``features`` array of ``reference`` (at most ``max_reference`` of them,
    the first ones). The features of all processes are gathered and ordered by sample index,
    so the result does not depend on how the samples were shared out. Keys: ``{name}_precision``,
    ``{name}_recall``."""

    def __init__(self, detector, reference, k=3, name='pr', max_reference=None):
        self.detector, self.name, self.k = detector, name, int(k)
        with np.load(reference, allow_pickle=False) as f:
            if 'features' not in f.files:
                raise ValueError(f'PrecisionRecall: {reference} holds no per-sample `features` '
                                 '(only mu/sigma); write it with `tools/eval.py ref ... --save-features`')
            feats = f['features']
        self.reference = torch.from_numpy(feats[:max_reference] if max_reference else feats)

    def reset(self, num_samples):
        self.features, self.indices = [], []

    def update(self, features, labels, indices):
        self.features.append(features.detach().float().cpu())
        self.indices.append(indices.cpu())

    def reduce(self):
        feats = torch.cat(self.features) if self.features else torch.zeros(0, self.reference.shape[1])
        idx = torch.cat(self.indices) if self.indices else torch.zeros(0, dtype=torch.long)
        dist = _dist()
        if dist is not None:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (idx, feats))
            idx = torch.cat([p[0] for p in parts])
            feats = torch.cat([p[1] for p in parts])
        order = idx.argsort()
        self.features, self.indices = [feats[order]], [idx[order]]

    def compute(self):
        pr = precision_recall(self.reference, self.features[0], k=self.k)
        return {f'{self.name}_precision': pr['precision'], f'{self.name}_recall': pr['recall']}


@METRICS.register_module()
class LabelAccuracy(ImageMetric):
    """Share of the samples whose class under ``classifier`` (a DETECTORS config returning
    logits, e.g. ``NetworkDetector(checkpoint=..., method='forward')``) is the class they were
    drawn for. Needs class-conditional sampling (labels)."""

    def __init__(self, classifier, name='label_accuracy'):
        self.detector, self.name = classifier, name

    def reset(self, num_samples):
        self.counts = torch.zeros(2, dtype=torch.float64)  # hits, total

    def update(self, features, labels, indices):
        if labels is None:
            raise ValueError('LabelAccuracy needs the class each sample was drawn for; the model is '
                             'unconditional (label_dim 0) or the evaluation passed no labels')
        pred = features.argmax(1).cpu()
        self.counts += torch.tensor([float((pred == labels.cpu()).sum()), float(labels.numel())],
                                    dtype=torch.float64)

    def reduce(self):
        dist = _dist()
        if dist is not None:
            c = self.counts.clone()
            if dist.get_backend() == 'nccl':
                c = c.cuda()
            dist.all_reduce(c)
            self.counts = c.cpu()

    def compute(self):
        hits, total = self.counts.tolist()
        return {self.name: hits / total if total else math.nan}


def _key(cfg):
    """A hashable form of a config (detectors named by equal configs are built once)."""
    if isinstance(cfg, dict):
        return tuple(sorted((k, _key(v)) for k, v in cfg.items()))
    if isinstance(cfg, (list, tuple)):
        return tuple(_key(v) for v in cfg)
    return cfg


class ImageEvaluator:
    """Runs a list of ``ImageMetric`` configs (METRICS) on batches of uint8 images; each distinct
    detector is built once and run once per batch."""

    def __init__(self, metrics, device='cpu'):
        if not metrics:
            raise ValueError('ImageEvaluator: no metrics given')
        self.metrics = [build(METRICS, m) for m in metrics]
        for m in self.metrics:
            if not isinstance(m, ImageMetric):
                raise TypeError(f'ImageEvaluator: {type(m).__name__} is not an ImageMetric '
                                '(FrechetDistance, PrecisionRecall, LabelAccuracy, ...)')
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f'ImageEvaluator: metric names must differ, got {names}')
        self.detectors, self.metric_detector = {}, []
        for m in self.metrics:
            key = _key(m.detector)
            if key not in self.detectors:
                self.detectors[key] = build(DETECTORS, m.detector) if m.detector is not None else None
            self.metric_detector.append(key)
        self.to(device)

    def to(self, device):
        self.device = torch.device(device)
        for det in self.detectors.values():
            if det is not None:
                det.to(self.device)
        return self

    def reset(self, num_samples):
        for m in self.metrics:
            m.reset(num_samples)

    @torch.no_grad()
    def update(self, images, labels=None, indices=None):
        """``images`` uint8 [N, C, H, W]; ``labels`` int64 [N] or None; ``indices`` the samples'
        global indices (default 0 … N−1)."""
        images = images.to(self.device)
        if indices is None:
            indices = torch.arange(images.shape[0])
        features = {k: (det(images) if det is not None else images) for k, det in self.detectors.items()}
        for m, key in zip(self.metrics, self.metric_detector):
            m.update(features[key], labels, indices)

    def finish(self):
        """Reduce over processes (every rank must call it) and compute the results."""
        out = {}
        for m in self.metrics:
            m.reduce()
        for m in self.metrics:
            out.update(m.compute())
        return out
