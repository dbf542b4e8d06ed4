"""scratchvit.kernels: every GPU twin's kernel held against the plain layer or formula it stands in for.

The kernel tests need CuPy and a CUDA device: they carry the `gpu` marker and skip with the reason
otherwise. Each runs the plain version on host copies of the inputs (NumPy: on CuPy arrays the
layers would call the very kernel under test) and compares on random inputs of several shapes, row
lengths below, at and above the raw kernels' block size, in float64 (tight tolerance: only rounding
differs, from the reduction order) and float32 (looser).

Runs everywhere: `test_module_imports_without_cupy` (the module must import, and expose its functions,
on a machine without CuPy), the source checks, and the NumPy half of the layer tests at the end
(attention, Dropout.forward_add, EncoderBlock): on NumPy their results must stay bit for bit those of
the plain steps, which are written out in this file; on CuPy the same tests hold the fused path
against those steps run by NumPy on host copies.
"""
import math
import os
import subprocess
import sys

import numpy
import pytest

import scratchvit
from scratchvit import kernels
from scratchvit.backend import get_backend, random_generator, to_host
from scratchvit.encoder_block import EncoderBlock
from scratchvit.layers import (GELU, Dropout, LayerNorm, MultiHeadSelfAttention, Parameter, SoftmaxCrossEntropy,
                               softmax, softmax_backward)
from scratchvit.optim import AdamW

from conftest import on_gpu   # tests/ is on sys.path under pytest's default import mode


DTYPES = ["float64", "float32"]
# relative to the largest magnitude of the expected array (see assert_close)
TOLERANCE = {"float64": 1e-10, "float32": 2e-5}


@pytest.fixture
def gpu():
    return get_backend("gpu")


def host_rng(*seed):
    return numpy.random.default_rng(list(seed))


def assert_close(actual, expected, dtype, factor=1.0):
    """Equal up to rounding: |actual - expected| <= tol * max(1, max|expected|) elementwise, same shape."""
    actual, expected = to_host(actual), to_host(expected)
    assert actual.shape == expected.shape
    assert actual.dtype == numpy.dtype(dtype)
    bound = TOLERANCE[dtype] * factor * max(1.0, float(numpy.abs(expected).max(initial=0.0)))
    numpy.testing.assert_allclose(actual, expected, rtol=TOLERANCE[dtype] * factor, atol=bound)


def on_device(backend, array, dtype):
    return backend.asarray(numpy.asarray(array, dtype=dtype))


def host_and_device(gpu, array, dtype):
    """The same values as a NumPy array (for the plain version) and a CuPy array (for the kernel)."""
    on_host = numpy.asarray(array, dtype=dtype)
    return on_host, gpu.asarray(on_host)


# ---------------------------------------------------------------------------------------------------
# Runs without a GPU
# ---------------------------------------------------------------------------------------------------

PUBLIC = {"gelu": ["gelu_forward", "gelu_backward"], "layernorm": ["layernorm_forward", "layernorm_backward"],
          "softmax": ["softmax_forward", "softmax_backward"],
          "attention": ["split_qkv", "merge_grad_qkv", "transposed_product"],
          "dropout": ["dropout_forward", "add_dropout", "add_dropout_forward"],
          "cross_entropy": ["cross_entropy_forward", "cross_entropy_backward"],
          "adamw": ["adamw_step", "l2_norm", "scale_to_max_norm"], "linear": ["add_transposed_product"],
          "shift_images": ["shift_images"], "weight_average": ["weight_average_update"]}


