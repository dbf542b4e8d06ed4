"""Training recipes: named sets of training options, each chosen for one kind of machine.

A recipe sets only the options that it is about (batch size, learning rate, schedule); every other
option keeps TrainConfig's default, and an option given explicitly always wins over the recipe:

    TrainConfig.from_recipe("gpu", device="gpu", seed=1)           # from Python
    python train_mnist.py --device gpu                             # the same: --device picks the recipe
    python train_mnist.py --recipe gpu                             # the GPU recipe, run on the CPU
    python train_mnist.py --device gpu --epochs 30                 # the GPU recipe with 30 epochs

- "cpu" (the default without --device gpu): TrainConfig's own defaults, batch 64. A small batch
  costs a CPU nothing per image, and more steps per epoch reach 99% in fewer epochs.
- "gpu" (the default with --device gpu): batch 512. On a GPU one step of this small ViT costs about
  the same at batch 64 as at 512 (the time goes into launching a few hundred kernels, not into
  arithmetic), so a larger batch makes an epoch about eight times faster. With eight times fewer
  steps per epoch it needs more epochs and a higher learning rate: 4e-3 (twice the CPU recipe's, about
  the square-root scaling of Adam's learning rate with the batch), a two-epoch warmup and 20 epochs.
  Evaluation runs at batch 2000. The math is the device's business only: this recipe run on the CPU
  (`--recipe gpu`) computes the same thing, which is how its accuracy was checked (README, "Results").
"""

RECIPES = {
    "cpu": {},
    "gpu": dict(batch_size=512, lr=4e-3, epochs=20, warmup_epochs=2.0, eval_batch_size=2000),
}


def recipe_for_device(device):
    """The recipe a device trains with unless another is named: "gpu" for the GPU, else "cpu"."""
    return "gpu" if device == "gpu" else "cpu"


def recipe_options(name):
    """The options recipe `name` sets (a new dict), or ValueError naming the recipes there are."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(sorted(RECIPES))}, got {name!r}")
    return dict(RECIPES[name])
