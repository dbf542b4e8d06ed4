"""Random affine augmentation: rotate, scale, shear and translate every image of a batch, batched,
with bilinear sampling written out, on NumPy or CuPy alike (the array module comes from the images).

The transform of one image
    Coordinates are (x, y) = (column, row) measured from the image's centre c = ((W-1)/2, (H-1)/2),
    with y pointing down as the rows do. A content point p of the input lands at

        q = A p + t,        A = R(angle) · Shear(shear) · scale,        t = (tx, ty) in pixels

        R(a)     = [[cos a,  sin a],      a positive angle turns the content counter-clockwise as the
                    [-sin a, cos a]]      image is displayed (rows down): +90° is numpy.rot90(k=1)
        Shear(s) = [[1, -tan s],          a positive shear slants vertical strokes: x' = x - y tan s,
                    [0,  1    ]]          so the top row moves right and the bottom row left

    Sampling runs the other way: output pixel q takes the input at p = A⁻¹ (q - t) (inverse
    mapping, so every output pixel gets exactly one value and no holes appear).

Bilinear sampling
    p = (px, py) rarely falls on a pixel. With x0 = floor(px), y0 = floor(py) and the fractions
    fx = px - x0, fy = py - y0, the value is the weighted mean of the four surrounding pixels:

        out = (1-fy)(1-fx) in[y0, x0] + (1-fy) fx in[y0, x0+1] + fy (1-fx) in[y0+1, x0] + fy fx in[y0+1, x0+1]

    A neighbour outside the image counts as `fill` (the background), so content rotated or shifted
    in from outside is blank, and a border pixel fades into the background instead of smearing.
    When p falls exactly on a pixel, fx = fy = 0 and the output is that pixel bit for bit: the
    identity and whole-pixel translations reproduce `data.shift_images` exactly.

Shapes: images (B, C, H, W); matrices (B, 2, 3), row b = [A⁻¹ | -A⁻¹ t] of image b, in pixels about
the centre; sampled coordinates (B, H, W); the output has the images' shape, dtype and device.

This is augmentation only: nothing differentiates through it, so there is no backward pass.
"""
import math

from .backend import get_array_module
from .data import BACKGROUND


def inverse_affine_matrices(angles, scales, shears, translations):
    """(B, 2, 3) host-or-device array of the sampling maps p = M[:, :2] q + M[:, 2] for B images.

    angles, shears: (B,) radians; scales: (B,) positive; translations: (B, 2) as (tx, ty) pixels,
    all on one device (the array module comes from `angles`). With A = R(angle) Shear(shear) scale
    (module docstring), M = [A⁻¹ | -A⁻¹ t]; A⁻¹ = scale⁻¹ Shear(shear)⁻¹ R(angle)⁻¹ in closed form:
        R⁻¹ = [[cos, -sin], [sin, cos]],   Shear⁻¹ = [[1, tan s], [0, 1]]
    """
    xp = get_array_module(angles)
    cos, sin, tan = xp.cos(angles), xp.sin(angles), xp.tan(shears)
    # Shear⁻¹ R⁻¹ / scale, row by row
    a = (cos + tan * sin) / scales
    b = (-sin + tan * cos) / scales
    c = sin / scales
    d = cos / scales
    tx, ty = translations[:, 0], translations[:, 1]
    matrices = xp.stack([xp.stack([a, b, -(a * tx + b * ty)], axis=1),
                         xp.stack([c, d, -(c * tx + d * ty)], axis=1)], axis=1)     # (B, 2, 3)
    return matrices


