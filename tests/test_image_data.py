"""EDM-format image datasets (folders and zips of PNG/JPEG + dataset.json) and the
preprocessor that scales their uint8 images to [−1, 1]."""
import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from mmengine.dataset import default_collate, pseudo_collate
from PIL import Image
from torch.utils.data import DataLoader

from gdistill.data import DatasetFormatError, EDMImageDataset, ImageDataPreprocessor
from gdistill.registry import DATASETS, MODELS


# --------------------------------------------------------------------------- helpers
def _pixels(k, res=8, channels=3):
    rng = np.random.RandomState(k)
    shape = (res, res) if channels == 1 else (res, res, channels)
    return rng.randint(0, 256, size=shape, dtype=np.uint8)


def _png_bytes(arr, fmt='PNG'):  # or another PIL format
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_files(n=6, res=8, channels=3, labels=True, nested=True):
    """{relative path: bytes} of a small EDM-style dataset, plus the expected arrays."""
    files, arrays, labs = {}, {}, {}
    for k in range(n):
        rel = (f'{k // 3:05d}/img{k:08d}.png' if nested else f'img{k:08d}.png')
        arr = _pixels(k, res, channels)
        files[rel] = _png_bytes(arr)
        arrays[rel] = arr
        labs[rel] = (k * 7) % 5
    if labels:
        files['dataset.json'] = json.dumps(
            {'labels': [[r, labs[r]] for r in sorted(arrays)]}).encode()
    return files, arrays, labs


def write_dir(root, files):
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return str(root)


def write_zip(path, files):
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as z:
        for rel, data in files.items():
            z.writestr(rel, data)
    return str(path)


def chw(arr):
    t = torch.from_numpy(arr)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


@pytest.fixture(params=['dir', 'zip'])
def kind(request):
    return request.param


def write(kind, tmp_path, files, name='ds'):
    if kind == 'dir':
        return write_dir(tmp_path / name, files)
    return write_zip(tmp_path / f'{name}.zip', files)


# --------------------------------------------------------------------------- reading
def test_items_labels_and_properties(kind, tmp_path):
    files, arrays, labs = make_files(n=7)
    ds = EDMImageDataset(write(kind, tmp_path, files))
    assert len(ds) == 7
    assert ds.image_names == sorted(arrays)
    assert ds.label_dim == 5 and ds.has_labels
    assert ds.resolution == 8 and ds.num_channels == 3 and ds.image_shape == (3, 8, 8)
    for i, rel in enumerate(sorted(arrays)):
        item = ds[i]
        assert set(item) == {'img', 'label', 'idx'}
        assert item['img'].dtype == torch.uint8 and item['img'].shape == (3, 8, 8)
        assert torch.equal(item['img'], chw(arrays[rel]))  # PNG is lossless
        assert item['label'].dtype == torch.float32
        assert torch.equal(item['label'], torch.nn.functional.one_hot(
            torch.tensor(labs[rel]), 5).float())
        assert item['idx'] == i
    assert ds.metainfo['label_dim'] == 5
    assert 'EDMImageDataset' in repr(ds)


def test_zip_and_folder_agree(tmp_path):
    files, _, _ = make_files(n=5)
    a = EDMImageDataset(write_dir(tmp_path / 'd', files))
    b = EDMImageDataset(write_zip(tmp_path / 'd.zip', files))
    assert a.image_names == b.image_names
    for i in range(5):
        assert torch.equal(a[i]['img'], b[i]['img']) and torch.equal(a[i]['label'], b[i]['label'])


def test_sorted_by_relative_path_recursively(tmp_path):
    files = {}
    for rel in ['b/2.png', 'a/z.png', 'a/sub/0.jpg', 'c.PNG', 'a/y.JPEG', 'notes.txt']:
        fmt = 'JPEG' if rel.lower().endswith(('.jpg', '.jpeg')) else 'PNG'
        files[rel] = _png_bytes(_pixels(len(files)), fmt=fmt)
    ds = EDMImageDataset(write_dir(tmp_path / 'd', files))
    assert ds.image_names == ['a/sub/0.jpg', 'a/y.JPEG', 'a/z.png', 'b/2.png', 'c.PNG']
    assert ds.label_dim == 0
    img = ds[0]['img']  # JPEG decodes to the right shape (lossy, so only roughly equal)
    assert img.shape == (3, 8, 8)


def test_grayscale_gives_one_channel(kind, tmp_path):
    files, arrays, _ = make_files(n=3, channels=1, labels=False)
    ds = EDMImageDataset(write(kind, tmp_path, files))
    assert ds.num_channels == 1 and ds.image_shape == (1, 8, 8)
    rel = sorted(arrays)[1]
    assert torch.equal(ds[1]['img'], torch.from_numpy(arrays[rel])[None])


