"""SoftmaxCrossEntropy's GPU twin: forward and backward of layers/softmax_cross_entropy.py.

Steps (layers/softmax_cross_entropy.py's docstring), forward one warp per row of C logits:
    m = max(z);  lse = log(sum(exp(z - m)));  log p = (z - m) - lse;  probs = exp(log p)
    loss = -log p[label];  with smoothing s:  loss = (1 - s) * loss - s * mean(log p);  then the batch mean
backward, elementwise:  dL/dz = (p - t) * grad_loss / B,  t = (1 - s) [c == label] + s / C
A label outside [0, C) makes its row's loss NaN here: the layer checks labels on the host only.
"""
import math

import numpy

from .compile import (ROW_THREADS, cupy_module, define_kernels, elementwise_kernel, float_dtype, on_device,
                      raw_kernel, row_grid, as_int32)
from ..layers.softmax_cross_entropy import SoftmaxCrossEntropy
from ..twins import register_gpu_twin

define_kernels(raw={
    # softmax_cross_entropy.py forward, one warp per row of C logits:
    #   m = max(z);  lse = log(sum(exp(z - m)));  log_p = (z - m) - lse;  probs = exp(log_p)
    #   loss = -log_p[label];  with smoothing s:  loss = (1 - s) * loss - s * mean(log_p)
    # A label outside [0, C) gives a NaN loss (passed in as invalid_loss) instead of a wild read.
    "scratchvit_cross_entropy_forward": r"""
extern "C" __global__ void scratchvit_cross_entropy_forward(
        const T* logits, const long long* labels, T* probs, T* row_loss, const long long rows, const int C,
        const T smoothing, const T one_minus_smoothing, const T invalid_loss) {
    ROW_AND_LANE
    const long long base = row * C;
    T local_max = logits[base];
    for (int j = lane; j < C; j += 32) {
        const T z = logits[base + j];
        local_max = (z > local_max) ? z : local_max;
    }
    const T m = warp_max(local_max);
    T partial = 0;
    for (int j = lane; j < C; j += 32) {
        partial += exp(logits[base + j] - m);
    }
    const T lse = log(warp_sum(partial));
    T partial_log_p = 0;
    for (int j = lane; j < C; j += 32) {
        const T log_p = (logits[base + j] - m) - lse;
        probs[base + j] = exp(log_p);
        partial_log_p += log_p;
    }
    const T sum_log_p = warp_sum(partial_log_p);
    if (lane == 0) {
        const long long label = labels[row];
        T loss = invalid_loss;
        if (label >= 0 && label < C) {
            loss = -((logits[base + label] - m) - lse);
            if (smoothing != (T)0) {
                loss = one_minus_smoothing * loss - smoothing * (sum_log_p / (T)C);
            }
        }
        row_loss[row] = loss;
    }
}
""",
}, elementwise={
    # softmax_cross_entropy.py backward: grad = ((p - s/C) - (1 - s)[c == label]) * (grad_loss / B).
    # `i` is the C-order index into the (B, C) output, so its row is i / C and its class i - row * C.
    "scratchvit_cross_entropy_backward": (
        "T p, raw int64 labels, raw T upstream, T smooth_over_c, T one_minus_smooth, T inv_batch, "
        "int64 num_classes",
        "T grad",
        "const long long row = i / num_classes;\n"
        "const long long col = i - row * num_classes;\n"
        "T value = p - smooth_over_c;\n"
        "if (col == labels[row]) {\n"
        "    value = value - one_minus_smooth;\n"
        "}\n"
        "grad = value * (upstream[0] * inv_batch);\n",
    ),
})


def _batch_and_classes(name, scores, labels):
    """(B, C) of (B, C) `scores` (logits or probs) with (B,) labels, or ValueError naming the argument."""
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape (B, num_classes), got {scores.shape}")
    B, C = scores.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},) to match {name} {scores.shape}, got {labels.shape}")
    return B, C


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Softmax cross-entropy with label smoothing on (B, C) logits and (B,) integer labels: returns
    (loss, probs), loss the batch mean as a 0-d CuPy array (no host synchronisation) and probs the
    softmax that the backward needs, as `layers.SoftmaxCrossEntropy.forward`.

    One launch per batch (a warp per row: log-sum-exp, the loss terms, probs) plus the mean.
    A label outside [0, C) makes its row's loss NaN (the plain layer checks labels on the host only)."""
    cupy = cupy_module()
    dtype = float_dtype(logits)
    B, C = _batch_and_classes("logits", logits, labels)
    on_device(cupy, logits=logits, labels=labels)
    s = float(label_smoothing)
    logits = cupy.ascontiguousarray(logits)
    labels = cupy.ascontiguousarray(labels, dtype=cupy.int64)
    probs = cupy.empty((B, C), dtype=dtype)
    row_loss = cupy.empty((B,), dtype=dtype)
    if B and C:
        raw_kernel("scratchvit_cross_entropy_forward", dtype)(
            row_grid(B), ROW_THREADS, (logits, labels, probs, row_loss, numpy.int64(B), as_int32(C),
                                 dtype.type(s), dtype.type(1.0 - s), dtype.type(math.nan)))
    return row_loss.mean(), probs


_ones_1 = {}   # dtype name -> cupy.ones(1): the default upstream gradient of the loss


def cross_entropy_backward(probs, labels, label_smoothing=0.0, grad_loss=1.0):
    """dL/dlogits = (probs - t) * grad_loss / B in one launch, t the smoothed one-hot targets:
    `layers.SoftmaxCrossEntropy.backward`. grad_loss may be a Python number or a 0-d CuPy array
    (then it is read on the device: no host synchronisation)."""
    cupy = cupy_module()
    dtype = float_dtype(probs)
    B, C = _batch_and_classes("probs", probs, labels)
    on_device(cupy, probs=probs, labels=labels)
    s = float(label_smoothing)
    probs = cupy.ascontiguousarray(probs)
    labels = cupy.ascontiguousarray(labels, dtype=cupy.int64)
    if isinstance(grad_loss, cupy.ndarray):
        upstream = grad_loss.astype(dtype, copy=False).reshape(1)
    elif grad_loss == 1.0:
        upstream = _ones_1.get(dtype.name)
        if upstream is None:
            upstream = _ones_1[dtype.name] = cupy.ones(1, dtype=dtype)
    else:
        upstream = cupy.full((1,), grad_loss, dtype=dtype)
    return elementwise_kernel("scratchvit_cross_entropy_backward")(
        probs, labels, upstream, s / C if C else 0.0, 1.0 - s, 1.0 / B if B else 0.0, C)


@register_gpu_twin(SoftmaxCrossEntropy.forward)
def forward_on_gpu(layer, logits, labels):
    loss, layer.probs = cross_entropy_forward(logits, labels, layer.label_smoothing)
    layer.labels = labels
    return loss


@register_gpu_twin(SoftmaxCrossEntropy.backward)
def backward_on_gpu(layer, grad_loss=1.0):
    return cross_entropy_backward(layer.probs, layer.labels, layer.label_smoothing, grad_loss)
