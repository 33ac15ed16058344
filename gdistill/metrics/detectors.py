"""Feature detectors of the image metrics: networks that map images to feature vectors whose
Gaussian fits the Fréchet distance compares.

Every detector takes uint8 images [N, C, H, W] (values 0…255, what a generated sample is
quantised to before it is measured, as EDM's ``fid.py`` does) and returns float32 [N, D].

- ``InceptionDetector``: the standard FID network (Inception-v3 of TensorFlow's 2015-12-05
  release, 2048-d pool features) from a local TorchScript file such as
  ``inception-2015-12-05.pt``. Read with ``torch.jit.load`` only: a TorchScript archive holds
  TorchScript code and tensors, never arbitrary pickled Python objects; any other file is
  refused before it is opened as a model.
- ``DINOv2Detector``: FD-DINOv2 (Stein et al. 2023; EDM2's protocol): images resized to
  224×224 (bicubic, antialiased), scaled to [0, 1], normalised with ImageNet's mean and std,
  and the ViT's normalised class token as the feature. Weights from a local file: DINOv2's
  released ``state_dict`` (``dinov2_vit*14_pretrain.pth``, read with ``weights_only=True`` into
  gdistill's own ViT) or a TorchScript export of the model.
- ``NetworkDetector``: any registered network (a MODELS config and/or a checkpoint written by
  a gdistill tool); ``method`` names the function that gives the features. FD-digits uses the
  penultimate features of ``DigitClassifier`` (``tools/train_digit_classifier.py``).
"""
import math
import os
import os.path as osp
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import DETECTORS, MODELS, build

__all__ = ['DetectorFormatError', 'Detector', 'InceptionDetector', 'DINOv2Detector', 'DINOv2ViT',
           'NetworkDetector', 'DigitClassifier', 'load_torchscript', 'is_torchscript_file',
           'images_to_uint8']


class DetectorFormatError(ValueError):
    """A detector file is not in the format the detector reads."""


def images_to_uint8(x):
    """Images in [−1, 1] (float [N, C, H, W]) → uint8 [N, C, H, W], rounding as EDM's
    ``generate.py`` does when it writes PNGs: (x·127.5 + 128) clipped to [0, 255], truncated."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _check_images(images, owner):
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = (f'{images.dtype} of shape {tuple(images.shape)}' if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise ValueError(f'{owner}: expected uint8 images [N, C, H, W] (values 0…255; convert '
                         f'samples in [−1, 1] with images_to_uint8), got {got}')
    return images


def _rgb(images, owner):
    c = images.shape[1]
    if c == 1:
        return images.expand(-1, 3, -1, -1)  # grey images repeated to RGB, as EDM's fid.py does
    if c != 3:
        raise ValueError(f'{owner}: expected 1- or 3-channel images, got {c} channels')
    return images


# --- TorchScript files -----------------------------------------------------------------------
def is_torchscript_file(path):
    """True when ``path`` is a zip archive with TorchScript's ``constants.pkl`` and ``code/``
    entries (``torch.jit.save``); a ``torch.save`` archive has neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return (any(n.endswith('/constants.pkl') for n in names)
            and any('/code/' in n for n in names))


def load_torchscript(path, map_location='cpu', owner='detector'):
    """``torch.jit.load(path)`` after checking that the file is a TorchScript archive, with a
    message that says what the file is instead and what would be right."""
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{owner}: detector file {path!r} does not exist')
    if not zipfile.is_zipfile(path):
        raise DetectorFormatError(
            f'{owner}: {path} is not a TorchScript module (it is not even a zip archive, e.g. a '
            'Python pickle such as StyleGAN/EDM\'s inception-2015-12-05.pkl). Detectors are read '
            'with torch.jit.load only, which never unpickles arbitrary Python objects: give the '
            'TorchScript file (inception-2015-12-05.pt), or export a network with '
            'torch.jit.script/trace and torch.jit.save.')
    if not is_torchscript_file(path):
        raise DetectorFormatError(
            f'{owner}: {path} is a zip archive without TorchScript code (no code/ and '
            'constants.pkl entries): a torch.save checkpoint, not a TorchScript module. Detectors '
            'are read with torch.jit.load only; export the network with torch.jit.script/trace '
            'and torch.jit.save, or load a state_dict through a registered network '
            '(NetworkDetector / DINOv2Detector).')
    try:
        return torch.jit.load(path, map_location=map_location)
    except RuntimeError as err:
        raise DetectorFormatError(f'{owner}: torch.jit.load could not read {path} ({err})') from None


class Detector(nn.Module):
    """uint8 images [N, C, H, W] → float32 features [N, feature_dim]. Frozen, eval mode."""

    feature_dim = None

    def forward(self, images):
        images = _check_images(images, type(self).__name__)
        return self.features(images).float()

    def features(self, images):
        raise NotImplementedError(f'{type(self).__name__} must define features(images)')

    def train(self, mode=True):  # a detector never trains (no dropout, fixed normalisation)
        return super().train(False)


