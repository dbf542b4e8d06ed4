"""The GPU twins: for each formula that has one, a CuPy kernel computing the same steps in fewer launches.

Why fuse. Each CuPy launch costs Python time on the host (argument parsing, type resolution, the
kernel cache look-up), and each plain array operation is one launch plus, usually, one temporary
array. A LayerNorm written with array operations (row mean, centring, square, row mean, add eps,
sqrt, reciprocal, scale, times gamma, plus beta) is about ten launches; on the small tensors of a ViT
the host's share, not the GPU's arithmetic, can set the step time (the README's GPU figures). A twin does the same arithmetic, in
the same order, in one launch (or two), and two products go to cuBLAS with its transpose flag where
CuPy would first copy a transposed operand.

| formula (math file)                          | GPU twin (this package)                               |
|----------------------------------------------|-------------------------------------------------------|
| layers/gelu.py  GELU                         | gelu.py  (gelu_forward, gelu_backward)                |
| layers/layernorm.py  LayerNorm               | layernorm.py  (layernorm_forward, layernorm_backward) |
| layers/softmax.py  softmax, softmax_backward | softmax.py  (softmax_forward, softmax_backward)       |
| layers/attention.py  MultiHeadSelfAttention  | attention.py  (split_qkv, merge_grad_qkv,             |
|                                              | transposed_product)                                   |
| layers/linear.py  Linear.backward            | linear.py  (add_transposed_product)                   |
| layers/dropout.py  Dropout, forward_add      | dropout.py  (dropout_forward, add_dropout_forward,    |
|                                              | add_dropout)                                          |
| layers/softmax_cross_entropy.py              | cross_entropy.py  (cross_entropy_forward, _backward)  |
| optim.py  AdamW step, grad norm, clipping    | adamw.py  (adamw_step, l2_norm, scale_to_max_norm)    |
| weight_average.py  WeightAverage update      | weight_average.py  (weight_average_update)            |
| data.py  shift_images                        | shift_images.py  (shift_images)                       |

compile.py compiles and caches the kernels and holds what they share (the warp reductions of the row
kernels, grid sizes, argument checks). Each twin registers itself for its formula (scratchvit/twins.py);
importing this package, as scratchvit/__init__.py does, registers them all and imports no CuPy.
tests/test_kernels.py holds every twin against its formula run by NumPy on host copies of the same
inputs; tests/test_fused_compiles.py compiles every kernel with NVRTC, GPU or not.
"""
from . import (adamw, attention, compile, cross_entropy, dropout, gelu, layernorm, linear, shift_images, softmax,
               weight_average)

__all__ = ["adamw", "attention", "compile", "cross_entropy", "dropout", "gelu", "layernorm", "linear",
           "shift_images", "softmax", "weight_average"]