def test_module_imports_without_cupy():
    """In a fresh interpreter where `import cupy` fails, scratchvit.kernels imports, exposes every public
    function, and a call says (BackendUnavailable) that the GPU backend is missing."""
    for module, names in PUBLIC.items():
        for name in names:
            assert callable(getattr(getattr(kernels, module), name)), name
            assert getattr(getattr(kernels, module), name).__doc__, name
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(scratchvit.__file__)))
    script = (
        "import sys\n"
        "sys.modules['cupy'] = None\n"          # `import cupy` now raises ImportError
        "import numpy\n"
        "from scratchvit import kernels\n"
        "from scratchvit.cupy_check import BackendUnavailable\n"
        f"for module, names in {PUBLIC!r}.items():\n"
        "    for name in names:\n"
        "        assert callable(getattr(getattr(kernels, module), name)), name\n"
        "try:\n"
        "    kernels.gelu.gelu_forward(numpy.ones(3))\n"
        "except BackendUnavailable:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('no BackendUnavailable without CuPy')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_kernel_sources_are_well_formed():
    """Cheap host-side checks of the CUDA sources (they compile only on a GPU): balanced brackets, one
    kernel of the right name per raw source, a typedef per dtype, and elementwise kernels that declare
    every parameter they use only once."""
    for name in kernels.compile.RAW_SOURCES:
        for dtype in DTYPES:
            source = kernels.compile.raw_kernel_source(name, dtype)
            assert source.startswith(f"typedef {kernels.compile.C_TYPES[dtype]} T;")
            for opening, closing in ("{}", "()", "[]"):
                assert source.count(opening) == source.count(closing), (name, opening)
            assert source.count(f'extern "C" __global__ void {name}(') == 1
    for name, (in_params, out_params, operation) in kernels.compile.ELEMENTWISE_SOURCES.items():
        names = [param.split()[-1] for param in (in_params + "," + out_params).split(",")]
        assert len(names) == len(set(names)) and "i" not in names, name
        for opening, closing in ("{}", "()"):
            assert operation.count(opening) == operation.count(closing), (name, opening)
        statements = [line for line in operation.strip().splitlines() if line.strip()]
        assert all(line.rstrip().endswith((";", "{", "}")) for line in statements), name


ROW_KERNELS = ["scratchvit_layernorm_forward", "scratchvit_layernorm_backward", "scratchvit_softmax_forward",
               "scratchvit_softmax_backward", "scratchvit_cross_entropy_forward"]


@pytest.mark.parametrize("name", ROW_KERNELS)
def test_row_kernels_reduce_within_a_warp(name):
    """The row kernels are one warp per row: their sums and maxima are warp shuffles in registers, with no
    shared memory and no block-wide barrier (which a tree reduction over a block of threads needs)."""
    source = kernels.compile.raw_kernel_source(name, "float64")
    body = source[source.index('extern "C"'):]
    assert "ROW_AND_LANE" in body and ("warp_sum(" in body or "warp_max(" in body)
    assert "__shfl_xor_sync" in source
    assert "__shared__" not in source and "__syncthreads" not in source


def test_row_grid_covers_every_row():
    """Blocks of ROWS_PER_BLOCK rows: enough for every row, not one more; a grid too large is refused."""
    per_block = kernels.compile.ROWS_PER_BLOCK
    for rows in (1, per_block - 1, per_block, per_block + 1, 409600):
        (blocks,) = kernels.compile.row_grid(rows)
        assert (blocks - 1) * kernels.compile.ROWS_PER_BLOCK < rows <= blocks * kernels.compile.ROWS_PER_BLOCK
    assert kernels.compile.row_grid((2**31 - 1) * kernels.compile.ROWS_PER_BLOCK) == (2**31 - 1,)
    with pytest.raises(ValueError, match="rows"):
        kernels.compile.row_grid((2**31 - 1) * kernels.compile.ROWS_PER_BLOCK + 1)


# ---------------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (4, 33), (2, 3, 129)])
def test_gelu_matches_plain_layer(gpu, dtype, shape):
    rng = host_rng(1, len(shape))
    x_host, x = host_and_device(gpu, rng.standard_normal(shape) * 3.0, dtype)
    grad_host, grad_out = host_and_device(gpu, rng.standard_normal(shape), dtype)
    layer = GELU()
    y_plain = layer.forward(x_host)
    grad_plain = layer.backward(grad_host)
    y, t = kernels.gelu.gelu_forward(x)
    assert_close(y, y_plain, dtype)
    assert_close(t, layer.t, dtype)
    assert_close(kernels.gelu.gelu_backward(x, t, grad_out), grad_plain, dtype)


# ---------------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 8), (5, 32), (7, 33), (2, 17, 64), (4, 300), (2, 3, 1024)])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_layernorm_matches_plain_layer(gpu, dtype, shape, offset):
    """y, xhat, rstd and all three gradients, with random gamma and beta; an offset of 50 checks the
    variance is taken about the mean (two passes), not as E[x^2] - mu^2."""
    D = shape[-1]
    rng = host_rng(2, D, int(offset))
    layer = LayerNorm(D, eps=1e-5, dtype=dtype)              # on the host: the plain steps
    layer.weight.data, gamma = host_and_device(gpu, rng.standard_normal(D), dtype)
    layer.bias.data, beta = host_and_device(gpu, rng.standard_normal(D), dtype)
    x_host, x = host_and_device(gpu, rng.standard_normal(shape) * 2.0 + offset, dtype)
    grad_host, grad_out = host_and_device(gpu, rng.standard_normal(shape), dtype)
    y_plain = layer.forward(x_host)
    grad_x_plain = layer.backward(grad_host)                # grads start at zero: they become the sums

    y, xhat, rstd = kernels.layernorm.layernorm_forward(x, gamma, beta, layer.eps)
    assert_close(y, y_plain, dtype, factor=10)
    assert_close(xhat, layer.xhat, dtype, factor=10)
    assert_close(rstd, layer.rstd, dtype, factor=10)
    grad_x, grad_gamma, grad_beta = kernels.layernorm.layernorm_backward(grad_out, xhat, rstd, gamma)
    assert_close(grad_x, grad_x_plain, dtype, factor=10)
    assert_close(grad_gamma, layer.weight.grad, dtype, factor=10)
    assert_close(grad_beta, layer.bias.grad, dtype, factor=10)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_takes_non_contiguous_input(gpu, dtype):
    rng = host_rng(3)
    x = on_device(gpu, rng.standard_normal((48, 5)), dtype).T            # (5, 48), a transposed view
    gamma, beta = on_device(gpu, rng.standard_normal(48), dtype), on_device(gpu, rng.standard_normal(48), dtype)
    layer = LayerNorm(48, dtype=dtype)
    layer.weight.data, layer.bias.data = to_host(gamma), to_host(beta)
    y, xhat, rstd = kernels.layernorm.layernorm_forward(x, gamma, beta, layer.eps)
    assert_close(y, layer.forward(to_host(x)), dtype, factor=10)


# ---------------------------------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (5, 32), (6, 33), (9, 50), (2, 3, 65, 65), (2, 128), (3, 1024),
                                   (1, 300)])
@pytest.mark.parametrize("scale", [1.0, 0.125, 3.0])
def test_softmax_matches_plain(gpu, dtype, shape, scale):
    rng = host_rng(4, shape[-1], int(scale * 8))
    scores_host, scores = host_and_device(gpu, rng.standard_normal(shape) * 4.0 * scale, dtype)
    grad_host, grad_probs = host_and_device(gpu, rng.standard_normal(shape), dtype)
    probs_plain = softmax(scores_host)
    probs = kernels.softmax.softmax_forward(scores)
    assert_close(probs, probs_plain, dtype)
    assert_close(probs.sum(axis=-1), gpu.xp.ones(shape[:-1], dtype=dtype), dtype, factor=10)
    grad_plain = softmax_backward(probs_plain, grad_host)
    assert_close(kernels.softmax.softmax_backward(probs, grad_probs), grad_plain, dtype, factor=10)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_is_finite_for_huge_scores(gpu, dtype):
    rng = host_rng(5)
    scores = on_device(gpu, rng.standard_normal((4, 70)) * 5e3, dtype)
    probs = kernels.softmax.softmax_forward(scores)
    assert numpy.isfinite(to_host(probs)).all()
    assert_close(probs, softmax(to_host(scores)), dtype)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_takes_non_contiguous_input(gpu, dtype):
    rng = host_rng(6)
    scores = on_device(gpu, rng.standard_normal((2, 9, 3, 9)), dtype).transpose(0, 2, 1, 3)
    assert_close(kernels.softmax.softmax_forward(scores), softmax(to_host(scores)), dtype)


# ---------------------------------------------------------------------------------------------------
# Attention: split_qkv and merge_grad_qkv
# ---------------------------------------------------------------------------------------------------

