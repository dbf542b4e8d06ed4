"""Fused CuPy kernels: each one the GPU twin of a plain array-module formula elsewhere in the package.

Why fuse. CuPy spends roughly 20 microseconds of Python per kernel launch (argument parsing, type
resolution, the kernel cache look-up), and each plain array operation is one launch plus, usually, one
temporary array. A LayerNorm written with array operations (row mean, centring, square, row mean,
add eps, sqrt, reciprocal, scale, times gamma, plus beta) is about ten launches; on the small tensors
of a ViT that Python overhead, not the GPU, sets the step time. Each kernel here does the same
arithmetic in one launch (two for dropout, whose uniforms cuRAND draws; two for the norm).

| kernel (this module)                     | replaces (plain version)                                 | launches |
|------------------------------------------|----------------------------------------------------------|----------|
| gelu_forward / gelu_backward             | layers/gelu.py  GELU.forward / GELU.backward             | 1 / 1    |
| layernorm_forward                        | layers/layernorm.py  LayerNorm.forward                   | 1        |
| layernorm_backward                       | LayerNorm.backward (gamma/beta sums stay column_sum)     | 1 + 3    |
| softmax_forward / softmax_backward       | layers/softmax.py  softmax(scale*s) / softmax_backward   | 1 / 1    |
| split_qkv                                | layers/attention.py forward: q * scale and contiguous    | 1        |
|                                          | k, v, k^T, v^T out of qkv (5 launches)                   |          |
| merge_grad_qkv                           | attention.py backward: g_q *= scale, then the (3,B,H,T,d)| 1        |
|                                          | -> (B,T,3D) transpose-reshape copy (2 launches)          |          |
| dropout_forward                          | layers/dropout.py  Dropout.forward (mask and output)     | 1 + cuRAND |
| add_dropout_forward                      | x + Dropout(h) in EncoderBlock (Dropout.forward_add):    | 1 + cuRAND |
|                                          | Dropout.forward, then h += x (2 + cuRAND)                |          |
| add_dropout                              | the same with a fixed mask (Dropout.fix_mask; 2 launches)| 1        |
| cross_entropy_forward / _backward        | layers/softmax_cross_entropy.py  SoftmaxCrossEntropy     | 2 / 1    |
| adamw_step                               | optim.py  AdamW.step (about 12 launches)                 | 1        |
| l2_norm                                  | optim.py  AdamW.grad_norm, sqrt(g . g)                   | 2        |
| scale_to_max_norm                        | optim.py  AdamW.clip_grad_norm's scaling (5)             | 1        |
| weight_average_update                    | weight_average.py  WeightAverage.update (3)              | 1        |
| shift_images                             | data.py  shift_images (a multi-array gather: index       | 1        |
|                                          | preparation and a take per index array, mask, where)     |          |
| add_transposed_product (cuBLAS)          | linear.py backward: weight.grad += X^T G (2 launches and | 1        |
|                                          | a temporary of the weight's size)                        |          |
| transposed_product (cuBLAS)              | attention.py backward: attn^T @ g_context and            | 1 each   |
|                                          | g_scores^T @ q_scaled (a copy of the transposed operand, |          |
|                                          | then matmul: 2 each)                                     |          |

"cuRAND" is the uniform draw `generator.random(shape, dtype)` of a CuPy Generator: one launch of
CuPy's cuRAND-device kernel (cupy/random/_generator_api.pyx, `Generator.random` -> `_launch_dist`).

Every kernel is held against its plain version, run by NumPy on host copies of the same inputs, in
tests/test_fused.py, on random inputs of several shapes, in float64 (tight tolerance) and float32;
tests/test_fused_compiles.py compiles each with NVRTC where CuPy is installed, GPU or not.

Two kinds of kernel:
- `cupy.ElementwiseKernel` for elementwise work. Its type placeholder `T` takes the arrays' dtype, so
  one definition serves float32 and float64; scalar arguments declared `T` are cast to that dtype
  on the host, exactly as NumPy casts a Python float in `float32_array * 0.9`.
- `cupy.RawKernel` for everything else, compiled once per dtype with `typedef float T;` or
  `typedef double T;` in front of the source:
  - row-wise work (LayerNorm, softmax, cross-entropy): one warp (32 threads) per row, ROWS_PER_BLOCK
    rows per block, each lane striding over its row, sums and maxima by warp shuffles (`__shfl_xor_sync`)
    in registers: no shared memory, no block-wide synchronisation. The rows here are short (tens of
    attention scores or features, 10 logits): a whole block of threads per row would leave most of
    them idle and synchronise the block at every step of its reductions. Rows may have any length
    (the lanes loop), not only up to 32;
  - the attention layouts (split_qkv, merge_grad_qkv): a grid-stride loop, one thread per element
    of a (B, T, D) array, each moving that element's three values (q, k, v);
  - the gradient norm: two launches of fixed size (NORM_GRID blocks of NORM_BLOCK threads, then one
    block), sums of squares in double, no atomics, so the same input always gives the same bits.
  No `cupy.ReductionKernel`: with CuPy's default accelerators (CUPY_ACCELERATORS unset means "cub"),
  a full reduction of a contiguous array of 128 or more elements runs through CuPy's own CUB kernels
  (cupy/_core/_cub_reduction.pyx: two launches, source generated in Cython code, compiled by NVRTC
  without the options given to the ReductionKernel), which tests/test_fused_compiles.py cannot build.
Besides the kernels, two products go to cuBLAS directly, with its transpose flag, where CuPy's own
routine would first copy a transposed operand or allocate a temporary (add_transposed_product,
transposed_product: see each one for the CuPy source that decides it).

Import without CuPy: nothing here imports CuPy at module level. Kernels are built on first use and
cached in module-level dicts (`_elementwise_kernels`, `_raw_kernels`), so each is defined once per
process, never per call. The functions take and return CuPy arrays of dtype float32 or float64
(labels: any integer dtype; shift_images: any dtype); inputs of one call must share a dtype. Those
that take a layer's parameters or labels, the cuBLAS products and shift_images refuse a NumPy array
with a one-line TypeError naming the argument. None of them synchronises with
the host.

Arithmetic follows the plain formulas step by step (same operation order, constants cast to the
array dtype the way NumPy casts Python floats, and compiled with --fmad=false so no a*b+c becomes a
fused multiply-add), so results agree to rounding, with one exception in float32: CuPy appends
-ftz=true to every kernel's options (cupy/cuda/compiler.py, `_compile_with_cache_cuda`; our
--fmad=false is kept, not replaced), so float32 arithmetic on the GPU flushes subnormal inputs and
results (|v| < 2**-126, about 1.2e-38) to zero of the same sign, where NumPy keeps them. float64
arithmetic is not affected (NVRTC's -ftz concerns single precision only: with it, PTX gets
`mul.rn.ftz.f32` but still `mul.rn.f64`), and kernels that only copy a value (split_qkv's k and v)
move its bits unchanged. Row sums are reduced in a different order from the plain version's, so the
row kernels are not bitwise equal to it; l2_norm sums in double, so in float32 it is the more
accurate of the two.
"""
import math

import numpy

from .layers.gelu import CUBIC_COEFFICIENT, SQRT_2_OVER_PI
from .layers.reductions import column_sum

