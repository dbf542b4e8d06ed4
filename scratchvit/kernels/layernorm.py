"""LayerNorm's GPU twin: forward and the input gradient of layers/layernorm.py, one row kernel each.

Steps (layers/layernorm.py's numbering), one warp per row of D:
    forward   (1) mu = sum(x) * (1/D)   (2) xc = x - mu   (3) var = sum(xc^2) * (1/D)
              (4) rstd = 1 / sqrt(var + eps)   (5) xhat = xc * rstd   (6) y = xhat * gamma + beta
    backward  (6) h = g * gamma;  (5)-(1) grad_x = ((h - mean(h)) - xhat * mean(h * xhat)) * rstd
              (6) dL/dgamma, dL/dbeta: column sums, as in the layer (layers/reductions.py)
"""
import numpy

from .compile import (ROW_THREADS, cupy_module, define_kernels, float_dtype, on_device, raw_kernel, row_grid,
                      rows_of, as_int32)
from ..layers.layernorm import LayerNorm
from ..layers.reductions import column_sum
from ..twins import register_gpu_twin

define_kernels(raw={
    # layernorm.py forward, one warp per row of D:
    #   mu = sum(x) * (1/D);  var = sum((x - mu)^2) * (1/D);  rstd = 1 / sqrt(var + eps)
    #   xhat = (x - mu) * rstd;  y = xhat * gamma + beta
    "scratchvit_layernorm_forward": r"""
extern "C" __global__ void scratchvit_layernorm_forward(
        const T* x, const T* gamma, const T* beta, T* y, T* xhat, T* rstd_out, const long long rows,
        const int D, const T eps) {
    ROW_AND_LANE
    const long long base = row * D;
    const T inv_d = (T)(1.0 / (double)D);
    T partial = 0;
    for (int j = lane; j < D; j += 32) {
        partial += x[base + j];
    }
    const T mu = warp_sum(partial) * inv_d;
    partial = 0;
    for (int j = lane; j < D; j += 32) {
        const T centred = x[base + j] - mu;
        partial += centred * centred;
    }
    const T var = warp_sum(partial) * inv_d;
    const T rstd = (T)1 / sqrt(var + eps);
    for (int j = lane; j < D; j += 32) {
        const T normalised = (x[base + j] - mu) * rstd;
        xhat[base + j] = normalised;
        y[base + j] = normalised * gamma[j] + beta[j];
    }
    if (lane == 0) {
        rstd_out[row] = rstd;
    }
}
""",
    # layernorm.py backward, one warp per row:  h = g * gamma
    #   grad_x = ((h - mean(h)) - xhat * mean(h * xhat)) * rstd
    "scratchvit_layernorm_backward": r"""
extern "C" __global__ void scratchvit_layernorm_backward(
        const T* grad_out, const T* xhat, const T* rstd, const T* gamma, T* grad_x, const long long rows,
        const int D) {
    ROW_AND_LANE
    const long long base = row * D;
    const T inv_d = (T)(1.0 / (double)D);
    T partial_h = 0;
    T partial_hx = 0;
    for (int j = lane; j < D; j += 32) {
        const T h = grad_out[base + j] * gamma[j];
        partial_h += h;
        partial_hx += h * xhat[base + j];
    }
    const T mean_h = warp_sum(partial_h) * inv_d;
    const T mean_hx = warp_sum(partial_hx) * inv_d;
    const T r = rstd[row];
    for (int j = lane; j < D; j += 32) {
        const T h = grad_out[base + j] * gamma[j];
        grad_x[base + j] = ((h - mean_h) - xhat[base + j] * mean_hx) * r;
    }
}
""",
})


def layernorm_forward(x, gamma, beta, eps):
    """LayerNorm over the last axis in one launch: returns (y, xhat, rstd) with rstd of shape (..., 1),
    exactly what `layers.LayerNorm.forward` returns and keeps."""
    cupy = cupy_module()
    dtype = float_dtype(x, gamma, beta)
    D = x.shape[-1]
    if gamma.shape != (D,) or beta.shape != (D,):
        raise ValueError(f"gamma and beta must have shape ({D},), got {gamma.shape} and {beta.shape}")
    on_device(cupy, x=x, gamma=gamma, beta=beta)
    x = cupy.ascontiguousarray(x)
    gamma, beta = cupy.ascontiguousarray(gamma), cupy.ascontiguousarray(beta)
    y = cupy.empty(x.shape, dtype=dtype)
    xhat = cupy.empty(x.shape, dtype=dtype)
    rstd = cupy.empty(x.shape[:-1] + (1,), dtype=dtype)
    rows = rows_of(x.shape)
    if rows and D:
        raw_kernel("scratchvit_layernorm_forward", dtype)(
            row_grid(rows), ROW_THREADS, (x, gamma, beta, y, xhat, rstd, numpy.int64(rows), as_int32(D),
                                            dtype.type(eps)))
    return y, xhat, rstd


def layernorm_backward(grad_out, xhat, rstd, gamma):
    """LayerNorm backward: returns (grad_x, grad_gamma, grad_beta), as `layers.LayerNorm.backward`
    (which adds grad_gamma and grad_beta into the parameters' gradients: the caller does that here).
    grad_x is one launch; the two parameter sums are `column_sum`s, as in the plain layer."""
    cupy = cupy_module()
    dtype = float_dtype(grad_out, xhat, rstd, gamma)
    D = grad_out.shape[-1]
    if xhat.shape != grad_out.shape or gamma.shape != (D,) or rstd.size != rows_of(grad_out.shape):
        raise ValueError(f"layernorm_backward: shapes do not match: grad_out {grad_out.shape}, xhat {xhat.shape}, "
                         f"rstd {rstd.shape}, gamma {gamma.shape}")
    on_device(cupy, grad_out=grad_out, xhat=xhat, rstd=rstd, gamma=gamma)
    grad_out, xhat = cupy.ascontiguousarray(grad_out), cupy.ascontiguousarray(xhat)
    rstd, gamma = cupy.ascontiguousarray(rstd), cupy.ascontiguousarray(gamma)
    grad_x = cupy.empty(grad_out.shape, dtype=dtype)
    rows = rows_of(grad_out.shape)
    if rows and D:
        raw_kernel("scratchvit_layernorm_backward", dtype)(
            row_grid(rows), ROW_THREADS, (grad_out, xhat, rstd, gamma, grad_x, numpy.int64(rows), as_int32(D)))
    grad_beta = column_sum(grad_out)
    grad_gamma = column_sum(grad_out * xhat)
    return grad_x, grad_gamma, grad_beta


@register_gpu_twin(LayerNorm.forward)
def forward_on_gpu(layer, x):
    layer.check_input(x)
    y, layer.xhat, layer.rstd = layernorm_forward(x, layer.weight.data, layer.bias.data, layer.eps)
    return y


@register_gpu_twin(LayerNorm.backward)
def backward_on_gpu(layer, grad_out):
    grad_x, grad_gamma, grad_beta = layernorm_backward(grad_out, layer.xhat, layer.rstd, layer.weight.data)
    layer.weight.grad += grad_gamma
    layer.bias.grad += grad_beta
    return grad_x
