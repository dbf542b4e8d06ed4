"""The layers of a Vision Transformer, each with a hand-written forward and backward pass.

| layer                    | file                         | GPU twin (scratchvit/kernels/)         |
|--------------------------|------------------------------|----------------------------------------|
| Parameter, Layer (base)  | layer.py                     | (the dispatch to the twins)            |
| Patchify                 | patchify.py                  |                                        |
| Linear                   | linear.py                    | linear.py (backward)                   |
| LayerNorm                | layernorm.py                 | layernorm.py                           |
| GELU                     | gelu.py                      | gelu.py                                |
| Dropout                  | dropout.py                   | dropout.py (forward, forward_add)      |
| softmax (shared)         | softmax.py                   | softmax.py                             |
| row and column sums      | reductions.py                |                                        |
| MultiHeadSelfAttention   | attention.py                 | attention.py                           |
| SoftmaxCrossEntropy      | softmax_cross_entropy.py     | cross_entropy.py                       |
"""
from .layer import Layer, Parameter
from .patchify import Patchify
from .linear import Linear
from .layernorm import LayerNorm
from .gelu import GELU
from .dropout import Dropout
from .softmax import softmax, softmax_backward, softmax_simple
from .attention import MultiHeadSelfAttention
from .softmax_cross_entropy import SoftmaxCrossEntropy

__all__ = ["Layer", "Parameter", "Patchify", "Linear", "LayerNorm", "GELU", "Dropout",
           "MultiHeadSelfAttention", "SoftmaxCrossEntropy", "softmax", "softmax_backward", "softmax_simple"]
