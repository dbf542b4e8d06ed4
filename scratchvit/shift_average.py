"""Test-time augmentation by shifts: a model's class probabilities averaged over the image and its
eight one-pixel shifts, what predict, the demo and `--eval-only` answer by default.

For an image x, the shifts S = {(dy, dx) : dy, dx in {-1, 0, 1}} (nine, the image itself included)
and the model's logits f:
    p(x) = 1/|S| sum_{(dy, dx) in S} softmax(f(shift(x, dy, dx)))          (K,), sums to 1
    prediction(x) = argmax_k p(x)_k
with shift = data.shift_images (a positive dy moves the content down; pixels moved in from outside
are the background). Training moves every digit around (the random affine transform or shift), so
the model has seen each of these positions; averaging over them takes away the errors of a digit
whose class hangs on its exact position. It costs |S| forward passes per image. What it gains on
the validation and test sets, and why it was adopted, is in the README ("Toward 99.6%").

The copies of a few images are stacked into one batch, image b's |S| copies next to each other:
    copies (b * |S|, C, H, W) -> softmax(f(.)) (b * |S|, K) -> reshape (b, |S|, K) -> mean over axis 1
so a single drawing (the demo) is one forward pass of nine images, and a test set is passes of about
`batch_size` images, as a plain evaluation's.
"""
from .backend import get_array_module
from .data import shift_images
from .layers.softmax import softmax

ONE_PIXEL_SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))     # (dy, dx), (0, 0) included
NO_SHIFT = ((0, 0),)                                                               # the image alone: one pass


def check_shifts(shifts):
    """`shifts` as a tuple of (dy, dx) integer pairs; ValueError naming it when it is not one, or empty."""
    try:
        pairs = tuple((int(dy), int(dx)) for dy, dx in shifts)
        integral = all(dy == shift[0] and dx == shift[1] for (dy, dx), shift in zip(pairs, shifts))
    except (TypeError, ValueError):
        pairs, integral = (), False
    if not pairs or not integral:
        raise ValueError(f"shifts must be a non-empty sequence of (dy, dx) integer pairs, got {shifts!r}")
    return pairs


def shift_averaged_probabilities(model, images, shifts=ONE_PIXEL_SHIFTS, batch_size=500):
    """(B, K) class probabilities of (B, C, H, W) `images`, each row averaged over the copies of its
    image moved by each (dy, dx) of `shifts` (the module docstring), on the images' device (the model's).

    Eval mode (dropout off), restored afterwards; about `batch_size` images (copies) per forward pass.
    With shifts=NO_SHIFT, the softmax of one forward pass."""
    shifts = check_shifts(shifts)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be (B, C, H, W) with at least one image, got shape {images.shape}")
    xp = get_array_module(images)
    count = len(shifts)
    moves = any(shift != (0, 0) for shift in shifts)
    offsets = xp.asarray(shifts, dtype=xp.int64)                                  # (S, 2) on the images' device
    per_pass = max(1, batch_size // count)           # images whose copies make one forward pass
    rows = []
    with model.evaluating():
        for start in range(0, images.shape[0], per_pass):
            chunk = images[start:start + per_pass]                                # (b, C, H, W)
            copies = xp.repeat(chunk, count, axis=0) if count > 1 else chunk      # (b * S, C, H, W)
            if moves:
                copies = shift_images(copies, xp.tile(offsets, (chunk.shape[0], 1)))
            probabilities = softmax(model.forward(copies))                         # (b * S, K)
            rows.append(probabilities.reshape(chunk.shape[0], count, -1).mean(axis=1))
    return xp.concatenate(rows)
