"""gdistill.data.augment.AugmentPipe against EDM's official pipe (recorded outputs) and against
each transform's closed form on simple images."""
import math
import os.path as osp

import numpy as np
import pytest
import torch

from gdistill.data.augment import AugmentPipe, rotate2d, scale2d, translate2d, warp
from gdistill.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIXTURE = osp.join(ROOT, 'tests', 'data', 'edm_augment_fixture.pt')
SID = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)   # sid_train.py


def centred(h, w):
    y, x = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing='ij')
    return x.double(), y.double()


def ramp(h=32, w=32, a=0.03, b=-0.02, c=0.1):
    x, y = centred(h, w)
    return (a * x + b * y + c).expand(1, 1, h, w).clone()


def test_matches_edm_official_pipe():
    """Same seed, same images: the official NVlabs/edm AugmentPipe's recorded outputs and labels
    (SiD's transforms, the colour transforms, all thirteen; RGB and grey)."""
    fixture = torch.load(FIXTURE)
    assert len(fixture['cases']) == 6
    for case in fixture['cases']:
        torch.manual_seed(case['seed'])
        out, labels = AugmentPipe(**case['config'])(case['images'])
        torch.testing.assert_close(labels, case['labels'], rtol=0, atol=1e-6)
        torch.testing.assert_close(out, case['augmented'], rtol=0, atol=1e-4)


def test_registered_and_identity_at_p0():
    pipe = MODELS.build(dict(type='AugmentPipe', p=0.0, **SID))
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    out, labels = pipe(x)
    assert labels.shape == (5, 9) and bool((labels == 0).all())
    torch.testing.assert_close(out, x, rtol=0, atol=1e-4)       # the resampling of an identity map
    out, labels = AugmentPipe(p=1.0)(x)                        # no transform on: untouched
    assert torch.equal(out, x) and labels.shape == (5, 0)


def test_label_vector_layout():
    """SiD's setting gives EDM's augment_dim = 9: xflip, yflip, scale, rotate (2), aniso (2),
    translate (2); every transform adds its columns in EDM's order."""
    pipe = AugmentPipe(p=0.12, **SID)
    assert pipe.label_dim == 9
    assert pipe.label_layout() == [('xflip', 0, 1), ('yflip', 1, 1), ('scale', 2, 1), ('rotate_frac', 3, 2),
                                   ('aniso', 5, 2), ('translate_frac', 7, 2)]
    every = AugmentPipe(**{k: 1 for k in AugmentPipe.TRANSFORMS})
    assert every.label_dim == 19 and [k for k, _, _ in every.label_layout()] == list(AugmentPipe.TRANSFORMS)


@pytest.mark.parametrize('name,p', [('scale', 0.12), ('rotate_frac', 0.5), ('translate_frac', 0.3)])
def test_each_transform_is_drawn_with_probability_p(name, p):
    n = 4000
    _, labels = AugmentPipe(p=p, **{name: 1})(torch.zeros(n, 1, 4, 4))
    frac = float((labels.abs().sum(1) > 0).double().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_flips_and_quarter_turns():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    out, lab = AugmentPipe(p=1.0, xflip=1e8, yflip=1)(x)       # x-flip drawn always, then a fair coin
    for i in range(64):
        ref = x[i]
        if lab[i, 0] == 1:
            ref = ref.flip(2)
        if lab[i, 1] == 1:
            ref = ref.flip(1)
        assert torch.equal(out[i], ref)
    assert 0.3 < float(lab[:, 0].mean()) < 0.7                  # a flip with probability ½
    out, lab = AugmentPipe(p=1.0, rotate_int=1)(x)
    turns = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}        # labels → quarter turns
    for i in range(64):
        k = turns[(int(lab[i, 0]), int(lab[i, 1]))]
        assert torch.equal(out[i], torch.rot90(x[i], k, dims=(1, 2)))


def test_integer_translation_mirrors_at_the_border():
    torch.manual_seed(1)
    x = torch.rand(16, 2, 8, 8)
    out, lab = AugmentPipe(p=1.0, translate_int=1, translate_int_max=0.25)(x)
    for i in range(16):
        tx, ty = int(round(float(lab[i, 0]) * 8 * 0.25)), int(round(float(lab[i, 1]) * 8 * 0.25))
        ref = np.empty((2, 8, 8), dtype=np.float32)
        for r in range(8):
            for c in range(8):
                sr, sc = r + ty, c - tx                          # source pixel, mirrored into range
                sr = -sr if sr < 0 else (14 - sr if sr > 7 else sr)
                sc = -sc if sc < 0 else (14 - sc if sc > 7 else sc)
                ref[:, r, c] = x[i, :, sr, sc].numpy()
        assert np.array_equal(out[i].numpy(), ref)


