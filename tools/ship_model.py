"""Make the model scratchvit ships from a finished training run: its weights as an inference-only
checkpoint, scratchvit/models/mnist_vit.npz, and its provenance beside it, mnist_vit.json.

    python tools/ship_model.py runs/ship-s0/checkpoint.npz --data-dir ../shared/data/mnist \\
        --command "OPENBLAS_NUM_THREADS=1 python train_mnist.py ..." --commit a3d7526 --machine "..."

The .npz is the same file byte for byte on every export of the same checkpoint
(checkpoint.inference_checkpoint_bytes: sorted members, a fixed zip time), so its SHA-256, recorded in
the JSON, identifies the weights. The checkpoint does not record the command that trained it, its commit
or its machine: they are given here, and a re-export of the same weights takes them from the JSON
already in --out-dir, or from the shipped one, when they are not given again. So anyone can check
the shipped file against a checkpoint trained again with its command:

    python tools/ship_model.py runs/ship-s0/checkpoint.npz --data-dir ../shared/data/mnist --out-dir /tmp/check
    cmp /tmp/check/mnist_vit.npz scratchvit/models/mnist_vit.npz

The JSON records, besides those three: the seed, epoch and model configuration (from the checkpoint's
meta), the run's wall time (metrics.jsonl beside the checkpoint, its last epoch's wall_seconds), the
test accuracy overall and per class (report.evaluation_report on the MNIST test set, of the file just
written, predicting as the commands do by default: averaged over each image's shifts, shift_average.py)
and in one forward pass, the validation accuracy (null when the run held no image out, with a note
saying so), and ten sample digits: the first test image of each class, as 28x28 grey levels, with the
class and probability the shipped model gives it through predict's pipeline (preprocess.mnist_style,
then the shift-averaged forward passes), which is what `python -m scratchvit.predict` answers for a PNG
of that image. tests/test_pretrained.py checks every one of these against the files.

Errors are one line on stderr, `error: ...`, exit status 1 (2 for a bad option).
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:            # run as `python tools/ship_model.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from scratchvit.checkpoint import CheckpointError, inference_checkpoint_bytes, load_checkpoint  # noqa: E402
from scratchvit.data import DataError, atomic_write_bytes, load_mnist, normalize  # noqa: E402
from scratchvit.evaluation import SHIFT_AVERAGE_TEXT  # noqa: E402
from scratchvit.predict import load_trained_model, probabilities  # noqa: E402
from scratchvit.preprocess import PILLOW_HINT, mnist_style, pillow_available, to_model_input  # noqa: E402
from scratchvit.pretrained import PRETRAINED_PATH, PROVENANCE_FORMAT, PROVENANCE_PATH  # noqa: E402
from scratchvit.report import evaluation_report, json_text  # noqa: E402
from scratchvit.run_log import METRICS_NAME  # noqa: E402
from scratchvit.vit import parameter_count  # noqa: E402

GIVEN_FIELDS = ("command", "commit", "machine")        # what the checkpoint cannot tell


class ShipError(RuntimeError):
    """A checkpoint that is not a finished run, or a run folder without what the provenance needs."""


def finished_model(checkpoint):
    """(meta, weights to ship) of a finished run's checkpoint: the weight average where the run kept
    one, else the trained weights. ShipError for a run stopped before its last epoch."""
    meta, weights, _ = load_checkpoint(checkpoint, averaged=True)
    epochs = meta["train_config"]["epochs"]
    if meta["epoch"] != epochs or meta["step_in_epoch"] != 0:
        raise ShipError(f"{checkpoint}: the run stopped at epoch {meta['epoch']} of {epochs} (step "
                        f"{meta['step_in_epoch']}): ship a finished run (continue it with --resume)")
    return meta, weights


def last_epoch_metrics(checkpoint, epoch):
    """The metrics.jsonl record of `epoch` in the checkpoint's folder (wall time, validation accuracy)."""
    path = Path(checkpoint).parent / METRICS_NAME
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise ShipError(f"{path}: cannot read the run's metrics ({error}): the wall time comes from there") from None
    for record in records:
        if isinstance(record, dict) and record.get("epoch") == epoch:
            return record
    raise ShipError(f"{path}: no record of epoch {epoch}, the checkpoint's: not this checkpoint's run")


def first_of_each_class(labels):
    """[(class, index of its first image)] for every class present, in class order."""
    return [(int(label), int(numpy.flatnonzero(labels == label)[0])) for label in numpy.unique(labels)]


