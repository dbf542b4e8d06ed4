"""Train scratchvit's ViT on MNIST: `python train_mnist.py` (CPU) or `python train_mnist.py --device gpu`.

This script only parses arguments and calls the library; everything it does can be done from Python
with `scratchvit.train.run(TrainConfig(...))` (and --eval-only with
`scratchvit.evaluation.report_checkpoint`, or without --checkpoint `report_pretrained`: the model
shipped in the package). Errors that a user can fix (a missing data
folder, a corrupt file, a model option that does not fit, no CuPy) are printed as one line, with a
non-zero exit status: 2 for a bad option or a missing GPU backend, 1 for data and checkpoint problems,
an output folder that cannot be created, locked or written to and a diverged run, 130 after Ctrl-C
and 143 after SIGTERM (during training a checkpoint is written first).

The output folder is the run's own (scratchvit/run_folder.py, RunFolder): a second run on the same
--out-dir stops at once, naming the run that holds it; a folder that holds a run is continued with
--resume or replaced with --overwrite, never replaced silently.

Recipes (scratchvit/recipes.py): `--device gpu` trains with the GPU recipe (batch 512 and the schedule
that goes with it), the CPU with the CPU recipe; `--recipe` names one explicitly, and an option given
on the command line always wins over the recipe's value.

Under mpiexec (`mpiexec -n 4 python train_mnist.py ...`) every process runs this script and trains
data-parallel (scratchvit/distributed.py); rank 0 alone prints and writes. An error on any rank ends
the whole job, never a hang: that rank prints its one line, prefixed with the rank, and MPI_Abort
ends every process with the exit status above (mpiexec passes it on). Ctrl-C stops every rank at the
same step, rank 0 writes the checkpoint, and all exit with 130; SIGTERM (mpiexec passes it on too)
the same way, with 143.
"""
import argparse
import dataclasses
import sys
import traceback

from scratchvit.cupy_check import BackendUnavailable
from scratchvit.checkpoint import CheckpointError
from scratchvit.config import LOSS_READ_INTERVAL, ConfigError, TrainConfig
from scratchvit.data import DataError
from scratchvit.distributed import DistributedError, usable_cores, world
from scratchvit.evaluation import report_checkpoint, report_pretrained
from scratchvit.pretrained import shipped_model_line
from scratchvit.recipes import RECIPES, SUMMARIES
from scratchvit.run_log import OutputError
from scratchvit.signals import Terminated, TrainingInterrupted, terminate_like_ctrl_c
from scratchvit.train import NonFiniteLoss, run
from scratchvit.vit import MAX_PARAMETERS


RECIPE_OPTIONS = {name for options in RECIPES.values() for name in options}


def recipe_default(name, text=""):
    """Help text for an option a recipe may set: its value in each recipe."""
    values = "; ".join(f"{recipe} recipe: {RECIPES[recipe].get(name, getattr(TrainConfig, name))}" for recipe in RECIPES)
    return f"{text} ({values})".strip()


def add_option(parser, flag, text=None, **kwargs):
    """An option of TrainConfig. One that a recipe sets is left out of the parsed arguments unless it
    is given (the recipe then decides), and its help lists each recipe's value."""
    name = flag[2:].replace("-", "_")
    if name in RECIPE_OPTIONS:
        parser.add_argument(flag, default=argparse.SUPPRESS, help=recipe_default(name, text or ""), **kwargs)
    else:
        parser.add_argument(flag, default=getattr(TrainConfig, name), help=text, **kwargs)


