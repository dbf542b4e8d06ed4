"""Softmax and cross-entropy fused into one layer: the loss of the classifier.

Shapes
    logits z (B, C)   labels y (B,) integers in [0, C)   loss: a scalar (0-d array), the batch mean

Forward, for one example with logits z_1..z_C and label y:
    log p_c = (z_c - m) - log sum_j exp(z_j - m),     m = max_j z_j     (log-softmax, max-subtracted)
    target t_c = (1 - s) * [c == y] + s / C            label smoothing s (0 by default: one-hot)
    loss = - sum_c t_c log p_c,   averaged over the batch
  Working in log space with the max subtracted keeps the loss finite for logits of ±1e4, where
  softmax-then-log would take log(0) = -inf.

Backward. Composing the softmax backward with d(-t . log p)/dp = -t/p collapses to
    dL/dz_c = (p_c - t_c) / B        (times the upstream gradient of the loss, 1 by default)
  which is cheap and exact: no division by p, no separate softmax backward.

On the GPU forward and backward are one CuPy kernel each (the twins in kernels/cross_entropy.py).
"""
from .layer import Layer
from ..backend import get_array_module


class SoftmaxCrossEntropy(Layer):
    def __init__(self, label_smoothing=0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.probs = None    # softmax(logits) (B, C), used later in backward
        self.labels = None   # (B,), used later in backward

    def forward(self, logits, labels):
        xp = get_array_module(logits)
        if logits.ndim != 2:
            raise ValueError(f"logits must have shape (B, num_classes), got {logits.shape}")
        B, C = logits.shape
        if labels.shape != (B,):
            raise ValueError(f"labels must have shape ({B},) to match logits {logits.shape}, got {labels.shape}")
        # label range check here, on the host; the GPU twin skips it (it would wait for the device every step)
        if B and not (0 <= labels.min() and labels.max() < C):
            raise ValueError(f"labels must lie in [0, {C}), got values from {labels.min()} to {labels.max()}")
        shifted = logits - logits.max(axis=1, keepdims=True)                    # z - m
        log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        rows = xp.arange(B)
        s = self.label_smoothing
        nll = -log_probs[rows, labels]                                          # (B,)
        if s:
            nll = (1.0 - s) * nll - s * log_probs.mean(axis=1)
        self.probs, self.labels = xp.exp(log_probs), labels
        return xp.asarray(nll.mean())                                           # 0-d array, as on the GPU

    def backward(self, grad_loss=1.0):
        xp = get_array_module(self.probs)
        B, C = self.probs.shape
        s = self.label_smoothing
        # forward: loss = mean_b( -sum_c t_bc log p_bc )  ->  dL/dz = (p - t) / B
        grad_logits = self.probs - s / C if s else self.probs.copy()
        grad_logits[xp.arange(B), self.labels] -= 1.0 - s
        grad_logits *= grad_loss / B
        return grad_logits
