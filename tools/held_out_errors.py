"""Where the errors of finished runs lie: each run's accuracy on its held-out validation images (runs
trained with `--validation N`) and on the test set, plain and with test-time augmentation, and how the
images the runs get wrong overlap.

    python tools/held_out_errors.py runs/a/checkpoint.npz runs/b/checkpoint.npz --data-dir ../shared/data/mnist

Test-time augmentation here is the class probabilities averaged over the image and its 1-pixel
shifts (scratchvit/shift_average.py): "cross" the 4 shifts up, down, left and right (5 images),
"square" all 8 neighbours (9), which predict, the demo and --eval-only use by default.
Each model is evaluated as training evaluates it (the weight average where the run kept one, eval
mode) on the images training held out: the last N of the training file (config.load_data), so
"plain" is the run's last validation and test accuracy in its metrics.jsonl. Runs that held out
nothing (the shipped model's, for one) are measured on the test set alone; runs are compared only on
the same images, so they must all have held out the same N.

The overlap compares the sets of misclassified images: how many every run gets wrong and how many at
least one does. Errors that every run shares are images that more training does not fix.

`--json FILE` writes every figure and every misclassified index. Errors are one line on stderr,
`error: ...`, exit status 1 (2 for a bad option).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:            # run as `python tools/held_out_errors.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from scratchvit.backend import get_backend, to_host  # noqa: E402
from scratchvit.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from scratchvit.config import ConfigError, TrainConfig, load_data  # noqa: E402
from scratchvit.data import DataError, atomic_write_bytes  # noqa: E402
from scratchvit.predict import load_trained_model  # noqa: E402
from scratchvit.shift_average import NO_SHIFT, ONE_PIXEL_SHIFTS, shift_averaged_probabilities  # noqa: E402

CROSS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
SHIFT_SETS = {"plain": NO_SHIFT, "cross": CROSS, "square": ONE_PIXEL_SHIFTS}
SPLITS = ("validation", "test")
BATCH_SIZE = 500


class HeldOutError(RuntimeError):
    """Runs that held out different validation images: their errors cannot be compared."""


def misclassified(model, images, labels, shifts):
    """Sorted indices of the images whose most probable class (averaged over `shifts`) is not the label."""
    predicted = to_host(shift_averaged_probabilities(model, images, shifts, BATCH_SIZE)).argmax(axis=1)
    return numpy.flatnonzero(predicted != numpy.asarray(labels)).tolist()


def held_out_count(path):
    """The number of validation images the run of checkpoint `path` held out (0: none)."""
    meta, _, _ = load_checkpoint(path)
    return meta.get("train_config", {}).get("validation", 0)


def held_out_errors(paths, data_dir):
    """{"runs": [{checkpoint, accuracy: {split: {set: float}}, errors: {split: {set: [index]}}}],
    "images": {split: count}, "overlap": {split: {set: {"every": n, "any": n}}}} for the checkpoints
    `paths` of runs that held out the same validation images, on the MNIST files in `data_dir`; the
    splits are "validation" and "test", or "test" alone for runs that held out nothing."""
    counts = {path: held_out_count(path) for path in paths}
    if len(set(counts.values())) > 1:
        raise HeldOutError("the runs held out different validation images (--validation " +
                           ", ".join(f"{count} in {path}" for path, count in counts.items()) + ")")
    data = load_data(TrainConfig(data_dir=data_dir, validation=counts[paths[0]]), get_backend("cpu"))
    splits = SPLITS if counts[paths[0]] else ("test",)
    runs = []
    for path in paths:
        model, _ = load_trained_model(path)
        errors = {split: {name: misclassified(model, data[f"{split}_images"], data[f"{split}_labels"], shifts)
                          for name, shifts in SHIFT_SETS.items()} for split in splits}
        accuracy = {split: {name: 1 - len(wrong) / len(data[f"{split}_labels"]) for name, wrong in sets.items()}
                    for split, sets in errors.items()}
        runs.append(dict(checkpoint=str(path), accuracy=accuracy, errors=errors))
    overlap = {split: {name: dict(every=len(set.intersection(*(set(run["errors"][split][name]) for run in runs))),
                                  any=len(set.union(*(set(run["errors"][split][name]) for run in runs))))
                       for name in SHIFT_SETS} for split in splits}
    return dict(runs=runs, images={split: len(data[f"{split}_labels"]) for split in splits}, overlap=overlap)


def format_report(result):
    """The figures as a Markdown table: one row per run, then the overlap of their errors."""
    columns = [(split, name) for split in result["images"] for name in SHIFT_SETS]
    lines = ["| checkpoint | " + " | ".join(f"{split} {name} %" for split, name in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for run in result["runs"]:
        lines.append(f"| {run['checkpoint']} | " + " | ".join(
            f"{100 * run['accuracy'][split][name]:.2f} ({len(run['errors'][split][name])})"
            for split, name in columns) + " |")
    lines.append("| misclassified by every run, by any | " + " | ".join(
        f"{result['overlap'][split][name]['every']}, {result['overlap'][split][name]['any']}"
        for split, name in columns) + " |")
    sizes = ", ".join(f"{count} {split}" for split, count in result["images"].items())
    return "\n".join(lines) + f"\n\n(in brackets: misclassified images; {sizes} images)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint.npz of runs that held out the same --validation N (or none)")
    parser.add_argument("--data-dir", required=True, help="the folder of the four MNIST files")
    parser.add_argument("--json", help="also write every figure and misclassified index to this file")
    args = parser.parse_args(argv)
    try:
        result = held_out_errors(args.checkpoints, args.data_dir)
        if args.json:
            atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
    except (HeldOutError, CheckpointError, ConfigError, DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
