"""EDM's image dataset layout: a folder or a .zip archive of PNG/JPEG images (searched
recursively, ordered by relative path) with an optional ``dataset.json`` at its root,

    {"labels": [["00000/img00000000.png", 6], ["00000/img00000001.png", 9], ...]}

(``"labels": null`` for an unlabelled set). Every item is a dict

    {'img': uint8 tensor [C, H, W], 'label': float32 one-hot [label_dim], 'idx': int}

with ``label_dim = max label + 1`` (0 when there are no labels, so ``label`` has length 0).
Scaling to [−1, 1] happens later, in ``ImageDataPreprocessor``.
"""
import io
import json
import numbers
import os
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..registry import DATASETS

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
LABEL_FILE = 'dataset.json'

# PIL mode -> (mode to convert to, number of channels). 8-bit modes only.
_MODES = {
    '1': ('L', 1), 'L': ('L', 1), 'LA': ('LA', 2), 'RGB': ('RGB', 3), 'RGBA': ('RGBA', 4),
    'CMYK': ('RGB', 3), 'YCbCr': ('RGB', 3), 'P': (None, None), 'PA': ('RGBA', 4),
}


class DatasetFormatError(ValueError):
    """The files at a dataset path are not a valid EDM-format image dataset."""


def _target_mode(img, where):
    """The 8-bit mode an image is read as, and its channel count."""
    mode = img.mode
    if mode == 'P':  # palette: RGBA when it carries transparency, else RGB
        return ('RGBA', 4) if 'transparency' in img.info else ('RGB', 3)
    if mode not in _MODES:
        raise DatasetFormatError(
            f'{where}: unsupported image mode {mode!r}; expected an 8-bit grayscale or colour '
            f'image (PIL modes {", ".join(sorted(_MODES))}). Convert 16-bit or float images '
            'to 8 bits first.')
    return _MODES[mode]


def _is_image(relpath):
    name = relpath.rsplit('/', 1)[-1]
    if name.startswith('._') or relpath.startswith('__MACOSX/'):  # macOS archive litter
        return False
    return name.lower().endswith(IMAGE_EXTENSIONS)


