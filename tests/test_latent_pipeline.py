"""The latent pipeline of EDM2's ImageNet-512 models: the VAE's conventions (pixels in [0, 1],
EDM2's whitening, a fresh posterior draw), reading the VAE from local files only, EDM2's latent
dataset layout, the per-step draw of the preprocessor and decoding for sampling and metrics.
The VAE is a tiny randomly initialised diffusers AutoencoderKL."""
import io
import json
import os
import os.path as osp
import zipfile

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip('diffusers')

import gdistill.data  # noqa: E402,F401
import gdistill.networks  # noqa: E402,F401
import gdistill.samplers  # noqa: E402,F401
from gdistill.data.image_folder import DatasetFormatError  # noqa: E402
from gdistill.data.latents import (EDM2LatentDataset, LatentDataPreprocessor, encode_image_dataset,  # noqa: E402
                                   latent_file_name, latent_statistics, write_latent_dataset)
from gdistill.engine.visual import image_grid  # noqa: E402
from gdistill.metrics.detectors import images_to_uint8  # noqa: E402
from gdistill.networks.vae import StabilityVAE, clear_vae_cache, latent_scale_bias  # noqa: E402
from gdistill.registry import SAMPLERS, build  # noqa: E402

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
            norm_num_groups=4, down_block_types=['DownEncoderBlock2D'] * 2,
            up_block_types=['UpDecoderBlock2D'] * 2, sample_size=16)
# EDM2's constants as its training/encoders.py defines them (float32)
EDM2_SCALE = [0.11990407, 0.10822511, 0.13477089, 0.15243903]
EDM2_BIAS = [-0.69664264, -0.3517316, -0.01617251, 0.32774392]


@pytest.fixture
def vae():
    return StabilityVAE(config=TINY, seed=1)