# (B, T, H, d): one element, odd sizes, T = 65 with head_dim 16, T = 197 with head_dim 64
ATTENTION_SHAPES = [(1, 1, 1, 1), (2, 5, 3, 4), (3, 7, 5, 3), (2, 65, 4, 16), (1, 197, 3, 64)]


def split_qkv_plain(qkv, heads, scale):
    """attention.py's plain steps, in NumPy: (q_scaled, k, v, k^T, v^T) of a (B, T, 3D) qkv."""
    B, T, three_D = qkv.shape
    d = three_D // (3 * heads)
    q, k, v = qkv.reshape(B, T, 3, heads, d).transpose(2, 0, 3, 1, 4)          # each (B, H, T, d)
    return (q * scale, numpy.ascontiguousarray(k), numpy.ascontiguousarray(v),
            numpy.ascontiguousarray(k.transpose(0, 1, 3, 2)), numpy.ascontiguousarray(v.transpose(0, 1, 3, 2)))


def merge_grad_qkv_plain(grad_heads, scale):
    """attention.py's plain steps, in NumPy: g_q *= scale, then (3, B, H, T, d) -> (B, T, 3D)."""
    grad = grad_heads.copy()
    grad[0] *= scale
    _, B, H, T, d = grad.shape
    return grad.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * d)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,d", ATTENTION_SHAPES)
@pytest.mark.parametrize("grid_max", [None, 3])
def test_split_qkv_matches_plain_steps(gpu, dtype, B, T, H, d, grid_max, monkeypatch):
    """q_scaled to rounding, k, v, k^T and v^T exactly, each C-contiguous in its (B, H, T, d) or
    (B, H, d, T) layout, qkv untouched. grid_max=3 caps the grid at 3 blocks, so that the threads'
    grid-stride loop runs several rounds (as it does beyond 65535 blocks)."""
    if grid_max is not None:
        monkeypatch.setattr(kernels.compile, "ELEMENT_GRID_MAX", grid_max)
    rng = host_rng(16, B, T, H, d)
    qkv_host, qkv = host_and_device(gpu, rng.standard_normal((B, T, 3 * H * d)), dtype)
    scale = 1.0 / math.sqrt(d)
    expected = split_qkv_plain(qkv_host, H, scale)
    actual = kernels.attention.split_qkv(qkv, H, scale)
    names = ("q_scaled", "k", "v", "k_t", "v_t")
    for name, got, want in zip(names, actual, expected):
        assert got.shape == want.shape and got.flags.c_contiguous, name
    assert_close(actual[0], expected[0], dtype)
    for name, got, want in zip(names[1:], actual[1:], expected[1:]):
        numpy.testing.assert_array_equal(to_host(got), want, err_msg=name)
    numpy.testing.assert_array_equal(to_host(qkv), qkv_host)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,d", ATTENTION_SHAPES)
@pytest.mark.parametrize("grid_max", [None, 3])
def test_merge_grad_qkv_matches_plain_steps(gpu, dtype, B, T, H, d, grid_max, monkeypatch):
    """The q third (times scale) to rounding, the k and v thirds exactly, grad_heads untouched."""
    if grid_max is not None:
        monkeypatch.setattr(kernels.compile, "ELEMENT_GRID_MAX", grid_max)
    rng = host_rng(17, B, T, H, d)
    grad_host, grad_heads = host_and_device(gpu, rng.standard_normal((3, B, H, T, d)), dtype)
    scale = 1.0 / math.sqrt(d)
    expected = merge_grad_qkv_plain(grad_host, scale)
    actual = kernels.attention.merge_grad_qkv(grad_heads, scale)
    assert actual.shape == (B, T, 3 * H * d) and actual.flags.c_contiguous
    D = H * d
    assert_close(actual[..., :D], expected[..., :D], dtype)
    numpy.testing.assert_array_equal(to_host(actual[..., D:]), expected[..., D:])
    numpy.testing.assert_array_equal(to_host(grad_heads), grad_host)


@on_gpu
def test_split_and_merge_reject_bad_shapes(gpu):
    xp = gpu.xp
    with pytest.raises(ValueError):
        kernels.attention.split_qkv(xp.ones((2, 3, 10)), 4, 0.5)                 # 10 is not 3 * heads * head_dim
    with pytest.raises(ValueError):
        kernels.attention.split_qkv(xp.ones((2, 12)), 2, 0.5)                    # not (B, T, 3D)
    with pytest.raises(ValueError):
        kernels.attention.merge_grad_qkv(xp.ones((2, 1, 2, 3, 4)), 0.5)          # not (3, B, H, T, d)
    with pytest.raises(TypeError):
        kernels.attention.split_qkv(xp.ones((2, 3, 12), dtype=xp.float16), 2, 0.5)


