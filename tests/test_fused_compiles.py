"""Every kernel in scratchvit/kernels/ compiles with NVRTC, for float32 and float64, with no GPU needed.

Why: tests/test_kernels.py runs the kernels, so it needs a CUDA device and skips everywhere else, and a
typo in a kernel string would go unnoticed until someone ran on a GPU. CuPy writes each kernel's CUDA
source on the host and hands it to NVRTC, which needs no device. So any machine with CuPy and NVRTC can
check that the kernels compile. This file is not marked `gpu`. It skips where CuPy or NVRTC is missing.

What is compiled: each kernel, for T = float and T = double, for sm_90 (H100), with the options
kernels/compile.py gives it (`COMPILE_OPTIONS`). The kernel objects come from its own builders
(`raw_kernel`, `elementwise_kernel`), so new entries in the registries are covered automatically:
- `RAW_SOURCES`: the RawKernel's source, compiled the way RawKernel compiles it on first launch.
- `ELEMENTWISE_SOURCES`: CuPy wraps the operation in a full kernel at call time, with parameter
  declarations that depend on the arguments. The source here comes from CuPy's own generator
  (`_get_elementwise_kernel_code`, the one `__call__` uses), given a description of the arguments:
  outputs and `raw` inputs as contiguous 1-D arrays. Every other input appears once as an array
  and once as a scalar, the two forms CuPy emits depending on what the caller passes.
Those are the only two kinds kernels/ uses. It has no cupy.ReductionKernel: CuPy runs a full
reduction of 128 or more elements through CUB kernels that it generates and compiles (with NVRTC)
inside Cython-only code (cupy/_core/_cub_reduction.pyx), which this file could not rebuild.

Two more checks: that CuPy hands NVRTC kernels/compile.py's --fmad=false together with its own -ftz=true (the
arithmetic kernels/'s docstring describes), and that a kernel with an error does fail here.

How, without a device: CuPy asks the device only two things. It asks for the architecture, and
the fixture answers sm_90. It asks the device to load the compiled module, and the fixture keeps
the cubin instead. Everything in between is CuPy's own code: the headers, the include paths, the
added options (-std, -ftz, -arch) and the NVRTC call. These are CuPy internals, checked against
CuPy 14.2, so a CuPy release that renames them means updating this file.
"""
import io
import types

import numpy
import pytest

from scratchvit.kernels import compile as kernel_compile

try:
    import cupy
    from cupy.cuda import nvrtc
    nvrtc.getVersion()
except Exception as error:  # no CuPy (the CI machine), or CuPy without an NVRTC library
    pytest.skip(f"needs CuPy and NVRTC: {type(error).__name__}: {error}", allow_module_level=True)

try:
    from cupy._core import _carray, _kernel, _scalar, core
    from cupy.cuda import compiler, function
except ImportError as error:  # CuPy's internals moved: this file needs updating for this CuPy
    pytest.skip(f"written against CuPy 14.2's internals, this CuPy {cupy.__version__} differs: {error}",
                allow_module_level=True)

ARCH = "90"   # compute capability compiled for: sm_90, the H100
DTYPES = ("float32", "float64")
_NDARRAY, _INDEXER, _SCALAR = 1, 2, 3   # CuPy's enum _ArgKind (cupy/_core/_kernel.pxd)


class _CubinModule(function.Module):
    """A CuPy Module that keeps the compiled cubin instead of loading it onto a device."""

    def load(self, cubin):
        self.cubin = cubin


@pytest.fixture(scope="module")
def nvrtc_only():
    """CuPy's compile path with its device queries answered on the host (see the module docstring)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUPY_CACHE_IN_MEMORY", "1")   # no on-disk kernel cache: NVRTC runs every time
        patch.setattr(compiler, "_get_arch", lambda: ARCH)
        # Memoized per device (it asks the driver for the current device); the function itself is kept.
        patch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                      compiler._get_arch_for_options_for_nvrtc.__wrapped__)
        patch.setattr(compiler, "function", types.SimpleNamespace(Module=_CubinModule))
        # the builders get CuPy through cupy_module(), which checks for a device: hand them CuPy, and
        # empty caches so that no kernel object built here outlives the test.
        patch.setattr(kernel_compile, "_cupy_module", cupy)
        for cache in ("_raw_kernels", "_elementwise_kernels"):
            patch.setattr(kernel_compile, cache, {})
        yield


def _compile(source, options, **kwargs):
    """Compile `source` with CuPy's compile_with_cache (headers, options, NVRTC). On failure, fail
    with NVRTC's log, the options and the numbered source that the log's line numbers refer to."""
    report = io.StringIO()
    try:
        module = core.compile_with_cache(source, options, **kwargs)
    except compiler.CompileException as error:
        error.dump(report)
    if report.getvalue():   # failing here, not inside `except`, keeps the report free of chained tracebacks
        pytest.fail(report.getvalue(), pytrace=False)
    assert module.cubin.startswith(b"\x7fELF")


def _array(dtype, ndim=1):   # a C-contiguous array with 32-bit indexing, as a contiguous call gives
    return _kernel._ArgInfo(_NDARRAY, cupy.ndarray, dtype, ndim, True, True)


def _scalar_value(dtype):
    return _kernel._ArgInfo(_SCALAR, _scalar.CScalar, dtype, 0, True, True)


def _indexer(ndim):
    return _kernel._ArgInfo(_INDEXER, _carray.Indexer, None, ndim, True, True)


def _dtype_of(param, dtype):
    """A parameter's dtype: its own (`int64 n`), or the one under test for a placeholder (`T x`)."""
    return dtype if param.dtype is None else numpy.dtype(param.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(kernel_compile.RAW_SOURCES))
