"""Train scratchvit's ViT on MNIST: `python train_mnist.py` (CPU) or `python train_mnist.py --device gpu`.

This script only parses arguments and calls `scratchvit.train`; everything it does can be done from
Python with `scratchvit.train.run(TrainConfig(...))`. Errors that a user can fix (a missing data
folder, a corrupt file, a model option that does not fit, no CuPy) are printed as one line, with a
non-zero exit status: 2 for a bad option or a missing GPU backend, 1 for data and checkpoint problems,
an output folder that cannot be created and a diverged run, 130 after Ctrl-C (a checkpoint is
written first).

Recipes (scratchvit/recipes.py): `--device gpu` trains with the GPU recipe (batch 512 and the schedule
that goes with it), the CPU with the CPU recipe; `--recipe` names one explicitly, and an option given
on the command line always wins over the recipe's value.
"""
import argparse
import dataclasses
import sys

from scratchvit.backend import BackendUnavailable
from scratchvit.data import DataError
from scratchvit.recipes import RECIPES
from scratchvit.train import (LOSS_READ_INTERVAL, CheckpointError, ConfigError, NonFiniteLoss, OutputError,
                              TrainConfig, report_checkpoint, run)


def recipe_default(name, text=""):
    """Help text for an option a recipe may set: its value in each recipe."""
    values = "; ".join(f"{recipe} recipe: {RECIPES[recipe].get(name, getattr(TrainConfig, name))}" for recipe in RECIPES)
    return f"{text} ({values})".strip()


def build_parser():
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description="Train a Vision Transformer on MNIST with scratchvit.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default=defaults.device)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=argparse.SUPPRESS,
                        help="a set of training options (scratchvit/recipes.py); default: the device's. "
                             "Options given here win over the recipe's")
    # an option a recipe may set is left out of the parsed arguments unless given: then the recipe decides
    parser.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help=recipe_default("epochs"))
    parser.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help=recipe_default("batch_size"))
    parser.add_argument("--lr", type=float, default=argparse.SUPPRESS, help=recipe_default("lr", "peak learning rate"))
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-epochs", type=float, default=argparse.SUPPRESS, help=recipe_default("warmup_epochs"))
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--clip-grad-norm", type=float, default=defaults.clip_grad_norm, help="0 disables clipping")
    parser.add_argument("--max-shift", type=int, default=defaults.max_shift,
                        help="random shift augmentation in pixels, below the image size (0 disables it)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="CPU threads for the data-parallel training step (default: one per core)")
    model = parser.add_argument_group("model")
    model.add_argument("--patch-size", type=int, default=defaults.patch_size)
    model.add_argument("--dim", type=int, default=defaults.dim)
    model.add_argument("--depth", type=int, default=defaults.depth)
    model.add_argument("--heads", type=int, default=defaults.heads)
    model.add_argument("--mlp-dim", type=int, default=defaults.mlp_dim)
    model.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--data-dir", default=defaults.data_dir,
                        help="folder holding the four MNIST IDX files (.gz or not); default: download to the cache")
    parser.add_argument("--out-dir", default=defaults.out_dir, help="where metrics.jsonl, checkpoint.npz and plots go")
    parser.add_argument("--train-limit", type=int, default=defaults.train_limit,
                        help="train on the first N training images only (of those --validation leaves)")
    parser.add_argument("--validation", type=int, default=defaults.validation, metavar="N",
                        help="hold the last N training images out of training and report their accuracy after "
                             "every epoch (validation_accuracy in metrics.jsonl): choose settings on it, not on "
                             "the test set. Split off before --train-limit: on MNIST's 60,000 training images, "
                             "--validation 5000 --train-limit 20000 trains on the first 20,000 of the first 55,000 "
                             "and validates on the last 5,000. 0: off. --resume needs the same N")
    parser.add_argument("--eval-batch-size", type=int, default=argparse.SUPPRESS,
                        help=recipe_default("eval_batch_size",
                                            "images per forward pass when measuring test (and validation) accuracy"))
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    parser.add_argument("--log-every", type=int, default=defaults.log_every, metavar="N",
                        help=f"write a line to OUT/steps.jsonl every N steps (step, epoch, mean loss since the "
                             f"last line, lr, images/s): a multiple of {LOSS_READ_INTERVAL}, the steps between "
                             f"reads of the loss from the device. 0: off")
    parser.add_argument("--eval-only", action="store_true",
                        help="print the test accuracy, per-class accuracy and confusion matrix of --checkpoint, "
                             "write them to evaluation.json in the checkpoint's folder, and exit")
    parser.add_argument("--checkpoint", help="checkpoint to evaluate with --eval-only")
    parser.add_argument("--plot", action="store_true",
                        help="write plots (matplotlib): after training curves.png (loss over steps, accuracy over "
                             "epochs), attention.png and attention_heads.png in OUT; with --eval-only "
                             "confusion.png and misclassified.png beside the checkpoint")
    return parser


def config_from_args(args):
    """The TrainConfig of the command line: the recipe's options, then every option given."""
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    options = {name: value for name, value in vars(args).items() if name in fields}
    return TrainConfig.from_recipe(getattr(args, "recipe", None), **options)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_only and not args.checkpoint:
        parser.error("--eval-only needs --checkpoint PATH")
    config = config_from_args(args)
    try:
        if args.eval_only:
            report_checkpoint(args.checkpoint, config)
        else:
            run(config)
    except (BackendUnavailable, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, OutputError, NonFiniteLoss) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print(str(interrupt) or "interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
