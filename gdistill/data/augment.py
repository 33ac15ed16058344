"""EDM's augmentation pipe (Karras et al. 2022, App. F.2; the transforms and probabilities of
NVlabs/edm ``training/augment.py``, themselves from StyleGAN2-ADA, Karras et al. 2020), written
for gdistill.

Each transform is applied to a sample with probability ``p × its multiplier`` (a multiplier
≥ 1/p makes it always drawn; a drawn flip still flips with probability ½) and writes its
parameters to the sample's augmentation label, which a network with ``augment_dim`` > 0
receives as ``augment_labels`` (it learns to undo the augmentation, so the augmentation does not
leak into the samples). Label columns, in this order, for each transform whose multiplier is
> 0:

    xflip [flipped]   yflip [flipped]   rotate_int [x-flip, y-flip of the 90° rotation]
    translate_int [tx, ty]/max   scale [w]   rotate_frac [cos θ − 1, sin θ]
    aniso [w·cos r, w·sin r]   translate_frac [wx, wy]   brightness [w]   contrast [w]
    lumaflip [flipped]   hue [cos θ − 1, sin θ]   saturation [w]

(w: the standard-normal draw behind a log₂ scale or a shift). SiD's CIFAR-10 setting (its
``sid_train.py``: xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
p = 0.12) gives the 9 columns of EDM's ``augment_dim=9``.

Geometric transforms are one affine map per sample, executed as EDM does: reflect-pad, 2×
upsample with the symlet-6 low-pass filter, bilinear resampling on the affine grid, low-pass
and 2× downsample (anti-aliased). Colour transforms are one 4×4 affine colour matrix per sample.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS

# Symlet-6 low-pass (scaling) filter, the resampling filter of EDM's geometric augmentation.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


# --- 3×3 (2-D) and 4×4 (colour) homogeneous matrices, one per sample ---------------------------
def _mat(rows, n, ref):
    """[n, R, C] from rows of per-sample tensors [n] or numbers."""
    def col(v):
        return v.to(ref.dtype) if torch.is_tensor(v) else torch.full((n,), float(v), dtype=ref.dtype, device=ref.device)
    return torch.stack([torch.stack([col(v) for v in row], -1) for row in rows], -2)


def translate2d(tx, ty):
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx.shape[0], tx)


def scale2d(sx, sy):
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx.shape[0], sx)


def rotate2d(theta):
    c, s = theta.cos(), theta.sin()
    return _mat([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta.shape[0], theta)


def translate3d(t):
    return _mat([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t.shape[0], t)


def scale3d(c):
    return _mat([[c, 0, 0, 0], [0, c, 0, 0], [0, 0, c, 0], [0, 0, 0, 1]], c.shape[0], c)


def rotate3d(axis, theta):
    """Rotation by θ about the unit ``axis`` (3 numbers), Rodrigues' formula, homogeneous."""
    (x, y, z), c, s = axis, theta.cos(), theta.sin()
    k = 1 - c
    return _mat([[x * x * k + c, x * y * k - z * s, x * z * k + y * s, 0],
                 [y * x * k + z * s, y * y * k + c, y * z * k - x * s, 0],
                 [z * x * k - y * s, z * y * k + x * s, z * z * k + c, 0],
                 [0, 0, 0, 1]], theta.shape[0], theta)


def _sep_conv(x, taps, axis, **kw):
    """Depthwise 1-D convolution of [N, C, H, W] along ``axis`` (2: rows, 3: columns)."""
    c = x.shape[1]
    k = taps.reshape(1, 1, -1, 1) if axis == 2 else taps.reshape(1, 1, 1, -1)
    return F.conv2d(x, k.expand(c, 1, *k.shape[2:]), groups=c, **kw)