# ---------------------------------------------------------------------------------------------------
# Dropout and the residual add
# ---------------------------------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(1000,), (4, 17, 33)])
def test_dropout_given_uniforms_is_the_plain_formula(gpu, dtype, p, shape):
    """mask = (u >= p) / (1 - p), y = x * mask, exactly; mask values are 0 or 1/(1-p)."""
    xp = gpu.xp
    rng = host_rng(7, int(p * 10), len(shape))
    x = on_device(gpu, rng.standard_normal(shape), dtype)
    u = on_device(gpu, rng.random(shape), dtype)
    y, mask = kernels.dropout.dropout_forward(x, p, uniforms=u)
    mask_plain = (u >= p).astype(dtype) * (1.0 / (1.0 - p))             # Dropout.forward's formula
    numpy.testing.assert_array_equal(to_host(mask), to_host(mask_plain))
    numpy.testing.assert_array_equal(to_host(y), to_host(x * mask_plain))
    kept = numpy.dtype(dtype).type(1.0 / (1.0 - p))
    assert numpy.isin(to_host(mask), [0, kept]).all()
    assert mask.dtype == xp.dtype(dtype) and y.shape == x.shape


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_with_generator_matches_dropout_layer(gpu, dtype, p):
    """With a generator the kernel masks by that generator's next uniforms (the plain formula on the
    host, from the same seed), and Dropout, which calls it, draws the same mask."""
    rng = host_rng(8)
    x_host, x = host_and_device(gpu, rng.standard_normal((3, 65, 48)), dtype)
    u = to_host(random_generator(gpu.xp, 123).random(x.shape, dtype=x.dtype))
    mask_plain = (u >= p).astype(dtype) * (1.0 / (1.0 - p))             # Dropout.forward's formula
    y, mask = kernels.dropout.dropout_forward(x, p, random_generator(gpu.xp, 123))
    numpy.testing.assert_array_equal(to_host(mask), mask_plain)
    numpy.testing.assert_array_equal(to_host(y), x_host * mask_plain)
    assert 0 < float(to_host((mask == 0).mean())) < 1
    layer = Dropout(p, seed=123)
    numpy.testing.assert_array_equal(to_host(layer.forward(x)), to_host(y))


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_residual_add_with_dropout(gpu, dtype, p):
    """add_dropout(x, h, mask) = x + h * mask; add_dropout_forward draws the mask as dropout_forward
    does (same uniforms, same mask) and adds in the same launch."""
    rng = host_rng(9, int(p * 10))
    shape = (2, 17, 40)
    x = on_device(gpu, rng.standard_normal(shape), dtype)
    h = on_device(gpu, rng.standard_normal(shape), dtype)
    u = on_device(gpu, rng.random(shape), dtype)
    _, mask = kernels.dropout.dropout_forward(h, p, uniforms=u)
    assert_close(kernels.dropout.add_dropout(x, h, mask), x + h * mask, dtype)
    y, mask_fused = kernels.dropout.add_dropout_forward(x, h, p, uniforms=u)
    numpy.testing.assert_array_equal(to_host(mask_fused), to_host(mask))
    assert_close(y, x + h * mask, dtype)
    u = random_generator(gpu.xp, 5).random(shape, dtype=x.dtype)         # what the generator draws next
    y, mask_fused = kernels.dropout.add_dropout_forward(x, h, p, random_generator(gpu.xp, 5))
    mask_plain = (to_host(u) >= p).astype(dtype) * (1.0 / (1.0 - p))
    numpy.testing.assert_array_equal(to_host(mask_fused), mask_plain)
    assert_close(y, to_host(x) + to_host(h) * mask_plain, dtype)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(3, 65, 48), (2, 7, 5)])
def test_dropout_forward_add_matches_plain_formula(gpu, dtype, p, shape):
    """Dropout.forward_add on the GPU (kernels.dropout.add_dropout_forward): the mask (u >= p) / (1 - p) from the
    uniforms the layer's generator draws next, as Dropout.forward draws them, and y = residual + x * mask,
    against NumPy on host copies; backward multiplies by that mask; with the mask fixed, the next call
    reuses it (kernels.dropout.add_dropout)."""
    rng = host_rng(18, int(p * 10), len(shape))
    x_host, x = host_and_device(gpu, rng.standard_normal(shape), dtype)
    residual_host, residual = host_and_device(gpu, rng.standard_normal(shape), dtype)
    u = to_host(random_generator(gpu.xp, 123).random(shape, dtype=dtype))
    mask_plain = (u >= p).astype(dtype) * (1.0 / (1.0 - p))             # Dropout.forward's formula
    layer = Dropout(p, seed=123)
    y = layer.forward_add(x, residual)
    numpy.testing.assert_array_equal(to_host(layer.mask), mask_plain)
    assert_close(y, residual_host + x_host * mask_plain, dtype)
    numpy.testing.assert_array_equal(to_host(x), x_host)
    numpy.testing.assert_array_equal(to_host(residual), residual_host)
    numpy.testing.assert_array_equal(to_host(layer.backward(residual)), residual_host * mask_plain)
    numpy.testing.assert_array_equal(to_host(Dropout(p, seed=123).forward(x)), x_host * mask_plain)  # same draw
    layer.fix_mask()
    x2_host, x2 = host_and_device(gpu, rng.standard_normal(shape), dtype)
    assert_close(layer.forward_add(x2, residual), residual_host + x2_host * mask_plain, dtype)
    numpy.testing.assert_array_equal(to_host(layer.mask), mask_plain)


@on_gpu
def test_dropout_rejects_bad_arguments(gpu):
    x = gpu.xp.ones(4, dtype="float32")
    with pytest.raises(ValueError):
        kernels.dropout.dropout_forward(x, 0.5)                            # neither generator nor uniforms
    with pytest.raises(ValueError):
        kernels.dropout.dropout_forward(x, 1.0, uniforms=x)
    with pytest.raises(TypeError):
        kernels.dropout.dropout_forward(x, 0.5, uniforms=gpu.xp.ones(4, dtype="float64"))  # mixed dtypes


# ---------------------------------------------------------------------------------------------------
# Softmax cross-entropy
# ---------------------------------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C", [(1, 2), (8, 10), (5, 32), (9, 33), (3, 130), (5, 1000)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("magnitude", [1.0, 1e4])
def test_cross_entropy_matches_plain_layer(gpu, dtype, B, C, smoothing, magnitude):
    """Loss (a 0-d device array), probs and the gradient, with and without label smoothing; logits of
    +-1e4 stay finite."""
    xp = gpu.xp
    rng = host_rng(10, B, C, int(smoothing * 10), int(magnitude))
    logits_host, logits = host_and_device(gpu, rng.standard_normal((B, C)) * magnitude, dtype)
    labels_host = rng.integers(0, C, B)
    labels = gpu.asarray(labels_host)
    layer = SoftmaxCrossEntropy(smoothing)                     # on the host: the plain formulas
    loss_plain = layer.forward(logits_host, labels_host)
    grad_plain = layer.backward()

    loss, probs = kernels.cross_entropy.cross_entropy_forward(logits, labels, smoothing)
    assert loss.shape == () and loss.dtype == xp.dtype(dtype)     # a 0-d device array: no host sync
    assert numpy.isfinite(float(loss))
    assert_close(loss, loss_plain, dtype, factor=10)
    assert_close(probs, layer.probs, dtype, factor=10)
    assert_close(kernels.cross_entropy.cross_entropy_backward(probs, labels, smoothing), grad_plain, dtype, factor=10)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_backward_upstream_gradient_and_label_dtypes(gpu, dtype):
    xp = gpu.xp
    rng = host_rng(11)
    logits_host, logits = host_and_device(gpu, rng.standard_normal((6, 12)), dtype)
    labels_host = rng.integers(0, 12, 6).astype(numpy.int32)
    labels = gpu.asarray(labels_host)
    layer = SoftmaxCrossEntropy(0.2)
    layer.forward(logits_host, labels_host)
    loss, probs = kernels.cross_entropy.cross_entropy_forward(logits, labels, 0.2)
    for grad_loss in (0.5, xp.asarray(2.5, dtype=dtype)):
        assert_close(kernels.cross_entropy.cross_entropy_backward(probs, labels, 0.2, grad_loss),
                     layer.backward(float(grad_loss)), dtype)


