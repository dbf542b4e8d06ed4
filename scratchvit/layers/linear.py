"""Linear: an affine map of the last axis, y = x @ W + b.

Shapes
    x (..., D_in)   weight W (D_in, D_out)   bias b (D_out,)   y (..., D_out)

W is stored as (in_features, out_features) (PyTorch stores its transpose), so the forward
is `x @ W` with no transpose. Any number of leading axes is allowed: they are flattened into one
row axis of M = prod(...) rows, so BLAS (or cuBLAS) sees one large product, not a loop of small ones.

Forward, with X = x.reshape(M, D_in):
    Y = X @ W + b                                     (M, D_out)

Backward. Let G = dL/dY (M, D_out). Since Y[m, o] = sum_i X[m, i] W[i, o] + b[o]:
    dL/dW[i, o] = sum_m X[m, i] G[m, o]    ->  dW = X^T @ G        (D_in, D_out)
    dL/db[o]    = sum_m G[m, o]            ->  db = G.sum(axis=0)  (D_out,)
    dL/dX[m, i] = sum_o G[m, o] W[i, o]    ->  dX = G @ W^T        (M, D_in)

dW is added into weight.grad (the accumulation rule of layer.py). On the GPU the product and the
addition are one cuBLAS call, weight.grad = 1 * X^T G + 1 * weight.grad, with no temporary of the
weight's size (the backward's twin, kernels/linear.py); NumPy has no such call and computes X^T G,
then adds.
"""
import math

from .layer import Layer, Parameter, check_same_device
from .reductions import column_sum
from ..backend import host_generator


class Linear(Layer):
    def __init__(self, in_features, out_features, *, weight=None, bias=None, dtype="float32", rng=None):
        """Weights are uniform in ±1/sqrt(in_features) (PyTorch's default) drawn from `rng`
        (a numpy Generator; seed 0 if omitted), or the given host or device arrays."""
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if int(value) != value or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        rng = host_generator(0) if rng is None else rng
        bound = 1.0 / math.sqrt(self.in_features)
        if weight is None:
            weight = rng.uniform(-bound, bound, (self.in_features, self.out_features)).astype(dtype)
        if bias is None:
            bias = rng.uniform(-bound, bound, self.out_features).astype(dtype)
        for name, value, shape in (("weight", weight, (self.in_features, self.out_features)),
                                   ("bias", bias, (self.out_features,))):
            if tuple(value.shape) != shape:
                raise ValueError(f"Linear({self.in_features}, {self.out_features}): {name} must have shape {shape}, "
                                 f"got {tuple(value.shape)}")
        self.weight = Parameter(weight)
        self.bias = Parameter(bias)
        self.x_rows = None   # the input as (M, D_in), used later in backward for dW

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs whose last axis is in_features={self.in_features}, "
                             f"got shape {x.shape}")
        check_same_device("Linear", x, self.weight)
        x_rows = x.reshape(-1, self.in_features)              # (M, D_in)
        self.x_rows = x_rows
        y = x_rows @ self.weight.data                          # (M, D_out)
        y += self.bias.data
        return y.reshape(*x.shape[:-1], self.out_features)     # (..., D_out)

    def backward(self, grad_out):
        grad_rows = grad_out.reshape(-1, self.out_features)   # G (M, D_out)
        # forward: y = x_rows @ W + b
        self.weight.grad += self.x_rows.T @ grad_rows          # dW = X^T G
        self.bias.grad += column_sum(grad_rows)                # db = sum over rows of G
        grad_x = grad_rows @ self.weight.data.T                # dX = G W^T
        return grad_x.reshape(*grad_out.shape[:-1], self.in_features)
