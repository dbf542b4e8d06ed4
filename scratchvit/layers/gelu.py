"""GELU, the Gaussian error linear unit, in its tanh form (PyTorch's `gelu(x, approximate="tanh")`).

Exact GELU is x * Phi(x), Phi the standard normal CDF, which needs erf. Its tanh approximation,
used by GPT-2 and BERT, needs only tanh and matches the exact form to within 1e-3:

Forward, elementwise (x and y of any shape, the same one):
    u = c * (x + a * x^3)          c = sqrt(2/pi),  a = 0.044715
    t = tanh(u)
    y = 0.5 * x * (1 + t)

Backward, elementwise, by the product and chain rules:
    dy/dx = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * du/dx,     du/dx = c * (1 + 3a * x^2)
    dL/dx = dL/dy * dy/dx
  Forward keeps x and t.

On the GPU, forward and backward each run as one CuPy kernel (its twin, kernels/gelu.py) computing
these same formulas; tests/test_kernels.py holds the two against each other.

Speed note: `x ** 3` with an integer power is a slow general power in NumPy; x^3 is computed as
x * x * x, and c * (x + a x^3) as x * (c + c*a * x*x).
"""
import math

from .layer import Layer
from ..backend import get_array_module

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC_COEFFICIENT = 0.044715


class GELU(Layer):
    approximate = "tanh"   # what PyTorch calls this form: torch.nn.functional.gelu(x, approximate="tanh")

    def __init__(self):
        self.x = None   # input, used later in backward
        self.t = None   # tanh(u), used later in backward

    def forward(self, x):
        xp = get_array_module(x)
        u = x * x
        u *= SQRT_2_OVER_PI * CUBIC_COEFFICIENT
        u += SQRT_2_OVER_PI
        u *= x                                                   # u = c * (x + a x^3)
        t = xp.tanh(u)
        self.x, self.t = x, t
        y = t + 1.0
        y *= 0.5 * x                                             # y = 0.5 x (1 + t)
        return xp.asarray(y)                                     # an array even for a 0-d input

    def backward(self, grad_out):
        x, t = self.x, self.t
        xp = get_array_module(x)                                 # what forward kept: grad_out may be a number
        # forward: u = c * (x + a x^3)  ->  du/dx = c * (1 + 3a x^2)
        dy_dx = x * x
        dy_dx *= 3.0 * SQRT_2_OVER_PI * CUBIC_COEFFICIENT
        dy_dx += SQRT_2_OVER_PI                                  # du/dx
        # forward: y = 0.5 x (1 + t), t = tanh(u)  ->  dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx
        dy_dx *= x
        dy_dx *= 1.0 - t * t
        dy_dx += 1.0 + t
        dy_dx *= 0.5 * grad_out
        return xp.asarray(dy_dx)