def images(n=3, seed=0, c=3, r=16):
    return torch.randint(0, 256, (n, c, r, r), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# --- constants and conventions --------------------------------------------------------------
def test_whitening_constants_are_edm2s():
    scale, bias = latent_scale_bias()
    assert scale.dtype == bias.dtype == np.float32
    np.testing.assert_allclose(scale, EDM2_SCALE, rtol=0, atol=5e-9)
    np.testing.assert_allclose(bias, EDM2_BIAS, rtol=0, atol=5e-9)
    with pytest.raises(ValueError, match='positive'):
        latent_scale_bias(raw_std=[1, 0, 1, 1])
    with pytest.raises(ValueError, match='one length'):
        latent_scale_bias(raw_mean=[0, 0], raw_std=[1, 1, 1])


def test_encode_pixels_feeds_the_vae_0_1_pixels_and_returns_mean_and_std(vae):
    x = images()
    moments = vae.encode_pixels(x)
    assert moments.shape == (3, 8, 8, 8) and moments.dtype == torch.float32
    d = vae.vae.encode(x.float() / 255)['latent_dist']           # EDM2: uint8 / 255, not [-1, 1]
    torch.testing.assert_close(moments, torch.cat([d.mean, d.std], 1))
    other = vae.vae.encode(x.float() / 127.5 - 1)['latent_dist']
    assert not torch.allclose(moments[:, :4], other.mean, atol=1e-3)
    # batching (batch_size 8 by default; 2 here) does not change the result
    small = StabilityVAE(config=TINY, seed=1, batch_size=2)
    torch.testing.assert_close(small.encode_pixels(x), moments)
    with pytest.raises(ValueError, match='uint8'):
        vae.encode_pixels(x.float())
    with pytest.raises(ValueError, match='channels'):
        vae.encode_pixels(images(c=1))
    with pytest.raises(ValueError, match='divisible'):
        vae.encode_pixels(images(r=15))


def test_encode_latents_is_a_fresh_whitened_posterior_draw(vae):
    scale, bias = torch.tensor(EDM2_SCALE).view(1, 4, 1, 1), torch.tensor(EDM2_BIAS).view(1, 4, 1, 1)
    mean = torch.randn(2, 4, 8, 8)
    std = torch.rand(2, 4, 8, 8) + 0.5
    moments = torch.cat([mean, std], 1)
    # with std 0 the draw is the whitened mean, exactly
    torch.testing.assert_close(vae.encode_latents(torch.cat([mean, 0 * std], 1)), mean * scale + bias)
    # a fixed generator gives mean + ε·std for ε from that generator
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    got = vae.encode_latents(moments, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, (mean + eps * std) * scale + bias)
    a, b = vae.encode_latents(moments), vae.encode_latents(moments)
    assert not torch.equal(a, b)                                  # fresh on every call
    # moments: over many draws, mean·scale + bias and std·scale
    many = torch.stack([vae.encode_latents(moments[:1]) for _ in range(4000)])
    z = (many.mean(0) - (mean[:1] * scale + bias)) / (std[:1] * scale / 4000 ** 0.5)
    assert z.abs().max() < 5
    ratio = many.std(0) / (std[:1] * scale)
    assert (ratio - 1).abs().max() < 0.1


def test_decode_inverts_the_whitening_then_truncates_to_uint8(vae):
    x = torch.randn(2, 4, 8, 8) * 0.5
    raw = (x - torch.tensor(EDM2_BIAS).view(1, 4, 1, 1)) / torch.tensor(EDM2_SCALE).view(1, 4, 1, 1)
    p = vae.vae.decode(raw)['sample']
    pixels = vae.decode_float(x)
    torch.testing.assert_close(pixels, p)                         # the whitening undone
    # (compared on decode_float's own values: an ulp of difference may flip a truncated level)
    want = (pixels.clamp(0, 1) * 255).to(torch.uint8)             # truncation, not rounding
    got = vae.decode(x)
    assert got.dtype == torch.uint8 and got.shape == (2, 3, 16, 16)
    assert torch.equal(got, want)
    assert not torch.equal(got, (pixels.clamp(0, 1) * 255).round().to(torch.uint8))   # the test tells them apart
    with pytest.raises(ValueError, match='latents'):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_vae_is_not_part_of_the_module_tree(vae):
    assert list(vae.parameters()) == [] and vae.state_dict() == {}   # never checkpointed, never trained
    assert not any(p.requires_grad for p in vae.vae.parameters())


# --- reading the VAE from local files only ---------------------------------------------------
def test_vae_from_folder_cache_and_file(tmp_path, vae, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    clear_vae_cache()
    folder = tmp_path / 'sd-vae'
    vae.vae.save_pretrained(folder)
    x = images(2)
    ref = vae.encode_pixels(x)
    lat = torch.randn(2, 4, 8, 8) * 0.5
    ref_dec = vae.decode(lat)
    # the Hugging Face cache layout of stabilityai/sd-vae-ft-mse
    snap = tmp_path / 'hub' / 'models--stabilityai--sd-vae-ft-mse' / 'snapshots' / 'abc123'
    snap.mkdir(parents=True)
    for f in os.listdir(folder):
        os.link(folder / f, snap / f)
    from safetensors.torch import save_file
    save_file(vae.vae.state_dict(), str(tmp_path / 'vae.safetensors'))
    torch.save(vae.vae.state_dict(), tmp_path / 'vae.pt')
    for path, config in [(folder, None), (snap.parent.parent, None), (tmp_path / 'hub', None),
                         (tmp_path / 'vae.safetensors', TINY), (tmp_path / 'vae.pt', TINY)]:
        loaded = build_vae(path=str(path), config=config)
        torch.testing.assert_close(loaded.encode_pixels(x), ref)
        assert torch.equal(loaded.decode(lat), ref_dec)
    # read once per process
    assert StabilityVAE(path=str(folder)).vae is StabilityVAE(path=str(folder)).vae


def build_vae(**kw):
    return build(gdistill.registry.MODELS, dict(type='StabilityVAE', **kw))


def test_vae_missing_or_wrong_files_give_clear_errors(tmp_path, vae):
    with pytest.raises(FileNotFoundError, match='huggingface-cli download stabilityai/sd-vae-ft-mse'):
        StabilityVAE(path=str(tmp_path / 'nowhere'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='config.json'):
        StabilityVAE(path=str(tmp_path / 'empty'))
    torch.save({'first_stage_model.encoder.down.0.block.0.conv1.weight': torch.zeros(1)}, tmp_path / 'ldm.ckpt')
    with pytest.raises(ValueError, match='original-format'):
        StabilityVAE(path=str(tmp_path / 'ldm.ckpt'))
    torch.save(vae.vae.state_dict(), tmp_path / 'tiny.pt')
    with pytest.raises(ValueError, match='does not fit'):          # the default config is sd-vae-ft-mse's
        StabilityVAE(path=str(tmp_path / 'tiny.pt'))
    (tmp_path / 'x.txt').write_text('no')
    with pytest.raises(ValueError, match='expected one of'):
        StabilityVAE(path=str(tmp_path / 'x.txt'))
    with pytest.raises(ValueError, match='path= .* or config='):
        StabilityVAE()
    with pytest.raises(ValueError, match='latent channels'):
        StabilityVAE(config=TINY, raw_mean=[0, 0], raw_std=[1, 1])


def test_sd_vae_architecture_builds_on_meta():
    from gdistill.networks.vae import SD_VAE_CONFIG
    with torch.device('meta'):
        v = diffusers.AutoencoderKL(**SD_VAE_CONFIG)
    # 512² RGB -> 4x64x64, as EDM2's img512 networks take
    assert 2 ** (len(v.config.block_out_channels) - 1) == 8 and v.config.latent_channels == 4


# --- EDM2's dataset layout ------------------------------------------------------------------
def edm2_zip(path, arrays, labels):
    """A zip written the way EDM2's dataset_tool.py encode writes it (independently of gdistill)."""
    with zipfile.ZipFile(path, 'w') as z:
        for i, a in enumerate(arrays):
            s = f'{i:08d}'
            buf = io.BytesIO()
            np.save(buf, a)
            z.writestr(f'{s[:5]}/img-mean-std-{s}.npy', buf.getvalue())
        meta = {'labels': [[f'{i:08d}'[:5] + f'/img-mean-std-{i:08d}.npy', int(c)] for i, c in enumerate(labels)]
                if labels is not None else None}
        z.writestr('dataset.json', json.dumps(meta))


def test_reads_edm2_layout_as_is(tmp_path):
    rng = np.random.RandomState(0)
    arrays = [rng.randn(8, 4, 4).astype(np.float32) for _ in range(5)]
    labels = [3, 0, 7, 3, 1]
    edm2_zip(tmp_path / 'lat.zip', arrays, labels)
    ds = EDM2LatentDataset(str(tmp_path / 'lat.zip'), latent_channels=4, resolution=4)
    assert len(ds) == 5 and ds.label_dim == 8 and ds.latent_shape == (4, 4, 4)
    for i in range(5):
        item = ds[i]
        assert torch.equal(item['img'], torch.from_numpy(arrays[i]))
        assert item['label'].argmax() == labels[i] and item['label'].sum() == 1 and item['idx'] == i
    assert latent_file_name(123456) == '00123/img-mean-std-00123456.npy'
    # our writer gives the same files, folder or zip
    write_latent_dataset(tmp_path / 'ours.zip', arrays, labels)
    write_latent_dataset(tmp_path / 'ours', arrays, labels)
    with zipfile.ZipFile(tmp_path / 'lat.zip') as a, zipfile.ZipFile(tmp_path / 'ours.zip') as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        for n in a.namelist():
            assert a.read(n) == b.read(n) or json.loads(a.read(n)) == json.loads(b.read(n))
    folder = EDM2LatentDataset(str(tmp_path / 'ours'))
    assert folder.file_names == ds.file_names and torch.equal(folder[4]['img'], ds[4]['img'])
    assert EDM2LatentDataset(str(tmp_path / 'lat.zip'), use_labels=False)[0]['label'].numel() == 0
    sub = EDM2LatentDataset(str(tmp_path / 'lat.zip'), max_size=3, random_seed=7)
    keep = np.arange(5)
    np.random.RandomState(7).shuffle(keep)                      # EDM2's dataset.py subset
    assert sub.file_names == [ds.file_names[i] for i in np.sort(keep[:3])]


def test_latent_dataset_errors(tmp_path):
    rng = np.random.RandomState(0)
    edm2_zip(tmp_path / 'odd.zip', [rng.randn(7, 4, 4).astype(np.float32)], [0])
    with pytest.raises(DatasetFormatError, match='even number'):
        EDM2LatentDataset(str(tmp_path / 'odd.zip'))
    edm2_zip(tmp_path / 'ok.zip', [rng.randn(8, 4, 4).astype(np.float32)], [0])
    with pytest.raises(DatasetFormatError, match='2 x 16'):
        EDM2LatentDataset(str(tmp_path / 'ok.zip'), latent_channels=16)
    with pytest.raises(DatasetFormatError, match='expected 64x64'):
        EDM2LatentDataset(str(tmp_path / 'ok.zip'), resolution=64)
    edm2_zip(tmp_path / 'mixed.zip', [rng.randn(8, 4, 4).astype(np.float32), rng.randn(8, 2, 2).astype(np.float32)],
             [0, 1])
    with pytest.raises(DatasetFormatError, match='one shape'):
        EDM2LatentDataset(str(tmp_path / 'mixed.zip'))[1]
    (tmp_path / 'pngs').mkdir()
    (tmp_path / 'pngs' / 'a.png').write_bytes(b'')
    with pytest.raises(DatasetFormatError, match='encode them first'):
        EDM2LatentDataset(str(tmp_path / 'pngs'))
    with pytest.raises(FileNotFoundError, match='encode_latents'):
        EDM2LatentDataset(str(tmp_path / 'none'))
    with zipfile.ZipFile(tmp_path / 'nolabel.zip', 'w') as z:
        buf = io.BytesIO()
        np.save(buf, np.zeros((8, 2, 2), np.float32))
        z.writestr('00000/img-mean-std-00000000.npy', buf.getvalue())
        z.writestr('00000/img-mean-std-00000001.npy', buf.getvalue())
        z.writestr('dataset.json', json.dumps({'labels': [['00000/img-mean-std-00000000.npy', 1]]}))
    with pytest.raises(DatasetFormatError, match='no label for 1 of 2'):
        EDM2LatentDataset(str(tmp_path / 'nolabel.zip'))


# --- the per-step posterior draw --------------------------------------------------------------
def test_preprocessor_draws_fresh_whitened_latents_every_step(tmp_path):
    mean = torch.randn(8, 4, 4, 4)
    std = torch.rand(8, 4, 4, 4) * 0.5 + 0.1
    write_latent_dataset(tmp_path / 'd', torch.cat([mean, std], 1), labels=list(range(8)))
    ds = EDM2LatentDataset(str(tmp_path / 'd'))
    batch = dict(img=[ds[i]['img'] for i in range(8)], label=[ds[i]['label'] for i in range(8)],
                 idx=list(range(8)))
    pre = LatentDataPreprocessor()
    a, b = pre(batch, True), pre(batch, True)
    assert a['inputs'].shape == (8, 4, 4, 4) and a['batch_size'] == 8 and a['labels'].shape == (8, 8)
    assert not torch.equal(a['inputs'], b['inputs'])               # a new draw per step
    torch.manual_seed(3)
    got = pre(batch, True)['inputs']
    torch.manual_seed(3)
    eps = torch.randn(mean.shape)
    scale, bias = torch.tensor(EDM2_SCALE).view(1, 4, 1, 1), torch.tensor(EDM2_BIAS).view(1, 4, 1, 1)
    torch.testing.assert_close(got, (mean + eps * std) * scale + bias)
    # other whitening (a toy VAE's): raw mean 1, raw std 2 -> scale 0.25, bias -0.25
    other = LatentDataPreprocessor(raw_mean=[1.0] * 4, raw_std=[2.0] * 4)
    torch.manual_seed(3)
    torch.testing.assert_close(other(batch, True)['inputs'], (mean + eps * std) * 0.25 - 0.25)
    # data-free batches pass through; pixel batches are refused
    assert pre(dict(idx=[0, 1]))['batch_size'] == 2
    with pytest.raises(ValueError, match='uint8 images'):
        pre(dict(img=[torch.zeros(3, 4, 4, dtype=torch.uint8)]))


def test_encode_image_dataset_and_statistics(tmp_path, vae):
    from gdistill.data.digits import DigitsDataset
    digits = DigitsDataset('train')
    gray = StabilityVAE(config=dict(TINY, in_channels=1, out_channels=1), seed=2)
    n = encode_image_dataset(digits, gray, tmp_path / 'digits.zip', batch_size=16, max_images=40)
    assert n == 40
    ds = EDM2LatentDataset(str(tmp_path / 'digits.zip'))
    assert ds.latent_shape == (4, 4, 4) and ds.label_dim == 10
    want = gray.encode_pixels(torch.stack([digits[i]['img'] for i in range(40)]))
    got = torch.stack([ds[i]['img'] for i in range(40)])
    torch.testing.assert_close(got, want)
    assert [int(ds[i]['label'].argmax()) for i in range(40)] == [int(digits.labels[i]) for i in range(40)]
    # statistics of the draws, against draws
    mu, sd = latent_statistics(ds)
    draws = torch.stack([gray.encode_latents(got, torch.Generator().manual_seed(k)) for k in range(200)])
    scale, bias = latent_scale_bias()
    raw = (draws - torch.tensor(bias).view(1, 1, 4, 1, 1)) / torch.tensor(scale).view(1, 1, 4, 1, 1)
    np.testing.assert_allclose(mu, raw.transpose(0, 2).reshape(4, -1).mean(1).numpy(), atol=0.02)
    np.testing.assert_allclose(sd, raw.transpose(0, 2).reshape(4, -1).std(1).numpy(), rtol=0.02)


# --- decoding for sampling and metrics ----------------------------------------------------------
class _Fixed:
    nfe = 3

    def __init__(self, out):
        self.out = out

    def __call__(self, denoiser, noise, class_labels=None, generator=None):
        return self.out


def test_decoded_sampler_gives_the_decoders_uint8_pixels_back(vae):
    lat = torch.randn(4, 4, 8, 8)
    s = build(SAMPLERS, dict(type='DecodedSampler', sampler=_Fixed(lat), decoder=vae))
    x = s(None, torch.zeros(4, 4, 8, 8))
    q = vae.decode(lat)
    assert s.nfe == 3 and x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(images_to_uint8(x), q)                     # the metrics see EDM2's pixels
    grid = image_grid(x, nrow=2)                                  # and so do the pictures
    assert np.array_equal(grid[:16, :16], q[0].permute(1, 2, 0).numpy())
    # a config builds the VAE only when sampling
    lazy = build(SAMPLERS, dict(type='DecodedSampler', sampler=_Fixed(lat),
                                decoder=dict(type='StabilityVAE', path='/nowhere/sd-vae-ft-mse')))
    with pytest.raises(FileNotFoundError, match='sd-vae-ft-mse'):
        lazy(None, lat)
    from gdistill.samplers import with_decoder
    assert with_decoder(s, dict(type='StabilityVAE')) is s and with_decoder(s.sampler, None) is s.sampler
    with pytest.raises(TypeError, match='decode'):
        build(SAMPLERS, dict(type='DecodedSampler', sampler=_Fixed(lat), decoder=object()))


def test_encode_latents_tool_writes_edm2_layout_from_an_image_folder(tmp_path, vae):
    """tools/encode_latents.py: an EDM image folder (PNGs + dataset.json) -> EDM2 latent zip."""
    import sys
    from PIL import Image
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
    import encode_latents
    src = tmp_path / 'imgs'
    (src / '00000').mkdir(parents=True)
    pics = images(5, seed=4)
    names = []
    for i, img in enumerate(pics):
        name = f'00000/img{i:08d}.png'
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(src / name)
        names.append([name, i % 3])
    (src / 'dataset.json').write_text(json.dumps({'labels': names}))
    vae.vae.save_pretrained(tmp_path / 'vae')
    out = encode_latents.main(['--source', str(src), '--dest', str(tmp_path / 'lat.zip'), '--vae',
                               str(tmp_path / 'vae'), '--batch', '2', '--stats', '--device', 'cpu'])
    assert out['images'] == 5 and len(out['raw_mean']) == 4
    ds = EDM2LatentDataset(str(tmp_path / 'lat.zip'))
    torch.testing.assert_close(torch.stack([ds[i]['img'] for i in range(5)]), vae.encode_pixels(pics))
    assert [int(ds[i]['label'].argmax()) for i in range(5)] == [0, 1, 2, 0, 1]
    assert ds.file_names[4] == '00000/img-mean-std-00000004.npy'


def test_decoder_whitening_must_match_the_models():
    """A decoder that un-whitens with other constants than the model's preprocessor whitened
    with would decode wrong pixels: tools/sample.py, tools/eval.py and the picture hook refuse it."""
    from gdistill.samplers.decoded import check_whitening, with_decoder

    class Model(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.data_preprocessor = LatentDataPreprocessor(**kw)
    toy = dict(raw_mean=[1.0, 0.0, 0.0, 0.0], raw_std=[2.0, 1.0, 1.0, 1.0])
    check_whitening(dict(type='StabilityVAE', path='x'), Model())                 # EDM2's constants, both
    check_whitening(dict(type='StabilityVAE', path='x', **toy), Model(**toy))
    with pytest.raises(ValueError, match='same raw_mean/raw_std'):
        check_whitening(dict(type='StabilityVAE', path='x'), Model(**toy))
    with pytest.raises(ValueError, match='same raw_mean/raw_std'):
        with_decoder(_Fixed(None), dict(type='StabilityVAE', path='x', **toy), Model())
    check_whitening(StabilityVAE(config=TINY, **toy), Model(**toy))              # a built module too
    assert isinstance(with_decoder(_Fixed(None), dict(type='StabilityVAE', path='x'), torch.nn.Linear(1, 1)),
                      gdistill.samplers.DecodedSampler)                          # no preprocessor: nothing to check
