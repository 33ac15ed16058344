"""Building blocks of EDM's UNets (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", App. B and F).

Every layer keeps the parameter and buffer names of the official checkpoints, so a state_dict
written by EDM loads here with ``strict=True``:

- ``Linear``: ``weight`` [out, in], ``bias`` [out] (bias optional);
- ``Conv2d``: ``weight`` [out, in, k, k] and ``bias`` [out] when k > 0, plus a
  ``resample_filter`` buffer [1, 1, n, n] only when the layer up- or down-samples;
- ``GroupNorm``: ``weight``, ``bias`` [C];
- ``FourierEmbedding``: a ``freqs`` buffer (random, fixed at construction).

Weights are cast to the input's dtype in ``forward`` so an fp16 input runs an fp16 layer while
the parameters stay float32. Attention runs ``scaled_dot_product_attention`` inside an ``autograd.Function`` with
``setup_context`` and an explicit ``jvp``, so ``torch.func.jvp`` works through every layer
(the fused CUDA kernels have no forward-mode derivative of their own). Under a forward-mode
derivative, convolutions and GroupNorms also run through autograd Functions with their JVPs
written out (``ConvolutionJvp``: the input tangent only, two convolutions where torch's rule runs
three; ``GroupNormJvp``: a few fused passes instead of torch's decomposition); elsewhere they are
torch's own calls, unchanged.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

# How each init mode turns (fan_in, fan_out) into a scale, and which unit distribution it draws.
_INIT_MODES = {
    'xavier_uniform': (lambda fi, fo: math.sqrt(6 / (fi + fo)), 'uniform'),
    'xavier_normal': (lambda fi, fo: math.sqrt(2 / (fi + fo)), 'normal'),
    'kaiming_uniform': (lambda fi, fo: math.sqrt(3 / fi), 'uniform'),
    'kaiming_normal': (lambda fi, fo: math.sqrt(1 / fi), 'normal'),
}


def weight_init(shape, mode, fan_in, fan_out):
    """A tensor of ``shape`` drawn as ``mode`` prescribes: uniform on [-s, s] or normal with
    std s, with s from the fans (Glorot & Bengio 2010; He et al. 2015)."""
    if mode not in _INIT_MODES:
        raise ValueError(f'unknown init_mode {mode!r}; expected one of {sorted(_INIT_MODES)}')
    scale_of, kind = _INIT_MODES[mode]
    unit = torch.rand(*shape) * 2 - 1 if kind == 'uniform' else torch.randn(*shape)
    return scale_of(fan_in, fan_out) * unit


def forward_ad_active():
    """Whether a forward-mode derivative may be running (inside ``torch.func.jvp`` or
    ``torch.autograd.forward_ad.dual_level``): the layers then use the functions below, whose
    derivatives are written out."""
    return _WRITTEN_RULES and torch.autograd.forward_ad._current_level >= 0


_WRITTEN_RULES = True


@contextlib.contextmanager
def builtin_forward_ad():
    """Inside: torch's own forward-mode rules for convolution and GroupNorm instead of the
    written-out ones (to compare the two, as the speed tests and benchmarks do)."""
    global _WRITTEN_RULES
    before, _WRITTEN_RULES = _WRITTEN_RULES, False
    try:
        yield
    finally:
        _WRITTEN_RULES = before


class ConvolutionJvp(torch.autograd.Function):
    """``F.conv2d``/``F.conv_transpose2d`` with the forward-mode derivative written out. A
    convolution is bilinear, so d conv(x, W) = conv(ẋ, W) + conv(x, Ẇ) + ḃ; torch's built-in
    rule evaluates every term, with a zero tensor for an input without a tangent — a network's
    weights under ``torch.func.jvp`` — so its JVP costs three convolutions; here only the terms
    with a tangent run (two convolutions for an input tangent: the primal and conv(ẋ, W)).
    Backward: ``aten.convolution_backward``, as torch's own."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, transposed, stride, padding, groups):
        fn = F.conv_transpose2d if transposed else F.conv2d
        return fn(x, weight, bias, stride=stride, padding=padding, groups=groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, transposed, stride, padding, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.conv = (transposed, stride, padding, groups)
        ctx.set_materialize_grads(False)   # inputs without a tangent (the weights) get None, not zeros
        ctx.bias_sizes = None if bias is None else list(bias.shape)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight = ctx.saved_tensors
        transposed, stride, padding, groups = ctx.conv
        fn = F.conv_transpose2d if transposed else F.conv2d
        out = None
        if dx is not None:
            out = fn(dx, weight, None, stride=stride, padding=padding, groups=groups)
        if dweight is not None:
            term = fn(x, dweight, None, stride=stride, padding=padding, groups=groups)
            out = term if out is None else out + term
        if dbias is not None:
            if out is None:
                out = torch.zeros_like(fn(x, weight, None, stride=stride, padding=padding, groups=groups))
            out = out + dbias.reshape(1, -1, 1, 1)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        transposed, stride, padding, groups = ctx.conv
        pair = (lambda v: [v, v])
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, x, weight, ctx.bias_sizes, pair(stride), pair(padding), [1, 1], transposed, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_sizes is not None and ctx.needs_input_grad[2]])
        return gx, gw, gb, None, None, None, None


