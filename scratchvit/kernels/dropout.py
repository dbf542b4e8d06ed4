"""Dropout's GPU twin: forward and forward_add (the residual add after dropout) of layers/dropout.py,
the mask and the output written by one elementwise launch after the uniform draw.

Steps (layers/dropout.py's docstring):
    keep = u >= p  (u uniform in [0, 1), drawn by the layer's generator);   mask = keep / (1 - p)
    forward      y = x * mask
    forward_add  y = residual + x * mask          (the mask kept for backward, which stays the layer's)
"cuRAND" is the uniform draw `generator.random(shape, dtype)` of a CuPy Generator: one launch of
CuPy's cuRAND-device kernel (cupy/random/_generator_api.pyx, `Generator.random` -> `_launch_dist`).
"""
from .compile import define_kernels, elementwise_kernel, float_dtype
from ..layers.dropout import Dropout
from ..twins import register_gpu_twin

define_kernels(elementwise={
    # dropout.py forward: keep = u >= p;  mask = keep * (1 / (1 - p));  y = x * mask
    "scratchvit_dropout_forward": (
        "T x, T u, T p, T scale",
        "T mask, T y",
        "mask = (u >= p) ? scale : (T)0;\n"
        "y = x * mask;\n",
    ),
    # a residual add after dropout with a given mask: y = x + h * mask
    "scratchvit_add_dropout": (
        "T x, T h, T mask",
        "T y",
        "y = x + h * mask;\n",
    ),
    # residual add after dropout, the mask drawn in the same launch: y = x + h * mask
    "scratchvit_add_dropout_forward": (
        "T x, T h, T u, T p, T scale",
        "T mask, T y",
        "mask = (u >= p) ? scale : (T)0;\n"
        "y = x + h * mask;\n",
    ),
})


def _uniforms(x, p, generator, uniforms):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    if (generator is None) == (uniforms is None):
        raise ValueError("give exactly one of generator (a CuPy Generator) and uniforms (an array like x)")
    if uniforms is None:
        uniforms = generator.random(x.shape, dtype=x.dtype)   # the draw Dropout.forward makes
    elif uniforms.shape != x.shape:
        raise ValueError(f"uniforms must have x's shape {x.shape}, got {uniforms.shape}")
    return uniforms


def dropout_forward(x, p, generator=None, *, uniforms=None):
    """Inverted dropout: returns (y, mask), mask = (u >= p) / (1 - p) and y = x * mask, written by one
    elementwise launch, as `layers.Dropout.forward` computes them.

    u are uniforms in [0, 1) of x's shape and dtype: drawn here as `generator.random(x.shape, dtype=x.dtype)`
    (a second launch, inside cuRAND), the very draw Dropout.forward makes, so the same seeded generator
    gives the same mask; or given as `uniforms`."""
    float_dtype(x)
    u = _uniforms(x, p, generator, uniforms)
    float_dtype(x, u)
    mask, y = elementwise_kernel("scratchvit_dropout_forward")(x, u, float(p), 1.0 / (1.0 - p))
    return y, mask


def add_dropout(x, h, mask):
    """x + h * mask in one launch: a residual add after dropout with a known mask (`x + h * mask`)."""
    float_dtype(x, h, mask)
    return elementwise_kernel("scratchvit_add_dropout")(x, h, mask)


def add_dropout_forward(x, h, p, generator=None, *, uniforms=None):
    """A residual add after inverted dropout: returns (y, mask), y = x + h * mask with mask drawn as in
    `dropout_forward` (uniforms of h's shape), mask and y written by one launch: `x + Dropout.forward(h)`."""
    float_dtype(x, h)
    u = _uniforms(h, p, generator, uniforms)
    float_dtype(h, u)
    mask, y = elementwise_kernel("scratchvit_add_dropout_forward")(x, h, u, float(p), 1.0 / (1.0 - p))
    return y, mask


@register_gpu_twin(Dropout.forward)
def forward_on_gpu(layer, x):
    if not layer.active():
        return x
    if layer._needs_new_mask(x):
        y, layer.mask = dropout_forward(x, layer.p, layer.generator)
        return y
    return x * layer.mask


@register_gpu_twin(Dropout.forward_add)
def forward_add_on_gpu(layer, x, residual, *, overwrite=False):
    if not layer.active():                   # the identity, then the add (in x, the caller's temporary, if allowed)
        if not overwrite:
            return residual + x
        x += residual
        return x
    if layer._needs_new_mask(x):             # the very draw of dropout_forward: same generator, same mask
        y, layer.mask = add_dropout_forward(residual, x, layer.p, layer.generator)
        return y
    return add_dropout(residual, x, layer.mask)