def _upsample2(x, taps, axis):
    """Zero-insertion 2× upsampling along ``axis`` filtered by ``taps`` (reversed): length L → 2L."""
    shape = list(x.shape)
    shape[axis] = 2 * shape[axis]
    up = x.new_zeros(shape)
    idx = [slice(None)] * 4
    idx[axis] = slice(0, None, 2)
    up[tuple(idx)] = x
    idx[axis] = slice(0, -1)
    up = up[tuple(idx)]                           # 2L − 1 samples
    pad = (len(taps) + 1) // 2
    padding = [pad, 0] if axis == 2 else [0, pad]
    return _sep_conv(up, taps.flip(0), axis, padding=padding)


def _downsample2(x, taps, axis, crop):
    """Filter by ``taps`` and keep every second sample along ``axis``, then drop ``crop`` at each end."""
    pad = (len(taps) - 1) // 2
    stride, padding = ([2, 1], [pad, 0]) if axis == 2 else ([1, 2], [0, pad])
    y = _sep_conv(x, taps, axis, stride=stride, padding=padding)
    idx = [slice(None)] * 4
    idx[axis] = slice(crop, -crop)
    return y[tuple(idx)]


def warp(images, g_inv):
    """Resample ``images`` [N, C, H, W] at the source points g_inv·p of each output pixel p, in
    pixel units centred on the image ((W−1)/2, (H−1)/2), g_inv [N, 3, 3] — the anti-aliased
    scheme of EDM's pipe: reflect padding wide enough for every sample's source footprint, 2×
    upsampling with the symlet-6 filter, bilinear resampling, filtering and 2× downsampling."""
    n, c, h, w = images.shape
    dev, dt = images.device, images.dtype
    taps = torch.tensor(SYM6, dtype=dt, device=dev)
    tpad = len(SYM6) // 4
    g_inv = g_inv.to(dt)
    # the source footprint of the output corners: the margin to pad on each side
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=dt, device=dev).t()
    src = (g_inv @ corners)[:, :2, :]                                   # [N, xy, corner]
    src = src.permute(1, 0, 2).flatten(1)                               # [xy, N·corner]
    lo, hi = (-src).amax(1), src.amax(1)
    base = torch.tensor([2 * tpad - cx, 2 * tpad - cy], dtype=dt, device=dev)
    top = torch.tensor([w - 1, h - 1], dtype=dt, device=dev)
    lo = torch.minimum(torch.clamp(lo + base, min=0), top).ceil().to(torch.int64).tolist()
    hi = torch.minimum(torch.clamp(hi + base, min=0), top).ceil().to(torch.int64).tolist()
    (mx0, my0), (mx1, my1) = lo, hi
    x = F.pad(images, [mx0, mx1, my0, my1], mode='reflect')
    shift = torch.full((n,), 1.0, dtype=dt, device=dev)
    g = translate2d(shift * (mx0 - mx1) / 2, shift * (my0 - my1) / 2) @ g_inv
    # 2× upsampling: coordinates double, with the half-pixel offset of the new grid
    x = _upsample2(_upsample2(x, taps, 3), taps, 2)
    two, half = shift * 2, shift * 0.5
    g = scale2d(two, two) @ g @ scale2d(1 / two, 1 / two)
    g = translate2d(-half, -half) @ g @ translate2d(half, half)
    # to the normalised coordinates of affine_grid/grid_sample (align_corners=False)
    out_h, out_w = (h + 2 * tpad) * 2, (w + 2 * tpad) * 2
    in_h, in_w = x.shape[2], x.shape[3]
    g = scale2d(shift * 2 / in_w, shift * 2 / in_h) @ g @ scale2d(shift * out_w / 2, shift * out_h / 2)
    grid = F.affine_grid(g[:, :2, :], [n, c, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    x = _downsample2(x, taps, 3, tpad)
    return _downsample2(x, taps, 2, tpad)


@MODELS.register_module()
class AugmentPipe(nn.Module):
    """EDM's augmentation pipe: ``pipe(images) -> (augmented images, labels [N, L])`` for images
    [N, C, H, W] (C = 1 or 3 when a colour transform is on) in [−1, 1].

    ``p``: the overall probability multiplier (0: the identity, labels all zero). Per transform:
    a probability multiplier (0 = off, the default) and its range — as EDM's ``AugmentPipe``
    (the defaults below are EDM's): pixel blitting ``xflip``, ``yflip``, ``rotate_int`` (90°
    steps), ``translate_int`` (integer shifts up to ``translate_int_max`` of the size, mirrored
    at the border); geometric ``scale`` (log₂-normal, ``scale_std``), ``rotate_frac`` (uniform
    up to ±π·``rotate_frac_max``), ``aniso`` (log₂-normal ``aniso_std`` along an axis rotated
    by a uniform angle with probability ``aniso_rotate_prob``), ``translate_frac`` (normal,
    ``translate_frac_std`` of the size); colour ``brightness`` (+N(0, ``brightness_std``²)),
    ``contrast`` (×2^N(0, ``contrast_std``²)), ``lumaflip`` (mirror along the luma axis),
    ``hue`` (rotation about the luma axis up to ±π·``hue_max``), ``saturation``
    (×2^N(0, ``saturation_std``²) off the luma axis). ``generator``: an optional
    ``torch.Generator`` for the draws (on the images' device)."""

    TRANSFORMS = ('xflip', 'yflip', 'rotate_int', 'translate_int', 'scale', 'rotate_frac', 'aniso',
                  'translate_frac', 'brightness', 'contrast', 'lumaflip', 'hue', 'saturation')
    LABEL_WIDTH = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2,
                       translate_frac=2, brightness=1, contrast=1, lumaflip=1, hue=2, saturation=1)

    def __init__(self, p=1.0, xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
                 scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1,
                 aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125,
                 brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2,
                 contrast_std=0.5, hue_max=1, saturation_std=1):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f'AugmentPipe: p is a probability in [0, 1], got {p}')
        self.p = float(p)
        mult = dict(xflip=xflip, yflip=yflip, rotate_int=rotate_int, translate_int=translate_int, scale=scale,
                    rotate_frac=rotate_frac, aniso=aniso, translate_frac=translate_frac, brightness=brightness,
                    contrast=contrast, lumaflip=lumaflip, hue=hue, saturation=saturation)
        for name, v in mult.items():
            if v < 0:
                raise ValueError(f'AugmentPipe: {name} is a probability multiplier >= 0 (0 = off), got {v}')
        self.mult = {k: float(v) for k, v in mult.items()}
        self.translate_int_max, self.scale_std = float(translate_int_max), float(scale_std)
        self.rotate_frac_max, self.aniso_std = float(rotate_frac_max), float(aniso_std)
        self.aniso_rotate_prob, self.translate_frac_std = float(aniso_rotate_prob), float(translate_frac_std)
        self.brightness_std, self.contrast_std = float(brightness_std), float(contrast_std)
        self.hue_max, self.saturation_std = float(hue_max), float(saturation_std)

    @property
    def label_dim(self):
        """Width of the label vector (the network's ``augment_dim``)."""
        return sum(self.LABEL_WIDTH[k] for k in self.TRANSFORMS if self.mult[k] > 0)

    def label_layout(self):
        """[(transform, first column, width)] of the label vector."""
        out, col = [], 0
        for k in self.TRANSFORMS:
            if self.mult[k] > 0:
                out.append((k, col, self.LABEL_WIDTH[k]))
                col += self.LABEL_WIDTH[k]
        return out

    def extra_repr(self):
        on = ', '.join(f'{k}={v:g}' for k, v in self.mult.items() if v > 0)
        return f'p={self.p:g}' + (f', {on}' if on else '')

    def forward(self, images, generator=None):
        if images.ndim != 4:
            raise ValueError(f'AugmentPipe: images must be [N, C, H, W], got shape {tuple(images.shape)}')
        n, c, h, w = images.shape
        dev, dt = images.device, images.dtype
        kw = dict(device=dev, generator=generator)

        def rand(*shape):
            return torch.rand(shape, dtype=dt, **kw)

        def randn(*shape):
            return torch.randn(shape, dtype=dt, **kw)

        def drawn(name, *shape):
            """Which samples this transform applies to: U < p·multiplier."""
            return rand(*shape) < self.mult[name] * self.p

        def bit(name, k=2):
            v = torch.randint(k, (n, 1, 1, 1), **kw)
            return torch.where(drawn(name, n, 1, 1, 1), v, torch.zeros_like(v))

        labels = []
        # --- pixel blitting -------------------------------------------------------------------
        if self.mult['xflip'] > 0:
            b = bit('xflip')
            images = torch.where(b == 1, images.flip(3), images)
            labels.append(b)
        if self.mult['yflip'] > 0:
            b = bit('yflip')
            images = torch.where(b == 1, images.flip(2), images)
            labels.append(b)
        if self.mult['rotate_int'] > 0:
            if h != w:
                raise ValueError(f'AugmentPipe: rotate_int turns by 90°, which needs square images, got {h}x{w}')
            k = bit('rotate_int', 4)                    # k quarter turns
            fx, fy = (k == 1) | (k == 2), (k == 2) | (k == 3)
            images = torch.where(fx, images.flip(3), images)
            images = torch.where(fy, images.flip(2), images)
            images = torch.where((k == 1) | (k == 3), images.transpose(2, 3), images)
            labels += [fx, fy]
        if self.mult['translate_int'] > 0:
            v = rand(2, n, 1, 1, 1) * 2 - 1
            v = torch.where(drawn('translate_int', 1, n, 1, 1, 1), v, torch.zeros_like(v))
            tx = (v[0] * (w * self.translate_int_max)).round().to(torch.int64)
            ty = (v[1] * (h * self.translate_int_max)).round().to(torch.int64)
            images = _shift_mirrored(images, tx, ty)
            labels += [tx / (w * self.translate_int_max), ty / (h * self.translate_int_max)]

        # --- geometric: one inverse affine map per sample -----------------------------------------
        g_inv, geometric = None, False
        eye = torch.eye(3, dtype=dt, device=dev).expand(n, 3, 3)
        if self.mult['scale'] > 0:
            v = randn(n)
            v = torch.where(drawn('scale', n), v, torch.zeros_like(v))
            s = torch.exp2(v * self.scale_std)
            g_inv, geometric = _then(g_inv, eye, scale2d(1 / s, 1 / s)), True
            labels.append(v)
        if self.mult['rotate_frac'] > 0:
            v = (rand(n) * 2 - 1) * (math.pi * self.rotate_frac_max)
            v = torch.where(drawn('rotate_frac', n), v, torch.zeros_like(v))
            g_inv, geometric = _then(g_inv, eye, rotate2d(v)), True   # the inverse of a turn by −θ
            labels += [v.cos() - 1, v.sin()]
        if self.mult['aniso'] > 0:
            v = randn(n)
            r = (rand(n) * 2 - 1) * math.pi
            v = torch.where(drawn('aniso', n), v, torch.zeros_like(v))
            r = torch.where(rand(n) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(v * self.aniso_std)
            g_inv = _then(g_inv, eye, rotate2d(-r) @ scale2d(1 / s, s) @ rotate2d(r))
            geometric = True
            labels += [v * r.cos(), v * r.sin()]
        if self.mult['translate_frac'] > 0:
            v = randn(2, n)
            v = torch.where(drawn('translate_frac', 1, n), v, torch.zeros_like(v))
            g_inv = _then(g_inv, eye, translate2d(-v[0] * (w * self.translate_frac_std),
                                                  -v[1] * (h * self.translate_frac_std)))
            geometric = True
            labels += [v[0], v[1]]
        if geometric:
            images = warp(images, g_inv)

        # --- colour: one 4×4 affine colour matrix per sample ------------------------------------
        m, colour = torch.eye(4, dtype=dt, device=dev).expand(n, 4, 4), False
        luma = torch.tensor([1, 1, 1, 0], dtype=dt, device=dev) / math.sqrt(3)
        luma_outer = torch.outer(luma, luma)
        if self.mult['brightness'] > 0:
            v = randn(n)
            v = torch.where(drawn('brightness', n), v, torch.zeros_like(v))
            m, colour = translate3d(v * self.brightness_std) @ m, True
            labels.append(v)
        if self.mult['contrast'] > 0:
            v = randn(n)
            v = torch.where(drawn('contrast', n), v, torch.zeros_like(v))
            m, colour = scale3d(torch.exp2(v * self.contrast_std)) @ m, True
            labels.append(v)
        if self.mult['lumaflip'] > 0:
            b = torch.randint(2, (n, 1, 1), **kw)
            b = torch.where(drawn('lumaflip', n, 1, 1), b, torch.zeros_like(b))
            m, colour = (torch.eye(4, dtype=dt, device=dev) - 2 * luma_outer * b) @ m, True
            labels.append(b)
        if self.mult['hue'] > 0:
            v = (rand(n) * 2 - 1) * (math.pi * self.hue_max)
            v = torch.where(drawn('hue', n), v, torch.zeros_like(v))
            m, colour = rotate3d(luma[:3].tolist(), v) @ m, True
            labels += [v.cos() - 1, v.sin()]
        if self.mult['saturation'] > 0:
            v = randn(n, 1, 1)
            v = torch.where(drawn('saturation', n, 1, 1), v, torch.zeros_like(v))
            off = torch.eye(4, dtype=dt, device=dev) - luma_outer
            m, colour = (luma_outer + off * torch.exp2(v * self.saturation_std)) @ m, True
            labels.append(v)
        if colour:
            images = apply_colour(images, m)

        if not labels:
            return images, images.new_zeros((n, 0), dtype=torch.float32)
        return images, torch.cat([x.to(torch.float32).reshape(n, -1) for x in labels], dim=1)


def _then(g_inv, eye, step):
    """Append ``step`` on the right of the accumulated inverse map (EDM's order of composition)."""
    return (eye if g_inv is None else g_inv) @ step


def _shift_mirrored(images, tx, ty):
    """Integer shift by (tx, ty) [N, 1, 1, 1] with the image mirrored at its border (no repeated
    edge pixel), as EDM's ``translate_int``."""
    n, c, h, w = images.shape
    x = torch.arange(w, device=images.device).view(1, 1, 1, w) - tx
    y = torch.arange(h, device=images.device).view(1, 1, h, 1) + ty
    x = (w - 1) - ((w - 1) - x % (2 * w - 2)).abs()
    y = (h - 1) - ((h - 1) - y % (2 * h - 2)).abs()
    flat = (y * w + x).expand(n, c, h, w).reshape(n, c, h * w)
    return images.reshape(n, c, h * w).gather(2, flat).reshape(n, c, h, w)


def apply_colour(images, m):
    """Affine colour map m [N, 4, 4] (homogeneous RGB): RGB images get m[:3, :3]·rgb + m[:3, 3];
    grey images (C = 1) the mean of its RGB rows applied to grey = R = G = B."""
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w)
    if c == 3:
        out = m[:, :3, :3] @ flat + m[:, :3, 3:]
    elif c == 1:
        row = m[:, :3, :].mean(dim=1, keepdim=True)                      # [N, 1, 4]
        out = flat * row[:, :, :3].sum(dim=2, keepdim=True) + row[:, :, 3:]
    else:
        raise ValueError(f'AugmentPipe: colour transforms need RGB (3 channels) or grey (1) images, got {c}')
    return out.reshape(n, c, h, w)


__all__ = ['AugmentPipe', 'warp', 'apply_colour', 'SYM6']
