"""scratchvit: a Vision Transformer from scratch in NumPy (CPU) and CuPy (GPU), every backward pass by hand."""
from .backend import get_backend
from .vit import ViT
from . import kernels    # registers the GPU twins (scratchvit/twins.py); imports no CuPy
from .pretrained import PRETRAINED_PATH, pretrained_provenance

__version__ = "0.1.0"
__all__ = ["PRETRAINED_PATH", "ViT", "get_backend", "load_pretrained", "pretrained_provenance", "__version__"]


def load_pretrained(device="cpu"):
    """The model shipped in the package, in eval mode on `device` ("cpu" or "gpu"): predict.load_pretrained.
    Its provenance (command, seed, commit, machine, accuracy): pretrained_provenance()."""
    # imported here, not above: `python -m scratchvit.predict` must be the first to import predict
    from .predict import load_pretrained as load_shipped
    return load_shipped(device)
