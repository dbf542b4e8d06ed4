"""Building the CuPy kernels of scratchvit/kernels/: sources, compile options, caches, launch helpers.

Each twin module defines its CUDA sources (`define_kernels`) and builds them here on first use, so
nothing imports CuPy at import time and each kernel object is made once per process, never per call
(`_elementwise_kernels`, `_raw_kernels`). The wrappers take and return CuPy arrays of dtype float32 or
float64 (labels: any integer dtype; shift_images: any dtype); the arrays of one call share a dtype.

Two kinds of kernel:
- `cupy.ElementwiseKernel` for elementwise work. Its type placeholder `T` takes the arrays' dtype, so
  one definition serves float32 and float64; scalar arguments declared `T` are cast to that dtype
  on the host, exactly as NumPy casts a Python float in `float32_array * 0.9`.
- `cupy.RawKernel` for everything else, compiled once per dtype with `typedef float T;` or
  `typedef double T;` in front of the source:
  - row-wise work (LayerNorm, softmax, cross-entropy): one warp (32 threads) per row, ROWS_PER_BLOCK
    rows per block, each lane striding over its row, sums and maxima by warp shuffles (`__shfl_xor_sync`,
    ROW_HELPERS below) in registers: no shared memory, no block-wide synchronisation. The rows here are
    short (tens of attention scores or features, 10 logits): a whole block of threads per row would
    leave most of them idle and synchronise the block at every step of its reductions. Rows may have
    any length (the lanes loop), not only up to 32;
  - the attention layouts (split_qkv, merge_grad_qkv): a grid-stride loop, one thread per element
    of a (B, T, D) array (element_grid);
  - the gradient norm (kernels/adamw.py): two launches of fixed size, sums in double, no atomics.
  No `cupy.ReductionKernel`: with CuPy's default accelerators (CUPY_ACCELERATORS unset means "cub"),
  a full reduction of a contiguous array of 128 or more elements runs through CuPy's own CUB kernels
  (cupy/_core/_cub_reduction.pyx: two launches, source generated in Cython code, compiled by NVRTC
  without the options given to the ReductionKernel), which tests/test_fused_compiles.py cannot build.

Arithmetic follows the plain formulas step by step (same operation order, constants cast to the
array dtype the way NumPy casts Python floats, and compiled with --fmad=false so no a*b+c becomes a
fused multiply-add), so results agree to rounding, with one exception in float32: CuPy appends
-ftz=true to every kernel's options (cupy/cuda/compiler.py, `_compile_with_cache_cuda`; our
--fmad=false is kept, not replaced), so float32 arithmetic on the GPU flushes subnormal inputs and
results (|v| < 2**-126, about 1.2e-38) to zero of the same sign, where NumPy keeps them. float64
arithmetic is not affected (NVRTC's -ftz concerns single precision only: with it, PTX gets
`mul.rn.ftz.f32` but still `mul.rn.f64`), and kernels that only copy a value (split_qkv's k and v)
move its bits unchanged. Row sums are reduced in a different order from the plain version's, so the
row kernels are not bitwise equal to it. No wrapper synchronises with the host.
"""
import numpy

from ..cupy_check import cupy_or_error

ROWS_PER_BLOCK = 4   # rows per block of the row-wise raw kernels: one warp each, so blocks of 128 threads
# split_qkv and merge_grad_qkv: ELEMENT_BLOCK threads per block, one thread per element up to
# ELEMENT_GRID_MAX blocks (16.7M elements), beyond that each thread loops (a grid-stride loop)
ELEMENT_BLOCK = 256
ELEMENT_GRID_MAX = 65535

C_TYPES = {"float32": "float", "float64": "double"}

# NVRTC option: no contraction of a*b+c into one fused multiply-add, so each kernel rounds every
# product as the plain formula (one array operation per product) does. Without it, a kernel computing
# exp(a * b - m) would round differently from the plain version, which rounds a * b first.
COMPILE_OPTIONS = ("--fmad=false",)

# The sources, filled by the twin modules (define_kernels); plain strings, building them needs no CuPy.
ELEMENTWISE_SOURCES = {}   # name -> (in_params, out_params, operation) of a cupy.ElementwiseKernel
RAW_SOURCES = {}           # name -> CUDA source of a cupy.RawKernel, without the typedef of T


def define_kernels(*, elementwise=None, raw=None):
    """Add a twin module's kernel sources to the registries; a name may be defined once."""
    for registry, sources in ((ELEMENTWISE_SOURCES, elementwise or {}), (RAW_SOURCES, raw or {})):
        for name, source in sources.items():
            if name in ELEMENTWISE_SOURCES or name in RAW_SOURCES:
                raise ValueError(f"kernel {name!r} is defined twice")
            registry[name] = source