def test_warp_is_the_affine_map_on_a_linear_image():
    """On I(p) = a·x + b·y + c the anti-aliased resampling is exact up to the filters' tiny
    error away from the border: the output at p is I(G⁻¹p)."""
    img = ramp()
    one = torch.ones(1, dtype=torch.float64)
    for g in (rotate2d(0.5 * one), scale2d(0.8 * one, 1.3 * one), translate2d(1.5 * one, -2.0 * one),
              rotate2d(-2.0 * one) @ scale2d(1.1 * one, 1.1 * one) @ translate2d(0.3 * one, 0.7 * one)):
        out = warp(img, g)[0, 0]
        x, y = centred(32, 32)
        q = g[0] @ torch.stack([x.flatten(), y.flatten(), torch.ones(32 * 32, dtype=torch.float64)])
        expected = (0.03 * q[0] - 0.02 * q[1] + 0.1).reshape(32, 32)
        err = (out - expected)[12:20, 12:20].abs().max()
        assert float(err) < 2e-3, float(err)                   # < 0.07 pixel of this slope


def _interior_error(out, expected):
    """Largest error over the central 8×8 pixels, in pixels of the ramp's slope 0.036: a
    wrong sign, centre or scale errs by whole pixels; the anti-aliasing filters by < 0.15."""
    return float((out - expected)[..., 12:20, 12:20].abs().max()) / math.hypot(0.03, 0.02)


def test_geometric_transforms_follow_their_labels():
    """Each geometric transform alone, its parameters read back from the labels: scaling by
    s = 2^(0.2·w) about the centre, rotation by θ about it, translation by (wx, wy)·0.125·size."""
    torch.manual_seed(2)
    n = 6
    img = ramp().expand(n, 1, 32, 32).clone()
    x, y = centred(32, 32)

    def lin(px, py):
        return 0.03 * px - 0.02 * py + 0.1

    out, lab = AugmentPipe(p=1.0, scale=1)(img)
    s = torch.exp2(0.2 * lab[:, 0].double()).view(n, 1, 1)
    assert _interior_error(out[:, 0], lin(x / s, y / s)) < 0.15
    out, lab = AugmentPipe(p=1.0, rotate_frac=1)(img)
    th = torch.atan2(lab[:, 1].double(), lab[:, 0].double() + 1).view(n, 1, 1)
    # EDM's convention: the output at p shows the input at R(θ)·p (the content turns by −θ)
    assert _interior_error(out[:, 0], lin(th.cos() * x - th.sin() * y, th.sin() * x + th.cos() * y)) < 0.15
    out, lab = AugmentPipe(p=1.0, translate_frac=1)(img)
    tx, ty = (lab[:, 0].double() * 4).view(n, 1, 1), (lab[:, 1].double() * 4).view(n, 1, 1)
    assert _interior_error(out[:, 0], lin(x - tx, y - ty)) < 0.15


def test_colour_transforms_closed_form():
    torch.manual_seed(3)
    x = torch.rand(8, 3, 4, 4) * 2 - 1
    out, lab = AugmentPipe(p=1.0, brightness=1)(x)
    torch.testing.assert_close(out, x + 0.2 * lab.view(8, 1, 1, 1))
    out, lab = AugmentPipe(p=1.0, contrast=1)(x)
    torch.testing.assert_close(out, x * torch.exp2(0.5 * lab).view(8, 1, 1, 1))
    out, lab = AugmentPipe(p=1.0, lumaflip=1)(x)
    mirrored = x - 2 * x.mean(1, keepdim=True)                   # reflect along (1, 1, 1)/√3
    torch.testing.assert_close(out, torch.where(lab.view(8, 1, 1, 1) == 1, mirrored, x))
    out, lab = AugmentPipe(p=1.0, saturation=1)(x)
    mean = x.mean(1, keepdim=True)
    torch.testing.assert_close(out, mean + (x - mean) * torch.exp2(lab).view(8, 1, 1, 1), rtol=1e-5, atol=1e-5)
    out, lab = AugmentPipe(p=1.0, hue=1)(x)                      # a turn about the grey axis
    torch.testing.assert_close(out.mean(1), x.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)
    th = torch.atan2(lab[:, 1], lab[:, 0] + 1)
    u, v = (x - x.mean(1, keepdim=True)), (out - out.mean(1, keepdim=True))
    cos = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))
    torch.testing.assert_close(cos, th.cos().view(8, 1, 1).expand_as(cos), rtol=1e-4, atol=1e-4)
    grey = torch.rand(8, 1, 4, 4)                                # grey images: the mean RGB row
    out, lab = AugmentPipe(p=1.0, brightness=1)(grey)
    torch.testing.assert_close(out, grey + 0.2 * lab.view(8, 1, 1, 1))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r'AugmentPipe: p is a probability in \[0, 1\], got 1.5'):
        AugmentPipe(p=1.5)
    with pytest.raises(ValueError, match=r'AugmentPipe: scale is a probability multiplier >= 0'):
        AugmentPipe(scale=-1)
    with pytest.raises(ValueError, match=r'images must be \[N, C, H, W\]'):
        AugmentPipe(xflip=1)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match='colour transforms need RGB'):
        AugmentPipe(brightness=1)(torch.zeros(2, 2, 4, 4))
