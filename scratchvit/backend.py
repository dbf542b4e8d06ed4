"""The array-module abstraction: NumPy on the CPU, CuPy on the GPU.

Everything that differs between NumPy and CuPy lives here, so no layer file imports either:

- which module an array belongs to (`get_array_module`, like `cupy.get_array_module`);
- seedable random generators on an array's device (`random_generator`);
- host <-> device transfer (`Backend.asarray`, `to_host`);
- waiting for the device (`Backend.synchronize`).

Layers take the array module from their input or their parameters, never from a global switch:

    xp = get_array_module(x)        # numpy for a numpy array, cupy for a cupy array

so the same layer code runs on either device, and a GPU run cannot silently fall back to the CPU.
"""
import sys

import numpy

host = numpy   # the host's array module: weights are created here, then moved with Backend.asarray

GPU_INSTALL_HINT = 'pip install "scratchvit[gpu]" (CuPy for CUDA 12; see the README for other CUDA versions)'


class BackendUnavailable(RuntimeError):
    """The requested device cannot be used here; the message is one line saying why and what to install."""


def get_array_module(*arrays):
    """numpy, or cupy if any of `arrays` is a CuPy array."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return numpy


def is_gpu_array(array):
    return get_array_module(array) is not numpy


def to_host(array):
    """A NumPy copy (or the array itself) of a NumPy or CuPy array."""
    if is_gpu_array(array):
        return array.get()
    return numpy.asarray(array)


def random_generator(xp, seed=None):
    """A seedable random generator that draws arrays on xp's device.

    Both NumPy's and CuPy's generators offer `.random(shape, dtype=...)` and
    `.standard_normal(shape, dtype=...)`, the two draws this project makes on the device.
    """
    return xp.random.default_rng(seed)


def host_generator(seed=None):
    """A NumPy generator on the host: weights are drawn here, so CPU and GPU runs start identical."""
    return numpy.random.default_rng(seed)


class Backend:
    """One device: `name` is "cpu" or "gpu", `xp` is numpy or cupy."""

    def __init__(self, name, xp):
        self.name = name
        self.xp = xp

    def asarray(self, array, dtype=None):
        """Move (copy if needed) a host or device array onto this backend's device."""
        if self.xp is numpy:
            return numpy.asarray(to_host(array), dtype=dtype)
        return self.xp.asarray(array, dtype=dtype)

    def random_generator(self, seed=None):
        return random_generator(self.xp, seed)

    def synchronize(self):
        """Wait until the device has finished its queued work (a no-op on the CPU)."""
        if self.xp is not numpy:
            self.xp.cuda.get_current_stream().synchronize()

    def __repr__(self):
        return f"Backend({self.name!r})"


def cupy_or_error():
    """Import CuPy and check a CUDA device is visible, or raise BackendUnavailable with a one-line message."""
    try:
        import cupy
    except ImportError:
        raise BackendUnavailable(f"the GPU backend needs CuPy, which is not installed: {GPU_INSTALL_HINT}") from None
    try:
        device_count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDA driver missing or broken: CuPy raises its own runtime errors
        raise BackendUnavailable(f"CuPy is installed but no CUDA device is usable ({error}); "
                                 "check the NVIDIA driver, or run on the CPU") from None
    if device_count == 0:
        raise BackendUnavailable("CuPy is installed but no CUDA device is visible; run on the CPU") from None
    return cupy


def get_backend(name="cpu"):
    """The backend for "cpu" (NumPy) or "gpu" (CuPy). A Backend passes through unchanged."""
    if isinstance(name, Backend):
        return name
    if name == "cpu":
        return Backend("cpu", numpy)
    if name == "gpu":
        return Backend("gpu", cupy_or_error())
    raise ValueError(f"device must be 'cpu' or 'gpu', got {name!r}")


def backend_of(array):
    """The Backend an array lives on."""
    xp = get_array_module(array)
    return Backend("cpu" if xp is numpy else "gpu", xp)