def convolution(x, weight, bias=None, transposed=False, stride=1, padding=0, groups=1):
    """A 2-D convolution (transposed if asked) with integer stride and padding; under a forward-mode
    derivative through ``ConvolutionJvp`` (its JVP costs two convolutions, not three)."""
    if forward_ad_active():
        return ConvolutionJvp.apply(x, weight, bias, transposed, stride, padding, groups)
    fn = F.conv_transpose2d if transposed else F.conv2d
    return fn(x, weight, bias, stride=stride, padding=padding, groups=groups)


class GroupNormJvp(torch.autograd.Function):
    """``F.group_norm`` with its forward-mode derivative written out (Wu & He 2018's
    normalisation; torch differentiates it forward by decomposition into a dozen elementwise
    passes). Per group, with x̂ = (x − μ)·r, r = 1/√(var + ε):

        ẏ = γ·r·(ẋ − mean(ẋ) − x̂·mean(x̂·ẋ)) + γ̇·x̂ + β̇,

    the statistics in at least float32. Backward: recomputed under autograd (first order)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, num_groups, eps):
        return F.group_norm(x, num_groups, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, num_groups, eps = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.save_for_forward(x, weight)
        ctx.norm = (num_groups, eps)
        ctx.set_materialize_grads(False)   # inputs without a tangent (the weights) get None, not zeros

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight = ctx.saved_tensors
        num_groups, eps = ctx.norm
        n, c = x.shape[:2]
        dtype = torch.promote_types(x.dtype, torch.float32)
        # [N, G, C/G, pixels]: per-group statistics, per-channel affine
        xc = x.reshape(n, num_groups, c // num_groups, -1).to(dtype)
        var, mean = torch.var_mean(xc, dim=(2, 3), unbiased=False, keepdim=True)
        rstd = (var + eps).rsqrt()
        xc = xc - mean                                             # x̂ = r·xc
        gamma = weight.to(dtype).reshape(1, num_groups, c // num_groups, 1)
        out = torch.zeros_like(xc)
        if dx is not None:
            # ẏ = γr·ẋ − γr·mean(ẋ) − γr³·mean(xc·ẋ)·xc, as two fused multiply-adds
            dg = dx.reshape(xc.shape).to(dtype)
            scale = gamma * rstd
            coef_x = -scale * rstd ** 2 * (xc * dg).mean(dim=(2, 3), keepdim=True)
            shift = -scale * dg.mean(dim=(2, 3), keepdim=True)
            out = torch.addcmul(torch.addcmul(shift, coef_x, xc), scale, dg)
        if dweight is not None:
            out = out + xc * rstd * dweight.to(dtype).reshape(gamma.shape)
        if dbias is not None:
            out = out + dbias.to(dtype).reshape(gamma.shape)
        out = out.reshape(x.shape)
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        num_groups, eps = ctx.norm
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, weight, bias), ctx.needs_input_grad)]
        with torch.enable_grad():
            out = F.group_norm(inputs[0], num_groups, inputs[1], inputs[2], eps)
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3]) + (None, None)


def group_norm(x, num_groups, weight, bias, eps):
    """``F.group_norm``; under a forward-mode derivative through ``GroupNormJvp``."""
    if forward_ad_active():
        return GroupNormJvp.apply(x, weight, bias, num_groups, eps)
    return F.group_norm(x, num_groups, weight, bias, eps)


class Linear(nn.Module):
    """y = x·Wᵀ + b with EDM's initialisation knobs (``init_weight``/``init_bias`` scale the
    drawn values; 0 gives an all-zero layer)."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class Conv2d(nn.Module):
    """A k×k convolution (k = 0: none, only resampling) with optional 2× up- or down-sampling
    by a separable FIR filter (``resample_filter``, e.g. [1, 1] box or [1, 3, 3, 1] binomial).

    Unfused, the resampling runs before the convolution. ``fused_resample`` merges the two
    into one padded pass (upsample → conv, or conv → downsample) as NCSN++'s residual encoder
    does; the padding keeps the output at exactly half or twice the input size.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        if up and down:
            raise ValueError('Conv2d: up and down cannot both be set')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
                    fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans)
                                    * init_weight) if kernel else None)
        self.bias = (nn.Parameter(weight_init([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f2d = torch.outer(taps, taps)[None, None] / taps.sum().square()  # unit DC gain
        self.register_buffer('resample_filter', f2d if (up or down) else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        c_in, c_out = self.in_channels, self.out_channels

        if self.fused_resample and self.up and w is not None:
            x = convolution(x, f.mul(4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, transposed=True,
                            padding=max(f_pad - w_pad, 0))
            x = convolution(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = convolution(x, w, padding=w_pad + f_pad)
            x = convolution(x, f.tile([c_out, 1, 1, 1]), groups=c_out, stride=2)
        else:
            if self.up:  # ×4: the transposed conv spreads each pixel over a 2×2 cell
                x = convolution(x, f.mul(4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, transposed=True,
                                padding=f_pad)
            if self.down:
                x = convolution(x, f.tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                x = convolution(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most ``num_groups`` groups and at least
    ``min_channels_per_group`` channels in each (so narrow layers use fewer groups)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class SoftmaxAttention(torch.autograd.Function):
    """O = softmax(q·kᵀ/√C)·v on [N, L, C] tensors (Vaswani et al. 2017, eq. 1), computed by
    ``scaled_dot_product_attention`` (fused kernels where available), with its forward-mode
    derivative written out so ``torch.func.jvp`` and ``forward_ad`` work on every backend:
    with S = q·kᵀ/√C, P = softmax(S) and tangents (q̇, k̇, v̇),

        Ṡ = (q̇·kᵀ + q·k̇ᵀ)/√C,   Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)),   Ȯ = Ṗ·v + P·v̇.

    The backward pass recomputes the forward under autograd (first order only)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)
        device = q.device.type
        # the recomputation in backward runs under the autocast the forward ran under
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v = (x.detach().requires_grad_() for x in ctx.saved_tensors)
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        out_dtype = ctx.saved_tensors[0].dtype
        wide = torch.promote_types(out_dtype, torch.float32)
        q, k, v = (t.to(wide) for t in ctx.saved_tensors)
        dq, dk, dv = (None if t is None else t.to(wide) for t in (dq, dk, dv))
        scale = q.shape[-1] ** -0.5
        p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        ds = torch.zeros_like(p)
        if dq is not None:
            ds = ds + dq @ k.transpose(-1, -2) * scale
        if dk is not None:
            ds = ds + q @ dk.transpose(-1, -2) * scale
        dp = p * (ds - (p * ds).sum(-1, keepdim=True))
        out = dp @ v
        if dv is not None:
            out = out + p @ dv
        return out.to(out_dtype)