__all__ = ["gelu_forward", "gelu_backward", "layernorm_forward", "layernorm_backward",
           "softmax_forward", "softmax_backward", "split_qkv", "merge_grad_qkv", "dropout_forward", "add_dropout",
           "add_dropout_forward", "cross_entropy_forward", "cross_entropy_backward", "adamw_step", "l2_norm",
           "add_transposed_product", "transposed_product", "shift_images", "weight_average_update",
           "scale_to_max_norm",
           "ROWS_PER_BLOCK", "NORM_BLOCK", "NORM_GRID"]

ROWS_PER_BLOCK = 4   # rows per block of the row-wise raw kernels: one warp each, so blocks of 128 threads
# l2_norm: stage 1 runs NORM_GRID blocks of NORM_BLOCK threads (a power of two, for the tree sum), each
# block writing one partial sum; stage 2 is one block of NORM_BLOCK threads adding the NORM_GRID
# partials. Fixed sizes, not derived from the device or the input: the order of the additions, hence
# the result, depends on the input alone. 1024 blocks of 256 threads are about one full wave on an
# H100/H200 (132 SMs, up to 2048 resident threads each), enough to stream a gradient buffer of
# millions of elements at memory speed; on a small input most threads find nothing to add.
NORM_BLOCK = 256
NORM_GRID = 1024
# split_qkv and merge_grad_qkv: ELEMENT_BLOCK threads per block, one thread per element up to
# _ELEMENT_GRID_MAX blocks (16.7M elements), beyond that each thread loops (a grid-stride loop)
ELEMENT_BLOCK = 256
_ELEMENT_GRID_MAX = 65535

_C_TYPES = {"float32": "float", "float64": "double"}

# NVRTC option: no contraction of a*b+c into one fused multiply-add, so each kernel rounds every
# product as the plain formula (one array operation per product) does. Without it, softmax of
# scale * s with |scale * s| ~ 1e4 would differ from the plain version by ~1e-4 relative in float32
# (exp of the unrounded scale*s - max). The kernels are memory-bound: this costs nothing measurable.
_COMPILE_OPTIONS = ("--fmad=false",)

# ---------------------------------------------------------------------------------------------------
# Kernel sources (plain strings: building them needs no CuPy)
# ---------------------------------------------------------------------------------------------------

# GELU constants exactly as gelu.py computes them (in Python double precision, then cast to T).
_GELU_C = repr(SQRT_2_OVER_PI)                                  # c
_GELU_CA = repr(SQRT_2_OVER_PI * CUBIC_COEFFICIENT)             # c * a
_GELU_3CA = repr(3.0 * SQRT_2_OVER_PI * CUBIC_COEFFICIENT)      # 3 * c * a

# optim.py AdamW.step, in its order: the moments, the decoupled decay, the update (the two variants
# below differ only in the decay step)
_ADAMW_MOMENTS = ("exp_avg = exp_avg * beta1 + grad * one_minus_beta1;\n"
                  "exp_avg_sq = exp_avg_sq * beta2 + (grad * grad) * one_minus_beta2;\n")
_ADAMW_UPDATE = "param = param - (exp_avg / (sqrt(exp_avg_sq) * inv_sqrt_bc2 + eps)) * step_size;\n"

# name -> (in_params, out_params, operation)
_ELEMENTWISE_SOURCES = {
    # gelu.py forward: u = x * (c + c*a * x*x);  t = tanh(u);  y = (t + 1) * (0.5 * x)
    "scratchvit_gelu_forward": (
        "T x",
        "T y, T t",
        "const T u = ((x * x) * (T)" + _GELU_CA + " + (T)" + _GELU_C + ") * x;\n"
        "t = tanh(u);\n"
        "y = (t + (T)1) * ((T)0.5 * x);\n",
    ),
    # gelu.py backward: dy/dx = ((x*x * 3ca + c) * x) * (1 - t*t) + (1 + t);  dL/dx = dy/dx * (0.5 * g)
    "scratchvit_gelu_backward": (
        "T x, T t, T grad_out",
        "T grad_x",
        "T d = (x * x) * (T)" + _GELU_3CA + " + (T)" + _GELU_C + ";\n"
        "d = d * x;\n"
        "d = d * ((T)1 - t * t);\n"
        "d = d + ((T)1 + t);\n"
        "grad_x = d * ((T)0.5 * grad_out);\n",
    ),
    # dropout.py forward: keep = u >= p;  mask = keep * (1 / (1 - p));  y = x * mask
    "scratchvit_dropout_forward": (
        "T x, T u, T p, T scale",
        "T mask, T y",
        "mask = (u >= p) ? scale : (T)0;\n"
        "y = x * mask;\n",
    ),
    # a residual add after dropout with a given mask: y = x + h * mask
    "scratchvit_add_dropout": (
        "T x, T h, T mask",
        "T y",
        "y = x + h * mask;\n",
    ),
    # residual add after dropout, the mask drawn in the same launch: y = x + h * mask
    "scratchvit_add_dropout_forward": (
        "T x, T h, T u, T p, T scale",
        "T mask, T y",
        "mask = (u >= p) ? scale : (T)0;\n"
        "y = x + h * mask;\n",
    ),
    # softmax_cross_entropy.py backward: grad = ((p - s/C) - (1 - s)[c == label]) * (grad_loss / B).
    # `i` is the C-order index into the (B, C) output, so its row is i / C and its class i - row * C.
    "scratchvit_cross_entropy_backward": (
        "T p, raw int64 labels, raw T upstream, T smooth_over_c, T one_minus_smooth, T inv_batch, "
        "int64 num_classes",
        "T grad",
        "const long long row = i / num_classes;\n"
        "const long long col = i - row * num_classes;\n"
        "T value = p - smooth_over_c;\n"
        "if (col == labels[row]) {\n"
        "    value = value - one_minus_smooth;\n"
        "}\n"
        "grad = value * (upstream[0] * inv_batch);\n",
    ),
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
    # optim.py AdamW.clip_grad_norm: grad *= minimum(1, max_norm / (norm + eps)), norm a 0-d device
    # array read by every thread. `factor > 1 ? 1 : factor` keeps a NaN factor NaN, as numpy.minimum does.
    "scratchvit_scale_to_max_norm": (
        "raw T norm, T max_norm, T eps",
        "T grad",
        "T factor = max_norm / (norm[0] + eps);\n"
        "factor = (factor > (T)1) ? (T)1 : factor;\n"
        "grad = grad * factor;\n",
    ),
    # weight_average.py WeightAverage.update: step = theta - average;  step *= rate;  average += step
    "scratchvit_weight_average_update": (
        "T weights, T rate",
        "T average",
        "average = average + (weights - average) * rate;\n",
    ),
    # optim.py AdamW.step, decay with a per-element mask (parameter groups with different decays)
    "scratchvit_adamw_masked": (
        "T grad, T decay_mask, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T decay_rate, "
        "T inv_sqrt_bc2, T eps, T step_size",
        "T param, T exp_avg, T exp_avg_sq",
        _ADAMW_MOMENTS + "param = param - (param * decay_mask) * decay_rate;\n" + _ADAMW_UPDATE,
    ),
    # optim.py AdamW.step, one weight decay for all elements
    "scratchvit_adamw_unmasked": (
        "T grad, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T decay_factor, "
        "T inv_sqrt_bc2, T eps, T step_size",
        "T param, T exp_avg, T exp_avg_sq",
        _ADAMW_MOMENTS + "param = param * decay_factor;\n" + _ADAMW_UPDATE,
    ),
}

