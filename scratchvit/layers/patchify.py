"""Patchify: cut images into non-overlapping square patches and flatten each one.

Forward
    images (B, C, H, W) with H = Hp·p and W = Wp·p  ->  patches (B, N, p·p·C),  N = Hp·Wp

    patches[b, i·Wp + j, (r·p + s)·C + c] = images[b, c, i·p + r, j·p + s]

Patches are numbered in row-major order over the (Hp, Wp) grid, and the pixels of one patch in
(row r, column s, channel c) order: the layout of `einops.rearrange(x, "b c (h p1) (w p2) ->
b (h w) (p1 p2 c)")` used by vit-pytorch. The whole thing is one reshape, one transpose, one reshape:

    images.reshape(B, C, Hp, p, Wp, p)         # split H into (Hp, p) and W into (Wp, p)
          .transpose(0, 2, 4, 3, 5, 1)         # -> (B, Hp, Wp, p, p, C)
          .reshape(B, Hp·Wp, p·p·C)

Backward
    Patchify only moves numbers, each input pixel to exactly one output slot, so its Jacobian is a
    permutation matrix and the backward pass is the inverse permutation: undo the three steps in
    reverse order. It has no parameters.
"""
from .layer import Layer


class Patchify(Layer):
    def __init__(self, patch_size):
        if int(patch_size) != patch_size or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
        self.patch_size = int(patch_size)
        self.image_shape = None   # (B, C, H, W) of the last forward input, used later in backward

    def forward(self, images):
        if images.ndim != 4:
            raise ValueError(f"Patchify expects images of shape (B, C, H, W), got shape {images.shape}")
        B, C, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image height {H} and width {W} must both be divisible by patch_size {p}")
        self.image_shape = images.shape
        Hp, Wp = H // p, W // p
        grid = images.reshape(B, C, Hp, p, Wp, p).transpose(0, 2, 4, 3, 5, 1)   # (B, Hp, Wp, p, p, C)
        return grid.reshape(B, Hp * Wp, p * p * C)                               # (B, N, p*p*C)

    def backward(self, grad_patches):
        B, C, H, W = self.image_shape
        p = self.patch_size
        Hp, Wp = H // p, W // p
        # forward: grid.reshape(B, N, p*p*C)  ->  back to the grid layout
        grad_grid = grad_patches.reshape(B, Hp, Wp, p, p, C)
        # forward: transpose(0, 2, 4, 3, 5, 1)  ->  the inverse permutation of the axes
        grad_split = grad_grid.transpose(0, 5, 1, 3, 2, 4)                      # (B, C, Hp, p, Wp, p)
        # forward: images.reshape(B, C, Hp, p, Wp, p)  ->  merge the axes again
        return grad_split.reshape(B, C, H, W)