def build_parser():
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description="Train a Vision Transformer on MNIST with scratchvit.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default=defaults.device)
    parser.add_argument("--recipe", choices=list(RECIPES), default=argparse.SUPPRESS,
                        help="a set of training options (scratchvit/recipes.py): "
                             + "; ".join(f"{name}: {summary}" for name, summary in SUMMARIES.items()).replace("%", "%%")
                             + ". Each option below lists its value in each recipe. Default: the device's "
                               "(gpu with --device gpu, else cpu); options given here win over the recipe's")
    add_option(parser, "--epochs", type=int)
    add_option(parser, "--batch-size", type=int)
    add_option(parser, "--lr", "peak learning rate", type=float)
    add_option(parser, "--weight-decay", type=float)
    add_option(parser, "--warmup-epochs", type=float)
    add_option(parser, "--label-smoothing", type=float)
    add_option(parser, "--clip-grad-norm", "0 disables clipping", type=float)
    add_option(parser, "--ema-decay", "evaluate (and keep in the checkpoint for predictions) an exponential moving "
                                      "average of the weights with this decay per step, e.g. 0.999; 0: off", type=float)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="CPU threads for the data-parallel training step (default: one per core; under "
                             "mpiexec, the rank's share of its node's cores); at most the cores this process may "
                             f"use ({len(usable_cores())} here)")
    augmentation = parser.add_argument_group("augmentation (per image, random: an affine transform, then a shift)")
    add_option(augmentation, "--rotation", "degrees: uniform in [-R, R]", type=float, metavar="R")
    add_option(augmentation, "--scale", "scale uniform in [1 - S, 1 + S]", type=float, metavar="S")
    add_option(augmentation, "--shear", "degrees: uniform in [-S, S]", type=float, metavar="S")
    add_option(augmentation, "--translate", "fraction of the image size: uniform in [-T, T] in each direction",
               type=float, metavar="T")
    add_option(augmentation, "--max-shift", "shift by whole pixels, below the image size (0 disables it)", type=int)
    model = parser.add_argument_group(
        "model", f"at most {MAX_PARAMETERS:,} parameters (and, on the CPU, weights, gradients and Adam's two "
                 f"moments within this machine's memory): checked before anything is allocated")
    for flag in ("--patch-size", "--dim", "--depth", "--heads", "--mlp-dim"):
        add_option(model, flag, type=int)
    add_option(model, "--dropout", type=float)
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
    add_option(parser, "--eval-batch-size", "images per forward pass when measuring test (and validation) accuracy",
               type=int)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in OUT (its checkpoint, logs, plots and evaluation), saying what it "
                             "replaces; without it (or --resume) a folder that holds a run is refused")
    parser.add_argument("--log-every", type=int, default=defaults.log_every, metavar="N",
                        help=f"write a line to OUT/steps.jsonl every N steps (step, epoch, mean loss since the "
                             f"last line, lr, images/s): a multiple of {LOSS_READ_INTERVAL}, the steps between "
                             f"reads of the loss from the device. 0: off")
    parser.add_argument("--eval-only", action="store_true",
                        help="print the test accuracy, per-class accuracy and confusion matrix of --checkpoint, "
                             "write them to evaluation.json in the checkpoint's folder, and exit; without "
                             "--checkpoint, of the model shipped in the package, written into --out-dir")
    parser.add_argument("--checkpoint", help="checkpoint to evaluate with --eval-only (default: the model shipped "
                                             "in the package, scratchvit/models/mnist_vit.npz)")
    parser.add_argument("--shift-average", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                        help="with --eval-only: report the predictions averaged over each image and its eight "
                             "one-pixel shifts, as predict answers (the default; the one-pass accuracy, which "
                             "training prints after every epoch, is printed beside it); --no-shift-average: "
                             "one forward pass alone")
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


def in_option_names(message):
    """A ConfigError's message as the command line says it: the TrainConfig fields it opens with
    ("seed must be ...", "resume and overwrite ...") or quotes with their values ("by heads 4") spelled
    as options ("--seed must be ...", "by --heads 4")."""
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    words = message.split(" ")
    for index, word in enumerate(words):
        named = index == 0 or (index == 2 and words[1] == "and")
        quoted = index + 1 < len(words) and words[index + 1].lstrip("-").replace(".", "", 1).isdigit()
        if word in fields and (named or quoted):
            words[index] = "--" + word.replace("_", "-")
    return " ".join(words)


def evaluate_only(args, config):
    """--eval-only: the report of --checkpoint, written beside it; without --checkpoint, of the model
    shipped in the package, written into --out-dir (the installed package may be read-only)."""
    shift_average = getattr(args, "shift_average", True)
    if args.checkpoint:
        return report_checkpoint(args.checkpoint, config, shift_average=shift_average)
    print(shipped_model_line(shift_average), flush=True)
    return report_pretrained(config, shift_average=shift_average)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "shift_average") and not args.eval_only:
        parser.error("--shift-average and --no-shift-average go with --eval-only: training evaluates each "
                     "epoch in one forward pass")
    config = config_from_args(args)
    try:
        communicator = world()          # this process alone, unless mpiexec started it with others
    except DistributedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # communicator.fail: print the one line and return the status; under MPI, with the rank, then MPI_Abort
    try:
        with terminate_like_ctrl_c():   # SIGTERM ends the program as Ctrl-C does (in training: a checkpoint first)
            if args.eval_only:
                if communicator.is_root:    # one evaluation report, not one per rank
                    evaluate_only(args, config)
            else:
                run(config, communicator=communicator)
    except ConfigError as error:
        return communicator.fail(f"error: {in_option_names(str(error))}", 2)
    except (BackendUnavailable, DistributedError) as error:
        return communicator.fail(f"error: {error}", 2)
    except (DataError, CheckpointError, OutputError, NonFiniteLoss) as error:
        return communicator.fail(f"error: {error}", 1)
    except TrainingInterrupted as interrupt:
        # every rank stopped at the same step and the checkpoint is written: an orderly end, said once
        if communicator.is_root:
            print(str(interrupt), file=sys.stderr)
        return interrupt.exit_status              # 130 (Ctrl-C) or 143 (SIGTERM), the same on every rank
    except KeyboardInterrupt as interrupt:        # Ctrl-C or SIGTERM outside training (loading, evaluating at the end)
        return communicator.fail(str(interrupt) or "interrupted", 143 if isinstance(interrupt, Terminated) else 130)
    except Exception as error:
        if communicator.size == 1:                # one process: a bug keeps its traceback, as before
            raise
        # under MPI the job must end here, or the other ranks wait for this one for ever. Out of memory
        # (MemoryError; CuPy's OutOfMemoryError is one) is one line; anything else, a bug, keeps its traceback
        if not isinstance(error, MemoryError):
            traceback.print_exc()
        return communicator.fail(f"error: {type(error).__name__}: {' '.join(str(error).split())}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
