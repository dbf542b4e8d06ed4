"""Tools that need a checkout of the repository rather than an installed scratchvit: the GPU acceptance
run (gpu_acceptance.py) and the PyTorch reference ViT (torch_reference.py). Run from the checkout."""
