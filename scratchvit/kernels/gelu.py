"""GELU's GPU twin: forward and backward of layers/gelu.py, one elementwise kernel each.

Steps (layers/gelu.py's docstring, in its order):
    forward   u = c * (x + a * x^3) = x * (c + c*a * x*x);   t = tanh(u);   y = 0.5 * x * (1 + t)
    backward  dy/dx = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * c * (1 + 3a * x^2);   dL/dx = dL/dy * dy/dx
The constants c and a are the layer file's own (SQRT_2_OVER_PI, CUBIC_COEFFICIENT), written into the
source as Python doubles, then cast to T.
"""
import numpy

from .compile import cupy_module, define_kernels, elementwise_kernel, float_dtype
from ..layers.gelu import CUBIC_COEFFICIENT, GELU, SQRT_2_OVER_PI
from ..twins import register_gpu_twin

# GELU constants exactly as gelu.py computes them (in Python double precision, then cast to T).
_GELU_C = repr(SQRT_2_OVER_PI)                                  # c
_GELU_CA = repr(SQRT_2_OVER_PI * CUBIC_COEFFICIENT)             # c * a
_GELU_3CA = repr(3.0 * SQRT_2_OVER_PI * CUBIC_COEFFICIENT)      # 3 * c * a

define_kernels(elementwise={
    # gelu.py forward: u = x * (c + c*a * x*x);  t = tanh(u);  y = (t + 1) * (0.5 * x)
    "scratchvit_gelu_forward": (
        "T x",
        "T y, T t",
        "const T u = ((x * x) * (T)" + _GELU_CA + " + (T)" + _GELU_C + ") * x;\n"
        "t = tanh(u);\n"
        "y = (t + (T)1) * ((T)0.5 * x);\n",
    ),
    # gelu.py backward: dy/dx = ((x*x * 3ca + c) * x) * (1 - t*t) + (1 + t);  dL/dx = dy/dx * (0.5 * g)
    "scratchvit_gelu_backward": (
        "T x, T t, T grad_out",
        "T grad_x",
        "T d = (x * x) * (T)" + _GELU_3CA + " + (T)" + _GELU_C + ";\n"
        "d = d * x;\n"
        "d = d * ((T)1 - t * t);\n"
        "d = d + ((T)1 + t);\n"
        "grad_x = d * ((T)0.5 * grad_out);\n",
    ),
})


def gelu_forward(x):
    """Tanh-GELU in one launch: returns (y, t), t = tanh(c (x + a x^3)), as `layers.GELU.forward`
    computes y and keeps t."""
    float_dtype(x)
    y, t = elementwise_kernel("scratchvit_gelu_forward")(x)
    return y, t


def gelu_backward(x, t, grad_out):
    """dL/dx of tanh-GELU in one launch, from the forward's x and t: `layers.GELU.backward`.
    grad_out is a CuPy array or a number (the upstream gradient of a 0-d output): a number is passed to
    the kernel as a scalar, cast to x's dtype (CuPy takes Python and NumPy scalars, never a NumPy array:
    cupy/_core/_kernel.pyx `_preprocess_arg`, cupy/_core/_scalar.pyx `CScalar`)."""
    cupy = cupy_module()
    if isinstance(grad_out, cupy.ndarray):
        float_dtype(x, t, grad_out)
    elif numpy.ndim(grad_out) == 0:
        float_dtype(x, t)
        grad_out = float(grad_out)
    else:
        raise TypeError(f"grad_out must be a CuPy array or a number, got {type(grad_out).__name__} "
                        f"of shape {numpy.shape(grad_out)}")
    return elementwise_kernel("scratchvit_gelu_backward")(x, t, grad_out)


@register_gpu_twin(GELU.forward)
def forward_on_gpu(layer, x):
    y, layer.t = gelu_forward(x)
    layer.x = x
    return y


@register_gpu_twin(GELU.backward)
def backward_on_gpu(layer, grad_out):
    return gelu_backward(layer.x, layer.t, grad_out)