# Shared by every row kernel, after `typedef float T;` / `typedef double T;`. One warp (32 threads) per
# row, ROWS_PER_BLOCK rows per block: warp w of block b owns row b * ROWS_PER_BLOCK + w, and its lane
# (0..31) strides over the row. The sums and maxima are butterfly reductions in registers: after the
# step with offset o, lanes i and i ^ o hold the same value, so after five steps every lane holds the
# row's result, bit for bit the same in every lane (each step's addition has the same two operands,
# swapped, and IEEE addition is commutative). No shared memory, no __syncthreads: the warp reads its
# lanes' registers directly. All 32 lanes must call the reductions (the full mask says so): a warp
# whose row lies past the end returns as a whole before any of them.
_ROW_HELPERS = r"""
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

# The l2_norm kernels' block sum, in double: a tree in shared memory, the same order on every run.
# Needs blockDim.x == NORM_BLOCK (a power of two); every thread of the block must call it (it syncs).
_NORM_BLOCK_SUM = r"""
__device__ double norm_block_sum(double value, double* buf) {
    const int tid = threadIdx.x;
    buf[tid] = value;
    __syncthreads();
    for (int stride = NORM_BLOCK / 2; stride > 0; stride >>= 1) {
        if (tid < stride) {
            buf[tid] = buf[tid] + buf[tid + stride];
        }
        __syncthreads();
    }
    return buf[0];
}
"""

_RAW_SOURCES = {
    # layernorm.py forward, one warp per row of D:
    #   mu = sum(x) * (1/D);  var = sum((x - mu)^2) * (1/D);  rstd = 1 / sqrt(var + eps)
    #   xhat = (x - mu) * rstd;  y = xhat * gamma + beta
    "scratchvit_layernorm_forward": r"""
extern "C" __global__ void scratchvit_layernorm_forward(
        const T* x, const T* gamma, const T* beta, T* y, T* xhat, T* rstd_out, const long long rows,
        const int D, const T eps) {
    ROW_AND_LANE
    const long long base = row * D;
    const T inv_d = (T)(1.0 / (double)D);
    T partial = 0;
    for (int j = lane; j < D; j += 32) {
        partial += x[base + j];
    }
    const T mu = warp_sum(partial) * inv_d;
    partial = 0;
    for (int j = lane; j < D; j += 32) {
        const T centred = x[base + j] - mu;
        partial += centred * centred;
    }
    const T var = warp_sum(partial) * inv_d;
    const T rstd = (T)1 / sqrt(var + eps);
    for (int j = lane; j < D; j += 32) {
        const T normalised = (x[base + j] - mu) * rstd;
        xhat[base + j] = normalised;
        y[base + j] = normalised * gamma[j] + beta[j];
    }
    if (lane == 0) {
        rstd_out[row] = rstd;
    }
}
""",
    # layernorm.py backward, one warp per row:  h = g * gamma
    #   grad_x = ((h - mean(h)) - xhat * mean(h * xhat)) * rstd
    "scratchvit_layernorm_backward": r"""
extern "C" __global__ void scratchvit_layernorm_backward(
        const T* grad_out, const T* xhat, const T* rstd, const T* gamma, T* grad_x, const long long rows,
        const int D) {
    ROW_AND_LANE
    const long long base = row * D;
    const T inv_d = (T)(1.0 / (double)D);
    T partial_h = 0;
    T partial_hx = 0;
    for (int j = lane; j < D; j += 32) {
        const T h = grad_out[base + j] * gamma[j];
        partial_h += h;
        partial_hx += h * xhat[base + j];
    }
    const T mean_h = warp_sum(partial_h) * inv_d;
    const T mean_hx = warp_sum(partial_hx) * inv_d;
    const T r = rstd[row];
    for (int j = lane; j < D; j += 32) {
        const T h = grad_out[base + j] * gamma[j];
        grad_x[base + j] = ((h - mean_h) - xhat[base + j] * mean_hx) * r;
    }
}
""",
    # softmax.py forward of scale * scores, one warp per row of n:
    #   z = scale * s;  e = exp(z - max(z));  p = e / sum(e)
    # Every lane starts its maximum at the row's first z (lanes past the end of a short row have no
    # element of their own), so the maximum is one of the row's values.
    "scratchvit_softmax_forward": r"""
extern "C" __global__ void scratchvit_softmax_forward(
        const T* scores, T* probs, const long long rows, const int n, const T scale) {
    ROW_AND_LANE
    const long long base = row * n;
    T local_max = scale * scores[base];
    for (int j = lane; j < n; j += 32) {
        const T z = scale * scores[base + j];
        local_max = (z > local_max) ? z : local_max;
    }
    const T row_max = warp_max(local_max);
    T partial = 0;
    for (int j = lane; j < n; j += 32) {
        const T e = exp(scale * scores[base + j] - row_max);
        probs[base + j] = e;
        partial += e;
    }
    const T total = warp_sum(partial);
    for (int j = lane; j < n; j += 32) {
        probs[base + j] = probs[base + j] / total;
    }
}
""",
    # softmax.py backward (times scale, the chain rule through z = scale * s), one warp per row:
    #   grad_s = scale * (g * p - p * sum(g * p))
    "scratchvit_softmax_backward": r"""
extern "C" __global__ void scratchvit_softmax_backward(
        const T* probs, const T* grad_probs, T* grad_scores, const long long rows, const int n, const T scale) {
    ROW_AND_LANE
    const long long base = row * n;
    T partial = 0;
    for (int j = lane; j < n; j += 32) {
        partial += grad_probs[base + j] * probs[base + j];
    }
    const T dot = warp_sum(partial);
    for (int j = lane; j < n; j += 32) {
        const T p = probs[base + j];
        grad_scores[base + j] = scale * (grad_probs[base + j] * p - p * dot);
    }
}
""",
    # softmax_cross_entropy.py forward, one warp per row of C logits:
    #   m = max(z);  lse = log(sum(exp(z - m)));  log_p = (z - m) - lse;  probs = exp(log_p)
    #   loss = -log_p[label];  with smoothing s:  loss = (1 - s) * loss - s * mean(log_p)
    # A label outside [0, C) gives a NaN loss (passed in as invalid_loss) instead of a wild read.
    "scratchvit_cross_entropy_forward": r"""
