"""Softmax's GPU twin: softmax and softmax_backward of layers/softmax.py, one row kernel each.

Steps (layers/softmax.py's docstring), one warp per row of n:
    forward   m = max(s);   e = exp(s - m);   p = e / sum(e)
    backward  dL/ds = g * p - p * sum(g * p)
"""
import numpy

from .compile import ROW_THREADS, cupy_module, define_kernels, float_dtype, raw_kernel, row_grid, rows_of, as_int32
from ..layers.softmax import softmax as plain_softmax, softmax_backward as plain_softmax_backward
from ..twins import register_gpu_twin

define_kernels(raw={
    # softmax.py forward, one warp per row of n:  e = exp(s - max(s));  p = e / sum(e)
    # Every lane starts its maximum at the row's first score (lanes past the end of a short row have no
    # element of their own), so the maximum is one of the row's values.
    "scratchvit_softmax_forward": r"""
extern "C" __global__ void scratchvit_softmax_forward(
        const T* scores, T* probs, const long long rows, const int n) {
    ROW_AND_LANE
    const long long base = row * n;
    T local_max = scores[base];
    for (int j = lane; j < n; j += 32) {
        const T z = scores[base + j];
        local_max = (z > local_max) ? z : local_max;
    }
    const T row_max = warp_max(local_max);
    T partial = 0;
    for (int j = lane; j < n; j += 32) {
        const T e = exp(scores[base + j] - row_max);
        probs[base + j] = e;
        partial += e;
    }
    const T total = warp_sum(partial);
    for (int j = lane; j < n; j += 32) {
        probs[base + j] = probs[base + j] / total;
    }
}
""",
    # softmax.py backward, one warp per row:  grad_s = g * p - p * sum(g * p)
    "scratchvit_softmax_backward": r"""
extern "C" __global__ void scratchvit_softmax_backward(
        const T* probs, const T* grad_probs, T* grad_scores, const long long rows, const int n) {
    ROW_AND_LANE
    const long long base = row * n;
    T partial = 0;
    for (int j = lane; j < n; j += 32) {
        partial += grad_probs[base + j] * probs[base + j];
    }
    const T dot = warp_sum(partial);
    for (int j = lane; j < n; j += 32) {
        const T p = probs[base + j];
        grad_scores[base + j] = grad_probs[base + j] * p - p * dot;
    }
}
""",
})


def softmax_forward(scores):
    """Row softmax of scores over the last axis, max-subtracted, in one launch: `layers.softmax(scores)`."""
    cupy = cupy_module()
    dtype = float_dtype(scores)
    scores = cupy.ascontiguousarray(scores)
    probs = cupy.empty(scores.shape, dtype=dtype)
    rows, n = rows_of(scores.shape), scores.shape[-1]
    if rows and n:
        raw_kernel("scratchvit_softmax_forward", dtype)(
            row_grid(rows), ROW_THREADS, (scores, probs, numpy.int64(rows), as_int32(n)))
    return probs


def softmax_backward(probs, grad_probs):
    """dL/dscores = p * (g - sum(g * p)) row-wise, in one launch: `layers.softmax_backward(probs, grad_probs)`."""
    cupy = cupy_module()
    dtype = float_dtype(probs, grad_probs)
    if probs.shape != grad_probs.shape:
        raise ValueError(f"probs {probs.shape} and grad_probs {grad_probs.shape} must have the same shape")
    probs, grad_probs = cupy.ascontiguousarray(probs), cupy.ascontiguousarray(grad_probs)
    grad_scores = cupy.empty(probs.shape, dtype=dtype)
    rows, n = rows_of(probs.shape), probs.shape[-1]
    if rows and n:
        raw_kernel("scratchvit_softmax_backward", dtype)(
            row_grid(rows), ROW_THREADS, (probs, grad_probs, grad_scores, numpy.int64(rows), as_int32(n)))
    return grad_scores


@register_gpu_twin(plain_softmax)
def softmax_on_gpu(scores, *, overwrite=False):
    return softmax_forward(scores)          # a new array either way: overwrite is the CPU's saving


@register_gpu_twin(plain_softmax_backward)
def softmax_backward_on_gpu(probs, grad_probs, *, overwrite=False):
    return softmax_backward(probs, grad_probs)
