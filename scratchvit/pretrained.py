"""The trained model that ships with the package: where it is and what it is. predict, the demo and
`train_mnist.py --eval-only` use it when no --checkpoint is given; Python gets it with
`scratchvit.load_pretrained()` (predict.py, beside the loader of any checkpoint).

    scratchvit/models/mnist_vit.npz     an inference-only checkpoint (checkpoint_file.py): the weights
                                        in float32 and a meta marking them so, read through the same
                                        checks as any checkpoint
    scratchvit/models/mnist_vit.json    its provenance: the command that trained it, seed, commit,
                                        machine, wall time, test accuracy (overall and per class, as the
                                        commands predict by default: shift_average.py; and in one forward
                                        pass), and ten sample digits with the class and probability it
                                        gives each

Both are written by tools/ship_model.py from a finished training checkpoint, the same bytes each time.
"""
import json
from pathlib import Path

MODELS_FOLDER = Path(__file__).resolve().parent / "models"
PRETRAINED_PATH = MODELS_FOLDER / "mnist_vit.npz"
PROVENANCE_PATH = MODELS_FOLDER / "mnist_vit.json"
PROVENANCE_FORMAT = "scratchvit-provenance-2"     # 2: test_accuracy is the shift average's


def pretrained_provenance():
    """The shipped model's provenance (mnist_vit.json) as a dict, or {} where the file is missing or not
    JSON: it describes the model, the model itself does not depend on it."""
    try:
        provenance = json.loads(PROVENANCE_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return provenance if isinstance(provenance, dict) else {}


def shipped_model_line(shift_average=True):
    """One line naming the shipped model and its test accuracy as the command will predict (averaged over
    shifts, or one pass), for the first line of a command that uses it because no --checkpoint was given."""
    record = pretrained_provenance()
    accuracy = record.get("test_accuracy" if shift_average else "one_pass_test_accuracy")
    how = "averaged over the image and its 8 one-pixel shifts" if shift_average else "one forward pass"
    measured = f", test accuracy {accuracy:.2%} ({how})" if isinstance(accuracy, float) else ""
    return f"using the shipped model {PRETRAINED_PATH}{measured}, as no --checkpoint was given"