def affine_sample(images, matrices, fill=BACKGROUND):
    """Resample every image of (B, C, H, W) `images` through its (2, 3) map of (B, 2, 3) `matrices`
    (inverse_affine_matrices), bilinearly, with `fill` outside the image (module docstring)."""
    xp = get_array_module(images)
    batch, channels, height, width = images.shape
    if tuple(matrices.shape) != (batch, 2, 3):
        raise ValueError(f"matrices must have shape ({batch}, 2, 3) for {batch} images, got {tuple(matrices.shape)}")
    dtype = images.dtype
    matrices = xp.asarray(matrices, dtype=dtype)
    # 1. the output pixel grid about the centre, and where each output pixel samples the input
    qx = (xp.arange(width, dtype=dtype) - (width - 1) / 2)[None, None, :]          # (1, 1, W)
    qy = (xp.arange(height, dtype=dtype) - (height - 1) / 2)[None, :, None]        # (1, H, 1)
    m = matrices[:, :, :, None, None]                                             # (B, 2, 3, 1, 1)
    px = m[:, 0, 0] * qx + m[:, 0, 1] * qy + m[:, 0, 2] + (width - 1) / 2          # (B, H, W) input column
    py = m[:, 1, 0] * qx + m[:, 1, 1] * qy + m[:, 1, 2] + (height - 1) / 2         # (B, H, W) input row
    # 2. the four neighbours and the bilinear weights. The images get a one-pixel border of `fill`,
    #    and neighbour indices are clipped into [-1, W] x [-1, H]: a neighbour outside the image then
    #    reads the border, so each neighbour is one plain gather, without a mask
    x0, y0 = xp.floor(px), xp.floor(py)
    fx = (px - x0).reshape(batch, 1, -1)                                          # (B, 1, H·W) in [0, 1)
    fy = (py - y0).reshape(batch, 1, -1)
    x0, x1 = xp.clip(x0, -1, width).astype(xp.int32), xp.clip(x0 + 1, -1, width).astype(xp.int32)
    y0, y1 = xp.clip(y0, -1, height).astype(xp.int32), xp.clip(y0 + 1, -1, height).astype(xp.int32)
    padded = xp.full((batch, channels, height + 2, width + 2), fill, dtype=dtype)
    padded[:, :, 1:-1, 1:-1] = images
    padded = padded.reshape(-1)
    plane = (height + 2) * (width + 2)
    plane_start = (xp.arange(batch * channels, dtype=xp.int32) * plane).reshape(batch, channels, 1)   # (B, C, 1)

    def neighbour(rows, cols):
        """(B, C, H·W) padded-image values at (rows, cols) of shape (B, H, W), -1 and H (W) being the border."""
        return xp.take(padded, plane_start + ((rows + 1) * (width + 2) + cols + 1).reshape(batch, 1, -1))

    # 3. out = (1-fy) [(1-fx) in00 + fx in01] + fy [(1-fx) in10 + fx in11]
    top = (1 - fx) * neighbour(y0, x0) + fx * neighbour(y0, x1)
    bottom = (1 - fx) * neighbour(y1, x0) + fx * neighbour(y1, x1)
    sampled = (1 - fy) * top + fy * bottom
    return sampled.reshape(batch, channels, height, width).astype(dtype, copy=False)


def random_affine(images, generator, *, rotation=0.0, scale=0.0, shear=0.0, translate=0.0, fill=BACKGROUND):
    """Each image of (B, C, H, W) `images` through its own random affine transform, drawn uniformly:

        angle in [-rotation, rotation] degrees        shear in [-shear, shear] degrees
        scale in [1 - scale, 1 + scale]               tx, ty in [-translate, translate] · image size

    (torchvision's RandomAffine(degrees, translate, scale, shear) draws the same ranges.)
    `generator` is a NumPy or CuPy Generator on the images' device; all draws are one batched call.
    Returns `images` itself when every range is 0, else a new array of the same shape and dtype.
    """
    for name, value, upper in (("rotation", rotation, 180), ("scale", scale, 1), ("shear", shear, 90),
                               ("translate", translate, 1)):
        if not 0 <= value < upper:
            raise ValueError(f"{name} must be in [0, {upper}), got {value!r}")
    if not (rotation or scale or shear or translate):
        return images
    xp = get_array_module(images)
    batch, _, height, width = images.shape
    uniform = generator.random((batch, 5), dtype="float64") * 2 - 1                # (B, 5) in [-1, 1)
    matrices = inverse_affine_matrices(
        angles=uniform[:, 0] * math.radians(rotation),
        scales=1 + uniform[:, 1] * scale,
        shears=uniform[:, 2] * math.radians(shear),
        translations=uniform[:, 3:5] * (translate * xp.asarray([width, height], dtype="float64")))
    return affine_sample(images, matrices, fill)
