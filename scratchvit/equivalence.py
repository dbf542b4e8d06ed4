"""The same training steps on two devices, compared: the check of the GPU path that needs no accuracy threshold.

Why this check. The CuPy path runs different code from the NumPy one (fused kernels instead of array
expressions, cuBLAS instead of OpenBLAS), but it computes the same mathematics. So the same model,
from the same weights, trained on the same batches with the same learning rates, must give the same
losses and the same weights on both devices, up to floating-point rounding. A wrong kernel, a missed
gradient or an optimiser that reads the wrong learning rate shows up at once, and nothing here
depends on how well a small run happens to learn.

What runs (`compare_training`): one ViT, initialised on the host from `seed` and copied to each device;
`steps` steps of the real training step (`TrainStep`: zero grad, forward, label-smoothed softmax
cross-entropy, backward, gradient clipping, AdamW with the weight-decay groups of training and a
warmup-cosine learning rate that changes every step); a new random batch every step, drawn on the
host. Dropout and the shift augmentation are off: their random numbers come from each device's own
generator, so they would differ by design. After the steps, the eval-mode logits of a held-out batch
are compared too.

How it is compared. For every step's loss, every parameter tensor and the final logits:
    error = max |a - b| / max |b|          (b: the reference device, the first of `devices`)
relative to the tensor's largest entry, so that entries near zero (a bias after a few steps) do
not turn rounding into a large relative error. The check passes when every error is within its tolerance.

Tolerances (`TOLERANCES`, per dtype and per kind of value):
- float64: 1e-10 for everything. Rounding is ~1e-16 per operation; two CPU runs that sum in different
  orders (the single-threaded and the threaded step) differ by at most 2e-12 in a parameter after 10
  steps, 2e-16 in a loss and 2e-15 in the logits.
- float32: measured, not assumed. Two float32 runs that differ only in summation order already differ
  by up to 1e-3 in a parameter tensor: AdamW's first steps move each weight by about lr * sign(g), so a
  gradient element whose float32 rounding error is as large as itself (a sum of cancelling terms)
  moves its weight the other way. Losses and logits stay close. The tolerances are about ten times the
  largest error measured (module constant FLOAT32_MEASURED: 4 seeds, 10 steps, DEFAULT_MODEL,
  float32 one thread against two threads and against float64), so that cuBLAS's summation orders,
  which differ from OpenBLAS's, fit, while a wrong kernel (errors of 1e-2 and more in the loss) does not.

From the command line (the GPU acceptance command runs this):

    python -m scratchvit.equivalence                          # CPU against GPU, float64 and float32
    python -m scratchvit.equivalence --devices cpu cpu        # CPU against itself (runs without a GPU)

Exit status: 0 when every comparison passes, 1 when one fails, 2 when a device is unavailable.
"""
import argparse
import dataclasses
import json
import sys

import numpy

from .backend import get_backend, to_host
from .cupy_check import BackendUnavailable
from .layers import SoftmaxCrossEntropy
from .optim import AdamW, parameter_groups, warmup_cosine
from .train_step import TrainStep
from .vit import ViT

# The largest errors measured between CPU float32 runs (one thread vs two, and vs float64), seeds 0-3, 10 steps of
# DEFAULT_MODEL at batch 32, on the 2-core CPU machine with NumPy 2.4.6 (OpenBLAS 0.3.31).
FLOAT32_MEASURED = dict(loss=7.7e-7, parameters=1.1e-3, logits=1.5e-5)
TOLERANCES = {
    "float64": dict(loss=1e-10, parameters=1e-10, logits=1e-10),
    "float32": dict(loss=1e-5, parameters=1e-2, logits=2e-4),
}

# The GPU recipe's model (patch 4: 50 tokens; train_mnist.py's default is patch 7), the one FLOAT32_MEASURED was
# measured on, at a batch that a CPU finishes in seconds.
DEFAULT_MODEL = dict(image_size=28, patch_size=4, num_classes=10, dim=64, depth=6, heads=4, mlp_dim=128)


@dataclasses.dataclass
class Comparison:
    """The outcome of `compare_training`: the largest error per kind, and the worst tensor."""
    devices: tuple
    dtype: str
    steps: int
    tolerance: dict              # kind -> the largest error allowed (TOLERANCES[dtype] by default)
    loss_error: float            # the largest error over the steps' losses
    parameter_error: float       # the largest error over all parameter tensors, after the last step
    worst_parameter: str         # the parameter tensor with that error
    logits_error: float          # eval-mode logits of a held-out batch, after the last step
    losses: list                 # the reference device's losses, one per step

    def errors(self):
        return dict(loss=self.loss_error, parameters=self.parameter_error, logits=self.logits_error)

    @property
    def passed(self):
        return all(error <= self.tolerance[kind] for kind, error in self.errors().items())

    def summary(self):
        verdict = "ok" if self.passed else "FAILED"
        limits = self.tolerance
        return (f"{self.devices[1]} vs {self.devices[0]}, {self.dtype}, {self.steps} steps: "
                f"losses {self.loss_error:.1e} (<= {limits['loss']:.0e}), "
                f"parameters {self.parameter_error:.1e} (<= {limits['parameters']:.0e}; worst: {self.worst_parameter}), "
                f"logits {self.logits_error:.1e} (<= {limits['logits']:.0e}): {verdict}")


