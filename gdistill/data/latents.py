"""Datasets of VAE latents in EDM2's layout (NVlabs/edm2 ``dataset_tool.py encode`` and
``training/dataset.py``), read as they are:

    {dest}/00000/img-mean-std-00000000.npy   float32 [2C, h, w] = cat(posterior mean, std)
    {dest}/dataset.json                      {"labels": [["00000/img-mean-std-00000000.npy", 3], ...]}

(a folder or a zip of it; ``"labels": null`` or no ``dataset.json`` for an unlabelled set). For
ImageNet-512 through sd-vae-ft-mse every array is [8, 64, 64]. The arrays are the *raw latents*;
a training step sees a fresh posterior draw of them, whitened (``LatentDataPreprocessor``), as
EDM2's training loop draws one per step (``training_loop.py:222``). No VAE is needed to train.

``encode_image_dataset`` writes such a dataset from images (what ``tools/encode_latents.py``
runs); ``latent_statistics`` measures the per-channel mean and standard deviation that whiten
the latents of a VAE other than sd-vae-ft-mse.
"""
import io
import json
import numbers
import os
import os.path as osp
import zipfile
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

from ..networks.vae import SD_VAE_RAW_MEAN, SD_VAE_RAW_STD, draw_latents, latent_scale_bias
from ..registry import DATASETS, MODELS
from .distill import DistillDataPreprocessor
from .image_folder import LABEL_FILE, DatasetFormatError

__all__ = ['EDM2LatentDataset', 'LatentDataPreprocessor', 'latent_file_name', 'write_latent_dataset',
           'encode_image_dataset', 'latent_statistics']


def latent_file_name(idx):
    """EDM2's name of the ``idx``-th array: ``{idx:08d}[:5]/img-mean-std-{idx:08d}.npy``."""
    s = f'{int(idx):08d}'
    return f'{s[:5]}/img-mean-std-{s}.npy'