def test_raw_kernel_compiles(nvrtc_only, name, dtype):
    kernel = kernel_compile.raw_kernel(name, numpy.dtype(dtype))
    # What RawKernel does on its first launch (cupy/_core/raw.pyx, _get_raw_module).
    _compile(kernel.code, kernel.options, prepend_cupy_headers=False, backend=kernel.backend)


@pytest.mark.parametrize("inputs_as", ["arrays", "scalars"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(kernel_compile.ELEMENTWISE_SOURCES))
def test_elementwise_kernel_compiles(nvrtc_only, name, dtype, inputs_as):
    kernel = kernel_compile.elementwise_kernel(name)
    # What ElementwiseKernel does with that source (_get_simple_elementwise_kernel_from_code).
    _compile(_elementwise_source(kernel, numpy.dtype(dtype), inputs_as), kernel.kwargs.get("options", ()))


def _elementwise_source(kernel, dtype, inputs_as):
    """The full CUDA source CuPy generates for `kernel` called on contiguous 1-D arrays of `dtype`
    (inputs not declared `raw` passed as scalars if inputs_as == "scalars")."""
    inputs = tuple(_scalar_value(_dtype_of(p, dtype)) if inputs_as == "scalars" and not p.raw
                   else _array(_dtype_of(p, dtype)) for p in kernel.in_params)
    outputs = tuple(_array(_dtype_of(p, dtype)) for p in kernel.out_params)
    _, _, type_map = _kernel._decide_params_type(
        kernel.in_params, kernel.out_params,
        tuple(None if arg.arg_kind == _SCALAR else arg.dtype for arg in inputs),
        tuple(arg.dtype for arg in outputs))
    source = _kernel._get_elementwise_kernel_code(
        inputs + outputs + (_indexer(1),), type_map, kernel.params, kernel.operation, kernel.name,
        kernel.preamble, **kernel.kwargs)
    assert "CArray<" in source and "CIndexer<1" in source, "CuPy's _ArgKind numbering changed"
    return source


def test_every_raw_kernel_source_is_compiled_above():
    """The parametrisation above is the registry itself; kernels/ builds every RawKernel from it."""
    names = set(kernel_compile.RAW_SOURCES)
    assert {"scratchvit_split_qkv", "scratchvit_merge_grad_qkv", "scratchvit_l2_norm_partials",
            "scratchvit_l2_norm_finish", "scratchvit_layernorm_forward", "scratchvit_softmax_forward"} <= names
    assert "scratchvit_shift_images" in kernel_compile.ELEMENTWISE_SOURCES
    assert not hasattr(kernel_compile, "REDUCTION_SOURCES") and not hasattr(kernel_compile, "reduction_kernel")


def test_nvrtc_gets_fmad_false_and_ftz_true(nvrtc_only, monkeypatch):
    """The options NVRTC receives for a fused kernel: kernels/compile.py's --fmad=false is kept and CuPy adds
    -ftz=true (cupy/cuda/compiler.py, _compile_with_cache_cuda), as kernels/'s docstring says."""
    seen = []
    compile_with_nvrtc = compiler._compile_using_nvrtc_no_warning

    def record(source, options=(), *args, **kwargs):
        seen.append(tuple(options))
        return compile_with_nvrtc(source, options, *args, **kwargs)

    monkeypatch.setattr(compiler, "_compile_using_nvrtc_no_warning", record)
    kernel = kernel_compile.raw_kernel("scratchvit_split_qkv", numpy.dtype("float32"))
    _compile(kernel.code, kernel.options, prepend_cupy_headers=False, backend=kernel.backend)
    assert seen, "CuPy no longer compiles through _compile_using_nvrtc_no_warning: update this test"
    assert "--fmad=false" in seen[-1] and "-ftz=true" in seen[-1], seen[-1]


@pytest.mark.parametrize("name", ["scratchvit_l2_norm_partials", "scratchvit_split_qkv", "scratchvit_softmax_forward"])
def test_a_broken_raw_kernel_fails_to_compile(nvrtc_only, name):
    """The checks above are not vacuous: the same kernel with one member misspelt fails, with NVRTC's log."""
    kernel = kernel_compile.raw_kernel(name, numpy.dtype("float64"))
    broken = kernel.code.replace("blockIdx.x", "blockIdx.x_", 1)
    assert broken != kernel.code
    with pytest.raises(pytest.fail.Exception, match='has no member "x_"'):
        _compile(broken, kernel.options, prepend_cupy_headers=False, backend=kernel.backend)


def test_a_broken_elementwise_kernel_fails_to_compile(nvrtc_only):
    in_params, out_params, operation = kernel_compile.ELEMENTWISE_SOURCES["scratchvit_add_dropout_forward"]
    broken = cupy.ElementwiseKernel(in_params, out_params, operation.replace("scale", "scael", 1),
                                    "scratchvit_add_dropout_forward", options=kernel_compile.COMPILE_OPTIONS)
    with pytest.raises(pytest.fail.Exception, match='identifier "scael" is undefined'):
        _compile(_elementwise_source(broken, numpy.dtype("float32"), "arrays"), kernel_compile.COMPILE_OPTIONS)
