"""One pre-LayerNorm Transformer encoder block.

Shapes: x (B, T, D) in and out; the MLP's hidden layer is (B, T, mlp_dim).

Forward (pre-norm: each branch normalises its input, the residual stream itself is never normalised)
    x = x + Dropout(Attn(LN_1(x)))                                   the attention branch
    x = x + Dropout(fc2(Dropout(GELU(fc1(LN_2(x))))))                the MLP branch

Backward. A residual x_out = x_in + f(x_in) passes its gradient both ways:
    dL/dx_in = dL/dx_out + f.backward(dL/dx_out)
  so the backward pass runs the MLP branch backward, adds, then the attention branch, and adds.

Each `x + Dropout(h)` is `Dropout.forward_add(h, x, overwrite=True)`, written into h (a fresh array no
layer keeps);
on the GPU, with dropout active, mask and sum are one launch (kernels/dropout.py).
"""
from .backend import host_generator
from .layers import GELU, Dropout, LayerNorm, Layer, Linear, MultiHeadSelfAttention


class EncoderBlock(Layer):
    def __init__(self, dim, heads, mlp_dim, *, dropout=0.0, dtype="float32", rng=None, dropout_seeds=(0, 1, 2)):
        rng = host_generator(0) if rng is None else rng      # one generator: every Linear draws its own weights
        self.attn_norm = LayerNorm(dim, dtype=dtype)
        self.attn = MultiHeadSelfAttention(dim, heads, dtype=dtype, rng=rng)
        self.attn_dropout = Dropout(dropout, seed=dropout_seeds[0])
        self.mlp_norm = LayerNorm(dim, dtype=dtype)
        self.fc1 = Linear(dim, mlp_dim, dtype=dtype, rng=rng)
        self.gelu = GELU()
        self.hidden_dropout = Dropout(dropout, seed=dropout_seeds[1])
        self.fc2 = Linear(mlp_dim, dim, dtype=dtype, rng=rng)
        self.mlp_dropout = Dropout(dropout, seed=dropout_seeds[2])

    def forward(self, x):
        h = self.attn.forward(self.attn_norm.forward(x))
        x = self.attn_dropout.forward_add(h, x, overwrite=True)                       # x = x + Dropout(h), in h
        h = self.gelu.forward(self.fc1.forward(self.mlp_norm.forward(x)))
        h = self.fc2.forward(self.hidden_dropout.forward(h))
        return self.mlp_dropout.forward_add(h, x, overwrite=True)                     # x + Dropout(h)

    def backward(self, grad_out):
        # forward: x = x + mlp_dropout(fc2(hidden_dropout(gelu(fc1(mlp_norm(x))))))
        grad_h = self.fc2.backward(self.mlp_dropout.backward(grad_out))
        grad_h = self.fc1.backward(self.gelu.backward(self.hidden_dropout.backward(grad_h)))
        grad_x = self.mlp_norm.backward(grad_h)
        grad_x += grad_out                            # the residual: dL/dx_in = dL/dx_out + branch gradient
        # forward: x = x + attn_dropout(attn(attn_norm(x)))
        grad_h = self.attn.backward(self.attn_dropout.backward(grad_x))
        grad_x += self.attn_norm.backward(grad_h)     # grad_x is our own temporary: safe to update in place
        return grad_x