def relative_error(value, reference):
    """max |value - reference| / max |reference| (0 for two all-zero arrays), computed in float64 on the host."""
    value = numpy.asarray(to_host(value), dtype=numpy.float64)
    reference = numpy.asarray(to_host(reference), dtype=numpy.float64)
    scale = float(numpy.abs(reference).max(initial=0.0))
    difference = float(numpy.abs(value - reference).max(initial=0.0))
    if scale == 0.0:
        return difference
    return difference / scale


def train_steps(device, *, steps, dtype, model_config, batch_size, seed, threads=1, lr=2e-3):
    """Train on `device` for `steps` steps as described in the module docstring; returns
    (losses as floats, {name: host parameter array}, host eval logits of the held-out batch)."""
    backend = get_backend(device)
    model = ViT(**model_config, dtype=dtype, seed=seed).to(backend)
    optimizer = AdamW(parameter_groups(model, 0.05), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 3)
    optimizer.set_schedule([warmup_cosine(step, total_steps=steps, warmup_steps=warmup, peak_lr=lr)
                            for step in range(steps)])
    step = TrainStep(model, optimizer, SoftmaxCrossEntropy(label_smoothing=0.1), clip_grad_norm=1.0, threads=threads)
    batches = numpy.random.default_rng(seed + 1)     # the same batches on every device: drawn on the host
    shape = (batch_size, model_config.get("channels", 1), model_config["image_size"], model_config["image_size"])
    model.train()
    losses = []
    for _ in range(steps):
        images = batches.standard_normal(shape).astype(dtype)
        labels = batches.integers(0, model_config["num_classes"], batch_size)
        losses.append(float(step(backend.asarray(images), backend.asarray(labels))))
    held_out = batches.standard_normal(shape).astype(dtype)
    model.eval()
    logits = to_host(model.forward(backend.asarray(held_out)))
    parameters = {name: to_host(parameter.data).copy() for name, parameter in model.named_parameters()}
    return losses, parameters, logits


def compare_training(devices=("cpu", "gpu"), *, steps=10, dtype="float64", model_config=None, batch_size=32, seed=0,
                     threads=(1, 1), tolerance=None):
    """Train the same model on devices[0] and devices[1] (`threads` CPU threads each) and compare them
    (module docstring); returns a Comparison. BackendUnavailable if a device cannot be used."""
    model_config = dict(DEFAULT_MODEL if model_config is None else model_config)
    runs = [train_steps(device, steps=steps, dtype=dtype, model_config=model_config, batch_size=batch_size, seed=seed,
                        threads=count)
            for device, count in zip(devices, threads)]
    (reference_losses, reference_parameters, reference_logits), (losses, parameters, logits) = runs
    loss_error = max(relative_error(value, reference) for value, reference in zip(losses, reference_losses))
    parameter_errors = {name: relative_error(parameters[name], reference)
                        for name, reference in reference_parameters.items()}
    worst = max(parameter_errors, key=parameter_errors.get)
    return Comparison(devices=tuple(devices), dtype=dtype, steps=steps,
                      tolerance=dict(TOLERANCES[dtype] if tolerance is None else tolerance),
                      loss_error=loss_error, parameter_error=parameter_errors[worst], worst_parameter=worst,
                      logits_error=relative_error(logits, reference_logits), losses=reference_losses)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m scratchvit.equivalence",
        description="Train the same ViT on two devices from identical weights and batches and compare every loss, "
                    "parameter and the final logits (dropout and shifts off).")
    parser.add_argument("--devices", nargs=2, default=["cpu", "gpu"], metavar=("REFERENCE", "OTHER"),
                        help="the two devices (default: cpu gpu)")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help="a tiny model (8x8 images, dim 8, depth 2) instead of train_mnist.py's default, for quick checks")
    parser.add_argument("--json", action="store_true", help="print one JSON object per comparison")
    return parser


SMALL_MODEL = dict(image_size=8, patch_size=2, num_classes=4, dim=8, depth=2, heads=2, mlp_dim=16)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        print("error: --steps and --batch-size must be at least 1", file=sys.stderr)
        return 2
    model_config = SMALL_MODEL if args.small else DEFAULT_MODEL
    passed = True
    for dtype in args.dtypes:
        try:
            comparison = compare_training(tuple(args.devices), steps=args.steps, dtype=dtype, model_config=model_config,
                                          batch_size=args.batch_size, seed=args.seed)
        except BackendUnavailable as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        passed = passed and comparison.passed
        if args.json:
            print(json.dumps(dict(dataclasses.asdict(comparison), passed=comparison.passed)), flush=True)
        else:
            print(comparison.summary(), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
