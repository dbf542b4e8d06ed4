"""LayerNorm over the last axis, with a learnable scale gamma (`weight`) and shift beta (`bias`).

Shapes
    x (..., D)   weight gamma (D,)   bias beta (D,)   y (..., D)
    per row (every index of the leading axes): mean mu, reciprocal std rstd, both (..., 1)

Forward, for one row x_1..x_D:
    mu    = (1/D) sum_i x_i
    var   = (1/D) sum_i (x_i - mu)^2               (biased, as in PyTorch)
    rstd  = 1 / sqrt(var + eps)                    eps keeps rstd finite for a constant row
    xhat_i = (x_i - mu) * rstd                     mean 0, variance 1 (up to eps)
    y_i   = gamma_i * xhat_i + beta_i

Backward. Let g_i = dL/dy_i.
    dL/dbeta_i  = sum over rows of g_i
    dL/dgamma_i = sum over rows of g_i * xhat_i
    dL/dxhat_i  = g_i * gamma_i                                          =: h_i
  xhat depends on x directly and through mu and rstd. Using
    d xhat_i / d x_j = rstd * (delta_ij - 1/D - xhat_i * xhat_j / D)
  (differentiate (x_i - mu) * rstd, with d mu/d x_j = 1/D and d rstd/d x_j = -rstd^2 * xhat_j / D),
    dL/dx_j = sum_i h_i * d xhat_i / d x_j
            = rstd * (h_j - mean_i(h_i) - xhat_j * mean_i(h_i * xhat_i))
  Only xhat and rstd are needed, so they are what forward keeps.

On the GPU, forward and the input gradient each run as one fused CuPy kernel (fused.py) with
these same formulas; tests/test_fused.py holds the two against each other.
"""
from .layer import Layer, Parameter
from .reductions import column_sum, row_mean
from ..backend import get_array_module, host, is_gpu_array


class LayerNorm(Layer):
    def __init__(self, dim, eps=1e-5, *, dtype="float32"):
        if int(dim) != dim or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.dim, self.eps = int(dim), float(eps)
        self.weight = Parameter(host.ones(self.dim, dtype=dtype))    # gamma
        self.bias = Parameter(host.zeros(self.dim, dtype=dtype))     # beta
        self.xhat = None   # normalised input (..., D), used later in backward
        self.rstd = None   # 1/sqrt(var + eps) per row (..., 1), used later in backward

    def forward(self, x):
        xp = get_array_module(x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"LayerNorm expects inputs whose last axis is dim={self.dim}, got shape {x.shape}")
        if is_gpu_array(x):                  # on the GPU these steps run as one fused kernel
            from ..fused import layernorm_forward
            y, self.xhat, self.rstd = layernorm_forward(x, self.weight.data, self.bias.data, self.eps)
            return y
        mu = row_mean(x)                                            # (..., 1)
        xhat = x - mu                                               # (..., D), centred for now
        var = row_mean(xhat * xhat)                                 # (..., 1)
        var += self.eps
        rstd = xp.sqrt(var, out=var)
        rstd = xp.divide(1.0, rstd, out=rstd)                       # (..., 1)
        xhat *= rstd                                                # (..., D), normalised
        self.xhat, self.rstd = xhat, rstd
        y = xhat * self.weight.data
        y += self.bias.data
        return y

    def backward(self, grad_out):
        xhat, rstd = self.xhat, self.rstd
        if is_gpu_array(grad_out):
            from ..fused import layernorm_backward
            grad_x, grad_gamma, grad_beta = layernorm_backward(grad_out, xhat, rstd, self.weight.data)
            self.weight.grad += grad_gamma
            self.bias.grad += grad_beta
            return grad_x
        # forward: y = xhat * gamma + beta
        self.bias.grad += column_sum(grad_out)
        self.weight.grad += column_sum(grad_out * xhat)
        grad_xhat = grad_out * self.weight.data                                  # h
        # forward: xhat = (x - mu) * rstd, with mu and rstd functions of x (see the docstring)
        mean_h_xhat = row_mean(grad_xhat * xhat)
        grad_x = grad_xhat - row_mean(grad_xhat)
        grad_x -= xhat * mean_h_xhat
        grad_x *= rstd
        return grad_x
