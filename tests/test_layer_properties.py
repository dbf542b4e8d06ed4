"""Properties of each layer that a finite-difference gradient check cannot see.

Layout (Patchify), numerical stability (softmax, loss, GELU), statistics (Dropout, LayerNorm),
the documented scale of attention, and the contracts every layer keeps: forward and backward never
modify their inputs, and backward adds into parameter gradients.

Every test that computes with arrays runs on the `backend` fixture (NumPy, and CuPy where it is
usable); references are computed on the host with NumPy or plain Python.
"""
import importlib
import math
import re
import warnings

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scratchvit.backend import get_array_module, get_backend, to_host
from scratchvit.encoder_block import EncoderBlock
from scratchvit.layers import (GELU, Dropout, LayerNorm, Linear, MultiHeadSelfAttention, Patchify,
                               SoftmaxCrossEntropy, softmax, softmax_backward, softmax_simple)
from scratchvit.layers import layer as layer_module
from scratchvit.vit import ViT

from conftest import on_gpu   # tests/ is on sys.path under pytest's default import mode

# The `backend` fixture is function-scoped but stateless, so reusing it across Hypothesis examples is safe.
with_backend = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

seeds = st.integers(0, 2**32 - 1)


def host_rng(seed):
    return numpy.random.default_rng(seed)


def assert_on_backend(array, backend):
    assert get_array_module(array) is backend.xp


# ---------------------------------------------------------------------------------------------
# Patchify
# ---------------------------------------------------------------------------------------------

def patchify_reference(images, p):
    """patches[b, i*Wp + j, (r*p + s)*C + c] = images[b, c, i*p + r, j*p + s], by explicit loops."""
    B, C, H, W = images.shape
    Hp, Wp = H // p, W // p
    patches = numpy.empty((B, Hp * Wp, p * p * C), dtype=images.dtype)
    for b in range(B):
        for i in range(Hp):
            for j in range(Wp):
                for r in range(p):
                    for s in range(p):
                        for c in range(C):
                            patches[b, i * Wp + j, (r * p + s) * C + c] = images[b, c, i * p + r, j * p + s]
    return patches


@with_backend
@given(B=st.integers(1, 2), C=st.integers(1, 3), Hp=st.integers(1, 3), Wp=st.integers(1, 3),
       p=st.integers(1, 4), seed=seeds)
def test_patchify_layout_and_exact_inverse(backend, B, C, Hp, Wp, p, seed):
    rng = host_rng(seed)
    images_host = rng.standard_normal((B, C, Hp * p, Wp * p))
    images = backend.asarray(images_host)
    layer = Patchify(p)
    patches = layer.forward(images)
    assert_on_backend(patches, backend)
    assert patches.shape == (B, Hp * Wp, p * p * C)
    numpy.testing.assert_array_equal(to_host(patches), patchify_reference(images_host, p))
    # backward is the inverse permutation: exact, in both directions
    numpy.testing.assert_array_equal(to_host(layer.backward(patches)), images_host)
    other_host = rng.standard_normal((B, Hp * Wp, p * p * C))
    numpy.testing.assert_array_equal(to_host(layer.forward(layer.backward(backend.asarray(other_host)))),
                                     other_host)


def test_patchify_hand_written_example(backend):
    """1x2x4x4 image, patch 2, pixel value 100*c + 10*h + w: every patch spelled out by hand.

    Regression for vit-pytorch's early bug of flattening the patch pixels as (c, r, s) instead of (r, s, c).
    """
    c, h, w = numpy.meshgrid(numpy.arange(2), numpy.arange(4), numpy.arange(4), indexing="ij")
    images = backend.asarray((100 * c + 10 * h + w)[None], dtype="float64")
    expected = numpy.array([[
        [0, 100, 1, 101, 10, 110, 11, 111],      # patch (0, 0): rows 0-1, columns 0-1
        [2, 102, 3, 103, 12, 112, 13, 113],      # patch (0, 1): rows 0-1, columns 2-3
        [20, 120, 21, 121, 30, 130, 31, 131],    # patch (1, 0): rows 2-3, columns 0-1
        [22, 122, 23, 123, 32, 132, 33, 133],    # patch (1, 1): rows 2-3, columns 2-3
    ]], dtype=numpy.float64)
    layer = Patchify(2)
    patches = layer.forward(images)
    numpy.testing.assert_array_equal(to_host(patches), expected)
    numpy.testing.assert_array_equal(to_host(layer.backward(patches)), to_host(images))


@pytest.mark.parametrize("height, width, p, bad", [(6, 7, 3, 7), (7, 6, 3, 7), (5, 4, 2, 5), (4, 10, 4, 10)])
def test_patchify_indivisible_image_raises(backend, height, width, p, bad):
    images = backend.xp.zeros((1, 1, height, width))
    with pytest.raises(ValueError) as error:
        Patchify(p).forward(images)
    message = str(error.value)
    assert re.search(rf"\b{bad}\b", message), message
    assert re.search(rf"\b{p}\b", message), message