extern "C" __global__ void scratchvit_cross_entropy_forward(
        const T* logits, const long long* labels, T* probs, T* row_loss, const long long rows, const int C,
        const T smoothing, const T one_minus_smoothing, const T invalid_loss) {
    ROW_AND_LANE
    const long long base = row * C;
    T local_max = logits[base];
    for (int j = lane; j < C; j += 32) {
        const T z = logits[base + j];
        local_max = (z > local_max) ? z : local_max;
    }
    const T m = warp_max(local_max);
    T partial = 0;
    for (int j = lane; j < C; j += 32) {
        partial += exp(logits[base + j] - m);
    }
    const T lse = log(warp_sum(partial));
    T partial_log_p = 0;
    for (int j = lane; j < C; j += 32) {
        const T log_p = (logits[base + j] - m) - lse;
        probs[base + j] = exp(log_p);
        partial_log_p += log_p;
    }
    const T sum_log_p = warp_sum(partial_log_p);
    if (lane == 0) {
        const long long label = labels[row];
        T loss = invalid_loss;
        if (label >= 0 && label < C) {
            loss = -((logits[base + label] - m) - lse);
            if (smoothing != (T)0) {
                loss = one_minus_smoothing * loss - smoothing * (sum_log_p / (T)C);
            }
        }
        row_loss[row] = loss;
    }
}
""",
    # attention.py forward, the split of qkv (B, T, 3D) into heads (D = H * d, s = 0, 1, 2 for q, k, v):
    #   qkv.reshape(B, T, 3, H, d).transpose(2, 0, 3, 1, 4)[s, b, h, t, e] = qkv[b, t, s*D + h*d + e]
    #   q_scaled = q * scale;  k, v copied (B, H, T, d);  k^T, v^T copied (B, H, d, T)
    # One thread per element i of a (B, T, D) array, i = (b*T + t) * D + c with c = h*d + e: it reads
    # the three values qkv[(b*T + t) * 3D + s*D + c] (consecutive threads, consecutive addresses) and
    # writes them at
    #   by_token   = ((b*H + h) * T + t) * d + e     into q_scaled, k, v       [b, h, t, e]
    #   by_feature = ((b*H + h) * d + e) * T + t     into k_t, v_t             [b, h, e, t]
    # (consecutive threads write k_t and v_t T elements apart: a transpose, as CuPy's copies were).
    # 64-bit indices: B*T*3D may pass 2**31 even when every dimension fits an int.
    "scratchvit_split_qkv": r"""
extern "C" __global__ void scratchvit_split_qkv(
        const T* qkv, T* q_scaled, T* k, T* v, T* k_t, T* v_t,
        const int batch, const int tokens, const int heads, const int head_dim, const T scale) {
    const long long D = (long long)heads * head_dim;
    const long long n = (long long)batch * tokens * D;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const long long row = i / D;                 // b*T + t
        const long long c = i - row * D;             // h*d + e
        const long long b = row / tokens;
        const long long t = row - b * tokens;
        const long long h = c / head_dim;
        const long long e = c - h * head_dim;
        const long long source = row * (3 * D) + c;  // q's element; k's is D further, v's 2D
        const long long bh = b * heads + h;
        const long long by_token = (bh * tokens + t) * head_dim + e;
        const long long by_feature = (bh * head_dim + e) * tokens + t;
        q_scaled[by_token] = qkv[source] * scale;
        const T key = qkv[source + D];
        k[by_token] = key;
        k_t[by_feature] = key;
        const T value = qkv[source + 2 * D];
        v[by_token] = value;
        v_t[by_feature] = value;
    }
}
""",
    # attention.py backward, the split undone: grad_heads (3, B, H, T, d) holds [g_q_scaled, g_k, g_v];
    #   g_q = g_q_scaled * scale   (forward: q_scaled = q * scale)
    #   grad_qkv = grad_heads.transpose(1, 3, 0, 2, 4).reshape(B, T, 3D):
    #   grad_qkv[b, t, s*D + h*d + e] = grad_heads[s, b, h, t, e]
    # Threads as in scratchvit_split_qkv (i = (b*T + t) * D + c, c = h*d + e); thread i reads
    # grad_heads at s*n + ((b*H + h) * T + t) * d + e (n = B*T*D, the size of one of the three) and
    # writes grad_qkv at (b*T + t) * 3D + s*D + c. g_k and g_v are copied, not multiplied by 1:
    # under -ftz a float32 product would flush subnormals the plain copy keeps.
    "scratchvit_merge_grad_qkv": r"""
extern "C" __global__ void scratchvit_merge_grad_qkv(
        const T* grad_heads, T* grad_qkv,
        const int batch, const int tokens, const int heads, const int head_dim, const T scale) {
    const long long D = (long long)heads * head_dim;
    const long long n = (long long)batch * tokens * D;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const long long row = i / D;                 // b*T + t
        const long long c = i - row * D;             // h*d + e
        const long long b = row / tokens;
        const long long t = row - b * tokens;
        const long long h = c / head_dim;
        const long long e = c - h * head_dim;
        const long long by_token = ((b * heads + h) * tokens + t) * head_dim + e;
        const long long target = row * (3 * D) + c;  // g_q's element; g_k's is D further, g_v's 2D
        grad_qkv[target] = grad_heads[by_token] * scale;
        grad_qkv[target + D] = grad_heads[n + by_token];
        grad_qkv[target + 2 * D] = grad_heads[2 * n + by_token];
    }
}
""",
    # optim.py AdamW.grad_norm, sqrt(g . g), stage 1 of 2: thread tid of block j sums the squares of
    # x[(k * NORM_GRID + j) * NORM_BLOCK + tid], k = 0, 1, ... (a grid-stride loop), the block sums its
    # threads' sums, and thread 0 writes partials[j].
    # In double for float32 too, for three reasons. The square of a float32 is exact in double (a 24-bit
    # significand squared fits in 53 bits). It neither overflows (a float32 square does above
    # |x| ~ 1.8e19: one such gradient would make the norm inf, and clip_grad_norm would then scale every
    # gradient to zero) nor underflows (a float32 square goes subnormal below |x| ~ 1.1e-19, and -ftz
    # flushes it to zero). And the sum's rounding error stays far below float32's: each thread adds at
    # most ceil(n / (NORM_GRID * NORM_BLOCK)) terms, then come a tree of 8 levels, 4 partials per thread
    # in stage 2 and another tree of 8 levels, a relative error of at most about
    # (n / 262144 + 20) * 1.1e-16 against float32's 6e-8.
    # What -ftz still does here: the conversion to double (cvt.ftz.f64.f32) flushes float32 elements
    # that are themselves subnormal (|x| < 2**-126) to zero; their squares (< 2**-252) change no norm
    # that float32 can represent. On an H100/H200 (full-rate float64) the few double operations per
    # element cost far less than loading the element: the kernel is bound by memory either way.
    "scratchvit_l2_norm_partials": r"""
#define NORM_BLOCK """ + str(NORM_BLOCK) + r"""
#define NORM_GRID """ + str(NORM_GRID) + r"""
""" + _NORM_BLOCK_SUM + r"""
extern "C" __global__ void scratchvit_l2_norm_partials(const T* x, const long long n, double* partials) {
    __shared__ double buf[NORM_BLOCK];
    double partial = 0.0;
    for (long long i = (long long)blockIdx.x * NORM_BLOCK + threadIdx.x; i < n;
            i += (long long)NORM_GRID * NORM_BLOCK) {
        const double value = (double)x[i];
        partial += value * value;
    }
    const double total = norm_block_sum(partial, buf);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = total;
    }
}
""",
    # stage 2 of 2, one block: thread tid sums partials[tid + k * NORM_BLOCK] (k = 0, 1, ...), the block
    # sums those, and thread 0 writes norm[0] = sqrt(total): the square root in double, then one rounding
    # to T (a float32 norm below 2**-126 becomes 0 under -ftz).
    "scratchvit_l2_norm_finish": r"""
