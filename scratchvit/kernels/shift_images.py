"""shift_images' GPU twin: data.shift_images, each output pixel computing its source pixel itself.

Step (data.shift_images' docstring):
    shifted[b, c, y, x] = images[b, c, y - dy, x - dx]   where that pixel exists, else fill;  (dy, dx) = shifts[b]
"""
from .compile import cupy_module, define_kernels, elementwise_kernel, on_device
from .. import data
from ..twins import register_gpu_twin

define_kernels(elementwise={
    # data.py shift_images: shifted[b, c, y, x] = images[b, c, y - dy, x - dx] where that pixel exists,
    # else fill, (dy, dx) = shifts[b]. `i` is the C-order index into the (B, C, H, W) output:
    # x = i mod W, then y, then image = b*C + c, whose plane starts at image * H * W in `images`.
    "scratchvit_shift_images": (
        "raw T images, raw int64 shifts, int64 height, int64 width, int64 channels, T fill",
        "T shifted",
        "const long long x = i % width;\n"
        "const long long rows_before = i / width;\n"
        "const long long y = rows_before % height;\n"
        "const long long image = rows_before / height;\n"
        "const long long b = image / channels;\n"
        "const long long source_y = y - shifts[2 * b];\n"
        "const long long source_x = x - shifts[2 * b + 1];\n"
        "if (source_y >= 0 && source_y < height && source_x >= 0 && source_x < width) {\n"
        "    shifted = images[(image * height + source_y) * width + source_x];\n"
        "} else {\n"
        "    shifted = fill;\n"
        "}\n",
    ),
})


def shift_images(images, shifts, fill):
    """`data.shift_images` in one launch: image b of (B, C, H, W) `images` translated by the integers
    shifts[b] = (dy, dx), pixels from outside the image set to `fill` (cast to the images' dtype).

    The plain version is one gather with computed indices: in CuPy, index arithmetic, broadcasting
    and a take for its four index arrays, then a mask and a where (cupy/_core/_routines_indexing.pyx,
    `_getitem_multiple`), each a launch of its own; here each output pixel computes its source pixel
    itself. Copies pixels exactly."""
    cupy = cupy_module()
    on_device(cupy, images=images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {images.shape}")
    batch, channels, height, width = images.shape
    shifts = cupy.ascontiguousarray(cupy.asarray(shifts), dtype=cupy.int64)   # uploaded if on the host
    if shifts.shape != (batch, 2):
        raise ValueError(f"shifts must have shape ({batch}, 2) (dy, dx per image), got {shifts.shape}")
    images = cupy.ascontiguousarray(images)
    shifted = cupy.empty(images.shape, dtype=images.dtype)
    if shifted.size:
        elementwise_kernel("scratchvit_shift_images")(images, shifts, height, width, channels,
                                                images.dtype.type(fill), shifted)
    return shifted


@register_gpu_twin(data.shift_images)
def shift_images_on_gpu(images, shifts, fill=data.BACKGROUND):
    return shift_images(images, shifts, fill)