def test_no_labels_variants(tmp_path):
    files, _, _ = make_files(n=3, labels=False)
    ds = EDMImageDataset(write_dir(tmp_path / 'a', files))  # no dataset.json
    assert ds.label_dim == 0 and ds[0]['label'].shape == (0,) and ds[0]['label'].dtype == torch.float32
    files['dataset.json'] = json.dumps({'labels': None}).encode()
    ds = EDMImageDataset(write_dir(tmp_path / 'b', files))  # "labels": null
    assert ds.label_dim == 0 and ds.raw_labels is None
    files, _, _ = make_files(n=3)
    ds = EDMImageDataset(write_dir(tmp_path / 'c', files), use_labels=False)
    assert ds.label_dim == 0 and ds[2]['label'].shape == (0,)


def test_xflip_doubles_with_mirrors(kind, tmp_path):
    files, arrays, labs = make_files(n=3)
    ds = EDMImageDataset(write(kind, tmp_path, files), xflip=True)
    assert len(ds) == 6
    for i, rel in enumerate(sorted(arrays)):
        assert torch.equal(ds[i]['img'], chw(arrays[rel]))
        assert torch.equal(ds[i + 3]['img'], chw(arrays[rel][:, ::-1].copy()))
        assert torch.equal(ds[i + 3]['label'], ds[i]['label'])
        assert ds[i + 3]['idx'] == i + 3
    with pytest.raises(IndexError):
        ds[6]


def test_max_size_subset_is_fixed_and_ordered(tmp_path):
    files, _, labs = make_files(n=10)
    path = write_dir(tmp_path / 'd', files)
    a = EDMImageDataset(path, max_size=4)
    b = EDMImageDataset(path, max_size=4)
    assert len(a) == 4 and a.image_names == b.image_names == sorted(a.image_names)
    assert a.label_dim == max(labs[r] for r in a.image_names) + 1  # from the kept images
    assert [int(l) for l in a.raw_labels] == [labs[r] for r in a.image_names]
    assert len(EDMImageDataset(path, max_size=50)) == 10
    assert EDMImageDataset(path, max_size=4, random_seed=1).image_names != a.image_names


def test_resolution_accepted_when_it_matches(tmp_path):
    files, _, _ = make_files(n=2, res=16)
    assert EDMImageDataset(write_dir(tmp_path / 'd', files), resolution=16).resolution == 16


def test_registered_in_datasets(tmp_path):
    files, _, _ = make_files(n=2)
    ds = DATASETS.build(dict(type='EDMImageDataset', path=write_dir(tmp_path / 'd', files)))
    assert isinstance(ds, EDMImageDataset) and len(ds) == 2


# --------------------------------------------------------------------------- workers
def test_zip_is_safe_with_dataloader_workers(tmp_path):
    files, arrays, _ = make_files(n=8)
    ds = EDMImageDataset(write_zip(tmp_path / 'd.zip', files))
    ds[0]  # opens the archive in this process first
    expected = torch.stack([chw(arrays[r]) for r in sorted(arrays)])
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=default_collate)
    got = torch.cat([b['img'] for b in loader])
    assert torch.equal(got, expected)
    # pickling (spawned workers) drops the open handle and reopens on first use
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zipfile is None
    assert torch.equal(clone[5]['img'], expected[5])


def test_archive_reopened_after_fork(tmp_path):
    files, _, _ = make_files(n=2)
    ds = EDMImageDataset(write_zip(tmp_path / 'd.zip', files))
    handle = ds._zip()
    ds._zip_pid = -1  # as a forked child sees it: another process's handle
    assert ds._zip() is not handle
    assert ds._zip() is ds._zip()


# --------------------------------------------------------------------------- errors
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        EDMImageDataset(str(tmp_path / 'nope'))


def test_not_a_zip_and_corrupt_zip(tmp_path):
    bad = tmp_path / 'fake.zip'
    bad.write_bytes(b'this is not an archive')
    with pytest.raises(DatasetFormatError, match='fake.zip.*not a valid zip'):
        EDMImageDataset(str(bad))
    other = tmp_path / 'data.bin'
    other.write_bytes(b'neither')
    with pytest.raises(DatasetFormatError, match='data.bin.*neither'):
        EDMImageDataset(str(other))
    files, _, _ = make_files(n=4)
    good = tmp_path / 'good.zip'
    write_zip(good, files)
    truncated = tmp_path / 'truncated.zip'
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetFormatError, match='truncated.zip'):
        EDMImageDataset(str(truncated))


