"""Where the CLS token looks: per-head attention maps and attention rollout, as host arrays.

Shapes (B images, L layers, H heads, T = N + 1 tokens, N = grid * grid patches):
    each block's attention after a forward: block.attn.attn (B, H, T, T), rows summing to 1

Per-head maps (`head_maps`): row 0 of each layer's and head's attention (what the CLS token takes
from every token) over the patch tokens, reshaped to the patch grid:
    maps[b, l, h] = attn_l[b, h, 0, 1:].reshape(grid, grid)               (B, L, H, grid, grid)
Each map sums to 1 minus the weight the CLS token gives itself.

Attention rollout (Abnar & Zuidema, 2020): each layer's attention, averaged over heads, plus the
identity for the residual connection and renormalised, A_l = normalise(mean_heads(attn_l) + I),
multiplied through the layers, R = A_L ... A_1. Row 0 of R over the patch tokens, reshaped to the
patch grid (7x7 for 28x28 images and patch 4), shows which parts of the image the classification
draws on, through all the layers at once.

Both run one forward pass in eval mode (dropout off) and restore the model's mode.
"""
from .backend import get_array_module, to_host
from .layers import softmax


def _forward_in_eval_mode(model, images):
    with model.evaluating():
        return model.forward(images)


def _to_grid(cls_to_patches):
    """(..., N) -> (..., grid, grid) for N = grid * grid patches."""
    grid = int(round(cls_to_patches.shape[-1] ** 0.5))
    return cls_to_patches.reshape(cls_to_patches.shape[:-1] + (grid, grid))


def rollout_from_attentions(attentions):
    """The rollout R[:, 0, 1:] on the patch grid, (B, grid, grid), from each layer's (B, H, T, T) attention."""
    xp = get_array_module(attentions[0])
    rollout = None
    for attention in attentions:
        attention = attention.mean(axis=1)                                    # (B, T, T), heads averaged
        attention = attention + xp.eye(attention.shape[-1], dtype=attention.dtype)
        attention /= attention.sum(axis=-1, keepdims=True)
        rollout = attention if rollout is None else attention @ rollout
    return _to_grid(to_host(rollout[:, 0, 1:]))


def attention_rollout(model, images):
    """((B, grid, grid) rollout maps, (B,) predicted classes), both host arrays."""
    logits = _forward_in_eval_mode(model, images)
    return rollout_from_attentions([block.attn.attn for block in model.blocks]), to_host(logits.argmax(axis=1))


def inspect(model, images):
    """Everything a page or a figure shows about `images`, from one forward pass, as host arrays:
    dict(logits (B, K), probabilities (B, K), rollout (B, grid, grid), heads (B, L, H, grid, grid))."""
    logits = _forward_in_eval_mode(model, images)
    xp = get_array_module(logits)
    attentions = [block.attn.attn for block in model.blocks]
    heads = xp.stack([attention[:, :, 0, 1:] for attention in attentions], axis=1)     # (B, L, H, N)
    probabilities = softmax(logits)
    return dict(logits=to_host(logits), probabilities=to_host(probabilities),
                rollout=rollout_from_attentions(attentions), heads=_to_grid(to_host(heads)))


def head_maps(model, images):
    """(B, L, H, grid, grid) host array: each layer's and head's CLS-token attention over the patch grid."""
    return inspect(model, images)["heads"]
