"""Whether CuPy can run scratchvit here: it imports, sees a CUDA device, and compiles and runs kernels.

`cupy_or_error` answers once per process and raises BackendUnavailable with a one-line reason and
what to install; `backend.get_backend("gpu")` and the kernels call it.
"""
import numpy

# Both extras bring CuPy 14 with NVIDIA's CUDA components from pip (runtime, NVRTC and its headers,
# cuBLAS, ...), so only the driver is needed; `nvidia-smi` shows which CUDA version the driver supports.
GPU_INSTALL_HINT = ('pip install "scratchvit[gpu]" for CUDA 12 drivers or "scratchvit[gpu-cuda13]" for CUDA 13 '
                    "(CuPy with NVIDIA's CUDA components)")


class BackendUnavailable(RuntimeError):
    """The requested device cannot be used here; the message is one line saying why and what to install."""


_kernel_check = {}   # {"cupy": the module checked, "failure": None or the one-line reason}: one check per process

# The two kinds of kernel scratchvit's GPU twins build. CuPy compiles them differently: an ElementwiseKernel's
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
