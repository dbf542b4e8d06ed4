"""scratchvit.backend: choosing a device, the message when the GPU cannot be used, array modules,
host transfer and seeded generators."""
import sys
import types

import numpy
import pytest

from scratchvit.backend import (GPU_INSTALL_HINT, Backend, BackendUnavailable, backend_of, get_array_module,
                                get_backend, host_generator, is_gpu_array, random_generator, to_host)


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
