"""scratchvit.backend and scratchvit.cupy_check: choosing a device, the message when the GPU cannot be used,
array modules, host transfer and seeded generators."""
import configparser
import pathlib
import sys
import types

import numpy
import pytest

from scratchvit import cupy_check
from scratchvit.backend import (Backend, backend_of, get_array_module, get_backend, host_generator, is_gpu_array,
                                random_generator, to_host)
from scratchvit.cupy_check import GPU_INSTALL_HINT, BackendUnavailable


def test_cpu_backend_is_numpy():
    backend = get_backend("cpu")
    assert backend.name == "cpu" and backend.xp is numpy
    assert get_backend().xp is numpy
    assert get_backend(backend) is backend     # a Backend passes through


@pytest.mark.parametrize("name", ["nope", "GPU", "cuda", "", None])
def test_unknown_backend_raises(name):
    with pytest.raises(ValueError, match="cpu"):
        get_backend(name)


def _assert_one_line_gpu_message(error):
    message = str(error.value)
    assert "\n" not in message and message.strip() == message
    assert "CuPy" in message
    return message


def test_gpu_without_cupy_raises_one_line_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)   # `import cupy` now raises ImportError
    with pytest.raises(BackendUnavailable) as error:
        get_backend("gpu")
    message = _assert_one_line_gpu_message(error)
    assert "not installed" in message
    assert GPU_INSTALL_HINT in message
    assert "pip install" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__   # no chained ImportError traceback
    assert isinstance(error.value, RuntimeError)


def _fake_cupy(get_device_count):
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime), get_array_module=lambda *a: numpy)


def test_gpu_with_cupy_but_no_device_raises_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 0))
    with pytest.raises(BackendUnavailable) as error:
        get_backend("gpu")
    message = _assert_one_line_gpu_message(error)
    assert "no CUDA device" in message


def test_gpu_with_broken_cuda_driver_raises_one_line(monkeypatch):
    def broken():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(broken))
    with pytest.raises(BackendUnavailable) as error:
        get_backend("gpu")
    message = _assert_one_line_gpu_message(error)
    assert "cudaErrorInsufficientDriver" in message     # the driver's own reason is kept


def test_install_hint_names_the_gpu_extras_of_setup_cfg():
    config = configparser.ConfigParser()
    config.read(pathlib.Path(__file__).resolve().parents[1] / "setup.cfg")
    extras = config["options.extras_require"]
    for extra, cupy_wheel in (("gpu", "cupy-cuda12x[ctk]"), ("gpu-cuda13", "cupy-cuda13x[ctk]")):
        assert f'"scratchvit[{extra}]"' in GPU_INSTALL_HINT
        assert cupy_wheel in extras[extra]   # CuPy with NVIDIA's NVRTC and headers, not CuPy alone


# The kernel check, with a stand-in for CuPy on the host. Its exception classes carry CuPy's names, and
# the failures below carry the messages CuPy 13.6 and 14.2 were seen to raise on a machine without NVRTC
# or without the CUDA headers (see _kernel_check_failure in scratchvit/cupy_check.py).

class CompileException(Exception):      # cupy.cuda.compiler.CompileException: str() is NVRTC's log
    def __init__(self, msg, source, name, options, backend="nvrtc"):
        super().__init__()
        self._msg = msg

    def __str__(self):
        return self._msg


class CUDARuntimeError(RuntimeError):   # cupy_backends.cuda.api.runtime
    pass


class CUDADriverError(RuntimeError):    # cupy_backends.cuda.api.driver
    pass


class DynamicLibNotFoundError(RuntimeError):   # cuda.pathfinder, which CuPy 14 loads NVRTC with
    pass


def _host_cupy(elementwise_error=None, raw_error=None, add=1.0, scale=2.0, raw_blocks_run=None):
    """A stand-in for CuPy whose kernels run on NumPy arrays. The probe's kernels compute x + 1 and 2 x;
    `add`, `scale` and `raw_blocks_run` make them wrong, `*_error` makes a kernel raise when first
    called, as CuPy compiles then. `built` counts the kernel objects made."""
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "14.2.0"
    cupy.built = []
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError),
        driver=types.SimpleNamespace(CUDADriverError=CUDADriverError),
        compiler=types.SimpleNamespace(CompileException=CompileException))
    cupy.asarray, cupy.asnumpy, cupy.empty_like = numpy.array, numpy.asarray, numpy.empty_like

    def elementwise_kernel(in_params, out_params, operation, name):
        cupy.built.append(name)

        def launch(x):
            if elementwise_error is not None:
                raise elementwise_error
            return x + numpy.float32(add)
        return launch

    def raw_kernel(source, name):
        cupy.built.append(name)

        def launch(grid, block, args):
            if raw_error is not None:
                raise raw_error
            x, y, n = args
            for block_index in range(grid[0] if raw_blocks_run is None else raw_blocks_run):
                for thread in range(block[0]):      # one thread per element, as on the GPU
                    i = block_index * block[0] + thread
                    if i < n:
                        y[i] = numpy.float32(scale) * x[i]
        return launch

    cupy.ElementwiseKernel, cupy.RawKernel = elementwise_kernel, raw_kernel
    return cupy