@DATASETS.register_module()
class EDMImageDataset(Dataset):
    """Images (and class labels) in EDM's dataset format, from a folder or a zip archive.

    Args:
        path (str): a directory or a ``.zip`` file.
        resolution (int, optional): expected image side; an error is raised if the images
            have another size.
        use_labels (bool): read ``dataset.json`` labels; when False every item's label has
            length 0 and ``label_dim`` is 0.
        max_size (int, optional): keep at most this many images, a fixed random subset
            (chosen with ``random_seed``, then kept in path order), as EDM does.
        xflip (bool): double the dataset with horizontally mirrored copies; items
            ``len(self)//2 …`` are the mirrors of items ``0 …``.
        random_seed (int): seed of the ``max_size`` subset.
        check_all (bool): read the header of every image when the dataset is created, so
            size / channel mismatches are reported up front (cheap: headers only). When False
            only the first image is checked then, and each image is still checked when it is
            loaded.

    Zip archives are opened lazily, once per process, so the dataset is safe to use from
    DataLoader workers (fork or spawn).
    """

    def __init__(self, path, resolution=None, use_labels=True, max_size=None, xflip=False,
                 random_seed=0, check_all=True):
        self._path = os.fspath(path)
        self._use_labels = bool(use_labels)
        self._xflip = bool(xflip)
        self._zipfile = None
        self._zip_pid = None
        if resolution is not None and (isinstance(resolution, bool) or
                                       not isinstance(resolution, numbers.Integral)
                                       or resolution < 1):
            raise ValueError(f'EDMImageDataset: resolution must be a positive int or None, '
                             f'got {resolution!r}')
        if max_size is not None and (isinstance(max_size, bool) or
                                     not isinstance(max_size, numbers.Integral) or max_size < 1):
            raise ValueError(f'EDMImageDataset: max_size must be a positive int or None, '
                             f'got {max_size!r}')

        if os.path.isdir(self._path):
            self._kind = 'dir'
            names = []
            for root, dirs, files in os.walk(self._path, followlinks=True):
                dirs.sort()
                for f in files:
                    rel = os.path.relpath(os.path.join(root, f), self._path)
                    names.append(rel.replace(os.sep, '/'))
        elif os.path.isfile(self._path):
            self._kind = 'zip'
            if not self._path.lower().endswith('.zip') and not zipfile.is_zipfile(self._path):
                raise DatasetFormatError(
                    f'{self._path}: expected a directory or a .zip archive of images, '
                    'got a file that is neither')
            names = [n for n in self._zip().namelist() if not n.endswith('/')]
        else:
            raise FileNotFoundError(
                f'EDMImageDataset: dataset path {self._path!r} does not exist (expected a '
                'directory or a .zip archive of PNG/JPEG images)')

        all_names = set(names)
        images = sorted(n for n in names if _is_image(n))
        if not images:
            raise DatasetFormatError(
                f'{self._path}: no images found (looked recursively for files ending in '
                f'{", ".join(IMAGE_EXTENSIONS)}, any case)')
        self._total_images = len(images)
        if max_size is not None and max_size < len(images):
            keep = np.random.RandomState(random_seed).choice(len(images), int(max_size),
                                                             replace=False)
            images = [images[i] for i in sorted(keep)]
        self._names = images

        # Shape: from the first image, then every header (or each image as it is loaded).
        c, h, w = self._header_shape(images[0])
        if h != w:
            raise DatasetFormatError(f'{self._where(images[0])}: images must be square, '
                                     f'got {w}x{h} (width x height)')
        if resolution is not None and resolution != h:
            raise DatasetFormatError(
                f'{self._where(images[0])}: resolution={resolution} was requested but the '
                f'images are {w}x{h}')
        self._image_shape = (c, h, w)
        if check_all:
            for name in images[1:]:
                self._check_shape(name, self._header_shape(name))

        self._raw_labels = self._load_labels(all_names) if self._use_labels else None
        self._label_dim = (int(self._raw_labels.max()) + 1) if self._raw_labels is not None else 0

    # ------------------------------------------------------------------ file access
    def _where(self, name):
        return os.path.join(self._path, name) if self._kind == 'dir' else f'{self._path}:{name}'

    def _zip(self):
        """The archive, opened once per process (a handle inherited through fork is not
        reused: its file offset would be shared with the parent)."""
        pid = os.getpid()
        if self._zipfile is None or self._zip_pid != pid:
            try:
                self._zipfile = zipfile.ZipFile(self._path)
            except zipfile.BadZipFile as e:
                raise DatasetFormatError(f'{self._path}: not a valid zip archive ({e}); '
                                         'expected a zip of PNG/JPEG images') from None
            self._zip_pid = pid
        return self._zipfile

    def _open(self, name):
        if self._kind == 'dir':
            return open(os.path.join(self._path, name), 'rb')
        return self._zip().open(name, 'r')

    def _read_bytes(self, name):
        try:
            with self._open(name) as f:
                return f.read()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise DatasetFormatError(f'{self._where(name)}: cannot read the file ({e})') from None

    def _header_shape(self, name):
        try:
            with self._open(name) as f, Image.open(f) as img:
                _, channels = _target_mode(img, self._where(name))
                w, h = img.size
        except (UnidentifiedImageError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise DatasetFormatError(f'{self._where(name)}: not a readable PNG/JPEG image '
                                     f'({e})') from None
        return channels, h, w

    def _check_shape(self, name, shape):
        if tuple(shape) != self._image_shape:
            c, h, w = shape
            ec, eh, ew = self._image_shape
            raise DatasetFormatError(
                f'{self._where(name)}: image is {w}x{h} with {c} channel(s), expected '
                f'{ew}x{eh} with {ec} channel(s) like {self._names[0]!r} (all images must '
                'share one square size and channel count)')

    def _load_labels(self, all_names):
        if LABEL_FILE not in all_names:
            return None
        where = self._where(LABEL_FILE)
        try:
            meta = json.loads(self._read_bytes(LABEL_FILE).decode('utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetFormatError(f'{where}: not valid JSON ({e}); expected '
                                     '{"labels": [[relative_path, int], ...]}') from None
        if not isinstance(meta, dict) or 'labels' not in meta:
            raise DatasetFormatError(f'{where}: expected a JSON object with a "labels" key '
                                     '({"labels": [[relative_path, int], ...]} or '
                                     '{"labels": null})')
        entries = meta['labels']
        if entries is None:
            return None
        if not isinstance(entries, list):
            raise DatasetFormatError(f'{where}: "labels" must be a list of '
                                     f'[relative_path, int] pairs or null, got '
                                     f'{type(entries).__name__}')
        table = {}
        for k, e in enumerate(entries):
            if (not isinstance(e, (list, tuple)) or len(e) != 2 or not isinstance(e[0], str)
                    or isinstance(e[1], bool) or not isinstance(e[1], int)):
                raise DatasetFormatError(f'{where}: labels[{k}] = {e!r}; expected a '
                                         '[relative_path, int] pair')
            rel, lab = e[0].replace('\\', '/'), e[1]
            if lab < 0:
                raise DatasetFormatError(f'{where}: labels[{k}] gives {rel!r} the negative '
                                         f'label {lab}; labels must be integers >= 0')
            if rel in table and table[rel] != lab:
                raise DatasetFormatError(f'{where}: {rel!r} is listed twice with different '
                                         f'labels ({table[rel]} and {lab})')
            table[rel] = lab
        missing = [n for n in self._names if n not in table]
        if missing:
            shown = ', '.join(repr(m) for m in missing[:5])
            raise DatasetFormatError(
                f'{where}: no label for {len(missing)} of {len(self._names)} images '
                f'(e.g. {shown}); every image needs a [relative_path, int] entry')
        return np.array([table[n] for n in self._names], dtype=np.int64)

    # ------------------------------------------------------------------ pickling (workers)
    def __getstate__(self):
        state = self.__dict__.copy()
        state['_zipfile'] = None
        state['_zip_pid'] = None
        return state

    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
        self._zipfile = None
        self._zip_pid = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ------------------------------------------------------------------ dataset API
    def __len__(self):
        return len(self._names) * (2 if self._xflip else 1)

    def raw_index(self, idx):
        """(position in ``image_names``, mirrored?) of item ``idx``."""
        n = len(self._names)
        if not -len(self) <= idx < len(self):
            raise IndexError(f'index {idx} out of range for a dataset of {len(self)} items')
        idx = idx % len(self)
        return idx % n, idx >= n

    def load_image(self, raw):
        """The uint8 [C, H, W] tensor of the ``raw``-th image (no mirroring)."""
        name = self._names[raw]
        where = self._where(name)
        data = self._read_bytes(name)
        try:
            img = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, EOFError, SyntaxError) as e:
            raise DatasetFormatError(f'{where}: not a readable PNG/JPEG image ({e})') from None
        with img:
            mode, channels = _target_mode(img, where)
            self._check_shape(name, (channels, img.size[1], img.size[0]))
            try:
                img.load()
                arr = np.asarray(img if img.mode == mode else img.convert(mode), dtype=np.uint8)
            except (OSError, EOFError, SyntaxError, ValueError) as e:
                raise DatasetFormatError(f'{where}: cannot decode the image ({e})') from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # own, writable, contiguous

    def get_label(self, raw):
        """Float32 one-hot label of the ``raw``-th image (length ``label_dim``)."""
        onehot = torch.zeros(self._label_dim, dtype=torch.float32)
        if self._raw_labels is not None:
            onehot[int(self._raw_labels[raw])] = 1.0
        return onehot

    def __getitem__(self, idx):
        idx = int(idx)
        raw, flip = self.raw_index(idx)
        img = self.load_image(raw)
        if flip:
            img = img.flip(-1).contiguous()
        return {'img': img, 'label': self.get_label(raw), 'idx': idx % len(self)}

    # ------------------------------------------------------------------ properties
    @property
    def path(self):
        return self._path

    @property
    def image_names(self):
        """Relative paths of the images, in item order (before mirroring)."""
        return list(self._names)

    @property
    def image_shape(self):
        """(C, H, W)."""
        return tuple(self._image_shape)

    @property
    def num_channels(self):
        return self._image_shape[0]

    @property
    def resolution(self):
        return self._image_shape[1]

    @property
    def label_dim(self):
        return self._label_dim

    @property
    def has_labels(self):
        return self._label_dim > 0

    @property
    def raw_labels(self):
        """int64 array of the class of every image, or None when unlabelled."""
        return None if self._raw_labels is None else self._raw_labels.copy()

    @property
    def metainfo(self):
        return dict(image_shape=self.image_shape, resolution=self.resolution,
                    num_channels=self.num_channels, label_dim=self.label_dim,
                    num_images=len(self._names), xflip=self._xflip)

    def __repr__(self):
        return (f'{type(self).__name__}(path={self._path!r}, items={len(self)}, '
                f'image_shape={self.image_shape}, label_dim={self.label_dim}, '
                f'xflip={self._xflip})')
