"""Data for data-free distillation: the dataloader only paces the run (batch size, epochs);
the distiller draws its own noise and, for class-conditional teachers, its labels."""
import torch
from mmengine.model import BaseDataPreprocessor
from torch.utils.data import Dataset

from ..registry import DATASETS, MODELS


@DATASETS.register_module()
class DistillationDataset(Dataset):
    """``length`` index items ``{'idx': i}``; with ``label_dim`` > 0 also a one-hot label
    cycling through the classes (so an epoch is class-balanced)."""

    def __init__(self, length=1 << 20, label_dim=0):
        if length < 1 or label_dim < 0:
            raise ValueError(f'DistillationDataset: need length >= 1 and label_dim >= 0, got {length}, {label_dim}')
        self.length, self.label_dim = int(length), int(label_dim)

    def __len__(self):
        return self.length

    @property
    def metainfo(self):
        """What mmengine's loops hand to the visualizer (``dataset_meta``); without it they warn."""
        return dict(length=self.length, label_dim=self.label_dim)

    def __getitem__(self, idx):
        item = {'idx': idx}
        if self.label_dim:
            item['label'] = torch.nn.functional.one_hot(torch.tensor(idx % self.label_dim), self.label_dim).float()
        return item


@MODELS.register_module()
class DistillDataPreprocessor(BaseDataPreprocessor):
    """Turns a collated batch into ``{'batch_size', 'labels', 'inputs'}``: images (if any)
    scaled from uint8 [0, 255] to [−1, 1], labels stacked, everything on the model's device."""

    def forward(self, data, training=False):
        # stack per-item lists first: casting a 1024-long list item by item costs more than
        # a small network's forward pass
        def stack(v):
            return torch.stack(list(v)) if isinstance(v, (list, tuple)) else v
        out = dict(inputs=None, labels=None)
        if data.get('img') is not None:
            img = self.cast_data(stack(data['img']))
            out['inputs'] = img.float() / 127.5 - 1 if img.dtype == torch.uint8 else img.float()
        if data.get('label') is not None:
            out['labels'] = self.cast_data(stack(data['label'])).float()
        if out['inputs'] is not None:
            out['batch_size'] = out['inputs'].shape[0]
        elif out['labels'] is not None:
            out['batch_size'] = out['labels'].shape[0]
        elif data.get('idx') is not None:
            out['batch_size'] = len(data['idx'])
        else:
            raise ValueError(f'cannot tell the batch size of a batch with keys {sorted(data)}; '
                             "items need 'img', 'label' or 'idx'")
        return out
