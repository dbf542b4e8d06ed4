"""MultiHeadSelfAttention's GPU twin: forward and backward of layers/attention.py, the same steps with
fewer launches and copies.

Steps (layers/attention.py's docstring, forward, then backward in reverse):
    q, k, v = split of qkv into heads; q_scaled = q / sqrt(d)     split_qkv: one launch writes q_scaled,
                                                                  k, v, k^T and v^T, reading qkv once
    scores = q_scaled k^T;  attn = softmax(scores);  context = attn v      (cuBLAS, kernels/softmax.py)
    g_v = attn^T g_context;  g_k = g_scores^T q_scaled            transposed_product: cuBLAS reads the
                                                                  transposed (B, H, T, T) operand in place
    g_q = g_q_scaled / sqrt(d), merged with g_k, g_v to (B, T, 3D)   merge_grad_qkv: one launch
grad_context is made C-contiguous once, because CuPy's batched matmul copies every operand that is not
(cupy/_core/_routines_linalg.pyx, `matmul`) and grad_context feeds two products.
"""
import numpy

from .compile import (ELEMENT_BLOCK, cupy_module, cublas_modules, define_kernels, element_grid,
                      float_dtype, on_device, raw_kernel, rows_of, as_int32)
from ..layers.attention import MultiHeadSelfAttention
from ..layers.softmax import softmax, softmax_backward
from ..twins import register_gpu_twin

define_kernels(raw={
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
})


def split_qkv(qkv, heads, scale):
    """The q, k, v heads of a (B, T, 3D) qkv in one launch: returns (q_scaled, k, v, k_t, v_t), new
    C-contiguous arrays, q_scaled, k, v of shape (B, H, T, d) and k_t, v_t of shape (B, H, d, T)
    (H = heads, d = D / H), as `layers.MultiHeadSelfAttention.forward` computes them:
        q, k, v = qkv.reshape(B, T, 3, H, d).transpose(2, 0, 3, 1, 4)
        q_scaled = q * scale;  k_t = k.transpose(0, 1, 3, 2);  v_t = v.transpose(0, 1, 3, 2)
    k and v are exact copies; q_scaled is one rounding of q * scale, scale cast to the dtype."""
    cupy = cupy_module()
    dtype = float_dtype(qkv)
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"qkv must have shape (B, T, 3 * heads * head_dim) with heads={heads}, got {qkv.shape}")
    B, T, three_D = qkv.shape
    d = three_D // (3 * heads)
    qkv = cupy.ascontiguousarray(qkv)
    q_scaled, k, v = (cupy.empty((B, heads, T, d), dtype=dtype) for _ in range(3))
    k_t, v_t = (cupy.empty((B, heads, d, T), dtype=dtype) for _ in range(2))
    n = B * T * heads * d
    if n:
        raw_kernel("scratchvit_split_qkv", dtype)(
            element_grid(n), (ELEMENT_BLOCK,),
            (qkv, q_scaled, k, v, k_t, v_t, as_int32(B), as_int32(T), as_int32(heads), as_int32(d), dtype.type(scale)))
    return q_scaled, k, v, k_t, v_t


