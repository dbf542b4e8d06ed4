"""The array-module abstraction: NumPy on the CPU, CuPy on the GPU.

Everything that differs between NumPy and CuPy lives here, so no layer file imports either:

- which module an array belongs to (`get_array_module`, like `cupy.get_array_module`);
- seedable random generators on an array's device (`random_generator`), and one whose state a
  checkpoint can hold on CuPy too (`ReplayableGenerator`);
- host <-> device transfer (`Backend.asarray`, `to_host`);
- waiting for the device (`Backend.synchronize`);
- whether the GPU can be used at all (`get_backend("gpu")`, through `cupy_or_error`): CuPy installed,
  a CUDA device visible, and CuPy able to compile and run kernels there, checked once per process.

Layers take the array module from their input or their parameters, never from a global switch:

    xp = get_array_module(x)        # numpy for a numpy array, cupy for a cupy array

so the same layer code runs on either device, and a GPU run cannot silently fall back to the CPU.
"""
import ctypes
import sys

import numpy

host = numpy   # the host's array module: weights are created here, then moved with Backend.asarray

# Both extras bring CuPy 14 with NVIDIA's CUDA components from pip (runtime, NVRTC and its headers,
# cuBLAS, ...), so only the driver is needed; `nvidia-smi` shows which CUDA version the driver supports.
GPU_INSTALL_HINT = ('pip install "scratchvit[gpu]" for CUDA 12 drivers or "scratchvit[gpu-cuda13]" for CUDA 13 '
                    "(CuPy with NVIDIA's CUDA components)")


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


def keep_freed_host_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same large temporaries (a few MB each) every step.
    By default glibc returns freed memory at the top of the heap to the OS and serves big requests
    with fresh mmap()s, so every step page-faults all of that memory in again: on a small ViT this
    costs a fifth of the CPU step time, most of it in LayerNorm. With these settings freed memory
    stays in the process (the heap grows to the step's peak and stays: about 190 MiB of temporaries
    at batch 128, 95 MiB at batch 64, as `python -m scratchvit.bench` reports).
    Called by the training loop and the benchmark on the CPU; the library does not call it on
    import. Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 256 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30)
                and mallopt(M_TOP_PAD, 64 << 20))


_blas_thread_limiter = []   # [function or None], found once


def _find_blas_thread_limiter():
    """OpenBLAS's `openblas_set_num_threads_local` (OpenBLAS >= 0.3.27, as in NumPy's own wheels), or None."""
    import glob
    import os
    package = os.path.dirname(numpy.__file__)
    candidates = glob.glob(os.path.join(package, "..", "numpy.libs", "*openblas*"))
    candidates += glob.glob(os.path.join(package, ".dylibs", "*openblas*"))
    for path in candidates:
        try:
            return getattr(ctypes.CDLL(path), "openblas_set_num_threads_local")
        except (OSError, AttributeError):
            continue
    return None


def can_limit_blas_threads():
    """True where `limit_blas_to_one_thread_here` works (NumPy on OpenBLAS >= 0.3.27)."""
    if not _blas_thread_limiter:
        _blas_thread_limiter.append(_find_blas_thread_limiter())
    return _blas_thread_limiter[0] is not None


def limit_blas_to_one_thread_here():
    """Make BLAS calls from the calling thread use one thread, leaving other threads' setting alone.

    Worker threads that each compute on part of a batch call this, so that two workers on two cores
    do not each start a BLAS thread pool of two (four busy threads on two cores is far slower).
    """
    limit_blas_threads_here(1)


def limit_blas_threads_here(count):
    """Make BLAS calls from the calling thread use at most `count` threads (other threads keep theirs).

    An MPI rank calls this on its main thread with its share of the node's cores (distributed.py), so
    that two ranks on two cores do not each run a BLAS pool as wide as the machine."""
    if not can_limit_blas_threads():
        raise RuntimeError("this NumPy's BLAS cannot limit its threads per calling thread")
    _blas_thread_limiter[0](int(count))


_kernel_check = {}   # {"cupy": the module checked, "failure": None or the one-line reason}: one check per process