@DATASETS.register_module()
class EDM2LatentDataset(Dataset):
    """Raw latents (and class labels) in EDM2's layout, from a folder or a zip archive.

    Every item is ``{'img': float32 [2C, h, w] (posterior mean and std), 'label': float32
    one-hot [label_dim], 'idx': int}``; ``LatentDataPreprocessor`` turns the batch into latents.
    Like EDM2's ``ImageFolderDataset`` it takes every ``.npy`` file (recursively, ordered by
    relative path), reshapes each to [−1, h, w], and reads integer labels from ``dataset.json``
    (label_dim = max label + 1).

    Args:
        path (str): a folder or a ``.zip``.
        use_labels (bool): read the labels; when False every label has length 0.
        max_size (int, optional): a fixed random subset of this many arrays, the one EDM2's
            ``dataset.py`` takes for ``random_seed``.
        latent_channels (int, optional): expected C (the arrays then have 2C channels), e.g. 4
            for sd-vae-ft-mse; checked up front.
        resolution (int, optional): expected latent side h = w.
    """

    def __init__(self, path, use_labels=True, max_size=None, latent_channels=None, resolution=None,
                 random_seed=0):
        self._path = os.fspath(path)
        self._use_labels = bool(use_labels)
        self._zipfile = self._zip_pid = None
        for name, v in (('max_size', max_size), ('latent_channels', latent_channels), ('resolution', resolution)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f'EDM2LatentDataset: {name} must be a positive int or None, got {v!r}')
        if osp.isdir(self._path):
            self._kind = 'dir'
            names = []
            for root, dirs, files in os.walk(self._path, followlinks=True):
                dirs.sort()
                names += [osp.relpath(osp.join(root, f), self._path).replace(os.sep, '/') for f in files]
        elif osp.isfile(self._path):
            self._kind = 'zip'
            names = [n for n in self._zip().namelist() if not n.endswith('/')]
        else:
            raise FileNotFoundError(f'EDM2LatentDataset: {self._path!r} does not exist (expected a folder or '
                                    'a .zip of img-mean-std-*.npy arrays, as `tools/encode_latents.py` or '
                                    "EDM2's `dataset_tool.py encode` write them)")
        arrays = sorted(n for n in names if n.lower().endswith('.npy') and not n.rsplit('/', 1)[-1].startswith('._'))
        if not arrays:
            pngs = sum(n.lower().endswith(('.png', '.jpg', '.jpeg')) for n in names)
            hint = (f' It holds {pngs} images: encode them first (tools/encode_latents.py), or train on pixels '
                    'with EDMImageDataset.') if pngs else ''
            raise DatasetFormatError(f'{self._path}: no .npy latent arrays found.{hint}')
        if max_size is not None and max_size < len(arrays):  # the subset EDM2's dataset.py picks
            keep = np.arange(len(arrays))
            np.random.RandomState(random_seed % (1 << 31)).shuffle(keep)
            arrays = [arrays[i] for i in np.sort(keep[:int(max_size)])]
        self._names = arrays
        first = self.load_moments(0)
        self._shape = tuple(first.shape)
        c2, h, w = self._shape
        if c2 % 2:
            raise DatasetFormatError(f'{self._where(arrays[0])}: {c2} channels; raw latents hold the posterior '
                                     'mean and std concatenated, an even number (8 for sd-vae-ft-mse)')
        if latent_channels is not None and c2 != 2 * latent_channels:
            raise DatasetFormatError(f'{self._where(arrays[0])}: {c2} channels, expected 2 x {latent_channels} '
                                     f'(mean and std of {latent_channels} latent channels)')
        if resolution is not None and (h, w) != (resolution, resolution):
            raise DatasetFormatError(f'{self._where(arrays[0])}: latents are {h}x{w}, expected '
                                     f'{resolution}x{resolution}')
        self._raw_labels = self._load_labels(set(names)) if self._use_labels else None
        self._label_dim = int(self._raw_labels.max()) + 1 if self._raw_labels is not None else 0

    # ------------------------------------------------------------------ files
    def _where(self, name):
        return osp.join(self._path, name) if self._kind == 'dir' else f'{self._path}:{name}'

    def _zip(self):
        pid = os.getpid()
        if self._zipfile is None or self._zip_pid != pid:  # one handle per process (workers fork)
            try:
                self._zipfile = zipfile.ZipFile(self._path)
            except zipfile.BadZipFile as e:
                raise DatasetFormatError(f'{self._path}: not a folder nor a valid zip archive ({e})') from None
            self._zip_pid = pid
        return self._zipfile

    def _read(self, name):
        try:
            if self._kind == 'dir':
                with open(osp.join(self._path, name), 'rb') as f:
                    return f.read()
            with self._zip().open(name, 'r') as f:
                return f.read()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
            raise DatasetFormatError(f'{self._where(name)}: cannot read the file ({e})') from None

    def load_moments(self, raw):
        """The float32 [2C, h, w] array of the ``raw``-th file."""
        name = self._names[raw]
        try:
            arr = np.load(io.BytesIO(self._read(name)), allow_pickle=False)
        except ValueError as e:
            raise DatasetFormatError(f'{self._where(name)}: not a plain .npy array ({e})') from None
        if arr.ndim < 2 or not np.issubdtype(arr.dtype, np.floating):
            raise DatasetFormatError(f'{self._where(name)}: expected a float array [2C, h, w], got {arr.dtype} '
                                     f'of shape {arr.shape}')
        arr = arr.reshape(-1, *arr.shape[-2:]).astype(np.float32, copy=False)
        if hasattr(self, '_shape') and arr.shape != self._shape:
            raise DatasetFormatError(f'{self._where(name)}: shape {arr.shape}, but {self._names[0]!r} has '
                                     f'{self._shape}; every array must have one shape')
        return torch.from_numpy(np.ascontiguousarray(arr))

    def _load_labels(self, all_names):
        if LABEL_FILE not in all_names:
            return None
        where = self._where(LABEL_FILE)
        try:
            meta = json.loads(self._read(LABEL_FILE).decode('utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetFormatError(f'{where}: not valid JSON ({e})') from None
        if not isinstance(meta, dict) or 'labels' not in meta:
            raise DatasetFormatError(f'{where}: expected {{"labels": [[relative_path, int], ...]}} or '
                                     '{"labels": null}')
        entries = meta['labels']
        if entries is None:
            return None
        if not isinstance(entries, list):
            raise DatasetFormatError(f'{where}: "labels" must be a list of [relative_path, int] pairs or null')
        table = {}
        for k, e in enumerate(entries):
            if (not isinstance(e, (list, tuple)) or len(e) != 2 or not isinstance(e[0], str)
                    or isinstance(e[1], bool) or not isinstance(e[1], int) or e[1] < 0):
                raise DatasetFormatError(f'{where}: labels[{k}] = {e!r}; expected a [relative_path, int >= 0] pair')
            table[e[0].replace('\\', '/')] = e[1]
        missing = [n for n in self._names if n not in table]
        if missing:
            raise DatasetFormatError(f'{where}: no label for {len(missing)} of {len(self._names)} arrays '
                                     f'(e.g. {missing[0]!r}); every array needs a [relative_path, int] entry')
        return np.array([table[n] for n in self._names], dtype=np.int64)

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None, _zip_pid=None)

    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
        self._zipfile = self._zip_pid = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ dataset API
    def __len__(self):
        return len(self._names)

    def get_label(self, raw):
        onehot = torch.zeros(self._label_dim, dtype=torch.float32)
        if self._raw_labels is not None:
            onehot[int(self._raw_labels[raw])] = 1.0
        return onehot

    def __getitem__(self, idx):
        idx = int(idx)
        if not -len(self) <= idx < len(self):
            raise IndexError(f'index {idx} out of range for {len(self)} latent arrays')
        idx %= len(self)
        return {'img': self.load_moments(idx), 'label': self.get_label(idx), 'idx': idx}

    @property
    def path(self):
        return self._path

    @property
    def file_names(self):
        return list(self._names)

    @property
    def moments_shape(self):
        """(2C, h, w) of the stored arrays."""
        return self._shape

    @property
    def image_shape(self):
        """(C, h, w) of the latents the preprocessor makes (what the teacher is checked against)."""
        return self.latent_shape

    @property
    def latent_shape(self):
        """(C, h, w): what a network is trained on."""
        c2, h, w = self._shape
        return (c2 // 2, h, w)

    @property
    def label_dim(self):
        return self._label_dim

    @property
    def raw_labels(self):
        return None if self._raw_labels is None else self._raw_labels.copy()

    @property
    def metainfo(self):
        """What mmengine's loops hand to the visualizer (``dataset_meta``)."""
        return dict(latent_shape=self.latent_shape, label_dim=self.label_dim, num_arrays=len(self))

    def __repr__(self):
        return (f'{type(self).__name__}(path={self._path!r}, items={len(self)}, latents={self.latent_shape}, '
                f'label_dim={self.label_dim})')


@MODELS.register_module()
class LatentDataPreprocessor(DistillDataPreprocessor):
    """``DistillDataPreprocessor`` for raw latents: the batch's ``img`` [B, 2C, h, w] (posterior
    mean and std, ``EDM2LatentDataset``) becomes ``inputs`` = one fresh whitened posterior draw
    (mean + ε·std)·scale + bias [B, C, h, w] on the model's device, every time a batch is
    processed (EDM2's ``encode_latents``). ``raw_mean``/``raw_std``/``final_mean``/``final_std``
    are EDM2's whitening (its sd-vae-ft-mse values by default; ``latent_statistics`` measures them
    for another VAE). Batches without ``img`` (data-free distillation) pass through unchanged."""

    def __init__(self, raw_mean=SD_VAE_RAW_MEAN, raw_std=SD_VAE_RAW_STD, final_mean=0.0, final_std=0.5, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.bias = latent_scale_bias(raw_mean, raw_std, final_mean, final_std)

    def forward(self, data, training=False):
        data = dict(data)
        moments = data.pop('img', None)
        if moments is not None:
            moments = self.cast_data(torch.stack(list(moments)) if isinstance(moments, (list, tuple)) else moments)
            if moments.dtype == torch.uint8:
                raise ValueError('LatentDataPreprocessor: the batch holds uint8 images, not raw latents; encode '
                                 'the images first (tools/encode_latents.py) or use DistillDataPreprocessor')
            if data.get('label') is None and data.get('idx') is None:
                data['idx'] = list(range(moments.shape[0]))
        out = super().forward(data, training)
        if moments is not None:
            out['inputs'] = draw_latents(moments, self.scale, self.bias)
            out['batch_size'] = out['inputs'].shape[0]
            if out['labels'] is not None and out['labels'].shape[0] != out['batch_size']:
                raise ValueError(f'LatentDataPreprocessor: {out["batch_size"]} latents but '
                                 f'{out["labels"].shape[0]} labels in the batch')
        return out


# --- writing and measuring --------------------------------------------------------------------
class _Writer:
    """A folder or a zip (by ``dest``'s extension) to write a dataset into."""

    def __init__(self, dest):
        self.dest = os.fspath(dest)
        self.zip = None
        if self.dest.lower().endswith('.zip'):
            os.makedirs(osp.dirname(osp.abspath(self.dest)), exist_ok=True)
            self.zip = zipfile.ZipFile(self.dest + '.tmp', 'w', compression=zipfile.ZIP_STORED)
        else:
            if osp.isdir(self.dest) and os.listdir(self.dest):
                raise FileExistsError(f'{self.dest} exists and is not empty; give a new folder or a .zip name')
            os.makedirs(self.dest, exist_ok=True)

    def write(self, name, data):
        if self.zip is not None:
            self.zip.writestr(name, data)
            return
        path = osp.join(self.dest, name)
        os.makedirs(osp.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)

    def close(self, complete=True):
        """A zip gets its name only when complete (a failed run leaves no half archive behind)."""
        if self.zip is not None:
            self.zip.close()
            if complete:
                os.replace(self.dest + '.tmp', self.dest)
            else:
                os.remove(self.dest + '.tmp')


def write_latent_dataset(dest, moments, labels=None):
    """Writes raw latents (an iterable of float32 [2C, h, w] arrays or tensors) and their integer
    labels (or None) as EDM2 does: ``latent_file_name(i)`` per array, then ``dataset.json``.
    ``dest`` ending in ``.zip`` makes a zip archive, else a folder. Returns the number written."""
    writer = _Writer(dest)
    n = 0
    try:
        for i, m in enumerate(moments):
            arr = np.ascontiguousarray(m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m),
                                       dtype=np.float32)
            buf = io.BytesIO()
            np.save(buf, arr)
            writer.write(latent_file_name(i), buf.getvalue())
            n += 1
        entries = None
        if labels is not None:  # read after the arrays: a list may be filled while they are made
            labels = [int(v) for v in labels]
            if len(labels) != n:
                raise ValueError(f'write_latent_dataset: {n} arrays but {len(labels)} labels')
            entries = [[latent_file_name(i), lab] for i, lab in enumerate(labels)]
        writer.write(LABEL_FILE, json.dumps({'labels': entries}).encode())
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close()
    return n


@torch.no_grad()
def encode_image_dataset(dataset, vae, dest, batch_size=64, max_images=None, use_labels=True, progress=None):
    """Encodes the uint8 images of ``dataset`` (items ``{'img', 'label'}``, e.g. ``EDMImageDataset``
    or ``DigitsDataset``) with ``vae`` (a ``StabilityVAE``) into EDM2's latent layout at ``dest``
    (EDM2 ``dataset_tool.py encode``): array i holds the posterior mean and std of image i.
    ``progress(done, total)`` is called after every batch. Returns the number of arrays."""
    total = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    labels = [] if use_labels else None

    def arrays():
        for start in range(0, total, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, total))]
            images = torch.stack([it['img'] for it in items])
            for it in items:
                if labels is not None:
                    lab = it.get('label')
                    if lab is None or lab.numel() == 0:
                        raise ValueError('encode_image_dataset: the dataset has no labels; pass use_labels=False')
                    labels.append(int(lab.argmax()))
            yield from vae.encode_pixels(images)
            if progress is not None:
                progress(min(start + batch_size, total), total)
    return write_latent_dataset(dest, arrays(), labels)


def latent_statistics(dataset, max_items=None):
    """Per-channel mean and standard deviation of the posterior draws of a latent dataset (the
    raw_mean/raw_std that whiten it), in float64: E[z] = E[mean], Var[z] = E[std² + mean²] − E[z]²,
    over every position of every array (without drawing)."""
    n = len(dataset) if max_items is None else min(len(dataset), int(max_items))
    s1 = s2 = None
    count = 0
    for i in range(n):
        mean, std = dataset[i]['img'].to(torch.float64).chunk(2, dim=0)
        m1 = mean.flatten(1).sum(1)
        m2 = (mean ** 2 + std ** 2).flatten(1).sum(1)
        s1 = m1 if s1 is None else s1 + m1
        s2 = m2 if s2 is None else s2 + m2
        count += mean[0].numel()
    mu = s1 / count
    return mu.tolist(), (s2 / count - mu ** 2).clamp_min(0).sqrt().tolist()