@DETECTORS.register_module()
class InceptionDetector(Detector):
    """FID's Inception-v3 pool features from a local TorchScript file (e.g. NVIDIA's
    ``inception-2015-12-05.pt``, which takes uint8 RGB images of any size, resizes them to
    299×299 itself and returns the 2048-d pool3 features with ``return_features=True``).

    ``call_kwargs``: keyword arguments of the TorchScript module's forward.
    Grey images are repeated to three channels."""

    def __init__(self, path, call_kwargs=dict(return_features=True), feature_dim=2048):
        super().__init__()
        self.model = load_torchscript(path, owner='InceptionDetector').eval()
        self.call_kwargs = dict(call_kwargs or {})
        self.feature_dim = int(feature_dim)

    def features(self, images):
        out = self.model(_rgb(images, 'InceptionDetector'), **self.call_kwargs)
        if out.ndim != 2 or out.shape[1] != self.feature_dim:
            raise ValueError(f'InceptionDetector: the TorchScript module returned shape '
                             f'{tuple(out.shape)}, expected [N, {self.feature_dim}]')
        return out


# --- DINOv2 ---------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(qkᵀ/√(c/heads))·v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):  # ViT-g/14's feed-forward layer
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class _Block(nn.Module):
    def __init__(self, dim, num_heads, hidden, swiglu):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _SwiGLU(dim, hidden) if swiglu else _Mlp(dim, hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2ViT(nn.Module):
    """The DINOv2 vision transformer (Oquab et al. 2023) with the parameter names of its released
    checkpoints, so ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` loads with ``strict=True``.
    ``forward`` returns the final-LayerNormed class token (the model's output, its head being the
    identity). Position embeddings, trained on a ``grid``×``grid`` patch grid, are resized
    bicubically to the input's grid with DINOv2's scale factor (n + 0.1)/grid."""

    def __init__(self, embed_dim=1024, depth=24, num_heads=16, patch_size=14, grid=37,
                 mlp_hidden=4096, swiglu=False, num_register_tokens=0, interpolate_offset=0.1):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f'DINOv2ViT: embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        self.patch_size, self.grid, self.interpolate_offset = patch_size, grid, interpolate_offset
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # used in training only
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_hidden, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    @classmethod
    def from_state_dict(cls, state, num_heads=None, head_dim=64):
        """The architecture a DINOv2 state_dict describes (every released model has 64-d heads)."""
        need = ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'norm.weight', 'blocks.0.norm1.weight']
        missing = [k for k in need if k not in state]
        if missing:
            raise DetectorFormatError(f'DINOv2Detector: not a DINOv2 state_dict; keys {missing} are '
                                      f'missing (found e.g. {sorted(state)[:5]})')
        dim = state['cls_token'].shape[-1]
        depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
        n_pos = state['pos_embed'].shape[1] - 1
        grid = math.isqrt(n_pos)
        if grid * grid != n_pos:
            raise DetectorFormatError(f'DINOv2Detector: pos_embed has {n_pos} patch positions, not a square grid')
        swiglu = 'blocks.0.mlp.w12.weight' in state
        hidden = (state['blocks.0.mlp.w12.weight'].shape[0] // 2 if swiglu
                  else state['blocks.0.mlp.fc1.weight'].shape[0])
        regs = state['register_tokens'].shape[1] if 'register_tokens' in state else 0
        return cls(embed_dim=dim, depth=depth, num_heads=num_heads or dim // head_dim,
                   patch_size=state['patch_embed.proj.weight'].shape[-1], grid=grid,
                   mlp_hidden=hidden, swiglu=swiglu, num_register_tokens=regs)

    def position_embedding(self, h, w):
        pos = self.pos_embed.float()
        if (h, w) == (self.grid, self.grid):
            return pos
        patch = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        scale = ((h + self.interpolate_offset) / self.grid, (w + self.interpolate_offset) / self.grid)
        patch = F.interpolate(patch, scale_factor=scale, mode='bicubic', antialias=False)
        if tuple(patch.shape[-2:]) != (h, w):
            raise RuntimeError(f'DINOv2ViT: position grid resized to {tuple(patch.shape[-2:])}, expected {(h, w)}')
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)

    def forward(self, x):
        b, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
        x = x + self.position_embedding(h, w).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@DETECTORS.register_module()
