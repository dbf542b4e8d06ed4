"""What a trained model gets right and wrong on a labelled set: accuracy, per-class accuracy, the
confusion matrix, and every image's prediction with its probability (`evaluation_report`).

For N images of K classes, with predictions p_n = argmax_k logits[n, k] and true labels t_n:
    confusion[t, p]       = #{n : t_n = t, p_n = p}                       (K, K): rows true, columns predicted
    accuracy              = trace(confusion) / N
    per_class_accuracy[t] = confusion[t, t] / sum_p confusion[t, p]       (K,): the recall of class t
    probabilities[n]      = softmax(logits[n])                            (N, K), max-subtracted
A class with no image in the set has no per-class accuracy (0 / 0): NaN here, null in the JSON file,
"-" in the table, never a number that looks measured.

The probabilities are the model's own softmax (layers/softmax.py: the max-subtracted formula, one
fused kernel on the GPU) applied to the logits. attention_maps.inspect also returns probabilities,
but it also stacks every layer's attention and multiplies out the rollout for each batch and copies
both to the host: over a whole test set that is work and transfers for maps nobody looks at.

Predictions are the argmax of the logits, exactly as `evaluation.evaluate` counts them (same batches,
same eval mode), so the report's accuracy is the number training printed for the same model. With
shift_average=True they are instead the argmax of the probabilities averaged over each image and its
eight one-pixel shifts (shift_average.py): what predict and the demo answer by default.
"""
import dataclasses
import json

import numpy

from .backend import to_host
from .data import atomic_write_bytes
from .layers.softmax import softmax
from .shift_average import ONE_PIXEL_SHIFTS, shift_averaged_probabilities

REPORT_FORMAT = "scratchvit-evaluation-1"
MISTAKES_IN_JSON = 20          # the most confident mistakes listed in the JSON file


@dataclasses.dataclass
class EvaluationReport:
    """Host arrays: labels (N,), predictions (N,), probabilities (N, K), confusion (K, K) int64."""
    labels: numpy.ndarray
    predictions: numpy.ndarray
    probabilities: numpy.ndarray
    confusion: numpy.ndarray

    @property
    def images(self):
        return int(self.labels.shape[0])

    @property
    def correct(self):
        return int(numpy.trace(self.confusion))

    @property
    def accuracy(self):
        return self.correct / self.images

    @property
    def class_images(self):
        """(K,) how many images of each true class: the confusion matrix's row sums."""
        return self.confusion.sum(axis=1)

    @property
    def per_class_accuracy(self):
        """(K,) float64: diagonal / row sums, NaN for a class with no image."""
        counts = self.class_images
        diagonal = numpy.diag(self.confusion).astype(numpy.float64)
        return numpy.divide(diagonal, counts, out=numpy.full(counts.shape, numpy.nan), where=counts > 0)

    @property
    def confidence(self):
        """(N,) the probability the model gave the class it predicted."""
        return self.probabilities[numpy.arange(self.images), self.predictions]

    def mistakes(self, count=None):
        """Indices of the misclassified images, the most confident mistake first (ties: lower index first)."""
        wrong = numpy.flatnonzero(self.predictions != self.labels)
        order = numpy.argsort(-self.confidence[wrong], kind="stable")
        return wrong[order][:count]

    def to_json(self, **context):
        """A JSON-ready dict (`context`, e.g. checkpoint and epoch, first); per-class accuracy null where undefined."""
        return dict(
            format=REPORT_FORMAT, **context, images=self.images, correct=self.correct, accuracy=self.accuracy,
            class_images=self.class_images.tolist(),
            per_class_accuracy=[None if numpy.isnan(value) else float(value) for value in self.per_class_accuracy],
            confusion_matrix=dict(rows="true class", columns="predicted class", counts=self.confusion.tolist()),
            most_confident_mistakes=[dict(index=int(index), true=int(self.labels[index]),
                                          predicted=int(self.predictions[index]),
                                          probability=float(self.confidence[index]))
                                     for index in self.mistakes(MISTAKES_IN_JSON)])

    def table(self):
        """The confusion matrix as aligned text, one row per true class, with its images and accuracy."""
        classes = self.confusion.shape[0]
        width = max(len(str(int(self.confusion.max()))), len(str(classes - 1))) + 2
        count_width = max(len("images"), len(str(int(self.class_images.max()))))
        label = "true \\ predicted"
        lines = [f"confusion matrix of {self.images} images (rows: true class, columns: predicted class; . is 0)",
                 f"{label}" + "".join(f"{column:>{width}}" for column in range(classes))
                 + f"  | {'images':>{count_width}}  accuracy"]
        for row, accuracy in enumerate(self.per_class_accuracy):
            # zeros as "." so the few mistakes stand out from the empty cells
            cells = "".join(f"{(str(int(count)) if count else '.'):>{width}}" for count in self.confusion[row])
            accuracy_text = "-" if numpy.isnan(accuracy) else f"{accuracy:.2%}"
            lines.append(f"{row:>{len(label)}}{cells}  | {int(self.class_images[row]):>{count_width}}  "
                         f"{accuracy_text:>8}")
        return "\n".join(lines)


