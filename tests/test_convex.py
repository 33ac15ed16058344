"""Tests of gdistill.divergences.convex: the convex functions h of the generalised Fisher
divergence and their Legendre duals (CoSIM App. B.1)."""
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdistill.divergences import (ConvexFunction, PowerH, PseudoHuberH, QuadraticH,
                                  RadialConvexFunction)
from gdistill.registry import CONVEX_FUNCTIONS

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
KINDS = ('QuadraticH', 'PseudoHuberH', 'PowerH')


# ----------------------------------------------------------------------------- strategies
@st.composite
def convex_fns(draw, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    alpha = draw(st.floats(0.1, 5.0))
    if kind == 'QuadraticH':
        return QuadraticH(alpha=alpha)
    delta = draw(st.floats(0.2, 3.0))
    if kind == 'PseudoHuberH':
        return PseudoHuberH(alpha=alpha, delta=delta)
    return PowerH(alpha=alpha, p=draw(st.floats(1.1, 4.0)), delta=delta)


def _array(draw, shape, max_abs):
    arr = draw(hnp.arrays(np.float64, shape,
                          elements=st.floats(-max_abs, max_abs, allow_subnormal=False)))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 100.0]))
    return torch.from_numpy(arr) * scale


@st.composite
def tensors(draw, n=1, max_abs=3.0):
    """``n`` float64 tensors of one shape ``[B, d]`` or ``[B, c, d]``."""
    shape = draw(st.sampled_from([(1, 1), (2, 3), (3, 5), (2, 2, 3)]))
    return tuple(_array(draw, shape, max_abs) for _ in range(n))


def norms(t):
    return t.flatten(1).norm(dim=1)


def dot(a, b):
    return (a * b).flatten(1).sum(1)


def into_dual_domain(fn, y, frac=1.0):
    """Map ``y`` into the open dual domain of ``fn`` (identity when that is everything)."""
    c = fn.dual_domain_radius
    if math.isinf(c):
        return y
    n = norms(y).view(-1, *([1] * (y.ndim - 1)))
    return y * (frac * c / (n + c))


