"""Training recipes: named sets of training options, each chosen for one machine or one goal.

A recipe sets only the options that it is about (batch size, learning rate, schedule); every other
option keeps TrainConfig's default, and an option given explicitly always wins over the recipe:

    TrainConfig.from_recipe("gpu", device="gpu", seed=1)           # from Python
    python train_mnist.py --device gpu                             # the same: --device picks the recipe
    python train_mnist.py --recipe gpu                             # the GPU recipe, run on the CPU
    python train_mnist.py --device gpu --epochs 30                 # the GPU recipe with 30 epochs

- "cpu" (the default without --device gpu): TrainConfig's own defaults, chosen to reach 99% soonest
  on two cores (patch 7, batch 128 at lr 3e-3, 8 epochs, the weight average evaluated).
- "gpu" (the default with --device gpu): batch 512, so that an epoch launches eight times fewer of a
  small ViT's many small kernels; with fewer steps it needs more epochs and a higher learning rate.
  The math is the device's business only: this recipe run on the CPU computes the same thing.
- "best": the most accurate in an hour of one CPU core: patch 7 trained long, random affine
  augmentation instead of the shifts, label smoothing, 80 epochs.

How each was chosen, with the runs behind it and their figures: README, "How the settings were
chosen" and "Results".
"""

RECIPES = {
    "cpu": {},
    "gpu": dict(batch_size=512, lr=4e-3, epochs=20, warmup_epochs=2.0, eval_batch_size=2000, patch_size=4,
                ema_decay=0.0),
    "best": dict(patch_size=7, batch_size=128, lr=3e-3, epochs=80, warmup_epochs=1.0, label_smoothing=0.1,
                 rotation=15.0, scale=0.1, translate=0.1, max_shift=0, ema_decay=0.0),
}

SUMMARIES = {
    "cpu": "the defaults",
    "gpu": "batch 512 for a GPU",
    "best": "the most accurate: patch 7, affine augmentation, 80 epochs (99.50% over three seeds, under an hour on one core)",
}


def recipe_for_device(device):
    """The recipe a device trains with unless another is named: "gpu" for the GPU, else "cpu"."""
    return "gpu" if device == "gpu" else "cpu"


def recipe_options(name):
    """The options recipe `name` sets (a new dict), or ValueError naming the recipes there are."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(sorted(RECIPES))}, got {name!r}")
    return dict(RECIPES[name])
