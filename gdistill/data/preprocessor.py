"""Turn a batch from the data loader into the tensors the distillers take.

The loader may collate with mmengine's ``pseudo_collate`` (a dict of lists), torch's /
mmengine's ``default_collate`` (a dict of stacked tensors), or not at all (a list of item
dicts). Images are uint8 [C, H, W] (``EDMImageDataset``) and are scaled to float in [−1, 1]
by x/127.5 − 1 (EDM's convention); labels are one-hot float rows. Data-free distillation
feeds items without images (only ``'label'`` or only ``'idx'``); then ``inputs`` is None.
"""
from collections.abc import Mapping, Sequence

import torch
from mmengine.dataset import pseudo_collate
from mmengine.model import BaseDataPreprocessor

from ..registry import MODELS


@MODELS.register_module()
class ImageDataPreprocessor(BaseDataPreprocessor):
    """Collate, move to the model's device, scale uint8 images to [−1, 1].

    Returns ``{'inputs': float images [B, C, H, W] or None, 'labels': float one-hot
    [B, label_dim] or None}``; labels are None when the batch carries none or they have
    length 0 (an unconditional dataset).

    Args:
        label_dim (int, optional): number of classes, needed only when labels arrive as
            integer class indices (they are then turned into one-hot rows); one-hot labels
            must have this width when it is given.
        dtype (torch.dtype): floating dtype of the returned images and labels.
        image_key, label_key (str): item keys of the image and the label.
        non_blocking (bool): passed to ``Tensor.to`` (see ``BaseDataPreprocessor``).
    """

    def __init__(self, label_dim=None, dtype=torch.float32, image_key='img', label_key='label',
                 non_blocking=False):
        super().__init__(non_blocking=non_blocking)
        if label_dim is not None and (isinstance(label_dim, bool) or not isinstance(label_dim, int)
                                      or label_dim < 0):
            raise ValueError(f'ImageDataPreprocessor: label_dim must be an int >= 0 or None, '
                             f'got {label_dim!r}')
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.replace('torch.', ''))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f'ImageDataPreprocessor: dtype must be a floating torch dtype, '
                             f'got {dtype!r}')
        self.label_dim = label_dim
        self.dtype = dtype
        self.image_key = image_key
        self.label_key = label_key

    # ------------------------------------------------------------------ scaling
    @staticmethod
    def scale(images, dtype=torch.float32):
        """uint8 [0, 255] → float in [−1, 1]: x/127.5 − 1 (0 → −1, 255 → 1 exactly)."""
        if images.dtype != torch.uint8:
            raise TypeError(f'expected uint8 images in [0, 255], got dtype {images.dtype}; '
                            'the preprocessor does the scaling to [-1, 1] itself')
        return images.to(dtype) / 127.5 - 1.0

    @staticmethod
    def to_uint8(images):
        """Inverse of ``scale``: float in [−1, 1] → uint8, rounding to the nearest level and
        clipping out-of-range values (for saving samples)."""
        return ((images.to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)

    # ------------------------------------------------------------------ collation
    @staticmethod
    def _stack(value, what):
        """A list/tuple of per-sample tensors (or numbers) → one batched tensor."""
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            if len(value) == 0:
                raise ValueError(f'ImageDataPreprocessor: empty batch of {what}')
            if all(isinstance(v, torch.Tensor) for v in value):
                shapes = {tuple(v.shape) for v in value}
                if len(shapes) > 1:
                    raise ValueError(f'ImageDataPreprocessor: cannot batch {what} of different '
                                     f'shapes {sorted(shapes)}')
                return torch.stack(list(value))
            return torch.as_tensor(value)
        return torch.as_tensor(value)

    def _labels(self, value):
        labels = self._stack(value, 'labels')
        if labels.ndim == 0:
            labels = labels.reshape(1)
        if labels.ndim == 1 and not labels.is_floating_point():  # class indices
            if self.label_dim is None:
                raise ValueError('ImageDataPreprocessor: labels arrived as class indices; set '
                                 'label_dim so they can be made one-hot')
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.label_dim):
                raise ValueError(f'ImageDataPreprocessor: class indices must lie in '
                                 f'[0, {self.label_dim}), got {labels.tolist()}')
            labels = torch.nn.functional.one_hot(labels.long(), self.label_dim)
        if labels.ndim != 2:
            raise ValueError(f'ImageDataPreprocessor: expected one-hot labels of shape '
                             f'[B, label_dim] or class indices [B], got {tuple(labels.shape)}')
        if self.label_dim is not None and labels.shape[1] != self.label_dim:
            raise ValueError(f'ImageDataPreprocessor: labels have width {labels.shape[1]}, '
                             f'expected label_dim={self.label_dim}')
        if labels.shape[1] == 0:
            return None
        return labels.to(self.device, non_blocking=self._non_blocking).to(self.dtype)

    def forward(self, data, training=False):
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            data = pseudo_collate(list(data))  # a list of item dicts, not yet collated
        if not isinstance(data, Mapping):
            raise TypeError(f'ImageDataPreprocessor: expected a batch dict (or a list of item '
                            f'dicts), got {type(data).__name__}')
        inputs = labels = None
        images = data.get(self.image_key)
        if images is None and self.image_key == 'img':
            images = data.get('inputs')  # mmengine's usual key
        if images is not None:
            images = self._stack(images, 'images')
            if images.ndim < 2:
                raise ValueError(f'ImageDataPreprocessor: images must be [B, C, H, W] (or '
                                 f'[B, ...]), got shape {tuple(images.shape)}')
            images = images.to(self.device, non_blocking=self._non_blocking)  # move uint8
            inputs = self.scale(images, self.dtype)
        if data.get(self.label_key) is not None:
            labels = self._labels(data[self.label_key])
        if inputs is not None and labels is not None and labels.shape[0] != inputs.shape[0]:
            raise ValueError(f'ImageDataPreprocessor: {inputs.shape[0]} images but '
                             f'{labels.shape[0]} labels in the batch')
        return {'inputs': inputs, 'labels': labels}

    def __repr__(self):
        return (f'{type(self).__name__}(label_dim={self.label_dim}, dtype={self.dtype}, '
                f'image_key={self.image_key!r}, label_key={self.label_key!r})')