def test_corrupt_member_names_the_file(kind, tmp_path):
    files, _, _ = make_files(n=3, labels=False)
    files['00000/img00000001.png'] = b'\x89PNG garbage'
    with pytest.raises(DatasetFormatError, match='img00000001.png.*not a readable'):
        EDMImageDataset(write(kind, tmp_path, files))
    # a PNG whose header is fine but whose pixel data is cut short fails when loaded
    files, _, _ = make_files(n=3, res=32, labels=False)
    rel = '00000/img00000002.png'
    files[rel] = files[rel][: len(files[rel]) // 2]
    ds = EDMImageDataset(write(kind, tmp_path, files, name='trunc'))
    with pytest.raises(DatasetFormatError, match='img00000002.png'):
        ds[2]


def test_no_images(kind, tmp_path):
    files = {'readme.txt': b'hello', 'sub/data.csv': b'1,2'}
    with pytest.raises(DatasetFormatError, match='no images found'):
        EDMImageDataset(write(kind, tmp_path, files))


def test_images_of_different_sizes(kind, tmp_path):
    files, _, _ = make_files(n=4, labels=False)
    files['00001/img00000004.png'] = _png_bytes(_pixels(9, res=12))
    with pytest.raises(DatasetFormatError, match=r'img00000004.png.*12x12.*expected 8x8'):
        EDMImageDataset(write(kind, tmp_path, files))
    # without the up-front scan the mismatch is reported when the image is loaded
    ds = EDMImageDataset(write(kind, tmp_path, files, name='lazy'), check_all=False)
    ds[0]
    with pytest.raises(DatasetFormatError, match=r'img00000004.png.*12x12'):
        ds[4]


def test_mixed_channels(tmp_path):
    files, _, _ = make_files(n=3, labels=False)
    files['00001/img00000009.png'] = _png_bytes(_pixels(3, channels=1))
    with pytest.raises(DatasetFormatError, match=r'img00000009.png.*1 channel.*3 channel'):
        EDMImageDataset(write_dir(tmp_path / 'd', files))


def test_not_square(tmp_path):
    files = {'a.png': _png_bytes(np.zeros((8, 10, 3), np.uint8))}
    with pytest.raises(DatasetFormatError, match=r'a.png.*square.*10x8'):
        EDMImageDataset(write_dir(tmp_path / 'd', files))


def test_resolution_disagrees(kind, tmp_path):
    files, _, _ = make_files(n=2)
    with pytest.raises(DatasetFormatError, match='resolution=32.*8x8'):
        EDMImageDataset(write(kind, tmp_path, files), resolution=32)


@pytest.mark.parametrize('content,match', [
    (b'{"labels": [["a", 1]', 'not valid JSON'),
    (b'[1, 2, 3]', '"labels" key'),
    (b'{"classes": []}', '"labels" key'),
    (b'{"labels": {"a": 1}}', 'must be a list'),
    (b'{"labels": [["00000/img00000000.png"]]}', r'labels\[0\]'),
    (b'{"labels": [[3, 1]]}', r'labels\[0\]'),
    (b'{"labels": [["00000/img00000000.png", 1.5]]}', r'labels\[0\]'),
    (b'{"labels": [["00000/img00000000.png", true]]}', r'labels\[0\]'),
])
def test_malformed_dataset_json(kind, tmp_path, content, match):
    files, _, _ = make_files(n=3)
    files['dataset.json'] = content
    with pytest.raises(DatasetFormatError, match='dataset.json.*' + match):
        EDMImageDataset(write(kind, tmp_path, files))
    # use_labels=False never reads the file
    assert EDMImageDataset(write(kind, tmp_path, files, name='nolab'), use_labels=False).label_dim == 0


def test_missing_label_entries(kind, tmp_path):
    files, arrays, labs = make_files(n=5)
    keep = sorted(arrays)[:3]
    files['dataset.json'] = json.dumps({'labels': [[r, labs[r]] for r in keep]}).encode()
    with pytest.raises(DatasetFormatError, match=r'dataset.json.*no label for 2 of 5.*img00000003'):
        EDMImageDataset(write(kind, tmp_path, files))


def test_negative_and_conflicting_labels(tmp_path):
    files, arrays, labs = make_files(n=3)
    entries = [[r, labs[r]] for r in sorted(arrays)]
    entries[1][1] = -2
    files['dataset.json'] = json.dumps({'labels': entries}).encode()
    with pytest.raises(DatasetFormatError, match='negative label -2'):
        EDMImageDataset(write_dir(tmp_path / 'a', files))
    entries[1][1] = 1
    entries.append([entries[1][0], 3])
    files['dataset.json'] = json.dumps({'labels': entries}).encode()
    with pytest.raises(DatasetFormatError, match='listed twice'):
        EDMImageDataset(write_dir(tmp_path / 'b', files))


def test_bad_arguments(tmp_path):
    files, _, _ = make_files(n=2)
    path = write_dir(tmp_path / 'd', files)
    with pytest.raises(ValueError, match='resolution'):
        EDMImageDataset(path, resolution=0)
    with pytest.raises(ValueError, match='max_size'):
        EDMImageDataset(path, max_size=0)


# --------------------------------------------------------------------------- preprocessor
def test_scaling_is_exact_and_round_trips():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = ImageDataPreprocessor.scale(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, x.float() / 127.5 - 1)
    assert y.min() == -1.0 and y.max() == 1.0 and float(y.flatten()[128]) == pytest.approx(1 / 255, abs=1e-7)
    assert torch.equal(ImageDataPreprocessor.to_uint8(y), x)
    # small perturbations still round back; out-of-range values clip
    assert torch.equal(ImageDataPreprocessor.to_uint8(y + 0.003), x)
    assert ImageDataPreprocessor.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
    with pytest.raises(TypeError, match='uint8'):
        ImageDataPreprocessor.scale(x.float())


def _items(n=4, label_dim=3):
    g = torch.Generator().manual_seed(0)
    return [{'img': torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=g),
             'label': torch.nn.functional.one_hot(torch.tensor(k % label_dim), label_dim).float(),
             'idx': k} for k in range(n)]


