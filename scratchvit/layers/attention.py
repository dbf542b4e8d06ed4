"""Multi-head self-attention (no mask), all heads in one batched product.

Shapes (B batch, T tokens, D = dim, H heads, d = head_dim = D / H)
    x (B, T, D)  ->  qkv (B, T, 3D) viewed as (B, T, 3, H, d)  ->  q, k, v (B, H, T, d)
    scores, attn (B, H, T, T)   context (B, H, T, d) -> (B, T, D)   out (B, T, D)

Forward
    qkv = x @ W_qkv + b_qkv                     the Linear `qkv`, D -> 3D
    q, k, v = split of qkv as [3, H, d]         (the last axis of qkv, 3D, viewed as [3, heads, head_dim])
    scores = (q @ k^T) / sqrt(d)                scale 1/sqrt(head_dim): dot products of d unit-variance
                                                terms have variance d, so this keeps softmax unsaturated
    attn = softmax(scores)                      over the last axis: each row is positive, sums to 1
    context = attn @ v                          each token's weighted average of the values
    out = merge_heads(context) @ W_proj + b     the Linear `proj`, D -> D

Backward, in reverse, with g = dL/dout:
    g_context = proj.backward(g), split into heads                     (B, H, T, d)
    context = attn @ v      ->  g_attn = g_context @ v^T,  g_v = attn^T @ g_context
    attn = softmax(scores)  ->  g_scores = attn * (g_attn - rowsum(g_attn * attn))
    scores = q_s @ k^T with q_s = q / sqrt(d)
                            ->  g_q = (g_scores @ k) / sqrt(d),  g_k = g_scores^T @ q_s
    g_qkv = [g_q, g_k, g_v] merged back to (B, T, 3D)  ->  g_x = qkv.backward(g_qkv)

On the GPU the same steps run in the twins of forward and backward (kernels/attention.py), which move
the data with fewer launches and copies: the split of qkv into heads and the merge of their gradients
are one kernel each, and the two products with a transposed (B, H, T, T) operand go to cuBLAS with its
transpose flag instead of a copy of that operand.
"""
import math

from .layer import Layer
from .linear import Linear
from .softmax import softmax, softmax_backward
from ..backend import get_array_module, host_generator


class MultiHeadSelfAttention(Layer):
    def __init__(self, dim, heads, *, dtype="float32", rng=None):
        if int(heads) != heads or heads <= 0:
            raise ValueError(f"heads must be a positive integer, got {heads!r}")
        if int(dim) != dim or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if dim % heads:
            raise ValueError(f"dim {dim!r} must be divisible by heads {heads!r}")
        self.dim, self.heads = int(dim), int(heads)
        self.head_dim = self.dim // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)      # 1/sqrt(head_dim), not dim, and no floor division
        rng = host_generator(0) if rng is None else rng      # one generator: qkv and proj draw different weights
        self.qkv = Linear(self.dim, 3 * self.dim, dtype=dtype, rng=rng)
        self.proj = Linear(self.dim, self.dim, dtype=dtype, rng=rng)
        self.q_scaled = self.k = None            # (B, H, T, d) each, used later in backward
        self.v_transposed = None                 # v^T (B, H, d, T), used later in backward
        self.attn = None                         # softmax probabilities (B, H, T, T), used later in backward

    def check_input(self, x):
        """ValueError, one line, unless x is (B, T, dim)."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MultiHeadSelfAttention expects x of shape (B, T, dim={self.dim}), got {x.shape}")

    def forward(self, x):
        xp = get_array_module(x)
        self.check_input(x)
        B, T, D = x.shape
        H, d = self.heads, self.head_dim
        qkv = self.qkv.forward(x)                                          # (B, T, 3D)
        # Contiguous copies of k, k^T, v and v^T (q_scaled is a new array anyway): NumPy's small batched
        # products run about twice as fast on contiguous operands as on transposed views, and the copies
        # cost less than that.
        qkv = qkv.reshape(B, T, 3, H, d).transpose(2, 0, 3, 1, 4)                  # (3, B, H, T, d)
        q_scaled = qkv[0] * self.scale                                             # (B, H, T, d)
        k = xp.ascontiguousarray(qkv[1])                                           # (B, H, T, d)
        v = xp.ascontiguousarray(qkv[2])                                           # (B, H, T, d)
        k_transposed = xp.ascontiguousarray(k.transpose(0, 1, 3, 2))               # (B, H, d, T)
        v_transposed = xp.ascontiguousarray(v.transpose(0, 1, 3, 2))               # (B, H, d, T)
        scores = q_scaled @ k_transposed                                   # (B, H, T, T)
        attn = softmax(scores, overwrite=True)                             # (B, H, T, T)
        context = attn @ v                                                 # (B, H, T, d)
        self.q_scaled, self.k, self.attn, self.v_transposed = q_scaled, k, attn, v_transposed
        merged = context.transpose(0, 2, 1, 3).reshape(B, T, D)            # (B, T, D), heads side by side
        return self.proj.forward(merged)

    def backward(self, grad_out):
        xp = get_array_module(self.attn)                     # the device of what forward kept
        B, T, D = grad_out.shape
        H, d = self.heads, self.head_dim
        q_scaled, k, v_transposed, attn = self.q_scaled, self.k, self.v_transposed, self.attn
        # forward: out = proj(merged)
        grad_merged = self.proj.backward(grad_out)                                 # (B, T, D)
        # forward: merged = context.transpose(0, 2, 1, 3).reshape(B, T, D)
        grad_context = grad_merged.reshape(B, T, H, d).transpose(0, 2, 1, 3)       # (B, H, T, d)
        # the gradients of q, k and v are written straight into one (3, B, H, T, d) buffer
        grad_qkv = xp.empty((3, B, H, T, d), dtype=grad_out.dtype)
        # forward: context = attn @ v
        grad_attn = grad_context @ v_transposed                                    # (B, H, T, T)
        xp.matmul(attn.transpose(0, 1, 3, 2), grad_context, out=grad_qkv[2])       # g_v = attn^T g_context
        # forward: attn = softmax(scores)
        grad_scores = softmax_backward(attn, grad_attn, overwrite=True)            # (B, H, T, T)
        # forward: scores = q_scaled @ k^T, q_scaled = q * scale
        xp.matmul(grad_scores, k, out=grad_qkv[0])                                 # g_q_scaled = g_scores k
        xp.matmul(grad_scores.transpose(0, 1, 3, 2), q_scaled, out=grad_qkv[1])    # g_k = g_scores^T q_scaled
        # forward: q_scaled = q * scale, with q, k, v = qkv.reshape(B, T, 3, H, d).transpose(2, 0, 3, 1, 4)
        grad_qkv[0] *= self.scale                                                  # g_q = g_q_scaled * scale
        grad_qkv = grad_qkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * D)          # (B, T, 3D)
        return self.qkv.backward(grad_qkv)