def provenance(model, meta, metrics, test_images, test_labels, *, sha256, given, eval_batch_size=500):
    """The JSON-ready provenance of the shipped `model` (see the module docstring)."""
    inputs = normalize(test_images, "cpu")
    report = evaluation_report(model, inputs, test_labels, eval_batch_size, shift_average=True)
    one_pass = evaluation_report(model, inputs, test_labels, eval_batch_size, shift_average=False)
    samples = []
    for label, index in first_of_each_class(test_labels):
        image = test_images[index]
        row = probabilities(model, to_model_input(mnist_style(image)))[0]
        predicted = int(numpy.argmax(row))
        samples.append(dict(test_index=index, label=label, predicted_class=predicted,
                            probability=float(row[predicted]), image=image.tolist()))
    validation = meta["train_config"].get("validation", 0)
    notes = [f"test accuracy: the shipped file on the {report.images:,} test images (report.evaluation_report), "
             f"predicting as predict, the demo and --eval-only do by default: the class probabilities averaged "
             f"over the image and its 8 one-pixel shifts (scratchvit/shift_average.py); one_pass_test_accuracy: "
             f"one forward pass per image, as training measures its test and validation accuracy",
             "wall time: the run's wall_seconds at its last epoch (metrics.jsonl)",
             "samples: the first test image of each class; predicted_class and probability are what "
             "`python -m scratchvit.predict` gives for a PNG of that image (preprocess.mnist_style, then the "
             "shift average)"]
    if validation:
        validation_accuracy = metrics.get("validation_accuracy")
    else:
        validation_accuracy = None
        notes.append("validation_accuracy is null: the run trained on all the training images (--validation 0), "
                     "so no image was held out to measure it; the test accuracy is the only held-out figure")
    return dict(format=PROVENANCE_FORMAT, model_file=PRETRAINED_PATH.name, sha256=sha256, **given,
                seed=meta["train_config"]["seed"], epoch=meta["epoch"], wall_seconds=metrics.get("wall_seconds"),
                parameters=parameter_count(**meta["model_config"]), model_config=meta["model_config"],
                prediction=SHIFT_AVERAGE_TEXT, test_images=report.images, test_accuracy=report.accuracy,
                per_class_test_accuracy=[None if numpy.isnan(value) else float(value)
                                         for value in report.per_class_accuracy],
                one_pass_test_accuracy=one_pass.accuracy,
                validation_images=validation, validation_accuracy=validation_accuracy, notes=notes,
                samples=samples)


def previous_values(json_paths, sha256):
    """The command, commit and machine of the first JSON of `json_paths` that describes these same
    weights (the same SHA-256), else {}."""
    for json_path in json_paths:
        try:
            previous = json.loads(Path(json_path).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(previous, dict) and previous.get("sha256") == sha256:
            return {name: previous[name] for name in GIVEN_FIELDS if isinstance(previous.get(name), str)}
    return {}


def ship(checkpoint, data_dir, out_dir=PRETRAINED_PATH.parent, **given):
    """Write OUT/mnist_vit.npz and OUT/mnist_vit.json from a finished run's `checkpoint`; returns the
    provenance dict. `given`: command, commit, machine (None: from the JSON there, for the same weights)."""
    meta, weights = finished_model(checkpoint)
    metrics = last_epoch_metrics(checkpoint, meta["epoch"])
    model_bytes = inference_checkpoint_bytes(weights, meta)
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    out_dir = Path(out_dir)
    npz_path, json_path = out_dir / PRETRAINED_PATH.name, out_dir / PROVENANCE_PATH.name
    given = dict(previous_values([json_path, PROVENANCE_PATH], sha256),
                 **{name: value for name, value in given.items() if value is not None})
    missing = [name for name in GIVEN_FIELDS if name not in given]
    if missing:
        raise ShipError(f"--{missing[0]} is needed: the checkpoint does not record it (and neither {json_path} "
                        f"nor the shipped {PROVENANCE_PATH.name} describes these weights)")
    arrays = load_mnist(data_dir, download=False)
    atomic_write_bytes(npz_path, model_bytes)
    model, _ = load_trained_model(npz_path)       # what is recorded is measured on the file as shipped
    record = provenance(model, meta, metrics, arrays["test_images"], arrays["test_labels"], sha256=sha256,
                        given={name: given[name] for name in GIVEN_FIELDS})
    atomic_write_bytes(json_path, (json_text(record) + "\n").encode())
    return record


def build_parser():
    parser = argparse.ArgumentParser(prog="python tools/ship_model.py",
                                     description="Write scratchvit/models/mnist_vit.npz and .json from a finished "
                                                 "training run's checkpoint.")
    parser.add_argument("checkpoint", help="the run's checkpoint.npz (metrics.jsonl beside it)")
    parser.add_argument("--data-dir", required=True, help="the folder holding MNIST's four IDX files")
    parser.add_argument("--out-dir", default=str(PRETRAINED_PATH.parent), help="default: scratchvit/models")
    parser.add_argument("--command", help="the exact command that trained the run")
    parser.add_argument("--commit", help="the commit it was trained at")
    parser.add_argument("--machine", help="the machine it was trained on (processor, cores, memory)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not pillow_available():
        print(f"error: {PILLOW_HINT}", file=sys.stderr)
        return 2
    try:
        record = ship(args.checkpoint, args.data_dir, args.out_dir, command=args.command, commit=args.commit,
                      machine=args.machine)
    except (CheckpointError, DataError, ShipError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"wrote {Path(args.out_dir) / PRETRAINED_PATH.name} (sha256 {record['sha256']}) and "
          f"{PROVENANCE_PATH.name}: test accuracy {record['test_accuracy']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