class DINOv2Detector(Detector):
    """FD-DINOv2's feature network from local weights ``path``: DINOv2's released state_dict
    (read with ``weights_only=True``; ``num_heads`` inferred as embed_dim/64) or a TorchScript
    export of the model. Images (grey ones repeated to RGB) are resized to ``resolution``²
    (224, the protocol's size) with antialiased bicubic interpolation in float32, divided by
    255 and normalised with ImageNet's mean and std; the feature is the normalised class
    token (1024-d for ViT-L/14)."""

    def __init__(self, path, resolution=224, num_heads=None):
        super().__init__()
        path = os.fspath(path)
        if not osp.isfile(path):
            raise FileNotFoundError(f'DINOv2Detector: weights file {path!r} does not exist')
        if is_torchscript_file(path):
            self.model = load_torchscript(path, owner='DINOv2Detector').eval()
            self.feature_dim = None  # known after the first batch
        else:
            try:
                state = torch.load(path, map_location='cpu', weights_only=True)
            except Exception as err:
                raise DetectorFormatError(
                    f'DINOv2Detector: {path} is neither a TorchScript module nor a state_dict that '
                    f'loads with weights_only=True ({type(err).__name__}: {err})') from None
            if isinstance(state, dict) and isinstance(state.get('model'), dict):
                state = state['model']
            if not isinstance(state, dict):
                raise DetectorFormatError(f'DINOv2Detector: {path} holds a {type(state).__name__}, '
                                          'expected a state_dict')
            self.model = DINOv2ViT.from_state_dict(state, num_heads=num_heads)
            self.model.load_state_dict(state, strict=True)
            self.feature_dim = self.model.cls_token.shape[-1]
        self.model.requires_grad_(False).eval()
        self.resolution = int(resolution)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def preprocess(self, images):
        x = _rgb(images, 'DINOv2Detector').to(torch.float32)
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode='bicubic', antialias=True)
        return (x / 255 - self.mean) / self.std

    def features(self, images):
        out = self.model(self.preprocess(images))
        if self.feature_dim is None:
            self.feature_dim = out.shape[1]
        return out


# --- any registered network ----------------------------------------------------------------
@DETECTORS.register_module()
class NetworkDetector(Detector):
    """A registered network as detector: ``network`` (a MODELS config; default: the
    ``'network'`` entry of the checkpoint) with weights from ``checkpoint`` (a file of plain
    tensors and containers, read with ``weights_only=True``: either a state_dict or
    ``{'network': config, 'state_dict': ...}`` as ``tools/train_digit_classifier.py`` writes).
    Images are scaled from uint8 to [−1, 1], gdistill's training range; the features are
    ``getattr(network, method)(x)`` flattened to [N, D]."""

    def __init__(self, network=None, checkpoint=None, method='features'):
        super().__init__()
        state = None
        if checkpoint is not None:
            checkpoint = os.fspath(checkpoint)
            if not osp.isfile(checkpoint):
                raise FileNotFoundError(f'NetworkDetector: checkpoint {checkpoint!r} does not exist '
                                        '(for FD-digits: python tools/train_digit_classifier.py)')
            state = torch.load(checkpoint, map_location='cpu', weights_only=True)
            if network is None:
                if not isinstance(state, dict) or 'network' not in state:
                    raise ValueError(f'NetworkDetector: {checkpoint} names no network config; give '
                                     '`network=` (a MODELS config)')
                network = dict(state['network'])
            if isinstance(state, dict) and 'state_dict' in state:
                state = state['state_dict']
        if network is None:
            raise ValueError('NetworkDetector needs a network config, a checkpoint naming one, or both')
        self.network = build(MODELS, network)
        if state is not None:
            self.network.load_state_dict(state, strict=True)
        if not callable(getattr(self.network, method, None)):
            raise ValueError(f'NetworkDetector: {type(self.network).__name__} has no method {method!r}')
        self.method = method
        self.network.requires_grad_(False).eval()
        self.feature_dim = getattr(self.network, 'feature_dim', None) if method == 'features' else None

    def features(self, images):
        x = images.to(torch.float32) / 127.5 - 1
        out = getattr(self.network, self.method)(x).flatten(1)
        if self.feature_dim is None:
            self.feature_dim = out.shape[1]
        return out


@MODELS.register_module()
class DigitClassifier(nn.Module):
    """A small convolutional classifier of [C, R, R] images in [−1, 1] (R divisible by 4): two
    stride-2 stages to R/4, a SiLU-activated ``feature_dim`` layer whose output is ``features``
    (the FD-digits detector), then a linear layer to the ``num_classes`` logits (``forward``).
    SiLU rather than ReLU keeps every feature varying, so their covariance is well conditioned."""

    def __init__(self, in_channels=1, resolution=8, num_classes=10, width=32, feature_dim=64, dropout=0.1):
        super().__init__()
        if resolution % 4:
            raise ValueError(f'DigitClassifier: resolution must be divisible by 4, got {resolution}')
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(2 * width * (resolution // 4) ** 2, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.resolution, self.resolution):
            raise ValueError(f'DigitClassifier: expected images [N, {self.in_channels}, {self.resolution}, '
                             f'{self.resolution}], got {tuple(x.shape)}')
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))
