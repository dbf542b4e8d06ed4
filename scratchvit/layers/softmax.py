"""Softmax over the last axis, and its backward: the piece attention and the loss share.

Forward, for one row s_1..s_n:
    p_i = exp(s_i - m) / sum_j exp(s_j - m),      m = max_j s_j
  Subtracting the row maximum changes nothing mathematically (it cancels between numerator and
  denominator) but keeps every exp() in (0, 1], so large scores cannot overflow to inf and turn
  the result into NaN. Each row of p is positive and sums to 1.

Backward. d p_i / d s_j = p_i (delta_ij - p_j), so for an upstream gradient g = dL/dp:
    dL/ds_j = sum_i g_i p_i (delta_ij - p_j) = p_j (g_j - sum_i g_i p_i)

`softmax_simple` is the textbook formula without the max subtraction: it teaches, and the tests
use it as the oracle for `softmax` on moderate inputs.
"""
from .reductions import row_sum
from ..backend import get_array_module, is_gpu_array


def softmax(scores, *, overwrite=False):
    """Row-wise softmax of `scores` (..., n). With overwrite=True the result is computed in the
    memory of `scores` (the caller's own temporary), saving two allocations of its size."""
    if is_gpu_array(scores):               # one fused kernel on the GPU (fused.py)
        from ..fused import softmax_forward
        return softmax_forward(scores)
    xp = get_array_module(scores)
    shifted = scores if overwrite else scores.copy()
    shifted -= shifted.max(axis=-1, keepdims=True)
    probs = xp.exp(shifted, out=shifted)
    inverse_sums = row_sum(probs)
    probs *= xp.reciprocal(inverse_sums, out=inverse_sums)     # one division per row, then multiplies
    return probs


def softmax_backward(probs, grad_probs):
    """dL/ds = p * (g - sum(g * p)) for p = softmax(s) and g = dL/dp, row-wise over the last axis."""
    if is_gpu_array(probs):
        from ..fused import softmax_backward as fused_softmax_backward
        return fused_softmax_backward(probs, grad_probs)
    grad_scores = grad_probs * probs
    grad_scores -= probs * row_sum(grad_scores)
    return grad_scores


def softmax_simple(scores):
    """exp(s) / sum exp(s): correct for moderate scores, overflows for large ones (the oracle)."""
    xp = get_array_module(scores)
    exps = xp.exp(scores)
    return exps / exps.sum(axis=-1, keepdims=True)
