"""scratchvit: a Vision Transformer from scratch in NumPy (CPU) and CuPy (GPU), every backward pass by hand."""
from .backend import get_backend
from .vit import ViT
from . import kernels    # registers the GPU twins (scratchvit/twins.py); imports no CuPy

__version__ = "0.1.0"
__all__ = ["ViT", "get_backend", "__version__"]