#define NORM_BLOCK """ + str(NORM_BLOCK) + r"""
#define NORM_GRID """ + str(NORM_GRID) + r"""
""" + _NORM_BLOCK_SUM + r"""
extern "C" __global__ void scratchvit_l2_norm_finish(const double* partials, T* norm) {
    __shared__ double buf[NORM_BLOCK];
    double partial = 0.0;
    for (int j = threadIdx.x; j < NORM_GRID; j += NORM_BLOCK) {
        partial += partials[j];
    }
    const double total = norm_block_sum(partial, buf);
    if (threadIdx.x == 0) {
        norm[0] = (T)sqrt(total);
    }
}
""",
}

# ---------------------------------------------------------------------------------------------------
# Lazy construction: each kernel object is created once, on first use
# ---------------------------------------------------------------------------------------------------

_cupy_module = None
_elementwise_kernels = {}   # name -> cupy.ElementwiseKernel (type-generic: CuPy compiles per dtype)
_raw_kernels = {}           # (name, dtype name) -> cupy.RawKernel


def _cupy():
    """CuPy, imported (and its device checked) on first use; BackendUnavailable if it cannot be used."""
    global _cupy_module
    if _cupy_module is None:
        from .backend import cupy_or_error
        _cupy_module = cupy_or_error()
    return _cupy_module


def _elementwise(name):
    kernel = _elementwise_kernels.get(name)
    if kernel is None:
        in_params, out_params, operation = _ELEMENTWISE_SOURCES[name]
        kernel = _cupy().ElementwiseKernel(in_params, out_params, operation, name, options=_COMPILE_OPTIONS)
        _elementwise_kernels[name] = kernel
    return kernel


def raw_kernel_source(name, dtype_name):
    """The full CUDA source of raw kernel `name` for "float32" or "float64" (also used by the tests)."""
    source = _RAW_SOURCES[name]
    helpers = _ROW_HELPERS if "ROW_AND_LANE" in source else ""   # the row kernels' warp reductions
    return "typedef " + _C_TYPES[dtype_name] + " T;\n" + helpers + source


def _raw(name, dtype):
    key = (name, dtype.name)
    kernel = _raw_kernels.get(key)
    if kernel is None:
        kernel = _cupy().RawKernel(raw_kernel_source(name, dtype.name), name, options=_COMPILE_OPTIONS)
        _raw_kernels[key] = kernel
    return kernel


def _float_dtype(*arrays):
    """The common dtype of `arrays`, which must be float32 or float64 and all the same."""
    dtype = arrays[0].dtype
    for array in arrays[1:]:
        if array.dtype != dtype:
            raise TypeError(f"fused kernels need one dtype for all arrays, got {dtype} and {array.dtype}")
    if dtype.name not in _C_TYPES:
        raise TypeError(f"fused kernels support float32 and float64, got {dtype}")
    return dtype


_ROW_THREADS = (32 * ROWS_PER_BLOCK,)


def _row_grid(rows):
    """Blocks for a row kernel over `rows` rows, ROWS_PER_BLOCK per block (the last may be partly empty)."""
    blocks = -(-rows // ROWS_PER_BLOCK)
    if blocks >= 2**31:
        raise ValueError(f"{rows} rows exceed the row kernels' grid ({2**31 - 1} blocks of {ROWS_PER_BLOCK} rows)")
    return (blocks,)


def _on_device(cupy, **arrays):
    """TypeError, one line naming the argument, unless every array is a CuPy array: a NumPy array
    would reach `cupy.ascontiguousarray`, which takes device arrays only (cupy/_core/core.pyx,
    `ascontiguousarray`), or a kernel launch, which refuses it deep inside CuPy."""
    for name, array in arrays.items():
        if not isinstance(array, cupy.ndarray):
            raise TypeError(f"{name} must be a CuPy array (on the GPU), got {type(array).__module__}."
                            f"{type(array).__name__}")


def _rows(shape):
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows


# ---------------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------------

def gelu_forward(x):
    """Tanh-GELU in one launch: returns (y, t), t = tanh(c (x + a x^3)), as `layers.GELU.forward`
    computes y and keeps t."""
    _float_dtype(x)
    y, t = _elementwise("scratchvit_gelu_forward")(x)
    return y, t


def gelu_backward(x, t, grad_out):
    """dL/dx of tanh-GELU in one launch, from the forward's x and t: `layers.GELU.backward`.
    grad_out is a CuPy array or a number (the upstream gradient of a 0-d output): a number is passed to
    the kernel as a scalar, cast to x's dtype (CuPy takes Python and NumPy scalars, never a NumPy array:
    cupy/_core/_kernel.pyx `_preprocess_arg`, cupy/_core/_scalar.pyx `CScalar`)."""
    cupy = _cupy()
    if isinstance(grad_out, cupy.ndarray):
        _float_dtype(x, t, grad_out)
    elif numpy.ndim(grad_out) == 0:
        _float_dtype(x, t)
        grad_out = float(grad_out)
    else:
        raise TypeError(f"grad_out must be a CuPy array or a number, got {type(grad_out).__name__} "
                        f"of shape {numpy.shape(grad_out)}")
    return _elementwise("scratchvit_gelu_backward")(x, t, grad_out)


# ---------------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------------

def layernorm_forward(x, gamma, beta, eps):
    """LayerNorm over the last axis in one launch: returns (y, xhat, rstd) with rstd of shape (..., 1),
    exactly what `layers.LayerNorm.forward` returns and keeps."""
    cupy = _cupy()
    dtype = _float_dtype(x, gamma, beta)
    D = x.shape[-1]
    if gamma.shape != (D,) or beta.shape != (D,):
        raise ValueError(f"gamma and beta must have shape ({D},), got {gamma.shape} and {beta.shape}")
    _on_device(cupy, x=x, gamma=gamma, beta=beta)
    x = cupy.ascontiguousarray(x)
    gamma, beta = cupy.ascontiguousarray(gamma), cupy.ascontiguousarray(beta)
    y = cupy.empty(x.shape, dtype=dtype)
    xhat = cupy.empty(x.shape, dtype=dtype)
    rstd = cupy.empty(x.shape[:-1] + (1,), dtype=dtype)
    rows = _rows(x.shape)
    if rows and D:
        _raw("scratchvit_layernorm_forward", dtype)(
            _row_grid(rows), _ROW_THREADS, (x, gamma, beta, y, xhat, rstd, numpy.int64(rows), _int32(D),
                                            dtype.type(eps)))
    return y, xhat, rstd


def layernorm_backward(grad_out, xhat, rstd, gamma):
    """LayerNorm backward: returns (grad_x, grad_gamma, grad_beta), as `layers.LayerNorm.backward`
    (which adds grad_gamma and grad_beta into the parameters' gradients: the caller does that here).
    grad_x is one launch; the two parameter sums are `column_sum`s, as in the plain layer."""
    cupy = _cupy()
    dtype = _float_dtype(grad_out, xhat, rstd, gamma)
    D = grad_out.shape[-1]
    if xhat.shape != grad_out.shape or gamma.shape != (D,) or rstd.size != _rows(grad_out.shape):
        raise ValueError(f"layernorm_backward: shapes do not match: grad_out {grad_out.shape}, xhat {xhat.shape}, "
                         f"rstd {rstd.shape}, gamma {gamma.shape}")
    _on_device(cupy, grad_out=grad_out, xhat=xhat, rstd=rstd, gamma=gamma)
    grad_out, xhat = cupy.ascontiguousarray(grad_out), cupy.ascontiguousarray(xhat)
    rstd, gamma = cupy.ascontiguousarray(rstd), cupy.ascontiguousarray(gamma)
    grad_x = cupy.empty(grad_out.shape, dtype=dtype)
    rows = _rows(grad_out.shape)
    if rows and D:
        _raw("scratchvit_layernorm_backward", dtype)(
            _row_grid(rows), _ROW_THREADS, (grad_out, xhat, rstd, gamma, grad_x, numpy.int64(rows), _int32(D)))
    grad_beta = column_sum(grad_out)
    grad_gamma = column_sum(grad_out * xhat)
    return grad_x, grad_gamma, grad_beta


# ---------------------------------------------------------------------------------------------------
# Softmax (attention)
# ---------------------------------------------------------------------------------------------------

def softmax_forward(scores, scale=1.0):
    """Row softmax of scale * scores over the last axis, max-subtracted, in one launch:
    `layers.softmax(scale * scores)`."""
    cupy = _cupy()
    dtype = _float_dtype(scores)
    scores = cupy.ascontiguousarray(scores)
    probs = cupy.empty(scores.shape, dtype=dtype)
    rows, n = _rows(scores.shape), scores.shape[-1]
    if rows and n:
        _raw("scratchvit_softmax_forward", dtype)(
            _row_grid(rows), _ROW_THREADS, (scores, probs, numpy.int64(rows), _int32(n), dtype.type(scale)))
    return probs


def softmax_backward(probs, grad_probs, scale=1.0):
    """dL/dscores = scale * p * (g - sum(g * p)) row-wise, in one launch:
    `scale * layers.softmax_backward(probs, grad_probs)`."""
    cupy = _cupy()
    dtype = _float_dtype(probs, grad_probs)
    if probs.shape != grad_probs.shape:
        raise ValueError(f"probs {probs.shape} and grad_probs {grad_probs.shape} must have the same shape")
    probs, grad_probs = cupy.ascontiguousarray(probs), cupy.ascontiguousarray(grad_probs)
    grad_scores = cupy.empty(probs.shape, dtype=dtype)
    rows, n = _rows(probs.shape), probs.shape[-1]
    if rows and n:
        _raw("scratchvit_softmax_backward", dtype)(
            _row_grid(rows), _ROW_THREADS, (probs, grad_probs, grad_scores, numpy.int64(rows), _int32(n),
                                            dtype.type(scale)))
    return grad_scores


# ---------------------------------------------------------------------------------------------------
# Attention: the split of qkv into heads, and its gradient's merge
# ---------------------------------------------------------------------------------------------------

def _element_grid(n):
    """Blocks for a grid-stride kernel over n elements: one thread each, up to _ELEMENT_GRID_MAX blocks."""
    return (max(1, min(-(-n // ELEMENT_BLOCK), _ELEMENT_GRID_MAX)),)


def split_qkv(qkv, heads, scale):
    """The q, k, v heads of a (B, T, 3D) qkv in one launch: returns (q_scaled, k, v, k_t, v_t), new
    C-contiguous arrays, q_scaled, k, v of shape (B, H, T, d) and k_t, v_t of shape (B, H, d, T)
    (H = heads, d = D / H), as `layers.MultiHeadSelfAttention.forward` computes them:
        q, k, v = qkv.reshape(B, T, 3, H, d).transpose(2, 0, 3, 1, 4)
        q_scaled = q * scale;  k_t = k.transpose(0, 1, 3, 2);  v_t = v.transpose(0, 1, 3, 2)
    k and v are exact copies; q_scaled is one rounding of q * scale, scale cast to the dtype."""
    cupy = _cupy()
    dtype = _float_dtype(qkv)
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"qkv must have shape (B, T, 3 * heads * head_dim) with heads={heads}, got {qkv.shape}")
    B, T, three_D = qkv.shape
    d = three_D // (3 * heads)
    qkv = cupy.ascontiguousarray(qkv)
    q_scaled, k, v = (cupy.empty((B, heads, T, d), dtype=dtype) for _ in range(3))
    k_t, v_t = (cupy.empty((B, heads, d, T), dtype=dtype) for _ in range(2))
    n = B * T * heads * d
    if n:
        _raw("scratchvit_split_qkv", dtype)(
            _element_grid(n), (ELEMENT_BLOCK,),
            (qkv, q_scaled, k, v, k_t, v_t, _int32(B), _int32(T), _int32(heads), _int32(d), dtype.type(scale)))
    return q_scaled, k, v, k_t, v_t


def merge_grad_qkv(grad_heads, scale):
    """The gradient of split_qkv's input in one launch: grad_heads (3, B, H, T, d) holds the gradients
    of (q_scaled, k, v); returns grad_qkv (B, T, 3 * H * d), new and C-contiguous, as
    `layers.MultiHeadSelfAttention.backward` computes it:
        grad_heads[0] *= scale      (q_scaled = q * scale)
        grad_qkv = grad_heads.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * d)
    without modifying grad_heads."""
    cupy = _cupy()
    dtype = _float_dtype(grad_heads)
    if grad_heads.ndim != 5 or grad_heads.shape[0] != 3:
        raise ValueError(f"grad_heads must have shape (3, B, heads, T, head_dim), got {grad_heads.shape}")
    _, B, H, T, d = grad_heads.shape
    grad_heads = cupy.ascontiguousarray(grad_heads)
    grad_qkv = cupy.empty((B, T, 3 * H * d), dtype=dtype)
    n = B * T * H * d
    if n:
        _raw("scratchvit_merge_grad_qkv", dtype)(
            _element_grid(n), (ELEMENT_BLOCK,),
            (grad_heads, grad_qkv, _int32(B), _int32(T), _int32(H), _int32(d), dtype.type(scale)))
    return grad_qkv


# ---------------------------------------------------------------------------------------------------
# Matrix products with a transposed operand, through cuBLAS's transpose flag
# ---------------------------------------------------------------------------------------------------

def _cublas():
    """CuPy's cuBLAS modules: the thin wrappers (cupy.cublas) and the raw bindings (cupy_backends)."""
    import cupy.cublas
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas
    return cupy.cublas, cublas, device