# The two kinds of kernel scratchvit/fused.py builds. CuPy compiles them differently: an ElementwiseKernel's
# source is wrapped in CuPy's own headers, which include the CUDA toolkit's (cuda_fp16.h), while a
# RawKernel is compiled as written. So one can compile where the other cannot, and both are tried.
_PROBE_ELEMENTWISE = ("T x", "T y", "y = x + 1", "scratchvit_probe_add_one")
_PROBE_RAW_NAME = "scratchvit_probe_double"   # y = 2 x, one thread per element
_PROBE_RAW_SOURCE = r"""
extern "C" __global__ void scratchvit_probe_double(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2.0f * x[i];
}
"""


def _kernel_check_failure(cupy):
    """None if CuPy compiles and runs a tiny ElementwiseKernel and RawKernel correctly, else why not (one line).

    What fails here when CuPy's CUDA components are incomplete, as CuPy 13.6 and 14.2 raise it:
    - NVRTC's library not found: RuntimeError "CuPy failed to load libnvrtc.so.12: ..." (CuPy 13,
      cupy_backends/cuda/_softlink.pyx) or cuda.pathfinder's DynamicLibNotFoundError, a RuntimeError
      (CuPy 14, cupy_backends/cuda/libs/_cnvrtc.pxi);
    - the CUDA headers not found: RuntimeError "Failed to find CUDA headers. ..." (CuPy 14) or "Failed to
      auto-detect CUDA root directory. ..." (CuPy 13), both from cupy/_core/core.pyx; or, where CuPy 13
      takes a folder without headers for the toolkit, NVRTC's own error, cupy.cuda.compiler.CompileException
      '...carray.cuh(57): catastrophic error: cannot open source file "cuda_fp16.h"';
    - loading or launching on the device: CUDADriverError (cupy_backends/cuda/api/driver.pyx) or
      CUDARuntimeError (runtime.pyx), both RuntimeErrors;
    - the on-disk kernel cache (~/.cupy/kernel_cache) not writable: OSError.
    Any other exception is a bug here, not a property of the machine, and propagates.
    """
    numpy_x = numpy.arange(8, dtype=numpy.float32)
    try:
        x = cupy.asarray(numpy_x)
        add_one = cupy.ElementwiseKernel(*_PROBE_ELEMENTWISE)
        plus_one = cupy.asnumpy(add_one(x))
        double = cupy.RawKernel(_PROBE_RAW_SOURCE, _PROBE_RAW_NAME)
        doubled = cupy.empty_like(x)
        double((2,), (4,), (x, doubled, numpy.int32(x.size)))   # 2 blocks of 4 threads: one per element
        doubled = cupy.asnumpy(doubled)
    except (cupy.cuda.compiler.CompileException, RuntimeError, OSError) as error:
        return (f"CuPy {cupy.__version__} cannot compile and run GPU kernels here "
                f"({type(error).__name__}: {_first_line(error)}): {_kernel_failure_fix(cupy, error)}")
    if not (numpy.array_equal(plus_one, numpy_x + 1) and numpy.array_equal(doubled, 2 * numpy_x)):
        return (f"CuPy {cupy.__version__} compiled test kernels, but the GPU returned wrong results "
                f"(x + 1 gave {plus_one.tolist()}, 2 x gave {doubled.tolist()} for x = {numpy_x.tolist()}); "
                "check the NVIDIA driver and the GPU, or run on the CPU")
    return None


def _first_line(error):
    """The line of an exception's message that says what went wrong: the first that names an error (NVRTC's
    log can list warnings before it), else the first."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[0] if lines else "no message")


def _kernel_failure_fix(cupy, error):
    if isinstance(error, (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError)):
        return ("check that the NVIDIA driver supports the CUDA version this CuPy is built for "
                "(`nvidia-smi` shows the driver's), or run on the CPU")
    return f"{GPU_INSTALL_HINT}, or set CUDA_PATH to a CUDA toolkit"


def cupy_or_error():
    """CuPy, once it is shown to work here, or BackendUnavailable with a one-line message saying why not.

    Three checks: CuPy imports, it sees a CUDA device, and it can compile and run kernels on it
    (`_kernel_check_failure`; its result is kept, so only the first call per process pays for it).
    """
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
        raise BackendUnavailable("CuPy is installed but no CUDA device is visible; run on the CPU")
    if _kernel_check.get("cupy") is not cupy:
        _kernel_check.update(cupy=cupy, failure=_kernel_check_failure(cupy))
    if _kernel_check["failure"] is not None:
        raise BackendUnavailable(_kernel_check["failure"])
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
