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

On the GPU each of softmax and softmax_backward is one CuPy kernel (its twin, kernels/softmax.py),
chosen by the device of `scores` / `probs` (never of the upstream gradient).
"""
from .layer import dispatched
from .reductions import row_sum
from ..backend import get_array_module


@dispatched(lambda scores, overwrite=False: scores)
def softmax(scores, *, overwrite=False):
    """Row-wise softmax of `scores` (..., n). With overwrite=True the result is computed in the
    memory of `scores` (the caller's own temporary), saving two allocations of its size."""
    xp = get_array_module(scores)
    exps = scores if overwrite else scores.copy()
    exps -= exps.max(axis=-1, keepdims=True)                   # s - m: every entry <= 0
    xp.exp(exps, out=exps)                                      # exp(s - m), in (0, 1]
    row_sums = row_sum(exps)                                    # >= 1: the maximum contributes exp(0) = 1
    exps *= xp.reciprocal(row_sums, out=row_sums)               # p: one division per row, then multiplies
    return exps


@dispatched(lambda probs, grad_probs, overwrite=False: probs)
def softmax_backward(probs, grad_probs, *, overwrite=False):
    """dL/ds = p * (g - sum(g * p)) for p = softmax(s) and g = dL/dp, row-wise over the last axis.
    With overwrite=True the result is computed in the memory of `grad_probs` (the caller's temporary)."""
    row_dots = row_sum(grad_probs * probs)                      # sum_i g_i p_i, one per row
    grad_scores = grad_probs if overwrite else grad_probs.copy()
    grad_scores -= row_dots                                     # g_j - sum_i g_i p_i
    grad_scores *= probs                                        # p_j (g_j - sum_i g_i p_i)
    return grad_scores


def softmax_simple(scores):
    """exp(s) / sum exp(s): correct for moderate scores, overflows for large ones (the oracle)."""
    xp = get_array_module(scores)
    exps = xp.exp(scores)
    return exps / exps.sum(axis=-1, keepdims=True)