@on_gpu
def test_cross_entropy_out_of_range_label_gives_nan_not_a_crash(gpu):
    logits = gpu.xp.zeros((2, 3), dtype="float64")
    loss, _ = kernels.cross_entropy.cross_entropy_forward(logits, gpu.asarray(numpy.array([0, 3])))
    assert math.isnan(float(loss))


# ---------------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------------

def _twin_optimizers(gpu, dtype, grouped, weight_decay):
    """Two AdamW over identical parameters: the plain one on the host (AdamW.step's array formula in
    NumPy), the other on the GPU (its fused kernel); `grouped` gives parameter groups with different
    decays, so AdamW builds a per-element decay mask."""
    shapes = [(7, 5), (5,), (3, 4, 6), (11,)]
    optimizers = []
    for backend in (get_backend("cpu"), gpu):
        rng = host_rng(12)
        params = [Parameter(on_device(backend, rng.standard_normal(shape), dtype)) for shape in shapes]
        if grouped:
            groups = [{"params": params[:2], "weight_decay": weight_decay},
                      {"params": params[2:3], "weight_decay": 0.0},
                      {"params": params[3:], "weight_decay": weight_decay / 2}]
        else:
            groups = params
        optimizers.append(AdamW(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=weight_decay))
    return optimizers


def _step_both(plain, on_gpu_optimizer, gpu, grad, dtype):
    plain.grad[...] = numpy.asarray(grad, dtype=dtype)
    on_gpu_optimizer.grad[...] = on_device(gpu, grad, dtype)
    plain.step()
    on_gpu_optimizer.step()
    assert_close(on_gpu_optimizer.exp_avg, plain.exp_avg, dtype)
    assert_close(on_gpu_optimizer.exp_avg_sq, plain.exp_avg_sq, dtype)
    assert_close(on_gpu_optimizer.data, plain.data, dtype, factor=10)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grouped,weight_decay", [(False, 0.0), (False, 0.1), (True, 0.1)])
def test_adamw_kernel_matches_plain_step(gpu, dtype, grouped, weight_decay):
    plain, fused_opt = _twin_optimizers(gpu, dtype, grouped, weight_decay)
    assert (fused_opt.decay_mask is not None) == grouped
    rng = host_rng(13)
    for step in range(6):
        _step_both(plain, fused_opt, gpu, rng.standard_normal(plain.grad.shape) * (0.1 + step), dtype)
    # the parameters' views see the update (it was written in place into the flat buffer)
    for parameter, view in zip(fused_opt.parameters, fused_opt.data_views):
        assert parameter.data is view
    assert_close(fused_opt.parameters[0].data, plain.parameters[0].data, dtype, factor=10)


# ---------------------------------------------------------------------------------------------------
# Gradient norm
# ---------------------------------------------------------------------------------------------------

NORM_THREADS = kernels.adamw.NORM_GRID * kernels.adamw.NORM_BLOCK
# empty, tiny, around one block, around the grid, several grid-stride rounds
NORM_SIZES = [0, 1, 7, kernels.adamw.NORM_BLOCK - 1, kernels.adamw.NORM_BLOCK, kernels.adamw.NORM_BLOCK + 1,
              kernels.adamw.NORM_GRID + 3, NORM_THREADS - 1, NORM_THREADS, NORM_THREADS + 1, 3 * NORM_THREADS + 77]


def l2_norm_in_float64(x_host):
    """sqrt(x . x) computed in float64 from the exact (float32 or float64) values, rounded to x's dtype."""
    x64 = x_host.astype(numpy.float64).ravel()
    return numpy.asarray(numpy.sqrt(numpy.dot(x64, x64))).astype(x_host.dtype)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", NORM_SIZES)
def test_l2_norm_matches_plain(gpu, dtype, size):
    """A 0-d device array of x's dtype, against AdamW.grad_norm's plain sqrt(g . g) in NumPy on host
    copies; in float32 also within one float32 rounding of the float64 norm (the kernel sums in double,
    the plain float32 dot does not); the same bits on a second call."""
    x_host, x = host_and_device(gpu, host_rng(15, size).standard_normal(size), dtype)
    norm = kernels.adamw.l2_norm(x)
    assert norm.shape == () and norm.dtype == numpy.dtype(dtype) and isinstance(norm, gpu.xp.ndarray)
    assert_close(norm, numpy.sqrt(numpy.dot(x_host, x_host)), dtype, factor=10 if dtype == "float32" else 1)
    if dtype == "float32":
        x64 = x_host.astype(numpy.float64)
        reference = math.sqrt(float(numpy.dot(x64, x64)))
        assert abs(float(norm) - reference) <= 2 * numpy.finfo(numpy.float32).eps * reference
    numpy.testing.assert_array_equal(to_host(kernels.adamw.l2_norm(x)), to_host(norm))
    numpy.testing.assert_array_equal(to_host(x), x_host)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_norm_of_any_shape_and_layout(gpu, dtype):
    x_host = host_rng(24).standard_normal((300, 7)).astype(dtype)
    x = gpu.asarray(x_host).T                                              # (7, 300), not contiguous
    assert_close(kernels.adamw.l2_norm(x), l2_norm_in_float64(x_host), dtype)


@on_gpu
@pytest.mark.parametrize("magnitude", [1e20, 1e-20])
def test_l2_norm_float32_squares_neither_overflow_nor_underflow(gpu, magnitude):
    """Elements of 1e20 (float32 squares overflow to inf) and 1e-20 (float32 squares fall below the
    normal range and flush to zero on the GPU): the double sums give the true norm, in float32."""
    x_host = (host_rng(25).standard_normal(5000) * magnitude).astype(numpy.float32)
    norm = kernels.adamw.l2_norm(gpu.asarray(x_host))
    assert numpy.isfinite(float(norm)) and float(norm) > 0
    assert_close(norm, l2_norm_in_float64(x_host), "float32")