def add_transposed_product(a, b, out):
    """out += a^T @ b for 2-D a (M, K), b (M, N) and out (K, N), in one cuBLAS call without a temporary:
    `Linear.backward`'s weight.grad += x_rows.T @ grad_rows.

    cupy.cublas.gemm('T', 'N', a, b, out=out, beta=1.0) (cupy/cublas.py, `gemm`) passes C-contiguous
    a, b and out straight to cuBLAS, the transposes as flags and out as (out^T = b^T a) in column-major
    order; an operand neither C- nor F-contiguous would be copied there, and an output neither C- nor
    F-contiguous copied twice, so a and b are made C-contiguous here (a no-op for the layer's arrays)
    and an out that is not C-contiguous takes the plain `out += a.T @ b`."""
    cupy = _cupy()
    _on_device(cupy, a=a, b=b, out=out)
    if a.ndim != 2 or not (a.dtype == b.dtype == out.dtype) or out.dtype.name not in _C_TYPES:
        out += a.T @ b                # another dtype or shape: CuPy's own rules (and errors)
        return out
    M, K = a.shape
    if b.ndim != 2 or b.shape[0] != M or out.shape != (K, b.shape[1]):
        raise ValueError(f"add_transposed_product: shapes do not match: a {a.shape}, b {b.shape}, out {out.shape}")
    if M == 0 or out.size == 0:       # nothing to add (and cuBLAS refuses a leading dimension of 0)
        return out
    if not out.flags.c_contiguous:
        out += a.T @ b
        return out
    cublas_module, _, _ = _cublas()
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    return cublas_module.gemm("T", "N", a, b, out=out, alpha=1.0, beta=1.0)


