"""The array module: NumPy on the CPU, CuPy on the GPU, chosen and moved between here.

What a layer, the optimizer or the data pipeline needs to run on either device, so no layer file
imports NumPy or CuPy for array math:

- which module an array belongs to (`get_array_module`, like `cupy.get_array_module`);
- seedable random generators on an array's device (`random_generator`), and one whose state a
  checkpoint can hold on CuPy too (`ReplayableGenerator`);
- host <-> device transfer (`Backend.asarray`, `to_host`);
- waiting for the device (`Backend.synchronize`);
- choosing the device (`get_backend`); whether the GPU can be used at all is cupy_check.py's
  question (CuPy installed, a CUDA device visible, kernels compile and run), asked once per process.

Layers take the array module from their input or their parameters, never from a global switch:

    xp = get_array_module(x)        # numpy for a numpy array, cupy for a cupy array

so the same layer code runs on either device, and a GPU run cannot silently fall back to the CPU.
"""
import sys

import numpy

from .cupy_check import cupy_or_error


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


class ReplayableGenerator:
    """A seeded generator on xp's device whose state is its seed and the draws made from it.

    CuPy's Generator has no state to read or write: its cuRAND states are a private device array
    (`bit_generator._state`, cupy/random/_bit_generator.pyx:79-84), one curandState per thread for 2048
    threads per multiprocessor (so its size depends on the GPU); Generator has no state attribute
    (cupy/random/_generator_api.pyx:81-107), and BitGenerator's `state()` returns only the raw device
    pointer, with no setter (_bit_generator.pyx:118-120). So this wrapper
    records the draws instead, run-length encoded (`[method, arguments, times]`), and `replayed` makes
    the same calls on a freshly seeded generator: each CuPy draw launches one kernel whose threads
    advance their states by what that call draws (`_launch_dist`, _generator_api.pyx:1068-1073), so the
    same calls in the same order leave the same state. The state is a small JSON-ready dict; a resume
    replays the epoch's draws so far (one launch each, no training) and then continues them. CuPy's
    numbers depend on the thread count, so the continuation is exact on a GPU with as many
    multiprocessors as the one that wrote the checkpoint, and a fresh, non-repeating stream elsewhere.

    Only the two draws this project makes on the device are offered, so a new kind of draw cannot
    escape the record: `random(size, dtype)` and `integers(low, high, size)`."""

    def __init__(self, xp, seed):
        self.xp, self.seed = xp, int(seed)
        self.generator = xp.random.default_rng(self.seed)
        self.draws = []             # [[method, arguments, times]]: the calls made so far, in order

    def _record(self, method, arguments):
        if self.draws and self.draws[-1][0] == method and self.draws[-1][1] == arguments:
            self.draws[-1][2] += 1
        else:
            self.draws.append([method, arguments, 1])

    @staticmethod
    def _size(size):
        return None if size is None else [int(n) for n in ((size,) if isinstance(size, int) else size)]

    def random(self, size=None, dtype="float64"):
        arguments = [self._size(size), str(numpy.dtype(dtype))]
        self._record("random", arguments)
        return self._draw("random", arguments)

    def integers(self, low, high=None, size=None):
        arguments = [int(low), None if high is None else int(high), self._size(size)]
        self._record("integers", arguments)
        return self._draw("integers", arguments)

    def _draw(self, method, arguments):
        if method == "random":
            size, dtype = arguments
            return self.generator.random(None if size is None else tuple(size), dtype=dtype)
        low, high, size = arguments
        return self.generator.integers(low, high, size=None if size is None else tuple(size))

    def state(self):
        """{"seed", "draws"}: JSON-ready, and all `replayed` needs."""
        return dict(seed=self.seed, draws=[[method, list(arguments), times] for method, arguments, times in self.draws])

    @classmethod
    def replayed(cls, xp, state):
        """A generator on xp's device that has drawn what `state` records: the next draw is the one the
        recorded generator would make next."""
        generator = cls(xp, state["seed"])
        for method, arguments, times in state["draws"]:
            for _ in range(times):
                generator._draw(method, arguments)
        generator.draws = [[method, list(arguments), times] for method, arguments, times in state["draws"]]
        return generator


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