# ---------------------------------------------------------------------------------------------------
# The layers that call the kernels: unchanged on NumPy, the same results on CuPy
# ---------------------------------------------------------------------------------------------------

def on_backend(backend, layer):
    for parameter in layer.parameters():
        parameter.data = backend.asarray(parameter.data)
    return layer


def attention_plain_steps(layer, x, grad_out):
    """MultiHeadSelfAttention's forward and backward as plain array operations, the steps attention.py
    takes on NumPy (and took on CuPy before split_qkv and merge_grad_qkv), on a NumPy layer: (out, grad_x)."""
    B, T, D = x.shape
    H, d = layer.heads, layer.head_dim
    qkv = layer.qkv.forward(x).reshape(B, T, 3, H, d).transpose(2, 0, 3, 1, 4)     # (3, B, H, T, d)
    q_scaled = qkv[0] * layer.scale
    k, v = numpy.ascontiguousarray(qkv[1]), numpy.ascontiguousarray(qkv[2])
    attn = softmax(q_scaled @ numpy.ascontiguousarray(k.transpose(0, 1, 3, 2)), overwrite=True)
    v_transposed = numpy.ascontiguousarray(v.transpose(0, 1, 3, 2))
    out = layer.proj.forward((attn @ v).transpose(0, 2, 1, 3).reshape(B, T, D))
    grad_context = layer.proj.backward(grad_out).reshape(B, T, H, d).transpose(0, 2, 1, 3)
    grad_qkv = numpy.empty((3, B, H, T, d), dtype=grad_out.dtype)
    grad_attn = grad_context @ v_transposed
    numpy.matmul(attn.transpose(0, 1, 3, 2), grad_context, out=grad_qkv[2])
    grad_scores = softmax_backward(attn, grad_attn, overwrite=True)
    numpy.matmul(grad_scores, k, out=grad_qkv[0])
    grad_qkv[0] *= layer.scale
    numpy.matmul(grad_scores.transpose(0, 1, 3, 2), q_scaled, out=grad_qkv[1])
    return out, layer.qkv.backward(grad_qkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * D))