# Shared by every row kernel, after `typedef float T;` / `typedef double T;`. One warp (32 threads) per
# row, ROWS_PER_BLOCK rows per block: warp w of block b owns row b * ROWS_PER_BLOCK + w, and its lane
# (0..31) strides over the row. The sums and maxima are butterfly reductions in registers: after the
# step with offset o, lanes i and i ^ o hold the same value, so after five steps every lane holds the
# row's result, bit for bit the same in every lane (each step's addition has the same two operands,
# swapped, and IEEE addition is commutative). No shared memory, no __syncthreads: the warp reads its
# lanes' registers directly. All 32 lanes must call the reductions (the full mask says so): a warp
# whose row lies past the end returns as a whole before any of them.
ROW_HELPERS = r"""
#define ROWS_PER_BLOCK """ + str(ROWS_PER_BLOCK) + r"""
#define FULL_WARP 0xffffffffu

__device__ __forceinline__ T warp_sum(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        value = value + __shfl_xor_sync(FULL_WARP, value, offset);
    }
    return value;
}

__device__ __forceinline__ T warp_max(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T other = __shfl_xor_sync(FULL_WARP, value, offset);
        value = (other > value) ? other : value;
    }
    return value;
}

// This warp's row (64-bit: rows * row length may pass 2**31) and this thread's lane.
#define ROW_AND_LANE                                                                    \
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);  \
    const int lane = threadIdx.x & 31;                                                   \
    if (row >= rows) {                                                                   \
        return;                                                                          \
    }
"""

# ---------------------------------------------------------------------------------------------------
# Lazy construction: each kernel object is created once, on first use
# ---------------------------------------------------------------------------------------------------

_cupy_module = None
_elementwise_kernels = {}   # name -> cupy.ElementwiseKernel (type-generic: CuPy compiles per dtype)
_raw_kernels = {}           # (name, dtype name) -> cupy.RawKernel


def cupy_module():
    """CuPy, imported (and its device checked) on first use; BackendUnavailable if it cannot be used."""
    global _cupy_module
    if _cupy_module is None:
        _cupy_module = cupy_or_error()
    return _cupy_module


def elementwise_kernel(name):
    kernel = _elementwise_kernels.get(name)
    if kernel is None:
        in_params, out_params, operation = ELEMENTWISE_SOURCES[name]
        kernel = cupy_module().ElementwiseKernel(in_params, out_params, operation, name, options=COMPILE_OPTIONS)
        _elementwise_kernels[name] = kernel
    return kernel


def raw_kernel_source(name, dtype_name):
    """The full CUDA source of raw kernel `name` for "float32" or "float64" (also used by the tests)."""
    source = RAW_SOURCES[name]
    helpers = ROW_HELPERS if "ROW_AND_LANE" in source else ""   # the row kernels' warp reductions
    return "typedef " + C_TYPES[dtype_name] + " T;\n" + helpers + source


def raw_kernel(name, dtype):
    key = (name, dtype.name)
    kernel = _raw_kernels.get(key)
    if kernel is None:
        kernel = cupy_module().RawKernel(raw_kernel_source(name, dtype.name), name, options=COMPILE_OPTIONS)
        _raw_kernels[key] = kernel
    return kernel


def float_dtype(*arrays):
    """The common dtype of `arrays`, which must be float32 or float64 and all the same."""
    dtype = arrays[0].dtype
    for array in arrays[1:]:
        if array.dtype != dtype:
            raise TypeError(f"fused kernels need one dtype for all arrays, got {dtype} and {array.dtype}")
    if dtype.name not in C_TYPES:
        raise TypeError(f"fused kernels support float32 and float64, got {dtype}")
    return dtype


ROW_THREADS = (32 * ROWS_PER_BLOCK,)


def row_grid(rows):
    """Blocks for a row kernel over `rows` rows, ROWS_PER_BLOCK per block (the last may be partly empty)."""
    blocks = -(-rows // ROWS_PER_BLOCK)
    if blocks >= 2**31:
        raise ValueError(f"{rows} rows exceed the row kernels' grid ({2**31 - 1} blocks of {ROWS_PER_BLOCK} rows)")
    return (blocks,)


def element_grid(n):
    """Blocks for a grid-stride kernel over n elements: one thread each, up to ELEMENT_GRID_MAX blocks."""
    return (max(1, min(-(-n // ELEMENT_BLOCK), ELEMENT_GRID_MAX)),)


def on_device(cupy, **arrays):
    """TypeError, one line naming the argument, unless every array is a CuPy array: a NumPy array
    would reach `cupy.ascontiguousarray`, which takes device arrays only (cupy/_core/core.pyx,
    `ascontiguousarray`), or a kernel launch, which refuses it deep inside CuPy."""
    for name, array in arrays.items():
        if not isinstance(array, cupy.ndarray):
            raise TypeError(f"{name} must be a CuPy array (on the GPU), got {type(array).__module__}."
                            f"{type(array).__name__}")


def rows_of(shape):
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows


def as_int32(value):
    """A 32-bit int kernel argument: RawKernel passes a Python int as 64 bits, the kernels take `int`."""
    if not 0 <= value < 2**31:
        raise ValueError(f"size {value} does not fit the kernels' 32-bit int")
    return numpy.int32(value)


def cublas_modules():
    """CuPy's cuBLAS modules: the thin wrappers (cupy.cublas) and the raw bindings (cupy_backends)."""
    import cupy.cublas
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas
    return cupy.cublas, cublas, device