def evaluation_report(model, images, labels, batch_size=500, *, shift_average=False):
    """The EvaluationReport of `model` on `images` (B, C, H, W) and integer `labels` (B,), on the
    model's device, in eval mode and `batch_size` images per forward pass; restores the model's mode.
    shift_average=True: the probabilities averaged over each image's nine shifts (shift_average.py,
    about `batch_size` copies per pass) and their argmax.

    ValueError naming the argument for labels that are not one class number per image (a label array
    of another length would otherwise broadcast into a confusion matrix of the wrong images)."""
    count = images.shape[0]
    labels = to_host(labels)
    if labels.ndim != 1 or labels.shape[0] != count or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be (B,) integers, one per image (B = {count}), "
                         f"got shape {labels.shape} of dtype {labels.dtype}")
    if count == 0:
        raise ValueError("images must hold at least one image, got 0")
    if not isinstance(batch_size, (int, numpy.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if shift_average:
        probabilities = to_host(shift_averaged_probabilities(model, images, ONE_PIXEL_SHIFTS, int(batch_size)))
        predictions = probabilities.argmax(axis=1).astype(numpy.int64)
    else:
        predictions, probabilities = [], []
        with model.evaluating():
            for start in range(0, images.shape[0], batch_size):
                logits = model.forward(images[start:start + batch_size])
                predictions.append(to_host(logits.argmax(axis=1)))
                probabilities.append(to_host(softmax(logits)))
        predictions = numpy.concatenate(predictions).astype(numpy.int64)
        probabilities = numpy.concatenate(probabilities)
    labels = labels.astype(numpy.int64)
    classes = probabilities.shape[1]
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must be class numbers 0..{classes - 1} (the model has {classes} outputs), "
                         f"got values from {labels.min()} to {labels.max()}")
    confusion = numpy.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)
    return EvaluationReport(labels=labels, predictions=predictions, probabilities=probabilities, confusion=confusion)


def write_report_json(path, report, **context):
    """Write report.to_json(**context) to `path` atomically; always valid JSON (allow_nan=False)."""
    atomic_write_bytes(path, (json_text(report.to_json(**context)) + "\n").encode())


def json_text(value, indent=""):
    """`value` as JSON, one member per line, except that a list or object holding no list or object
    stays on one line: each row of the confusion matrix, each mistake, so the file reads as a table."""
    if isinstance(value, (dict, list)) and any(isinstance(item, (dict, list))
                                               for item in (value.values() if isinstance(value, dict) else value)):
        inner = indent + " "
        if isinstance(value, dict):
            members = [f"{inner}{json.dumps(key)}: {json_text(item, inner)}" for key, item in value.items()]
            return "{\n" + ",\n".join(members) + "\n" + indent + "}"
        return "[\n" + ",\n".join(inner + json_text(item, inner) for item in value) + "\n" + indent + "]"
    return json.dumps(value, allow_nan=False)