@pytest.fixture
def kernel_check(monkeypatch):
    """A fresh kernel-check cache for the test (the real one, if any, comes back afterwards)."""
    monkeypatch.setattr(cupy_check, "_kernel_check", {})


def test_gpu_that_compiles_and_runs_kernels_is_used_and_checked_once(monkeypatch, kernel_check):
    cupy = _host_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    backend = get_backend("gpu")
    assert backend.name == "gpu" and backend.xp is cupy
    assert sorted(cupy.built) == ["scratchvit_probe_add_one", "scratchvit_probe_double"]
    assert get_backend("gpu").xp is cupy and cupy_check.cupy_or_error() is cupy
    assert len(cupy.built) == 2          # the check ran once, not per call


_NVRTC_LOG_NO_FP16_HEADER = (   # CuPy 13.6 with pip's NVRTC and a CUDA path without headers
    '/venv/lib/python3.11/site-packages/cupy/_core/include/cupy/carray.cuh(57): catastrophic error: '
    'cannot open source file "cuda_fp16.h"\n  #include <cuda_fp16.h>\n                        ^\n\n'
    '1 catastrophic error detected in the compilation of "default_program".\nCompilation terminated.\n')

COMPILE_FAILURES = {   # id: (the exception, what the one-line message must name)
    "cupy13-no-libnvrtc": (RuntimeError(
        "CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open shared object file: "
        "No such file or directory"), "libnvrtc.so.12: cannot open shared object file"),
    "cupy14-no-libnvrtc": (DynamicLibNotFoundError(
        'Failure finding "libnvrtc.so.13 or libnvrtc.so.12": No such file: libnvrtc.so.13 or libnvrtc.so.12, '
        "No such file: libnvrtc.so.13 or libnvrtc.so.12\n"), 'DynamicLibNotFoundError: Failure finding "libnvrtc.so'),
    "cupy14-no-headers": (RuntimeError(
        "Failed to find CUDA headers. Please install CUDA toolkit headers (e.g., pip install cupy-cuda12x[ctk]) "
        "or specify CUDA_PATH environment variable."), "Failed to find CUDA headers"),
    "cupy13-no-cuda-path": (RuntimeError(
        "Failed to auto-detect CUDA root directory. Please specify `CUDA_PATH` environment variable if you "
        "are using CUDA versions not yet supported by CuPy."), "Failed to auto-detect CUDA root directory"),
    "cupy13-no-fp16-header": (CompileException(_NVRTC_LOG_NO_FP16_HEADER, "source", "default_program", ()),
                              'CompileException: /venv/lib/python3.11/site-packages/cupy/_core/include/cupy/'
                              'carray.cuh(57): catastrophic error: cannot open source file "cuda_fp16.h")'),
    "kernel-cache-not-writable": (PermissionError(13, "Permission denied", "/home/user/.cupy/kernel_cache"),
                                  "PermissionError: [Errno 13] Permission denied"),
}


@pytest.mark.parametrize("failing_kernel", ["elementwise", "raw"])
@pytest.mark.parametrize("failure", sorted(COMPILE_FAILURES))
def test_gpu_that_cannot_compile_kernels_raises_one_line_with_the_fix(monkeypatch, kernel_check, failure,
                                                                       failing_kernel):
    exception, cause = COMPILE_FAILURES[failure]
    cupy = _host_cupy(**{f"{failing_kernel}_error": exception})
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    with pytest.raises(BackendUnavailable) as error:
        get_backend("gpu")
    message = _assert_one_line_gpu_message(error)
    assert message.startswith("CuPy 14.2.0 cannot compile and run GPU kernels here (")
    assert cause in message
    assert message.endswith(f"{GPU_INSTALL_HINT}, or set CUDA_PATH to a CUDA toolkit")
    assert error.value.__cause__ is None and error.value.__context__ is None   # no chained traceback
    built = len(cupy.built)
    with pytest.raises(BackendUnavailable) as again:
        get_backend("gpu")
    assert str(again.value) == message and len(cupy.built) == built   # the failure is kept, not retried


def test_nvrtc_log_gives_its_first_error_line_not_a_warning_before_it(monkeypatch, kernel_check):
    log = ('kern.cu(3): warning #177-D: variable "unused" was declared but never referenced\n\n'
           'kern.cu(4): error: identifier "undefined_name" is undefined\n\n'
           '1 error detected in the compilation of "kern.cu".\n')
    monkeypatch.setitem(sys.modules, "cupy", _host_cupy(raw_error=CompileException(log, "", "", ())))
    with pytest.raises(BackendUnavailable) as error:
        get_backend("gpu")
    message = _assert_one_line_gpu_message(error)
    assert '(CompileException: kern.cu(4): error: identifier "undefined_name" is undefined)' in message
    assert "warning" not in message


