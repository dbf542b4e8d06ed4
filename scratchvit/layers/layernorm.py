"""LayerNorm over the last axis, with a learnable scale gamma (`weight`) and shift beta (`bias`).

Shapes
    x (..., D)   weight gamma (D,)   bias beta (D,)   y (..., D)
    per row (every index of the leading axes): mean mu, reciprocal std rstd, both (..., 1)

Forward, for one row x_1..x_D, in numbered steps:
    (1) mu     = (1/D) sum_i x_i
    (2) xc_i   = x_i - mu                             centred
    (3) var    = (1/D) sum_i xc_i^2                   (biased, as in PyTorch)
    (4) rstd   = (var + eps)^(-1/2)                   eps keeps rstd finite for a constant row
    (5) xhat_i = xc_i * rstd                          mean 0, variance 1 (up to eps)
    (6) y_i    = gamma_i * xhat_i + beta_i

Backward, the same steps in reverse, with g_i = dL/dy_i (sums over i run over the row):
    (6) dL/dbeta_i  = sum over rows of g_i,   dL/dgamma_i = sum over rows of g_i * xhat_i
        h_i := dL/dxhat_i = g_i * gamma_i
    (5) xhat = xc * rstd:   g_xc_i = h_i * rstd (directly),   g_rstd = sum_i h_i * xc_i
    (4) g_var = g_rstd * (-1/2) (var + eps)^(-3/2) = -(1/2) rstd^3 * g_rstd
    (3) var = mean(xc^2):   g_xc_i += g_var * 2 xc_i / D
        Substituting xc = xhat / rstd, (5)-(3) together give
        g_xc_i = rstd * (h_i - xhat_i * mean_i(h_i * xhat_i))
    (2) xc = x - mu:   g_x_i = g_xc_i,   g_mu = -sum_i g_xc_i
    (1) mu = mean(x):  g_x_i += g_mu / D,  that is  g_x = g_xc - mean(g_xc)
  In all:  dL/dx_j = rstd * (h_j - mean_i(h_i) - xhat_j * mean_i(h_i * xhat_i)).
  Only xhat and rstd are needed, so they are what forward keeps.

On the GPU, forward and the input gradient each run as one CuPy kernel (the twins in
kernels/layernorm.py) with these same formulas; tests/test_kernels.py holds the two against each other.
"""
import numpy

from .layer import Layer, Parameter, check_same_device
from .reductions import column_sum, row_mean
from ..backend import get_array_module


class LayerNorm(Layer):
    def __init__(self, dim, eps=1e-5, *, dtype="float32"):
        if int(dim) != dim or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.dim, self.eps = int(dim), float(eps)
        # created on the host, as every parameter is; Layer.to moves them to the GPU
        self.weight = Parameter(numpy.ones(self.dim, dtype=dtype))    # gamma
        self.bias = Parameter(numpy.zeros(self.dim, dtype=dtype))     # beta
        self.xhat = None   # normalised input (..., D), used later in backward
        self.rstd = None   # 1/sqrt(var + eps) per row (..., 1), used later in backward

    def check_input(self, x):
        """ValueError, one line, unless x is (..., dim) on the parameters' device."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"LayerNorm expects inputs whose last axis is dim={self.dim}, got shape {x.shape}")
        check_same_device("LayerNorm", x, self.weight)

    def forward(self, x):
        xp = get_array_module(x)
        self.check_input(x)
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
        # (6) y = xhat * gamma + beta
        grad_out_xhat = grad_out * xhat                                          # g * xhat
        self.bias.grad += column_sum(grad_out)                                   # dL/dbeta
        self.weight.grad += column_sum(grad_out_xhat)                            # dL/dgamma
        grad_xc = grad_out * self.weight.data                                    # h = dL/dxhat
        # (5)-(3) xhat = xc * rstd, rstd = (var + eps)^(-1/2), var = mean(xc^2):
        #   g_xc / rstd = h - xhat * mean(h * xhat), and mean(h * xhat) = (g * xhat) @ gamma / D
        mean_h_xhat = (grad_out_xhat @ self.weight.data)[..., None]
        mean_h_xhat *= 1.0 / self.dim
        grad_xc -= xhat * mean_h_xhat
        # (2), (1) xc = x - mu, mu = mean(x):  g_x = g_xc - mean(g_xc)
        grad_xc -= row_mean(grad_xc)
        grad_xc *= rstd                                                          # the factor rstd of g_xc
        return grad_xc