def close(a, b, rtol, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def rel_close(a, b, rtol):
    """Per-sample relative closeness of two tensors (norm-wise for non-scalars); ``rtol`` is
    a number or a per-sample ``[B]`` tensor."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    err = (a - b).norm(dim=1)
    scale = torch.maximum(a.norm(dim=1), b.norm(dim=1))
    assert bool((err <= rtol * scale + 1e-300).all()), (err / scale, a, b)


# ------------------------------------------------------------------- Fenchel–Young, duality
@SETTINGS
@given(convex_fns(), tensors(n=2))
def test_fenchel_young_inequality(fn, xy):
    x, y = xy
    for yy in (y, into_dual_domain(fn, y)):
        hx, hy, xy_ = fn.h(x), fn.conj(yy), dot(x, yy)
        assert not torch.isnan(hy).any()
        finite = torch.isfinite(hy)
        gap = hx + hy - xy_
        tol = 1e-12 * (hx.abs() + hy.abs() + xy_.abs())
        assert bool((gap[finite] >= -tol[finite]).all()), gap
        assert bool((hy[~finite] == math.inf).all())
    assert bool(torch.isfinite(fn.conj(into_dual_domain(fn, y))).all())


@SETTINGS
@given(convex_fns(), tensors())
def test_fenchel_young_equality_at_gradient(fn, xs):
    x, = xs
    y = fn.grad(x)
    hx, hy, xy_ = fn.h(x), fn.conj(y), dot(x, y)
    assert bool(torch.isfinite(hy).all())
    # Condition number of the PowerH solve is ~ 1/(p-1) <= 10 here.
    assert bool(((hx + hy - xy_).abs() <= 1e-11 * (hx + hy + xy_.abs()) + 1e-300).all())


@SETTINGS
@given(convex_fns(), tensors(n=2))
def test_gradients_are_inverse_maps(fn, xy):
    x, y = xy
    rtol = 1e-10
    if isinstance(fn, PseudoHuberH):
        # ||grad h(x)|| = c (1 - delta^2 / (2 ||x||^2) + ...): y keeps ||x|| only in its
        # distance to the sphere ||y|| = c, so x -> y -> x is conditioned like ||x||^2/delta^2
        rtol = 1e-10 * (1 + norms(x) ** 2 / fn.delta ** 2)
    rel_close(fn.grad_conj(fn.grad(x)), x, rtol)
    y = into_dual_domain(fn, y, frac=0.95)
    rel_close(fn.grad(fn.grad_conj(y)), y, 1e-10)


@SETTINGS
@given(convex_fns(), tensors())
def test_conj_at_grad_equals_conj_of_grad(fn, xs):
    u, = xs
    u.requires_grad_(True)
    stable = fn.conj_at_grad(u)
    direct = fn.conj(fn.grad(u))
    rel_close(stable.detach(), direct.detach(), 1e-10)
    g_stable, = torch.autograd.grad(stable.sum(), u)
    g_direct, = torch.autograd.grad(direct.sum(), u)
    rel_close(g_stable, g_direct, 1e-8)
    naive = dot(u, fn.grad(u)) - fn.h(u)
    rel_close(stable.detach(), naive.detach(), 1e-8)


def _biconjugate(fn, x):
    """``h**(x) = sup_y <x, y> - h*(y)`` by L-BFGS over y (float64), batched."""
    c = fn.dual_domain_radius
    v = torch.zeros_like(x, requires_grad=True)

    def to_y(v):  # the open ball ||y|| < c is the image of R^d under this chart
        if math.isinf(c):
            return v
        n2 = v.flatten(1).square().sum(1).view(-1, *([1] * (v.ndim - 1)))
        return c * v / torch.sqrt(1 + n2)

    opt = torch.optim.LBFGS([v], lr=1, max_iter=500, tolerance_grad=1e-14,
                            tolerance_change=1e-16, history_size=20,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        y = to_y(v)
        loss = -(dot(x, y) - fn.conj(y)).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    with torch.no_grad():
        y = to_y(v)
        return dot(x, y) - fn.conj(y)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(convex_fns(), tensors(max_abs=2.0))
def test_biconjugate_equals_h(fn, xs):
    x, = xs
    x = x.clamp(-5, 5)  # keep the chart's optimum (||v|| ~ ||x|| / delta) well inside reach
    hx = fn.h(x)
    h2 = _biconjugate(fn, x)
    assert bool((h2 <= hx + 1e-12 * (1 + hx)).all())  # weak duality
    close(h2, hx, rtol=1e-7, atol=1e-12)


# ---------------------------------------------------------------------------- derivatives
@SETTINGS
@given(convex_fns(), tensors(n=2))
def test_gradients_match_autograd(fn, xy):
    x, y = xy
    x = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(fn.h(x).sum(), x)
    rel_close(fn.grad(x).detach(), g, 1e-12)
    y = into_dual_domain(fn, y, frac=0.95).clone().requires_grad_(True)
    g, = torch.autograd.grad(fn.conj(y).sum(), y)
    rel_close(fn.grad_conj(y).detach(), g, 1e-9)


@pytest.mark.parametrize('fn', [QuadraticH(0.3), PseudoHuberH(0.7, 0.4), PowerH(2.0, 1.5, 0.6),
                                PowerH(0.5, 3.0, 2.0), PowerH()])
@pytest.mark.parametrize('shape', [(1, 4), (1, 2, 3)])
def test_hessian_at_zero(fn, shape):
    x0 = torch.zeros(shape, dtype=torch.float64)
    d = x0.numel()
    hess = torch.autograd.functional.hessian(lambda x: fn.h(x).sum(), x0).reshape(d, d)
    close(hess, torch.eye(d, dtype=torch.float64) / (2 * fn.alpha), rtol=1e-14, atol=1e-14)
    hess = torch.autograd.functional.hessian(lambda y: fn.conj(y).sum(), x0).reshape(d, d)
    close(hess, 2 * fn.alpha * torch.eye(d, dtype=torch.float64), rtol=1e-14, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(convex_fns(), tensors())
def test_hessian_of_conj_is_inverse_hessian_of_h(fn, ys):
    y = into_dual_domain(fn, ys[0][:1], frac=0.9)
    d = y.numel()
    x = fn.grad_conj(y)
    h_conj = torch.autograd.functional.hessian(lambda v: fn.conj(v).sum(), y).reshape(d, d)
    h_prim = torch.autograd.functional.hessian(lambda v: fn.h(v).sum(), x).reshape(d, d)
    close(h_conj @ h_prim, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-8)


@pytest.mark.parametrize('fn', [PowerH(0.8, 1.3, 0.7), PowerH(1.5, 2.7, 1.3),
                                PseudoHuberH(1.0, 2.0)])
def test_gradcheck_dual(fn):
    torch.manual_seed(0)
    y = into_dual_domain(fn, torch.randn(3, 4, dtype=torch.float64) * 2, 0.9)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(fn.conj, (y,))
    assert torch.autograd.gradgradcheck(fn.conj, (y,))
    assert torch.autograd.gradcheck(fn.grad_conj, (y,))
    assert torch.autograd.gradcheck(fn.conj_at_grad, (y,))


# ------------------------------------------------------------------------ specific forms
@SETTINGS
@given(st.floats(0.05, 20.0), tensors())
def test_quadratic_closed_forms(alpha, xs):
    x, = xs
    fn = QuadraticH(alpha=alpha)
    sq = x.flatten(1).square().sum(1)
    close(fn.h(x), sq / (4 * alpha), rtol=1e-15, atol=0)
    close(fn.conj(x), alpha * sq, rtol=1e-15, atol=0)
    close(fn.grad(x), x / (2 * alpha), rtol=1e-15, atol=0)
    close(fn.grad_conj(x), 2 * alpha * x, rtol=1e-15, atol=0)
    close(fn.conj_at_grad(x), sq / (4 * alpha), rtol=1e-15, atol=0)


def test_pseudo_huber_closed_forms():
    fn = PseudoHuberH(alpha=0.5, delta=2.0)  # c = 2
    assert fn.c == fn.dual_domain_radius == 2.0
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)  # ||x|| = 5
    r = math.sqrt(4 + 25)
    close(fn.h(x), torch.tensor([2 * (r - 2), 0.0], dtype=torch.float64), rtol=1e-15, atol=0)
    close(fn.grad(x), 2 * x / torch.tensor([[r], [2.0]], dtype=torch.float64), rtol=1e-15,
          atol=0)
    y = torch.tensor([[1.2, 0.0], [0.0, 0.0]], dtype=torch.float64)
    close(fn.conj(y), torch.tensor([2 * (2 - 1.6), 0.0], dtype=torch.float64), rtol=1e-15,
          atol=0)
    close(fn.grad_conj(y), 2 * y / 1.6, rtol=1e-15, atol=0)


def test_pseudo_huber_conj_is_inf_outside_domain():
    fn = PseudoHuberH(alpha=1.2, delta=1.0)
    c = fn.c
    for dtype in (torch.float32, torch.float64):
        y = torch.zeros(5, 3, dtype=dtype)
        y[0, 0] = 0.5 * c   # inside
        y[1, 0] = c         # on (or, after rounding, next to) the boundary: ~ c * delta
        y[2, 1] = 1.5 * c   # outside
        y[3] = 1e30         # far outside
        y[4, 2] = -c * 1.0001
        y.requires_grad_(True)
        val = fn.conj(y)
        assert not torch.isnan(val).any()
        assert torch.isfinite(val[:2]).all()
        close(val[1], torch.tensor(c * fn.delta, dtype=dtype), rtol=1e-6, atol=0)
        assert (val[2:] == math.inf).all()
        # an interior sample keeps its finite gradient in a batch with infinite ones, and
        # the infinite ones put no NaN into the backward pass
        g, = torch.autograd.grad(val[[0, 2, 3, 4]].sum(), y)
        assert torch.isfinite(g).all()
        close(g[0], fn.grad_conj(y[:1].detach())[0], rtol=1e-6, atol=0)
        assert (g[1:] == 0).all()
    on_sphere = torch.tensor([[0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    fn1 = PseudoHuberH(alpha=0.5, delta=1.0)  # c = 1, and ||on_sphere||^2 == 1 exactly
    assert float(on_sphere.detach().square().sum()) == 1.0
    val = fn1.conj(on_sphere)
    assert float(val) == 1.0
    g, = torch.autograd.grad(val.sum(), on_sphere)
    assert torch.isfinite(g).all()
    with pytest.raises(ValueError, match='grad_conj'):
        fn.grad_conj(torch.tensor([[0.1, 0.0], [2 * c, 0.0]]))
    with pytest.raises(ValueError, match='grad_conj'):
        fn.grad_conj(torch.tensor([[c, 0.0]]))


def test_pseudo_huber_gradient_bounded():
    fn = PseudoHuberH(alpha=0.9, delta=0.3)
    x = torch.randn(50, 6, dtype=torch.float64) * 1e6
    assert (norms(fn.grad(x)) < fn.c).all()
    assert torch.isfinite(fn.conj_at_grad(x)).all()


def test_power_special_cases():
    torch.manual_seed(1)
    x = torch.randn(8, 5, dtype=torch.float64) * 3
    quad, pw = QuadraticH(0.7), PowerH(0.7, p=2.0, delta=0.4)
    for name in ('h', 'conj', 'grad', 'grad_conj', 'conj_at_grad'):
        close(getattr(pw, name)(x), getattr(quad, name)(x), rtol=1e-13, atol=0)
    ph, near = PseudoHuberH(0.7, 0.4), PowerH(0.7, p=1 + 1e-7, delta=0.4)
    for name in ('h', 'grad', 'conj_at_grad'):
        close(getattr(near, name)(x), getattr(ph, name)(x), rtol=1e-5, atol=0)


def test_power_conj_finite_everywhere_and_robust():
    for p in (1.2, 1.5, 3.0, 6.0):
        fn = PowerH(alpha=0.6, p=p, delta=0.5)
        y = torch.randn(41, 3, dtype=torch.float64) * torch.logspace(
            -12, 10, 41, dtype=torch.float64).view(-1, 1)
        y[0] = 0
        val, g = fn.conj(y), fn.grad_conj(y)
        assert torch.isfinite(val).all() and torch.isfinite(g).all()
        assert val[0] == 0 and (g[0] == 0).all()
        assert (val[1:] > 0).all()
        rel_close(fn.grad(g)[1:], y[1:], 1e-11)
        # conjugate growth exponent q = p / (p - 1) at large ||y||
        s1, s2 = torch.tensor([[1e10]]), torch.tensor([[1e11]])
        slope = torch.log10(fn.conj(s2.double()) / fn.conj(s1.double()))
        close(slope, torch.tensor([p / (p - 1)], dtype=torch.float64), rtol=1e-3, atol=0)


def test_power_newton_failure_is_reported():
    fn = PowerH(alpha=1.0, p=1.05, delta=1.0)
    y = torch.tensor([[0.4, 0.0], [0.0, 0.0]], dtype=torch.float64)  # rho ~ delta: worst start
    fn.grad_conj(y)
    fn.max_newton_iters = 0
    with pytest.raises(RuntimeError, match='did not converge'):
        fn.grad_conj(y)


@pytest.mark.parametrize('fn', [QuadraticH(), PseudoHuberH(), PowerH(), PowerH(p=3.0)])
def test_conj_at_grad_stable_in_float32(fn):
    torch.manual_seed(0)
    u64 = torch.randn(6, 16, dtype=torch.float64) * torch.tensor(
        [1e-20, 1e-6, 1e-2, 1.0, 1e3, 1e6], dtype=torch.float64).view(-1, 1)
    ref = fn.conj_at_grad(u64)
    got = fn.conj_at_grad(u64.float())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert ((got.double() - ref).abs() <= 2e-6 * ref).all(), (got, ref)
    # the dual path agrees too, in float32, where it is well conditioned (for pseudo-Huber
    # ||grad h(u)|| -> c as ||u|| grows, and c^2 - ||y||^2 cancels: hence conj_at_grad)
    rel_close(fn.conj(fn.grad(u64[1:4].float())).double(), ref[1:4], 1e-4)


# ------------------------------------------------------------------ shapes, dtypes, errors
@pytest.mark.parametrize('fn', [QuadraticH(), PseudoHuberH(delta=2.0), PowerH()])
def test_shapes_and_dtypes(fn):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 0.05  # norms ~0.45, inside PseudoHuberH's domain (c = 0.83)
    assert fn.h(x).shape == fn.conj(x).shape == fn.conj_at_grad(x).shape == (4,)
    assert fn.grad(x).shape == fn.grad_conj(x).shape == x.shape
    for out in (fn.h(x), fn.conj(x), fn.grad(x), fn.grad_conj(x), fn.conj_at_grad(x)):
        assert out.dtype == torch.float32
    close(fn.h(x), fn.h(x.reshape(4, -1)), rtol=1e-6, atol=0)
    v = torch.randn(7, dtype=torch.float64) * 0.1  # [B]: B samples of dimension 1
    close(fn.h(v), fn.h(v[:, None]), rtol=0, atol=0)
    close(fn.grad(v), fn.grad(v[:, None])[:, 0], rtol=0, atol=0)
    close(fn.grad_conj(v), fn.grad_conj(v[:, None])[:, 0], rtol=0, atol=0)
    empty = torch.zeros(0, 3)
    assert fn.h(empty).shape == fn.conj(empty).shape == (0,)
    assert fn.grad_conj(empty).shape == (0, 3)
    with pytest.raises(ValueError, match='batch dim'):
        fn.h(torch.tensor(1.0))
    with pytest.raises(TypeError, match='floating-point'):
        fn.grad(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match='torch.Tensor'):
        fn.h([[1.0, 2.0]])


@pytest.mark.parametrize('cls,kwargs,match', [
    (QuadraticH, dict(alpha=0), 'alpha'),
    (QuadraticH, dict(alpha=-1.0), 'alpha'),
    (QuadraticH, dict(alpha=float('nan')), 'alpha'),
    (PseudoHuberH, dict(alpha=float('inf')), 'alpha'),
    (PseudoHuberH, dict(delta=0.0), 'delta'),
    (PseudoHuberH, dict(delta=-2), 'delta'),
    (PowerH, dict(p=1.0), 'p must be > 1'),
    (PowerH, dict(p=0.5), 'p must be > 1'),
    (PowerH, dict(p=-3), ' p '),
    (PowerH, dict(delta=float('inf')), 'delta'),
])
def test_parameter_validation(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_parameter_types():
    with pytest.raises(TypeError, match='alpha'):
        QuadraticH(alpha=True)
    with pytest.raises(TypeError, match='delta'):
        PseudoHuberH(delta='wide')
    assert PowerH(alpha=2, p=3, delta=1).p == 3.0


def test_registry_and_repr():
    for kind in KINDS:
        assert CONVEX_FUNCTIONS.get(kind) is not None
    fn = CONVEX_FUNCTIONS.build(dict(type='PowerH', alpha=0.5, p=3.0, delta=2.0))
    assert isinstance(fn, PowerH) and isinstance(fn, ConvexFunction)
    assert (fn.alpha, fn.p, fn.delta) == (0.5, 3.0, 2.0)
    assert repr(fn) == 'PowerH(alpha=0.5, p=3.0, delta=2.0)'
    fn = CONVEX_FUNCTIONS.build(dict(type='PseudoHuberH'))
    assert (fn.alpha, fn.delta, fn.c) == (1.2, 1.0, 1.0 / 2.4)
    assert CONVEX_FUNCTIONS.build(dict(type='QuadraticH')).alpha == 1.2
    assert PowerH().p == 1.5 and PowerH().delta == 1.0
    with pytest.raises(KeyError, match='PowerH'):
        CONVEX_FUNCTIONS.build(dict(type='PowerHH'))


def test_base_default_conj_at_grad():
    """The generic ``<u, grad h(u)> - h(u)`` of the base class, on a non-radial h."""

    class DiagQuadratic(ConvexFunction):
        def __init__(self, w, alpha=1.0):
            super().__init__(alpha)
            self.w = w

        def h(self, x):
            return (self.w * x * x).flatten(1).sum(1) / (4 * self.alpha)

        def grad(self, x):
            return self.w * x / (2 * self.alpha)

        def conj(self, y):
            return (self.alpha * y * y / self.w).flatten(1).sum(1)

        def grad_conj(self, y):
            return 2 * self.alpha * y / self.w

    fn = DiagQuadratic(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), alpha=0.3)
    u = torch.randn(4, 3, dtype=torch.float64)
    close(fn.conj_at_grad(u), fn.conj(fn.grad(u)), rtol=1e-13, atol=0)
    with pytest.raises(TypeError):
        ConvexFunction()
    with pytest.raises(TypeError):
        RadialConvexFunction()