def attention(q, k, v):
    """Softmax attention in EDM's channels-first layout: q, k, v are [N, C, L] (N = batch ×
    heads, C = channels per head, L = pixels); returns [N, C, L].

    float32 and float64 inputs run in their own dtype. Half-precision inputs (a network run in
    bf16/fp16) stay in it: ``scaled_dot_product_attention``'s fused kernels form q·k and the
    softmax with float32 accumulation and round the weights to the input dtype before
    multiplying v, as EDM's fp16 ``AttentionOp`` does (weights in float32, cast to q's dtype).
    ``SoftmaxAttention`` carries the forward-mode derivative (its tangent in float32 or wider),
    so ``torch.func.jvp`` works here on CPU and CUDA alike.
    """
    half = q.dtype in (torch.float16, torch.bfloat16)
    dtype = q.dtype if half else torch.promote_types(q.dtype, torch.float32)
    out = SoftmaxAttention.apply(q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype),
                                 v.transpose(1, 2).to(dtype))
    # contiguous: a strided (channels-last) result would make the next GroupNorm's
    # forward-mode derivative fail in torch
    return out.transpose(1, 2).contiguous().to(q.dtype)


class UNetBlock(nn.Module):
    """A residual block conditioned on an embedding, optionally with self-attention.

    h = conv0(SiLU(norm0(x)))                              (up/down-sampling here if asked)
    h = SiLU(norm1(h)·(1 + scale) + shift)   if adaptive_scale (scale, shift = affine(emb))
      = SiLU(norm1(h + affine(emb)))         otherwise
    x = (conv1(dropout(h)) + skip(x)) · skip_scale
    x = (proj(attn(qkv(norm2(x)))) + x) · skip_scale      when attention is on

    ``skip`` is a 1×1 projection (with resampling) when the shape changes; with
    ``resample_proj=False`` a same-width up/down block resamples the skip without a projection.
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False,
                 attention=False, num_heads=None, channels_per_head=64, dropout=0, skip_scale=1,
                 eps=1e-5, resample_filter=(1, 1), resample_proj=False, adaptive_scale=True,
                 init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        elif num_heads is not None:
            self.num_heads = num_heads
        else:  # 0 heads (no attention) when out_channels < channels_per_head, as in EDM
            self.num_heads = out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init if init_attn is None else dict(init_attn)))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale

        if self.num_heads:
            n, c, height, width = x.shape
            # qkv channels are laid out [head, channel-in-head, (q, k, v)], as in EDM
            q, k, v = self.qkv(self.norm2(x)).reshape(
                n * self.num_heads, c // self.num_heads, 3, height * width).unbind(2)
            a = attention(q, k, v).reshape(n, c, height, width)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample: [cos(x·ω_i), sin(x·ω_i)] with
    ω_i = (1/max_positions)^(i/(n/2 − e)), i < n/2, e = 1 if ``endpoint`` else 0."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device)
        exponent = exponent / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponent
        phase = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([phase.cos(), phase.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2π·x·f), sin(2π·x·f)], f ~ N(0, scale²) fixed at
    construction (stored as the ``freqs`` buffer, so a checkpoint carries them)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        phase = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([phase.cos(), phase.sin()], dim=1)
