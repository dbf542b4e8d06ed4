"""AdamW's GPU twin: optim.py's step, gradient norm and clipping, each in one or two launches.

Steps (optim.py's docstring), for every element, at step t:
    (1) m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    (2) theta = theta - lr * weight_decay * theta          (decoupled decay, per element with a decay mask)
    (3) theta = theta - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),   bc = 1 - beta^t
  all three in one elementwise launch (adamw_step);
    grad_norm  sqrt(g . g): two launches of fixed size, in double (l2_norm)
    clipping   g *= minimum(1, max_norm / (norm + eps)), the norm read on the device (scale_to_max_norm)

Unlike the other twins, these are registered by optim.py itself (its last lines), so that importing the
kernels, as `import scratchvit` does, never imports the optimiser: predict, the report and the demo
need none of it (tests/test_imports.py).
"""
import math

import numpy

from .compile import cupy_module, define_kernels, elementwise_kernel, float_dtype, on_device, raw_kernel

# l2_norm: stage 1 runs NORM_GRID blocks of NORM_BLOCK threads (a power of two, for the tree sum), each
# block writing one partial sum; stage 2 is one block of NORM_BLOCK threads adding the NORM_GRID
# partials. Fixed sizes, not derived from the device or the input: the order of the additions, hence
# the result, depends on the input alone. 1024 blocks of 256 threads are about one full wave on an
# H100/H200 (132 SMs, up to 2048 resident threads each), enough to stream a gradient buffer of
# millions of elements at memory speed; on a small input most threads find nothing to add.
NORM_BLOCK = 256
NORM_GRID = 1024

# optim.py AdamW.step, in its order: the moments, the decoupled decay, the update (the two variants
# below differ only in the decay step)
_ADAMW_MOMENTS = ("exp_avg = exp_avg * beta1 + grad * one_minus_beta1;\n"
                  "exp_avg_sq = exp_avg_sq * beta2 + (grad * grad) * one_minus_beta2;\n")
_ADAMW_UPDATE = "param = param - (exp_avg / (sqrt(exp_avg_sq) * inv_sqrt_bc2 + eps)) * step_size;\n"

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

define_kernels(elementwise={
    # optim.py AdamW.clip_grad_norm: grad *= minimum(1, max_norm / (norm + eps)), norm a 0-d device
    # array read by every thread. `factor > 1 ? 1 : factor` keeps a NaN factor NaN, as numpy.minimum does.
    "scratchvit_scale_to_max_norm": (
        "raw T norm, T max_norm, T eps",
        "T grad",
        "T factor = max_norm / (norm[0] + eps);\n"
        "factor = (factor > (T)1) ? (T)1 : factor;\n"
        "grad = grad * factor;\n",
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
}, raw={
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
})


def adamw_step(data, grad, exp_avg, exp_avg_sq, decay_mask, lr, beta1, beta2, eps, weight_decay,
               bias_correction1, bias_correction2):
    """One AdamW step over flat buffers, in one launch, updating data, exp_avg and exp_avg_sq in place:
    exactly `optim.AdamW.step` after its step_count increment:
        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        theta -= lr * wd * mask * theta                       (decoupled decay; mask = 1 if decay_mask is None)
        theta -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
    with bc1 = 1 - beta1^t and bc2 = 1 - beta2^t. All arrays share one shape and dtype."""
    if decay_mask is None:
        float_dtype(data, grad, exp_avg, exp_avg_sq)
        elementwise_kernel("scratchvit_adamw_unmasked")(
            grad, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay,
            1.0 / math.sqrt(bias_correction2), eps, lr / bias_correction1,
            data, exp_avg, exp_avg_sq)
    else:
        float_dtype(data, grad, exp_avg, exp_avg_sq, decay_mask)
        elementwise_kernel("scratchvit_adamw_masked")(
            grad, decay_mask, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr * weight_decay,
            1.0 / math.sqrt(bias_correction2), eps, lr / bias_correction1,
            data, exp_avg, exp_avg_sq)


def l2_norm(x):
    """sqrt(sum(x * x)) over all elements, as a 0-d array of x's dtype: `AdamW.grad_norm`'s sqrt(g . g).

    Two launches of fixed size, no atomics, summing in double (see scratchvit_l2_norm_partials):
    NORM_GRID partial sums, then one block adds them and takes the square root. The result stays on
    the device (no host synchronisation) and is the same, bit for bit, every time for the same x."""
    cupy = cupy_module()
    dtype = float_dtype(x)
    x = cupy.ascontiguousarray(x)
    partials = cupy.empty((NORM_GRID,), dtype=cupy.float64)
    norm = cupy.empty((), dtype=dtype)
    raw_kernel("scratchvit_l2_norm_partials", dtype)((NORM_GRID,), (NORM_BLOCK,), (x, numpy.int64(x.size), partials))
    raw_kernel("scratchvit_l2_norm_finish", dtype)((1,), (NORM_BLOCK,), (partials, norm))
    return norm


def scale_to_max_norm(grad, norm, max_norm, eps):
    """grad *= minimum(1, max_norm / (norm + eps)) in place, in one launch, `norm` a 0-d CuPy array read
    on the device (no host synchronisation): `AdamW.clip_grad_norm`'s scaling, which as array operations
    is five launches on 0-d temporaries and the multiply."""
    cupy = cupy_module()
    on_device(cupy, grad=grad, norm=norm)
    float_dtype(grad, norm)
    if norm.size != 1:
        raise ValueError(f"norm must hold one value, got shape {norm.shape}")
    elementwise_kernel("scratchvit_scale_to_max_norm")(norm.reshape(1), float(max_norm), float(eps), grad)


def apply_step_on_gpu(optimizer, bias_correction1, bias_correction2):
    beta1, beta2 = optimizer.betas
    adamw_step(optimizer.data, optimizer.grad, optimizer.exp_avg, optimizer.exp_avg_sq, optimizer.decay_mask,
               optimizer.lr, beta1, beta2, optimizer.eps, optimizer.weight_decay, bias_correction1,
               bias_correction2)


def grad_norm_on_gpu(optimizer):
    return l2_norm(optimizer.grad)


def scale_to_max_norm_on_gpu(optimizer, norm, max_norm):
    scale_to_max_norm(optimizer.grad, norm, max_norm, optimizer.clip_eps)