def assert_same_results(backend, pairs, dtype):
    """Bit for bit on NumPy (the same operations); to rounding on CuPy (other kernels, cuBLAS)."""
    for name, actual, expected in pairs:
        if backend.name == "cpu":
            numpy.testing.assert_array_equal(actual, expected, err_msg=name)
        else:
            assert_close(actual, expected, dtype, factor=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,dim,heads", [(2, 5, 12, 3), (1, 17, 32, 4), (3, 9, 8, 1)])
def test_attention_matches_its_plain_steps(backend, dtype, B, T, dim, heads):
    """Output, input gradient and the four parameter gradients of MultiHeadSelfAttention against its
    plain steps run by NumPy on host copies (a twin layer with the same weights)."""
    rng = host_rng(19, B, T, dim, heads)
    x_host = rng.standard_normal((B, T, dim)).astype(dtype)
    grad_host = rng.standard_normal((B, T, dim)).astype(dtype)
    layer = on_backend(backend, MultiHeadSelfAttention(dim, heads, dtype=dtype, rng=host_rng(20)))
    plain = MultiHeadSelfAttention(dim, heads, dtype=dtype, rng=host_rng(20))
    out = layer.forward(backend.asarray(x_host))
    grad_x = layer.backward(backend.asarray(grad_host))
    out_plain, grad_x_plain = attention_plain_steps(plain, x_host, grad_host)
    pairs = [("out", to_host(out), out_plain), ("grad_x", to_host(grad_x), grad_x_plain)]
    pairs += [(name, to_host(parameter.grad), twin.grad)
              for (name, parameter), twin in zip(layer.named_parameters(), plain.parameters())]
    assert_same_results(backend, pairs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,training", [(0.0, True), (0.3, True), (0.3, False)])
def test_dropout_forward_add_is_forward_plus_residual(backend, dtype, p, training):
    """residual + Dropout.forward(x): the mask a twin layer of the same seed draws in forward, kept for
    backward; on NumPy bit for bit the plain add, on CuPy the fused one against NumPy on host copies."""
    shape = (4, 7, 9)
    rng = host_rng(23, int(p * 10))
    x_host, residual_host, grad_host = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    layer, twin = Dropout(p, seed=7).train(training), Dropout(p, seed=7).train(training)
    y = layer.forward_add(backend.asarray(x_host), backend.asarray(residual_host))
    twin.forward(backend.asarray(x_host))
    mask = to_host(twin.mask) if twin.active() else numpy.ones(shape, dtype=dtype)
    if twin.active():
        numpy.testing.assert_array_equal(to_host(layer.mask), mask)
    assert_same_results(backend, [("y", to_host(y), residual_host + x_host * mask),
                                  ("grad", to_host(layer.backward(backend.asarray(grad_host))), grad_host * mask)],
                        dtype)


def encoder_block_plain_steps(block, x, grad_out):
    """EncoderBlock's forward as plain steps (each dropout's forward, then an add in place), the steps
    encoder_block.py takes on NumPy (and took on CuPy before Dropout.forward_add), and its backward."""
    h = block.attn_dropout.forward(block.attn.forward(block.attn_norm.forward(x)))
    h += x
    x = h
    h = block.gelu.forward(block.fc1.forward(block.mlp_norm.forward(x)))
    h = block.mlp_dropout.forward(block.fc2.forward(block.hidden_dropout.forward(h)))
    h += x
    return h, block.backward(grad_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout,training", [(0.0, True), (0.2, True), (0.2, False)])
def test_encoder_block_matches_its_plain_steps(backend, dtype, dropout, training):
    """Output, input gradient and every parameter gradient of an EncoderBlock against its plain steps
    run by NumPy on a twin block (same weights, same dropout seeds). On CuPy the masks come from
    CuPy's generator, so the twin is given them (fix_mask); on NumPy it draws its own, the same."""
    B, T, dim, heads, mlp_dim = 2, 9, 16, 2, 24
    rng = host_rng(21, int(dropout * 10), int(training))
    x_host, grad_host = (rng.standard_normal((B, T, dim)).astype(dtype) for _ in range(2))

    def build():
        return EncoderBlock(dim, heads, mlp_dim, dropout=dropout, dtype=dtype, rng=host_rng(22),
                            dropout_seeds=(3, 4, 5)).train(training)

    block, plain = on_backend(backend, build()), build()
    out = block.forward(backend.asarray(x_host))
    grad_x = block.backward(backend.asarray(grad_host))
    dropouts = [(block.attn_dropout, plain.attn_dropout), (block.hidden_dropout, plain.hidden_dropout),
                (block.mlp_dropout, plain.mlp_dropout)]
    for mine, twin in dropouts:
        assert (mine.mask is not None) == (dropout > 0 and training)
        if backend.name == "gpu" and mine.mask is not None:
            twin.mask = to_host(mine.mask)
            twin.fix_mask()
    out_plain, grad_x_plain = encoder_block_plain_steps(plain, x_host, grad_host)
    pairs = [("out", to_host(out), out_plain), ("grad_x", to_host(grad_x), grad_x_plain)]
    pairs += [(name, to_host(parameter.grad), twin.grad)
              for (name, parameter), twin in zip(block.named_parameters(), plain.parameters())]
    pairs += [(f"mask {index}", to_host(mine.mask), twin.mask)
              for index, (mine, twin) in enumerate(dropouts) if mine.mask is not None]
    assert_same_results(backend, pairs, dtype)


# ---------------------------------------------------------------------------------------------------
# Layers' device checks, GELU's number gradient
# ---------------------------------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_backward_takes_a_number(gpu, dtype):
    """The upstream gradient of a 0-d output may be a Python number: the kernel takes it as a scalar."""
    layer = GELU()
    layer.forward(numpy.array(0.7, dtype=dtype))
    expected = layer.backward(0.5)
    x_host, x = host_and_device(gpu, 0.7, dtype)
    y, t = kernels.gelu.gelu_forward(x)
    assert_close(kernels.gelu.gelu_backward(x, t, 0.5), expected, dtype)
    gpu_layer = GELU()
    gpu_layer.forward(x)
    assert_close(gpu_layer.backward(0.5), expected, dtype)
    with pytest.raises(TypeError, match="grad_out must be a CuPy array or a number"):
        kernels.gelu.gelu_backward(x, t, numpy.ones(3, dtype=dtype))


@on_gpu
def test_layernorm_kernels_name_a_host_argument(gpu):
    x = on_device(gpu, numpy.ones((2, 4)), "float64")
    gamma, beta = numpy.ones(4), on_device(gpu, numpy.zeros(4), "float64")
    with pytest.raises(TypeError, match="^gamma must be a CuPy array"):
        kernels.layernorm.layernorm_forward(x, gamma, beta, 1e-5)
    with pytest.raises(TypeError, match="^labels must be a CuPy array"):
        SoftmaxCrossEntropy().forward(on_device(gpu, numpy.zeros((2, 3)), "float64"), numpy.array([0, 1]))


# ---------------------------------------------------------------------------------------------------
# Products through cuBLAS with a transposed operand
# ---------------------------------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 3, 4), (5, 1, 7), (7, 6, 1), (1, 1, 1), (64, 16, 48), (300, 64, 192),
                                   (0, 3, 4)])
def test_add_transposed_product_accumulates_a_transpose_b(gpu, dtype, M, K, N):
    """out += a^T b in place (beta = 1: what out held is kept and added to), against NumPy on the host."""
    rng = host_rng(30, M, K, N)
    a_host, a = host_and_device(gpu, rng.standard_normal((M, K)), dtype)
    b_host, b = host_and_device(gpu, rng.standard_normal((M, N)), dtype)
    out_host, out = host_and_device(gpu, rng.standard_normal((K, N)), dtype)
    pointer = out.data.ptr
    result = kernels.linear.add_transposed_product(a, b, out)
    assert result is out and out.data.ptr == pointer
    assert_close(out, out_host + a_host.T @ b_host, dtype, factor=max(1, M))


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_transposed_product_takes_any_layout(gpu, dtype):
    """Transposed views for a and b, and an out that is a strided view (the plain fallback)."""
    rng = host_rng(31)
    a_host, b_host = rng.standard_normal((6, 9)).T.astype(dtype), rng.standard_normal((5, 9)).T.astype(dtype)
    big_host = rng.standard_normal((6, 10)).astype(dtype)
    big = gpu.asarray(big_host)
    out = big[:, ::2]                                              # (6, 5), not contiguous
    kernels.linear.add_transposed_product(gpu.asarray(a_host.T).T, gpu.asarray(b_host.T).T, out)
    expected = big_host.copy()
    expected[:, ::2] += a_host.T @ b_host
    assert_close(big, expected, dtype, factor=10)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,M,N", [((3,), 5, 7, 4), ((2, 4), 50, 50, 16), ((2, 3), 9, 9, 9), ((1,), 1, 1, 1),
                                        ((2, 2), 0, 3, 4), ((0, 2), 3, 3, 3)])
def test_transposed_product_is_a_transpose_times_b(gpu, dtype, lead, K, M, N):
    """a^T b per batch entry, against NumPy's matmul of the transposed view on the host, into a new or
    a given output."""
    rng = host_rng(32, K, M, N)
    a_host, a = host_and_device(gpu, rng.standard_normal(lead + (K, M)), dtype)
    b_host, b = host_and_device(gpu, rng.standard_normal(lead + (K, N)), dtype)
    expected = numpy.swapaxes(a_host, -1, -2) @ b_host
    assert_close(kernels.attention.transposed_product(a, b), expected, dtype, factor=max(1, K))
    out = gpu.xp.full(lead + (M, N), numpy.nan, dtype=dtype)
    assert kernels.attention.transposed_product(a, b, out=out) is out
    assert_close(out, expected, dtype, factor=max(1, K))


