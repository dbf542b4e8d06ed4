"""Linear's GPU twin: the backward of layers/linear.py with dW = X^T G added in one cuBLAS call.

Steps (layers/linear.py's docstring):
    dW = X^T @ G, added into weight.grad     add_transposed_product: weight.grad = 1 * X^T G + 1 * weight.grad,
                                             no temporary of the weight's size
    db = G.sum(axis=0);  dX = G @ W^T        as in the layer
"""
from .compile import C_TYPES, cupy_module, cublas_modules, on_device
from ..layers.linear import Linear
from ..layers.reductions import column_sum
from ..twins import register_gpu_twin


def add_transposed_product(a, b, out):
    """out += a^T @ b for 2-D a (M, K), b (M, N) and out (K, N), in one cuBLAS call without a temporary:
    `Linear.backward`'s weight.grad += x_rows.T @ grad_rows.

    cupy.cublas.gemm('T', 'N', a, b, out=out, beta=1.0) (cupy/cublas.py, `gemm`) passes C-contiguous
    a, b and out straight to cuBLAS, the transposes as flags and out as (out^T = b^T a) in column-major
    order; an operand neither C- nor F-contiguous would be copied there, and an output neither C- nor
    F-contiguous copied twice, so a and b are made C-contiguous here (a no-op for the layer's arrays)
    and an out that is not C-contiguous takes the plain `out += a.T @ b`."""
    cupy = cupy_module()
    on_device(cupy, a=a, b=b, out=out)
    if a.ndim != 2 or not (a.dtype == b.dtype == out.dtype) or out.dtype.name not in C_TYPES:
        out += a.T @ b                # another dtype or shape: CuPy's own rules (and errors)
        return out
    M, K = a.shape
    if b.ndim != 2 or b.shape[0] != M or out.shape != (K, b.shape[1]):
        raise ValueError(f"add_transposed_product: shapes do not match: a {a.shape}, b {b.shape}, out {out.shape}")
    if M == 0 or out.size == 0:       # nothing to add (and cuBLAS refuses a leading dimension of 0)
        return out
    if not out.flags.c_contiguous:
        out += a.T @ b
        return out
    cublas_module, _, _ = cublas_modules()
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    return cublas_module.gemm("T", "N", a, b, out=out, alpha=1.0, beta=1.0)


@register_gpu_twin(Linear.backward)
def backward_on_gpu(layer, grad_out):
    grad_rows = grad_out.reshape(-1, layer.out_features)                           # G (M, D_out)
    add_transposed_product(layer.x_rows, grad_rows, layer.weight.grad)             # dW = X^T G, added in place
    layer.bias.grad += column_sum(grad_rows)                                       # db
    grad_x = grad_rows @ layer.weight.data.T                                       # dX = G W^T
    return grad_x.reshape(*grad_out.shape[:-1], layer.in_features)