@pytest.mark.parametrize("p", [0, -1, 1.5])
def test_patchify_bad_patch_size_raises(p):
    with pytest.raises(ValueError, match="patch_size"):
        Patchify(p)


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------

score_rows = hnp.arrays(numpy.float64, st.tuples(st.integers(1, 5), st.integers(1, 9)),
                        elements=st.floats(-30, 30, allow_nan=False))


@with_backend
@given(scores=score_rows)
def test_softmax_rows_are_distributions(backend, scores):
    probs = to_host(softmax(backend.asarray(scores)))
    assert probs.shape == scores.shape
    assert numpy.all(probs >= 0) and numpy.all(probs <= 1)
    numpy.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=0, atol=1e-12)


@with_backend
@given(scores=score_rows, shift=st.floats(-100, 100))
def test_softmax_is_shift_invariant_per_row(backend, scores, shift):
    row_shifts = shift * numpy.linspace(-1, 1, scores.shape[0])[:, None]   # a different constant per row
    plain = to_host(softmax(backend.asarray(scores)))
    shifted = to_host(softmax(backend.asarray(scores + row_shifts)))
    numpy.testing.assert_allclose(shifted, plain, rtol=1e-9, atol=1e-14)


@with_backend
@given(scores=score_rows)
def test_softmax_matches_simple_formula_on_moderate_inputs(backend, scores):
    numpy.testing.assert_allclose(to_host(softmax(backend.asarray(scores))),
                                  to_host(softmax_simple(backend.asarray(scores))), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_is_finite_for_huge_scores_where_simple_formula_is_not(backend, dtype):
    scores = backend.asarray([[1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4]], dtype=dtype)
    probs = to_host(softmax(scores))
    assert numpy.all(numpy.isfinite(probs))
    numpy.testing.assert_allclose(probs, [[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    with warnings.catch_warnings(), numpy.errstate(over="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        simple = to_host(softmax_simple(scores))
    assert not numpy.all(numpy.isfinite(simple))   # the textbook formula overflows: why softmax subtracts the max


def test_softmax_leaves_its_input_alone_unless_asked(backend):
    scores = backend.asarray(host_rng(0).standard_normal((3, 5)))
    before = to_host(scores).copy()
    probs = softmax(scores)
    numpy.testing.assert_array_equal(to_host(scores), before)
    overwritten = softmax(scores, overwrite=True)
    numpy.testing.assert_array_equal(to_host(overwritten), to_host(probs))


@with_backend
@given(rows=st.integers(1, 4), n=st.integers(1, 8), seed=seeds)
def test_softmax_backward_matches_explicit_jacobian(backend, rows, n, seed):
    rng = host_rng(seed)
    scores, grad = 3 * rng.standard_normal((rows, n)), rng.standard_normal((rows, n))
    probs = softmax(backend.asarray(scores))
    result = to_host(softmax_backward(probs, backend.asarray(grad)))
    probs_host = to_host(probs)
    for row in range(rows):
        p = probs_host[row]
        jacobian = numpy.diag(p) - numpy.outer(p, p)          # d p_i / d s_j
        numpy.testing.assert_allclose(result[row], jacobian.T @ grad[row], rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------

@with_backend
@given(rows=st.integers(1, 6), dim=st.integers(2, 32), scale=st.floats(0.1, 100), offset=st.floats(-100, 100),
       seed=seeds)
def test_layernorm_output_has_zero_mean_unit_variance(backend, rows, dim, scale, offset, seed):
    rng = host_rng(seed)
    # a shuffled ramp plus a little noise: every row's variance is at least about scale^2 / 4
    pattern = numpy.stack([rng.permutation(numpy.linspace(-1, 1, dim)) for _ in range(rows)])
    x = offset + scale * (pattern + 0.1 * rng.standard_normal((rows, dim)))
    layer = LayerNorm(dim, dtype="float64").to(backend)     # the parameters live where the input does
    y = to_host(layer.forward(backend.asarray(x)))
    numpy.testing.assert_allclose(y.mean(axis=-1), 0.0, rtol=0, atol=1e-10)
    var_x = x.var(axis=-1)
    # the only departure from variance 1 is eps: var(y) = var(x) / (var(x) + eps)
    numpy.testing.assert_allclose(y.var(axis=-1), var_x / (var_x + layer.eps), rtol=1e-9)
    assert numpy.all(numpy.abs(y.var(axis=-1) - 1.0) <= layer.eps / var_x + 1e-9)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("value", [0.0, 5.0, -1e3])
def test_layernorm_constant_row_is_finite(backend, dtype, value):
    layer = LayerNorm(8, dtype=dtype).to(backend)
    x = backend.xp.full((3, 8), value, dtype=dtype)
    y = to_host(layer.forward(x))
    assert numpy.all(numpy.isfinite(y))
    numpy.testing.assert_allclose(y, 0.0, atol=1e-2)   # centred to (about) zero, not blown up by 1/sqrt(0)
    grad = to_host(layer.backward(backend.xp.ones((3, 8), dtype=dtype)))
    assert numpy.all(numpy.isfinite(grad))


def test_layernorm_last_axis_mismatch_raises(backend):
    with pytest.raises(ValueError, match="8"):
        LayerNorm(8).forward(backend.xp.zeros((2, 7), dtype="float32"))


@pytest.mark.parametrize("dim, eps", [(0, 1e-5), (-2, 1e-5), (4, 0.0), (4, -1e-5)])
def test_layernorm_bad_arguments_raise(dim, eps):
    with pytest.raises(ValueError):
        LayerNorm(dim, eps)


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------

def gelu_tanh_reference(x):
    x = numpy.asarray(x, dtype=numpy.float64)
    return 0.5 * x * (1.0 + numpy.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_is_the_tanh_form():
    assert GELU.approximate == "tanh"
    assert GELU().approximate == "tanh"


@with_backend
@given(x=hnp.arrays(numpy.float64, hnp.array_shapes(max_dims=3, max_side=5),
                    elements=st.floats(-10, 10, allow_nan=False)))
def test_gelu_matches_tanh_formula(backend, x):
    y = to_host(GELU().forward(backend.asarray(x)))
    numpy.testing.assert_allclose(y, gelu_tanh_reference(x), rtol=1e-9, atol=1e-14)


def test_gelu_float32_matches_tanh_formula(backend):
    x = numpy.linspace(-6, 6, 241)
    layer = GELU()
    y = layer.forward(backend.asarray(x, dtype="float32"))
    assert y.dtype == numpy.float32
    numpy.testing.assert_allclose(to_host(y), gelu_tanh_reference(x), rtol=1e-5, atol=1e-6)


def test_gelu_is_within_1e3_of_exact_erf_gelu(backend):
    x = numpy.linspace(-5, 5, 2001)
    exact = numpy.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    y = to_host(GELU().forward(backend.asarray(x)))
    assert numpy.max(numpy.abs(y - exact)) < 1e-3


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gelu_is_finite_for_large_inputs(backend, dtype):
    # pytest turns RuntimeWarnings (overflow) into errors, so this also checks no overflow happens inside
    x = backend.asarray([-1e4, -50.0, -20.0, 20.0, 50.0, 1e4], dtype=dtype)
    layer = GELU()
    y = to_host(layer.forward(x))
    numpy.testing.assert_allclose(y, [0.0, 0.0, 0.0, 20.0, 50.0, 1e4], rtol=1e-6, atol=1e-6)
    grad = to_host(layer.backward(backend.xp.ones_like(x)))
    numpy.testing.assert_allclose(grad, [0, 0, 0, 1, 1, 1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_is_identity_in_eval_mode_and_with_p_zero(backend, dtype):
    x = backend.asarray(host_rng(0).standard_normal((4, 5)), dtype=dtype)
    g = backend.asarray(host_rng(1).standard_normal((4, 5)), dtype=dtype)
    evaluating = Dropout(0.5).eval()
    assert not evaluating.training
    for layer in (evaluating, Dropout(0.0)):
        numpy.testing.assert_array_equal(to_host(layer.forward(x)), to_host(x))
        numpy.testing.assert_array_equal(to_host(layer.backward(g)), to_host(g))


@with_backend
@given(p=st.floats(0.01, 0.95), dtype=st.sampled_from(["float32", "float64"]), seed=seeds)
def test_dropout_keeps_and_scales_exactly(backend, p, dtype, seed):
    x_host = host_rng(seed).uniform(1.0, 2.0, (8, 50)).astype(dtype)   # no zeros in the input
    g_host = host_rng(seed + 1).uniform(1.0, 2.0, (8, 50)).astype(dtype)
    layer = Dropout(p, seed=seed)
    y = layer.forward(backend.asarray(x_host))
    assert y.dtype == x_host.dtype and y.shape == x_host.shape
    y = to_host(y)
    kept = y != 0
    scale = numpy.asarray(1.0 / (1.0 - p), dtype=dtype)
    numpy.testing.assert_array_equal(y[kept], x_host[kept] * scale)
    assert numpy.all(y[~kept] == 0)
    # backward multiplies by the very same mask
    grad = to_host(layer.backward(backend.asarray(g_host)))
    numpy.testing.assert_array_equal(grad, numpy.where(kept, g_host * scale, 0))


def test_dropout_preserves_mean_and_zeroes_a_fraction_p(backend):
    p, n = 0.3, 400_000
    x_host = host_rng(2).uniform(0.5, 1.5, n)
    y = to_host(Dropout(p, seed=3).forward(backend.asarray(x_host)))
    # y_i = x_i * Bernoulli(1-p) / (1-p): E[y_i] = x_i, Var[y_i] = x_i^2 p / (1-p)
    sd_of_mean = math.sqrt(numpy.sum(x_host ** 2) * p / (1 - p)) / n
    assert abs(y.mean() - x_host.mean()) < 6 * sd_of_mean
    sd_of_fraction = math.sqrt(p * (1 - p) / n)
    assert abs(numpy.mean(y == 0) - p) < 6 * sd_of_fraction


def test_dropout_seed_determines_the_mask(backend):
    x = backend.xp.ones((20, 30), dtype="float64")
    first = to_host(Dropout(0.4, seed=11).forward(x))
    again = to_host(Dropout(0.4, seed=11).forward(x))
    other = to_host(Dropout(0.4, seed=12).forward(x))
    numpy.testing.assert_array_equal(first, again)
    assert not numpy.array_equal(first, other)


def test_dropout_fix_and_release_mask(backend):
    x = backend.xp.ones((20, 30), dtype="float64")
    layer = Dropout(0.5, seed=5)
    unfixed = [to_host(layer.forward(x)) for _ in range(2)]
    assert not numpy.array_equal(*unfixed)             # a new mask every forward
    layer.fix_mask()
    fixed = [to_host(layer.forward(x)) for _ in range(3)]
    numpy.testing.assert_array_equal(fixed[0], unfixed[1])   # the current mask is the one reused
    numpy.testing.assert_array_equal(fixed[0], fixed[1])
    numpy.testing.assert_array_equal(fixed[1], fixed[2])
    layer.release_mask()
    assert not numpy.array_equal(to_host(layer.forward(x)), fixed[2])


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_bad_probability_raises(p):
    with pytest.raises(ValueError, match="p"):
        Dropout(p)


# ---------------------------------------------------------------------------------------------
# SoftmaxCrossEntropy
# ---------------------------------------------------------------------------------------------

def log_softmax_reference(logits):
    """Row by row in plain Python: z - (m + log sum exp(z - m))."""
    out = numpy.empty_like(logits, dtype=numpy.float64)
    for b, row in enumerate(logits):
        m = max(row)
        log_sum = m + math.log(math.fsum(math.exp(z - m) for z in row))
        out[b] = [z - log_sum for z in row]
    return out


@st.composite
def logits_and_labels(draw):
    B, C = draw(st.integers(1, 8)), draw(st.integers(2, 10))
    logits = draw(hnp.arrays(numpy.float64, (B, C), elements=st.floats(-50, 50)))
    labels = draw(hnp.arrays(numpy.int64, (B,), elements=st.integers(0, C - 1)))
    return logits, labels


@with_backend
@given(case=logits_and_labels(), smoothing=st.sampled_from([0.0, 0.1, 0.5]))
def test_cross_entropy_loss_and_gradient_match_formula(backend, case, smoothing):
    logits, labels = case
    B, C = logits.shape
    layer = SoftmaxCrossEntropy(label_smoothing=smoothing)
    loss = layer.forward(backend.asarray(logits), backend.asarray(labels))
    grad = to_host(layer.backward())
    log_p = log_softmax_reference(logits)
    onehot = numpy.eye(C)[labels]
    target = (1.0 - smoothing) * onehot + smoothing / C
    expected = -numpy.mean(numpy.sum(target * log_p, axis=1))
    if smoothing == 0.0:
        expected_plain = -numpy.mean(log_p[numpy.arange(B), labels])
        assert expected == pytest.approx(expected_plain, rel=1e-12, abs=1e-12)
    assert float(to_host(loss)) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    numpy.testing.assert_allclose(grad, (numpy.exp(log_p) - target) / B, rtol=1e-9, atol=1e-14)


def test_cross_entropy_upstream_gradient_scales(backend):
    logits = backend.asarray(host_rng(0).standard_normal((3, 4)))
    labels = backend.asarray([0, 3, 1], dtype="int64")
    layer = SoftmaxCrossEntropy()
    layer.forward(logits, labels)
    numpy.testing.assert_allclose(to_host(layer.backward(2.5)), 2.5 * to_host(layer.backward()), rtol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_is_finite_for_huge_logits(backend, dtype):
    logits = backend.asarray([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype=dtype)
    labels = backend.asarray([1, 0], dtype="int64")
    layer = SoftmaxCrossEntropy()
    loss = float(to_host(layer.forward(logits, labels)))
    grad = to_host(layer.backward())
    assert math.isfinite(loss)
    # row 0: -log p = 1e4 - (-1e4) = 2e4; row 1: -log p = 1e4 + log 2 - (-1e4)
    assert loss == pytest.approx(2e4 + math.log(2) / 2, rel=1e-6)
    assert numpy.all(numpy.isfinite(grad))
    numpy.testing.assert_allclose(grad, numpy.array([[1, -1, 0], [-1, 0.5, 0.5]]) / 2, atol=1e-6)


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]])
def test_cross_entropy_out_of_range_labels_raise(backend, request, labels):
    if backend.name == "gpu":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "softmax_cross_entropy.py checks the label range on the host only (on the GPU the check would "
            "wait for the device every step); there the fused kernel gives such a row a NaN loss instead "
            "of raising (tests/test_kernels.py::test_cross_entropy_out_of_range_label_gives_nan_not_a_crash)")))
    layer = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match="labels"):
        layer.forward(backend.xp.zeros((2, 3)), backend.asarray(labels, dtype="int64"))


@pytest.mark.parametrize("shape", [(2, 1), (3,), (1,), ()])
def test_cross_entropy_wrong_label_shape_raises(backend, shape):
    layer = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match="labels"):
        layer.forward(backend.xp.zeros((2, 3)), backend.xp.zeros(shape, dtype="int64"))


def test_cross_entropy_bad_arguments_raise(backend):
    with pytest.raises(ValueError, match="logits"):
        SoftmaxCrossEntropy().forward(backend.xp.zeros((2, 3, 1)), backend.xp.zeros(2, dtype="int64"))
    for smoothing in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            SoftmaxCrossEntropy(label_smoothing=smoothing)


# ---------------------------------------------------------------------------------------------
# Inputs are never modified; parameter gradients accumulate
# ---------------------------------------------------------------------------------------------

def _linear(dtype):
    return Linear(6, 5, dtype=dtype, rng=host_rng(0)), (2, 3, 6), (2, 3, 5)


def _layernorm(dtype):
    layer = LayerNorm(6, dtype=dtype)
    layer.weight.data = host_rng(1).standard_normal(6).astype(dtype)   # not the identity affine map
    layer.bias.data = host_rng(2).standard_normal(6).astype(dtype)
    return layer, (2, 3, 6), (2, 3, 6)


def _gelu(dtype):
    return GELU(), (2, 3, 6), (2, 3, 6)


def _attention(dtype):
    return MultiHeadSelfAttention(8, 2, dtype=dtype, rng=host_rng(3)), (2, 4, 8), (2, 4, 8)


def _patchify(dtype):
    return Patchify(2), (2, 3, 4, 6), (2, 6, 12)


def _dropout(dtype):
    return Dropout(0.3, seed=1), (2, 3, 6), (2, 3, 6)


LAYER_FACTORIES = {"linear": _linear, "layernorm": _layernorm, "gelu": _gelu, "attention": _attention,
                   "patchify": _patchify, "dropout": _dropout}


def move_to(layer, backend):
    for parameter in layer.parameters():
        parameter.data = backend.asarray(parameter.data)
    return layer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(LAYER_FACTORIES))
def test_layer_does_not_modify_inputs_or_parameters(backend, name, dtype):
    layer, in_shape, out_shape = LAYER_FACTORIES[name](dtype)
    move_to(layer, backend)
    rng = host_rng(4)
    x = backend.asarray(rng.standard_normal(in_shape), dtype=dtype)
    g = backend.asarray(rng.standard_normal(out_shape), dtype=dtype)
    x_before, g_before = to_host(x).copy(), to_host(g).copy()
    params_before = [to_host(p.data).copy() for p in layer.parameters()]
    y = layer.forward(x)
    assert y.shape == out_shape and y.dtype == numpy.dtype(dtype)
    grad_x = layer.backward(g)
    assert grad_x.shape == in_shape and grad_x.dtype == numpy.dtype(dtype)
    numpy.testing.assert_array_equal(to_host(x), x_before)
    numpy.testing.assert_array_equal(to_host(g), g_before)
    for parameter, before in zip(layer.parameters(), params_before):
        numpy.testing.assert_array_equal(to_host(parameter.data), before)


def test_loss_does_not_modify_inputs(backend):
    rng = host_rng(5)
    logits = backend.asarray(rng.standard_normal((4, 3)))
    labels = backend.asarray([0, 2, 1, 2], dtype="int64")
    logits_before, labels_before = to_host(logits).copy(), to_host(labels).copy()
    layer = SoftmaxCrossEntropy(label_smoothing=0.1)
    layer.forward(logits, labels)
    layer.backward()
    numpy.testing.assert_array_equal(to_host(logits), logits_before)
    numpy.testing.assert_array_equal(to_host(labels), labels_before)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_vit_does_not_modify_inputs(backend, dropout):
    model = ViT(image_size=8, patch_size=4, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=16, channels=2,
                dropout=dropout, emb_dropout=dropout, dtype="float64", seed=0).to(backend.name)
    rng = host_rng(6)
    images = backend.asarray(rng.standard_normal((3, 2, 8, 8)))
    g = backend.asarray(rng.standard_normal((3, 3)))
    images_before, g_before = to_host(images).copy(), to_host(g).copy()
    state_before = model.state_dict()
    model.forward(images)
    model.backward(g)
    numpy.testing.assert_array_equal(to_host(images), images_before)
    numpy.testing.assert_array_equal(to_host(g), g_before)
    for name, value in model.state_dict().items():
        numpy.testing.assert_array_equal(value, state_before[name], err_msg=name)


@pytest.mark.parametrize("name", ["linear", "layernorm", "attention"])
def test_parameter_gradients_accumulate_and_zero_grad_resets(backend, name):
    layer, in_shape, out_shape = LAYER_FACTORIES[name]("float64")
    move_to(layer, backend)
    rng = host_rng(7)
    x = backend.asarray(rng.standard_normal(in_shape))
    g = backend.asarray(rng.standard_normal(out_shape))
    layer.forward(x)
    layer.backward(g)
    once = [to_host(p.grad).copy() for p in layer.parameters()]
    assert once and all(numpy.any(grad != 0) for grad in once)
    layer.backward(g)
    for parameter, first in zip(layer.parameters(), once):
        numpy.testing.assert_allclose(to_host(parameter.grad), 2 * first, rtol=1e-13, atol=1e-15)
    layer.zero_grad()
    for parameter in layer.parameters():
        assert not numpy.any(to_host(parameter.grad))


# ---------------------------------------------------------------------------------------------
# Linear: given weights
# ---------------------------------------------------------------------------------------------

def test_linear_uses_given_weight_and_bias(backend):
    weight, bias = numpy.arange(12.0).reshape(3, 4), numpy.arange(4.0)
    layer = Linear(3, 4, weight=backend.asarray(weight), bias=backend.asarray(bias))
    numpy.testing.assert_array_equal(to_host(layer.weight.data), weight)
    numpy.testing.assert_array_equal(to_host(layer.bias.data), bias)
    x = numpy.random.default_rng(0).standard_normal((2, 3))
    numpy.testing.assert_allclose(to_host(layer.forward(backend.asarray(x))), x @ weight + bias, rtol=1e-13)


def test_linear_keeps_a_weight_given_without_bias(backend):
    weight = numpy.arange(12.0).reshape(3, 4)
    try:
        layer = Linear(3, 4, weight=backend.asarray(weight), dtype="float64")
    except ValueError:
        return                                   # refusing half a specification is fine too
    numpy.testing.assert_array_equal(to_host(layer.weight.data), weight)


@pytest.mark.parametrize("weight_shape, bias_shape", [((4, 3), (4,)), ((3, 4), (1,))])
def test_linear_rejects_given_arrays_of_the_wrong_shape(weight_shape, bias_shape):
    with pytest.raises(ValueError):
        Linear(3, 4, weight=numpy.zeros(weight_shape), bias=numpy.zeros(bias_shape))


# ---------------------------------------------------------------------------------------------
# MultiHeadSelfAttention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim, heads", [(10, 3), (8, 3), (6, 4)])
def test_attention_dim_not_divisible_by_heads_raises(dim, heads):
    with pytest.raises(ValueError) as error:
        MultiHeadSelfAttention(dim, heads)
    message = str(error.value)
    assert re.search(rf"\b{dim}\b", message) and re.search(rf"\b{heads}\b", message), message


@pytest.mark.parametrize("heads", [0, -2])
def test_attention_non_positive_heads_raises(heads):
    with pytest.raises(ValueError, match="heads"):
        MultiHeadSelfAttention(8, heads)


def attention_reference(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads):
    """Textbook multi-head attention, one head at a time, scale 1/sqrt(head_dim)."""
    B, T, D = x.shape
    d = D // heads
    qkv = x @ qkv_weight + qkv_bias                                 # (B, T, 3D) = [q | k | v], heads side by side
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    context = numpy.empty((B, T, D))
    for h in range(heads):
        columns = slice(h * d, (h + 1) * d)
        scores = q[..., columns] @ k[..., columns].transpose(0, 2, 1) / math.sqrt(d)
        scores -= scores.max(axis=-1, keepdims=True)
        attn = numpy.exp(scores)
        attn /= attn.sum(axis=-1, keepdims=True)
        context[..., columns] = attn @ v[..., columns]
    return context @ proj_weight + proj_bias


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_matches_loop_reference_with_head_dim_scale(backend, heads):
    dim = 8
    layer = move_to(MultiHeadSelfAttention(dim, heads, dtype="float64", rng=host_rng(8)), backend)
    assert layer.head_dim == dim // heads
    assert layer.scale == pytest.approx(1 / math.sqrt(dim // heads), rel=1e-15)
    # scores of a realistic size, so a wrong scale changes the softmax visibly
    x = 3 * host_rng(9).standard_normal((2, 5, dim))
    out = to_host(layer.forward(backend.asarray(x)))
    weights = [to_host(p.data) for p in (layer.qkv.weight, layer.qkv.bias, layer.proj.weight, layer.proj.bias)]
    numpy.testing.assert_allclose(out, attention_reference(x, *weights, heads), rtol=1e-11, atol=1e-12)
    if heads > 1:   # the vit-pytorch bug, scale dim**-0.5, gives a different answer
        wrong = layer.scale
        layer.scale = dim ** -0.5
        assert not numpy.allclose(to_host(layer.forward(backend.asarray(x))), out, rtol=1e-6, atol=1e-8)
        layer.scale = wrong


@with_backend
@given(B=st.integers(1, 2), T=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]), seed=seeds)
def test_attention_is_permutation_equivariant(backend, B, T, heads, seed):
    rng = host_rng(seed)
    dim = 8
    layer = move_to(MultiHeadSelfAttention(dim, heads, dtype="float64", rng=rng), backend)
    x = rng.standard_normal((B, T, dim))
    perm = rng.permutation(T)
    out = to_host(layer.forward(backend.asarray(x)))
    out_permuted = to_host(layer.forward(backend.asarray(x[:, perm])))
    numpy.testing.assert_allclose(out_permuted, out[:, perm], rtol=1e-10, atol=1e-12)


def test_attention_without_rng_has_independent_qkv_and_proj_weights():
    layer = MultiHeadSelfAttention(8, 2, dtype="float64")
    qkv, proj = layer.qkv.weight.data.ravel(), layer.proj.weight.data.ravel()
    assert not numpy.array_equal(proj, qkv[:proj.size])


def test_attention_rejects_wrong_input_shape(backend):
    layer = MultiHeadSelfAttention(8, 2)
    for shape in [(2, 3, 6), (3, 8)]:
        with pytest.raises(ValueError):
            layer.forward(backend.xp.zeros(shape, dtype="float32"))


# ---------------------------------------------------------------------------------------------
# Devices: a layer computes where its parameters live, and picks its device from its own arrays
# ---------------------------------------------------------------------------------------------

class _StandInDeviceArray(numpy.ndarray):
    """A NumPy array that a patched `is_gpu_array` calls a device array: CuPy's part, on a CPU."""


def _on_stand_in_device(array):
    return array.view(_StandInDeviceArray)


# every layer on its own with each placement; the whole ViT refusing each mismatch (a stand-in array does
# not survive a whole model's forward, so the ViT's accepted case is the host's, as in every other test)
@pytest.mark.parametrize("layer_name,where", [
    (name, where) for name in ("Linear", "LayerNorm")
    for where in ("parameters on the device", "input on the device", "both", "neither")
] + [("ViT", "parameters on the device"), ("ViT", "input on the device"), ("ViT", "neither")])
def test_a_layer_refuses_an_input_on_another_device(monkeypatch, layer_name, where):
    """An input on another device than the layer's parameters is refused by the layer itself, in one line
    that says what to do; on one device (the stand-in's or the host) the layer computes."""
    monkeypatch.setattr(layer_module, "is_gpu_array", lambda array: isinstance(array, _StandInDeviceArray))
    monkeypatch.setattr(layer_module, "GPU_TWINS", {})     # no CuPy kernels for the stand-in: the formulas run
    layer, shape = {"Linear": (Linear(6, 5, dtype="float64"), (2, 3, 6)),
                    "LayerNorm": (LayerNorm(6, dtype="float64"), (2, 3, 6)),
                    "ViT": (_small_vit(), (2, 1, 4, 4))}[layer_name]
    x = host_rng(7).standard_normal(shape)
    if where in ("parameters on the device", "both"):
        for parameter in layer.parameters():
            parameter.data = _on_stand_in_device(parameter.data)
    if where in ("input on the device", "both"):
        x = _on_stand_in_device(x)
    if where in ("both", "neither"):
        assert layer.forward(x).shape[0] == 2
        return
    with pytest.raises(ValueError, match=rf"^{layer_name}: the input is on the (GPU|CPU) .* but the layer's "
                                         r"parameters are on the (GPU|CPU) .*; move the layer with \.to\(") as error:
        layer.forward(x)
    assert "\n" not in str(error.value)


@on_gpu
@pytest.mark.parametrize("layer_name", ["Linear", "LayerNorm", "ViT"])
def test_a_layer_with_host_weights_refuses_a_cupy_input(layer_name):
    """The fault of issue 15 item 1, on a GPU: host weights and a CuPy input give a one-line ValueError from
    the layer, not a TypeError from inside CuPy (cupy.ascontiguousarray takes device arrays only); and
    the other way round."""
    gpu = get_backend("gpu")
    layer, shape = {"Linear": (Linear(6, 5, dtype="float64"), (2, 6)),
                    "LayerNorm": (LayerNorm(6, dtype="float64"), (2, 6)),
                    "ViT": (_small_vit(), (2, 1, 4, 4))}[layer_name]
    with pytest.raises(ValueError, match=rf"^{layer_name}: the input is on the GPU .*\.to\(\"gpu\"\)"):
        layer.forward(gpu.asarray(numpy.ones(shape)))
    layer.to(gpu)
    assert_on_backend(layer.forward(gpu.asarray(numpy.ones(shape))), gpu)
    with pytest.raises(ValueError, match=rf"^{layer_name}: the input is on the CPU .*\.to\(\"cpu\"\)"):
        layer.forward(numpy.ones(shape))


# The modules whose layers choose a device (NumPy or CuPy, formula or GPU twin) with these two functions.
_DISPATCHING_MODULES = ("scratchvit.layers.layer", "scratchvit.layers.gelu", "scratchvit.layers.layernorm",
                        "scratchvit.layers.linear", "scratchvit.layers.attention", "scratchvit.layers.softmax",
                        "scratchvit.layers.softmax_cross_entropy", "scratchvit.layers.dropout", "scratchvit.vit",
                        "scratchvit.encoder_block")


def _record_device_queries(monkeypatch):
    """Every argument later given to is_gpu_array / get_array_module by a layer module, in a list."""
    queried = []
    for module_name in _DISPATCHING_MODULES:
        module = importlib.import_module(module_name)
        for function_name in ("is_gpu_array", "get_array_module"):
            original = getattr(module, function_name, None)
            if original is None:
                continue

            def record(*arrays, original=original):
                queried.extend(arrays)
                return original(*arrays)
            monkeypatch.setattr(module, function_name, record)
    return queried


def _small_vit():
    return ViT(image_size=4, patch_size=2, num_classes=3, dim=4, depth=1, heads=2, mlp_dim=8, dropout=0.2,
               emb_dropout=0.2, dtype="float64")


# name -> (layer, input shapes, the upstream gradient's shape: None for a 0-d output)
_DEVICE_CASES = {
    "Linear": (lambda: Linear(6, 5, dtype="float64"), [(2, 3, 6)], (2, 3, 5)),
    "LayerNorm": (lambda: LayerNorm(6, dtype="float64"), [(2, 3, 6)], (2, 3, 6)),
    "GELU": (GELU, [(2, 3)], (2, 3)),
    "Dropout": (lambda: Dropout(0.5, seed=1), [(2, 3)], (2, 3)),
    "MultiHeadSelfAttention": (lambda: MultiHeadSelfAttention(4, 2, dtype="float64"), [(2, 3, 4)], (2, 3, 4)),
    "EncoderBlock": (lambda: EncoderBlock(4, 2, 8, dropout=0.2, dtype="float64"), [(2, 3, 4)], (2, 3, 4)),
    "ViT": (_small_vit, [(2, 1, 4, 4)], (2, 3)),
    "Patchify": (lambda: Patchify(2), [(2, 1, 4, 4)], (2, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(_DEVICE_CASES))
def test_backward_takes_its_device_from_the_layer_not_from_grad_out(monkeypatch, name):
    """Issue 15 item 2: a layer's backward picks NumPy or CuPy (plain or fused) from what its forward kept
    or from its parameters, never from grad_out, which may be a Python number: with a number and CuPy
    arrays kept, the NumPy branch would run and fail. Here every argument of is_gpu_array and
    get_array_module in the layer modules is recorded during backward: grad_out is never among them."""
    make, input_shapes, grad_shape = _DEVICE_CASES[name]
    layer = make()
    rng = host_rng(8)
    layer.forward(*[rng.standard_normal(shape) for shape in input_shapes])
    grad_out = rng.standard_normal(grad_shape)
    queried = _record_device_queries(monkeypatch)
    layer.backward(grad_out)
    assert not any(argument is grad_out for argument in queried), f"{name}.backward asked grad_out for its device"


@pytest.mark.parametrize("name", ["GELU", "SoftmaxCrossEntropy"])
def test_backward_of_a_0d_output_takes_a_python_number(monkeypatch, name):
    """The upstream gradient of a 0-d output may be a Python number: backward works with it and never asks
    it for a device (on a GPU, GELU's did, took the NumPy branch and failed)."""
    if name == "GELU":
        layer = GELU()
        layer.forward(numpy.array(0.7))
    else:
        layer = SoftmaxCrossEntropy()
        layer.forward(host_rng(9).standard_normal((2, 3)), numpy.array([0, 2]))
    queried = _record_device_queries(monkeypatch)
    grad = layer.backward(0.5)
    assert not any(isinstance(argument, (int, float)) for argument in queried)
    if name == "GELU":   # 0.5 * dy/dx at 0.7, by central differences of the forward formula
        def gelu(x):
            return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        assert float(grad) == pytest.approx(0.5 * (gelu(0.7 + 1e-6) - gelu(0.7 - 1e-6)) / 2e-6, rel=1e-7)