@on_gpu
def test_transposed_product_refuses_what_it_would_copy(gpu):
    a = on_device(gpu, numpy.ones((2, 3, 4)), "float64")
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.attention.transposed_product(a.transpose(0, 2, 1).copy().transpose(0, 2, 1), a)
    with pytest.raises(ValueError, match="same leading shape"):
        kernels.attention.transposed_product(a, a[:1])
    with pytest.raises(ValueError, match="out must be"):
        kernels.attention.transposed_product(a, a, out=gpu.xp.empty((2, 4, 3)))


# ---------------------------------------------------------------------------------------------------
# Whole-pixel shifts
# ---------------------------------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1, 7, 6), (3, 2, 28, 28), (1, 3, 1, 1)])
@pytest.mark.parametrize("shifts_on", ["device", "host"])
def test_shift_images_kernel_is_the_plain_gather(gpu, dtype, shape, shifts_on):
    """data.shift_images on CuPy (one kernel) against data.shift_images on NumPy on host copies: the same
    pixels bit for bit, shifts from beyond the image (all fill) to zero, the fill cast to the dtype."""
    from scratchvit.data import shift_images
    batch, _, height, width = shape
    rng = host_rng(33, *shape)
    images_host, images = host_and_device(gpu, rng.standard_normal(shape), dtype)
    shifts_host = rng.integers(-max(height, width) - 2, max(height, width) + 3, size=(batch, 2))
    shifts_host[0] = 0
    shifts = gpu.asarray(shifts_host) if shifts_on == "device" else shifts_host
    fill = -0.4242640687119285
    shifted = shift_images(images, shifts, fill)
    assert shifted.dtype == numpy.dtype(dtype) and type(shifted) is type(images)
    numpy.testing.assert_array_equal(to_host(shifted), shift_images(images_host, shifts_host, fill))
    numpy.testing.assert_array_equal(to_host(shifted)[0], images_host[0])
    transposed = gpu.asarray(numpy.ascontiguousarray(images_host.transpose(0, 1, 3, 2))).transpose(0, 1, 3, 2)
    numpy.testing.assert_array_equal(to_host(shift_images(transposed, shifts, fill)), to_host(shifted))
    with pytest.raises(ValueError, match="shifts must have shape"):
        kernels.shift_images.shift_images(images, gpu.xp.zeros((batch + 1, 2), dtype="int64"), fill)


# ---------------------------------------------------------------------------------------------------
# Gradient clipping's scaling
# ---------------------------------------------------------------------------------------------------

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [30.0, 1.0, 0.2, 0.0, math.nan])
def test_scale_to_max_norm_is_the_plain_clip(gpu, dtype, norm):
    """grad *= minimum(1, max_norm / (norm + eps)), the plain line of AdamW.clip_grad_norm run by NumPy on
    the host: scaled down above max_norm, unchanged (bit for bit) below, NaN kept NaN."""
    from scratchvit.optim import CLIP_EPS
    rng = host_rng(40)
    grad_host, grad = host_and_device(gpu, rng.standard_normal(1000), dtype)
    norm_host, norm_device = host_and_device(gpu, norm, dtype)
    expected = grad_host * numpy.minimum(1.0, 1.0 / (norm_host + CLIP_EPS)).astype(dtype)
    kernels.adamw.scale_to_max_norm(grad, norm_device, 1.0, CLIP_EPS)
    if norm < 1.0:
        numpy.testing.assert_array_equal(to_host(grad), grad_host)
    elif math.isnan(norm):
        assert numpy.isnan(to_host(grad)).all()
    else:
        assert_close(grad, expected, dtype)


def _column_major_gemm_strided_batched(op_a, op_b, m, n, k, buffer_a, lda, stride_a, buffer_b, ldb, stride_b,
                                       buffer_c, ldc, stride_c, batch):
    """cublas<t>gemmStridedBatched with alpha = 1, beta = 0, as cuBLAS defines it, on flat NumPy buffers:
    C_i = op(A_i) op(B_i), matrices in column-major order (element (r, c) of a matrix with leading
    dimension ld at r + c * ld), A_i starting at i * stride_a (B_i, C_i likewise)."""
    def matrix(buffer, start, rows, cols, ld):
        item = buffer.itemsize
        return numpy.lib.stride_tricks.as_strided(buffer[start:], shape=(rows, cols), strides=(item, ld * item))

    for i in range(batch):
        a = matrix(buffer_a, i * stride_a, m, k, lda) if op_a == "N" else matrix(buffer_a, i * stride_a, k, m, lda).T
        b = matrix(buffer_b, i * stride_b, k, n, ldb) if op_b == "N" else matrix(buffer_b, i * stride_b, n, k, ldb).T
        matrix(buffer_c, i * stride_c, m, n, ldc)[...] = a @ b


@pytest.mark.parametrize("lead,K,M,N", [((3,), 5, 7, 4), ((2, 4), 50, 50, 16), ((1,), 1, 1, 1), ((2,), 6, 1, 3),
                                        ((2,), 6, 3, 1)])
def test_transposed_product_gives_cublas_the_right_layout(lead, K, M, N):
    """Runs on a CPU: the leading dimensions, strides and transpose flags that transposed_product hands
    to cuBLAS, put through a column-major strided-batched gemm written in NumPy, give a^T @ b for
    C-contiguous a (..., K, M) and b (..., K, N), in the C-contiguous layout of out (..., M, N)."""
    rng = host_rng(34, K, M, N)
    a, b = rng.standard_normal(lead + (K, M)), rng.standard_normal(lead + (K, N))
    batch = int(numpy.prod(lead))
    out = numpy.full(lead + (M, N), numpy.nan)
    op_a, op_b, m, n, k, lda, stride_a, ldb, stride_b, ldc, stride_c, count = (
        kernels.attention.transposed_product_gemm(K, M, N, batch))
    assert (lda >= max(1, m if op_a == "N" else k)) and (ldb >= max(1, k if op_b == "N" else n)) and ldc >= max(1, m)
    _column_major_gemm_strided_batched(op_a, op_b, m, n, k, b.reshape(-1), lda, stride_a, a.reshape(-1), ldb,
                                       stride_b, out.reshape(-1), ldc, stride_c, count)
    numpy.testing.assert_allclose(out, numpy.swapaxes(a, -1, -2) @ b, rtol=1e-12, atol=1e-12)