def merge_grad_qkv(grad_heads, scale):
    """The gradient of split_qkv's input in one launch: grad_heads (3, B, H, T, d) holds the gradients
    of (q_scaled, k, v); returns grad_qkv (B, T, 3 * H * d), new and C-contiguous, as
    `layers.MultiHeadSelfAttention.backward` computes it:
        grad_heads[0] *= scale      (q_scaled = q * scale)
        grad_qkv = grad_heads.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * d)
    without modifying grad_heads."""
    cupy = cupy_module()
    dtype = float_dtype(grad_heads)
    if grad_heads.ndim != 5 or grad_heads.shape[0] != 3:
        raise ValueError(f"grad_heads must have shape (3, B, heads, T, head_dim), got {grad_heads.shape}")
    _, B, H, T, d = grad_heads.shape
    grad_heads = cupy.ascontiguousarray(grad_heads)
    grad_qkv = cupy.empty((B, T, 3 * H * d), dtype=dtype)
    n = B * T * H * d
    if n:
        raw_kernel("scratchvit_merge_grad_qkv", dtype)(
            element_grid(n), (ELEMENT_BLOCK,),
            (grad_heads, grad_qkv, as_int32(B), as_int32(T), as_int32(H), as_int32(d), dtype.type(scale)))
    return grad_qkv


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
    cupy = cupy_module()
    dtype = float_dtype(a, b)
    on_device(cupy, a=a, b=b)
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
    batch = rows_of(a.shape[:-1])        # the product of the leading axes
    if out.size == 0:
        return out
    if K == 0:                        # an empty sum: cuBLAS would be given lda/ldb it may refuse
        out.fill(0)
        return out
    (op_a, op_b, m, n, k, lda, stride_a, ldb, stride_b, ldc, stride_c, batch) = transposed_product_gemm(K, M, N, batch)
    _, cublas, device = cublas_modules()
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


def transposed_product_gemm(K, M, N, batch):
    """The arguments of cublas<t>gemmStridedBatched for out = a^T @ b (transposed_product's docstring):
    (op_A, op_B, m, n, k, lda, strideA, ldb, strideB, ldc, strideC, batchCount), cuBLAS's A being b's
    C-contiguous (K, N) buffer and its B being a's (K, M) buffer. Kept apart so that a test can run them
    through a column-major gemm written in NumPy."""
    for size in (M, N, K, batch):
        as_int32(size)
    return "N", "T", N, M, K, N, K * N, M, K * M, N, M * N, batch


@register_gpu_twin(MultiHeadSelfAttention.forward)
def forward_on_gpu(layer, x):
    layer.check_input(x)
    B, T, D = x.shape
    qkv = layer.qkv.forward(x)                                                     # (B, T, 3D)
    q_scaled, k, v, k_transposed, v_transposed = split_qkv(qkv, layer.heads, layer.scale)
    scores = q_scaled @ k_transposed                                               # (B, H, T, T)
    attn = softmax(scores, overwrite=True)                                         # (B, H, T, T)
    context = attn @ v                                                             # (B, H, T, d)
    layer.q_scaled, layer.k, layer.attn, layer.v_transposed = q_scaled, k, attn, v_transposed
    merged = context.transpose(0, 2, 1, 3).reshape(B, T, D)                        # (B, T, D)
    return layer.proj.forward(merged)


@register_gpu_twin(MultiHeadSelfAttention.backward)
def backward_on_gpu(layer, grad_out):
    cupy = cupy_module()
    B, T, D = grad_out.shape
    H, d = layer.heads, layer.head_dim
    q_scaled, k, v_transposed, attn = layer.q_scaled, layer.k, layer.v_transposed, layer.attn
    grad_merged = layer.proj.backward(grad_out)                                    # (B, T, D)
    grad_context = grad_merged.reshape(B, T, H, d).transpose(0, 2, 1, 3)           # (B, H, T, d)
    grad_context = cupy.ascontiguousarray(grad_context)     # one copy, not one inside each product below
    grad_qkv = cupy.empty((3, B, H, T, d), dtype=grad_out.dtype)
    grad_attn = grad_context @ v_transposed                                        # (B, H, T, T)
    transposed_product(attn, grad_context, out=grad_qkv[2])                        # g_v = attn^T g_context
    grad_scores = softmax_backward(attn, grad_attn, overwrite=True)                # (B, H, T, T)
    cupy.matmul(grad_scores, k, out=grad_qkv[0])                                   # g_q_scaled = g_scores k
    transposed_product(grad_scores, q_scaled, out=grad_qkv[1])                     # g_k = g_scores^T q_scaled
    return layer.qkv.backward(merge_grad_qkv(grad_qkv, layer.scale))               # g_q = g_q_scaled * scale