@pytest.mark.parametrize("exception", [
    CUDADriverError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled with an unsupported "
                    "toolchain."),
    CUDARuntimeError("cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device"),
], ids=type)
def test_gpu_whose_driver_cannot_run_kernels_points_at_the_driver(monkeypatch, kernel_check, exception):
    monkeypatch.setitem(sys.modules, "cupy", _host_cupy(raw_error=exception))
    with pytest.raises(BackendUnavailable) as error:
        get_backend("gpu")
    message = _assert_one_line_gpu_message(error)
    assert f"({type(exception).__name__}: {exception})" in message
    assert "NVIDIA driver" in message and "pip install" not in message


@pytest.mark.parametrize("wrong", [{"add": 2.0}, {"scale": 3.0}, {"raw_blocks_run": 1}],
                         ids=["elementwise", "raw", "raw-half-the-blocks"])
def test_gpu_whose_kernels_give_wrong_results_is_not_used(monkeypatch, kernel_check, wrong):
    monkeypatch.setitem(sys.modules, "cupy", _host_cupy(**wrong))
    with pytest.raises(BackendUnavailable) as error:
        get_backend("gpu")
    message = _assert_one_line_gpu_message(error)
    assert "wrong results" in message


def test_a_bug_in_the_kernel_check_is_not_reported_as_a_missing_gpu(monkeypatch, kernel_check):
    monkeypatch.setitem(sys.modules, "cupy", _host_cupy(elementwise_error=TypeError("a bug, not the machine")))
    with pytest.raises(TypeError, match="a bug"):
        get_backend("gpu")


def test_array_module_of_numpy_arrays_is_numpy():
    a, b = numpy.zeros(3), numpy.ones((2, 2), dtype=numpy.float32)
    assert get_array_module(a) is numpy
    assert get_array_module(a, b) is numpy
    assert not is_gpu_array(a)
    assert backend_of(a).name == "cpu" and backend_of(a).xp is numpy


def test_array_module_without_cupy_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert get_array_module(numpy.zeros(2)) is numpy


def test_backend_arrays_report_their_module(backend):
    array = backend.asarray(numpy.arange(6.0).reshape(2, 3), dtype="float32")
    assert get_array_module(array) is backend.xp
    assert array.dtype == numpy.float32 and array.shape == (2, 3)
    assert is_gpu_array(array) == (backend.name == "gpu")
    assert backend_of(array).name == backend.name
    assert backend_of(array).xp is backend.xp


def test_to_host_returns_numpy_arrays(backend):
    values = numpy.arange(12.0).reshape(3, 4)
    host = to_host(backend.asarray(values))
    assert type(host) is numpy.ndarray
    numpy.testing.assert_array_equal(host, values)
    assert type(to_host(values)) is numpy.ndarray
    assert type(to_host([1.0, 2.0])) is numpy.ndarray


def test_asarray_moves_and_casts(backend):
    values = numpy.arange(4, dtype=numpy.float64)
    moved = backend.asarray(values, dtype="float32")
    assert get_array_module(moved) is backend.xp and moved.dtype == numpy.float32
    numpy.testing.assert_array_equal(to_host(moved), values.astype(numpy.float32))
    again = backend.asarray(moved)                 # already there: the values pass through
    numpy.testing.assert_array_equal(to_host(again), to_host(moved))
    cpu = get_backend("cpu").asarray(moved)        # any backend's array comes back to the host
    assert type(cpu) is numpy.ndarray
    numpy.testing.assert_array_equal(cpu, values)


def test_random_generator_is_reproducible(backend):
    for draw in (lambda g: g.random((4, 5), dtype=numpy.float32), lambda g: g.standard_normal((4, 5))):
        first = draw(random_generator(backend.xp, 123))
        again = draw(backend.random_generator(123))
        other = draw(random_generator(backend.xp, 124))
        assert get_array_module(first) is backend.xp
        numpy.testing.assert_array_equal(to_host(first), to_host(again))
        assert not numpy.array_equal(to_host(first), to_host(other))


def test_numpy_random_generator_is_reproducible():
    first = random_generator(numpy, 7).random(10)
    numpy.testing.assert_array_equal(first, random_generator(numpy, 7).random(10))
    numpy.testing.assert_array_equal(host_generator(7).random(10), first)
    assert not numpy.array_equal(first, random_generator(numpy, 8).random(10))


def test_synchronize_and_repr(backend):
    backend.synchronize()          # a no-op on the CPU; waits for the stream on the GPU
    assert repr(backend) == f"Backend({backend.name!r})"
    assert isinstance(backend, Backend)