def transposed_product(a, b, out=None):
    """a^T @ b over the last two axes, batched over the leading ones, in one cuBLAS call: a (..., K, M),
    b (..., K, N), both C-contiguous with the same leading shape; returns out (..., M, N), C-contiguous
    (given, or new). Attention's backward computes attn^T @ g_context and g_scores^T @ q_scaled this way.

    Why not `a.transpose(...) @ b`: CuPy's batched matmul (arrays of 3 or more axes) copies every
    operand that is not C-contiguous (cupy/_core/_routines_linalg.pyx, `matmul`: ascontiguousarray
    of both operands, then gemmStridedBatchedEx with both transpose flags 0), so a transposed view
    costs a full copy of a, one launch and its memory traffic. cuBLAS reads a transposed operand in
    place when told so by its flag, which is what this passes.

    In cuBLAS's column-major terms, a C-contiguous (R, C) matrix is its own transpose (C, R) with leading
    dimension C. So out^T (N, M) = b^T (N, K) @ a (K, M) is gemm(op_A = N on b's buffer, lda = N;
    op_B = T on a's buffer, which cuBLAS sees as a^T (M, K) with ldb = M; ldc = N), one matrix per batch
    entry at strides K*N, K*M and M*N (cublas<t>gemmStridedBatched, cupy_backends/cuda/libs/cublas.pyx)."""
    cupy = _cupy()
    dtype = _float_dtype(a, b)
    _on_device(cupy, a=a, b=b)
    if a.ndim < 3 or b.ndim != a.ndim or a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"transposed_product needs a (..., K, M) and b (..., K, N) with the same leading "
                         f"shape and K, got {a.shape} and {b.shape}")
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        raise ValueError("transposed_product needs C-contiguous a and b (a copy is what it avoids)")
    K, M, N = a.shape[-2], a.shape[-1], b.shape[-1]
    shape = a.shape[:-2] + (M, N)
    if out is None:
        out = cupy.empty(shape, dtype=dtype)
    elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {shape}, got {out.dtype} {out.shape}")
    batch = _rows(a.shape[:-1])        # the product of the leading axes
    if out.size == 0:
        return out
    if K == 0:                        # an empty sum: cuBLAS would be given lda/ldb it may refuse
        out.fill(0)
        return out
    (op_a, op_b, m, n, k, lda, stride_a, ldb, stride_b, ldc, stride_c, batch) = _transposed_product_gemm(K, M, N, batch)
    _, cublas, device = _cublas()
    gemm = cublas.sgemmStridedBatched if dtype == numpy.float32 else cublas.dgemmStridedBatched
    ops = {"N": cublas.CUBLAS_OP_N, "T": cublas.CUBLAS_OP_T}
    one, zero = numpy.ones((), dtype=dtype), numpy.zeros((), dtype=dtype)   # host scalars: host pointer mode
    handle = device.get_cublas_handle()
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:                              # cuBLAS's A is b's buffer, its B is a's (see the docstring)
        gemm(handle, ops[op_a], ops[op_b], m, n, k, one.ctypes.data, b.data.ptr, lda, stride_a,
             a.data.ptr, ldb, stride_b, zero.ctypes.data, out.data.ptr, ldc, stride_c, batch)
    finally:
        cublas.setPointerMode(handle, mode)
    return out


def _transposed_product_gemm(K, M, N, batch):
    """The arguments of cublas<t>gemmStridedBatched for out = a^T @ b (transposed_product's docstring):
    (op_A, op_B, m, n, k, lda, strideA, ldb, strideB, ldc, strideC, batchCount), cuBLAS's A being b's
    C-contiguous (K, N) buffer and its B being a's (K, M) buffer. Kept apart so that a test can run them
    through a column-major gemm written in NumPy."""
    for size in (M, N, K, batch):
        _int32(size)
    return "N", "T", N, M, K, N, K * N, M, K * M, N, M * N, batch


# ---------------------------------------------------------------------------------------------------
# Dropout and the residual add
# ---------------------------------------------------------------------------------------------------

def _uniforms(x, p, generator, uniforms):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    if (generator is None) == (uniforms is None):
        raise ValueError("give exactly one of generator (a CuPy Generator) and uniforms (an array like x)")
    if uniforms is None:
        uniforms = generator.random(x.shape, dtype=x.dtype)   # the draw Dropout.forward makes
    elif uniforms.shape != x.shape:
        raise ValueError(f"uniforms must have x's shape {x.shape}, got {uniforms.shape}")
    return uniforms


def dropout_forward(x, p, generator=None, *, uniforms=None):
    """Inverted dropout: returns (y, mask), mask = (u >= p) / (1 - p) and y = x * mask, written by one
    elementwise launch, as `layers.Dropout.forward` computes them.

    u are uniforms in [0, 1) of x's shape and dtype: drawn here as `generator.random(x.shape, dtype=x.dtype)`
    (a second launch, inside cuRAND), the very draw Dropout.forward makes, so the same seeded generator
    gives the same mask; or given as `uniforms`."""
    _float_dtype(x)
    u = _uniforms(x, p, generator, uniforms)
    _float_dtype(x, u)
    mask, y = _elementwise("scratchvit_dropout_forward")(x, u, float(p), 1.0 / (1.0 - p))
    return y, mask


def add_dropout(x, h, mask):
    """x + h * mask in one launch: a residual add after dropout with a known mask (`x + h * mask`)."""
    _float_dtype(x, h, mask)
    return _elementwise("scratchvit_add_dropout")(x, h, mask)


def add_dropout_forward(x, h, p, generator=None, *, uniforms=None):
    """A residual add after inverted dropout: returns (y, mask), y = x + h * mask with mask drawn as in
    `dropout_forward` (uniforms of h's shape), mask and y written by one launch: `x + Dropout.forward(h)`."""
    _float_dtype(x, h)
    u = _uniforms(h, p, generator, uniforms)
    _float_dtype(h, u)
    mask, y = _elementwise("scratchvit_add_dropout_forward")(x, h, u, float(p), 1.0 / (1.0 - p))
    return y, mask


# ---------------------------------------------------------------------------------------------------
# Data augmentation: whole-pixel shifts
# ---------------------------------------------------------------------------------------------------

