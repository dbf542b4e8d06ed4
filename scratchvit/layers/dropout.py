"""Dropout, inverted: in training, zero each element with probability p and scale the survivors.

Forward (training, 0 < p < 1), elementwise:
    keep ~ Bernoulli(1 - p)                   one draw per element, from the layer's generator
    mask = keep / (1 - p)                     so E[mask] = 1 and E[y] = x: no rescaling at test time
    y = x * mask
Forward (eval mode, or p = 0): y = x, the identity.

Backward: y is linear in x with the fixed coefficients `mask`, so
    dL/dx = dL/dy * mask                      (and dL/dx = dL/dy in eval mode)

Random state: the generator lives on the input's device (NumPy or CuPy), seeded by `seed`, and is
created at the first forward that draws. A dropout of p = 0 never draws, so it never has one: on
CuPy a generator is a cuRAND state for each of 2048 threads per multiprocessor, allocated and
initialised by a launch (cupy/random/_bit_generator.pyx:79-87), which a layer that draws nothing
should not pay for. For gradient checks, `fix_mask()` makes later forwards reuse the current mask,
so the function being differentiated stays the same; `release_mask()` undoes it.

`forward_add(x, residual)` is `residual + forward(x)`, the residual add that follows a branch's
dropout in a Transformer block: the same mask, drawn the same way and kept for the same backward
(d/dx = mask, d/dresidual = 1, which the caller adds). With overwrite=True the sum may be written
into x, the caller's own temporary (a branch's output that no layer keeps). On the GPU (kernels/dropout.py) mask and
sum come from one launch (plus the uniform draw) instead of forward's launch and an add.
"""
from .layer import Layer
from ..backend import get_array_module, random_generator


class Dropout(Layer):
    def __init__(self, p, *, seed=0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.seed = seed
        self.generator = None     # created on the input's device at the first forward
        self.generator_xp = None  # the array module the generator draws on
        self.mask_fixed = False
        self.mask = None          # keep / (1 - p), used later in backward

    def reseed(self, xp, seed, make_generator=random_generator):
        """A fresh generator on xp's device (NumPy or CuPy), `make_generator(xp, seed)`; none for p = 0,
        which draws nothing (its seed is kept, for a p set later)."""
        self.seed = seed
        if self.p > 0.0:
            self.use_generator(xp, make_generator(xp, seed))
        else:
            self.generator, self.generator_xp = None, None

    def use_generator(self, xp, generator):
        """Draw the masks from `generator`, which draws on xp's device (a resumed run's restored one)."""
        self.generator, self.generator_xp = generator, xp

    def fix_mask(self):
        """Reuse the current mask (drawn at the next forward if there is none) until release_mask()."""
        self.mask_fixed = True

    def release_mask(self):
        self.mask_fixed = False

    def active(self):
        return self.training and self.p > 0.0

    def _needs_new_mask(self, x):
        """Whether a forward on x draws a new mask (else it reuses the fixed one); if so, makes sure the
        generator lives on x's device."""
        if self.mask_fixed and self.mask is not None and self.mask.shape == x.shape:
            return False
        xp = get_array_module(x)
        if self.generator is None or self.generator_xp is not xp:
            self.reseed(xp, self.seed)
        return True

    def forward(self, x):
        if not self.active():
            return x
        if self._needs_new_mask(x):
            keep = self.generator.random(x.shape, dtype=x.dtype) >= self.p
            self.mask = keep.astype(x.dtype) * (1.0 / (1.0 - self.p))
        return x * self.mask

    def forward_add(self, x, residual, *, overwrite=False):
        """residual + forward(x), the mask drawn (or reused) exactly as forward does; with overwrite=True
        the sum may be computed in the memory of x (the caller's temporary)."""
        y = self.forward(x)
        if y is x and not overwrite:         # inactive: forward(x) is x itself, which must stay as it is
            return residual + x
        y += residual
        return y

    def backward(self, grad_out):
        if not self.active():
            return grad_out
        return grad_out * self.mask