@pytest.mark.parametrize('collate', ['pseudo', 'default', 'none'])
def test_preprocessor_collations(collate):
    items = _items()
    batch = {'pseudo': pseudo_collate, 'default': default_collate,
             'none': lambda x: x}[collate](items)
    out = ImageDataPreprocessor()(batch, training=True)
    assert set(out) == {'inputs', 'labels'}
    imgs = torch.stack([it['img'] for it in items])
    assert out['inputs'].shape == (4, 3, 4, 4) and out['inputs'].dtype == torch.float32
    assert torch.equal(out['inputs'], imgs.float() / 127.5 - 1)
    assert torch.equal(out['labels'], torch.stack([it['label'] for it in items]))


def test_preprocessor_end_to_end_from_dataset(tmp_path):
    files, arrays, labs = make_files(n=5)
    ds = EDMImageDataset(write_zip(tmp_path / 'd.zip', files))
    pre = MODELS.build(dict(type='ImageDataPreprocessor', label_dim=5))
    batch = next(iter(DataLoader(ds, batch_size=5, collate_fn=pseudo_collate)))
    out = pre(batch)
    rel = sorted(arrays)
    assert torch.equal(pre.to_uint8(out['inputs']), torch.stack([chw(arrays[r]) for r in rel]))
    assert out['labels'].argmax(1).tolist() == [labs[r] for r in rel]


def test_preprocessor_unlabelled_and_data_free():
    items = [{'img': it['img'], 'label': torch.zeros(0), 'idx': it['idx']} for it in _items()]
    out = ImageDataPreprocessor()(pseudo_collate(items))
    assert out['inputs'].shape == (4, 3, 4, 4) and out['labels'] is None  # label_dim 0
    # data-free: labels only (one-hot or class indices), or nothing but an index
    out = ImageDataPreprocessor()(pseudo_collate([{'label': it['label']} for it in _items()]))
    assert out['inputs'] is None and out['labels'].shape == (4, 3)
    out = ImageDataPreprocessor(label_dim=3)(default_collate([{'label': k % 3} for k in range(4)]))
    assert out['inputs'] is None
    assert torch.equal(out['labels'], torch.eye(3)[[0, 1, 2, 0]])
    out = ImageDataPreprocessor()(pseudo_collate([{'idx': k} for k in range(4)]))
    assert out == {'inputs': None, 'labels': None}
    with pytest.raises(ValueError, match='label_dim'):
        ImageDataPreprocessor()(default_collate([{'label': 1}, {'label': 2}]))
    with pytest.raises(ValueError, match=r'\[0, 3\)'):
        ImageDataPreprocessor(label_dim=3)(default_collate([{'label': 1}, {'label': 3}]))


def test_preprocessor_checks():
    with pytest.raises(ValueError, match='different shapes'):
        ImageDataPreprocessor()({'img': [torch.zeros(3, 4, 4, dtype=torch.uint8),
                                         torch.zeros(3, 5, 5, dtype=torch.uint8)]})
    with pytest.raises(ValueError, match='width 3, expected label_dim=10'):
        ImageDataPreprocessor(label_dim=10)(pseudo_collate(_items()))
    with pytest.raises(TypeError, match='batch dict'):
        ImageDataPreprocessor()(torch.zeros(3))
    with pytest.raises(ValueError, match='label_dim'):
        ImageDataPreprocessor(label_dim=-1)
    pre = ImageDataPreprocessor(dtype='float64')
    assert pre(pseudo_collate(_items()))['inputs'].dtype == torch.float64
    assert pre.device == torch.device('cpu')