def shift_images(images, shifts, fill):
    """`data.shift_images` in one launch: image b of (B, C, H, W) `images` translated by the integers
    shifts[b] = (dy, dx), pixels from outside the image set to `fill` (cast to the images' dtype).

    The plain version is one gather with computed indices: in CuPy, index arithmetic, broadcasting
    and a take for its four index arrays, then a mask and a where (cupy/_core/_routines_indexing.pyx,
    `_getitem_multiple`), each a launch of its own; here each output pixel computes its source pixel
    itself. Copies pixels exactly."""
    cupy = _cupy()
    _on_device(cupy, images=images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {images.shape}")
    batch, channels, height, width = images.shape
    shifts = cupy.ascontiguousarray(cupy.asarray(shifts), dtype=cupy.int64)   # uploaded if on the host
    if shifts.shape != (batch, 2):
        raise ValueError(f"shifts must have shape ({batch}, 2) (dy, dx per image), got {shifts.shape}")
    images = cupy.ascontiguousarray(images)
    shifted = cupy.empty(images.shape, dtype=images.dtype)
    if shifted.size:
        _elementwise("scratchvit_shift_images")(images, shifts, height, width, channels,
                                                images.dtype.type(fill), shifted)
    return shifted


# ---------------------------------------------------------------------------------------------------
# Softmax cross-entropy (the loss)
# ---------------------------------------------------------------------------------------------------

def _batch_and_classes(name, scores, labels):
    """(B, C) of (B, C) `scores` (logits or probs) with (B,) labels, or ValueError naming the argument."""
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape (B, num_classes), got {scores.shape}")
    B, C = scores.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},) to match {name} {scores.shape}, got {labels.shape}")
    return B, C


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Softmax cross-entropy with label smoothing on (B, C) logits and (B,) integer labels: returns
    (loss, probs), loss the batch mean as a 0-d CuPy array (no host synchronisation) and probs the
    softmax that the backward needs, as `layers.SoftmaxCrossEntropy.forward`.

    One launch per batch (a warp per row: log-sum-exp, the loss terms, probs) plus the mean.
    A label outside [0, C) makes its row's loss NaN (the plain layer checks labels on the host only)."""
    cupy = _cupy()
    dtype = _float_dtype(logits)
    B, C = _batch_and_classes("logits", logits, labels)
    _on_device(cupy, logits=logits, labels=labels)
    s = float(label_smoothing)
    logits = cupy.ascontiguousarray(logits)
    labels = cupy.ascontiguousarray(labels, dtype=cupy.int64)
    probs = cupy.empty((B, C), dtype=dtype)
    row_loss = cupy.empty((B,), dtype=dtype)
    if B and C:
        _raw("scratchvit_cross_entropy_forward", dtype)(
            _row_grid(B), _ROW_THREADS, (logits, labels, probs, row_loss, numpy.int64(B), _int32(C),
                                 dtype.type(s), dtype.type(1.0 - s), dtype.type(math.nan)))
    return row_loss.mean(), probs


_ones_1 = {}   # dtype name -> cupy.ones(1): the default upstream gradient of the loss


def cross_entropy_backward(probs, labels, label_smoothing=0.0, grad_loss=1.0):
    """dL/dlogits = (probs - t) * grad_loss / B in one launch, t the smoothed one-hot targets:
    `layers.SoftmaxCrossEntropy.backward`. grad_loss may be a Python number or a 0-d CuPy array
    (then it is read on the device: no host synchronisation)."""
    cupy = _cupy()
    dtype = _float_dtype(probs)
    B, C = _batch_and_classes("probs", probs, labels)
    _on_device(cupy, probs=probs, labels=labels)
    s = float(label_smoothing)
    probs = cupy.ascontiguousarray(probs)
    labels = cupy.ascontiguousarray(labels, dtype=cupy.int64)
    if isinstance(grad_loss, cupy.ndarray):
        upstream = grad_loss.astype(dtype, copy=False).reshape(1)
    elif grad_loss == 1.0:
        upstream = _ones_1.get(dtype.name)
        if upstream is None:
            upstream = _ones_1[dtype.name] = cupy.ones(1, dtype=dtype)
    else:
        upstream = cupy.full((1,), grad_loss, dtype=dtype)
    return _elementwise("scratchvit_cross_entropy_backward")(
        probs, labels, upstream, s / C if C else 0.0, 1.0 - s, 1.0 / B if B else 0.0, C)


# ---------------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------------

def adamw_step(data, grad, exp_avg, exp_avg_sq, decay_mask, lr, beta1, beta2, eps, weight_decay,
               bias_correction1, bias_correction2):
    """One AdamW step over flat buffers, in one launch, updating data, exp_avg and exp_avg_sq in place:
    exactly `optim.AdamW.step` after its step_count increment:
        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        theta -= lr * wd * mask * theta                       (decoupled decay; mask = 1 if decay_mask is None)
        theta -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
    with bc1 = 1 - beta1^t and bc2 = 1 - beta2^t. All arrays share one shape and dtype."""
    if decay_mask is None:
        _float_dtype(data, grad, exp_avg, exp_avg_sq)
        _elementwise("scratchvit_adamw_unmasked")(
            grad, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay,
            1.0 / math.sqrt(bias_correction2), eps, lr / bias_correction1,
            data, exp_avg, exp_avg_sq)
    else:
        _float_dtype(data, grad, exp_avg, exp_avg_sq, decay_mask)
        _elementwise("scratchvit_adamw_masked")(
            grad, decay_mask, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr * weight_decay,
            1.0 / math.sqrt(bias_correction2), eps, lr / bias_correction1,
            data, exp_avg, exp_avg_sq)


def scale_to_max_norm(grad, norm, max_norm, eps):
    """grad *= minimum(1, max_norm / (norm + eps)) in place, in one launch, `norm` a 0-d CuPy array read
    on the device (no host synchronisation): `AdamW.clip_grad_norm`'s scaling, which as array operations
    is five launches on 0-d temporaries and the multiply."""
    cupy = _cupy()
    _on_device(cupy, grad=grad, norm=norm)
    _float_dtype(grad, norm)
    if norm.size != 1:
        raise ValueError(f"norm must hold one value, got shape {norm.shape}")
    _elementwise("scratchvit_scale_to_max_norm")(norm.reshape(1), float(max_norm), float(eps), grad)


# ---------------------------------------------------------------------------------------------------
# Weight average
# ---------------------------------------------------------------------------------------------------

def weight_average_update(weights, average, rate):
    """average += (weights - average) * rate in place, in one launch and without a temporary:
    `WeightAverage.update`'s three array operations (subtract into a new array, scale, add)."""
    _float_dtype(weights, average)
    if weights.shape != average.shape:
        raise ValueError(f"weights {weights.shape} and average {average.shape} must have the same shape")
    _elementwise("scratchvit_weight_average_update")(weights, float(rate), average)


# ---------------------------------------------------------------------------------------------------
# Gradient norm
# ---------------------------------------------------------------------------------------------------

def l2_norm(x):
    """sqrt(sum(x * x)) over all elements, as a 0-d array of x's dtype: `AdamW.grad_norm`'s sqrt(g . g).

    Two launches of fixed size, no atomics, summing in double (see scratchvit_l2_norm_partials):
    NORM_GRID partial sums, then one block adds them and takes the square root. The result stays on
    the device (no host synchronisation) and is the same, bit for bit, every time for the same x."""
    cupy = _cupy()
    dtype = _float_dtype(x)
    x = cupy.ascontiguousarray(x)
    partials = cupy.empty((NORM_GRID,), dtype=cupy.float64)
    norm = cupy.empty((), dtype=dtype)
    _raw("scratchvit_l2_norm_partials", dtype)((NORM_GRID,), (NORM_BLOCK,), (x, numpy.int64(x.size), partials))
    _raw("scratchvit_l2_norm_finish", dtype)((1,), (NORM_BLOCK,), (partials, norm))
    return norm


def _int32(value):
    """A 32-bit int kernel argument: RawKernel passes a Python int as 64 bits, the kernels take `int`."""
    if not 0 <= value < 2**31:
        raise ValueError(f"size {value} does not fit the kernels' 32-bit int")
    return numpy.int32(value)
