"""The GPU acceptance run's programs that run inside a stage's own process: the machine report (stage 1)
and the inference on two devices, and whether an MPI runtime is there for the MPI stage.

tools/gpu_acceptance.py starts them as `python -c "from tools.acceptance_probes import ..."` in the
checkout; they print what tools/acceptance_judging.py then reads.
"""
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:      # started as a stage: the checkout's scratchvit, the one being tested
    sys.path.insert(0, str(REPO_ROOT))

from scratchvit.data import MNIST_FILES  # noqa: E402
from scratchvit.machine import add_gpu_facts, cpu_name, nvidia_driver_version  # noqa: E402
from tools.acceptance_judging import parse_json_objects  # noqa: E402

INFERENCE_IMAGES = 16           # test digits the inference stage classifies on both devices
# The largest difference of a probability between the CPU and the GPU the inference stage accepts. The
# same float32 forward pass, its sums in another order: the equivalence stage holds logits to ~1e-5
# relative; a probability moves by at most about that, far below this.
PROBABILITY_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------------
# stage 1: the machine report (runs in its own process: `machine_main`)

def torch_facts(with_gpu):
    """PyTorch's version (and its CUDA, and whether it sees the GPU), or why it did not import."""
    try:
        import torch
    except Exception as error:          # torch is optional: a missing or broken one is a fact, not a failure
        return dict(torch="not importable", torch_error=f"{type(error).__name__}: {error}")
    facts = dict(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if with_gpu:
        facts["torch_sees_gpu"] = bool(torch.cuda.is_available())
    return facts


def cupy_facts_if_any():
    """CuPy's version, or that it is not installed or not importable (and why)."""
    if importlib.util.find_spec("cupy") is None:
        return dict(cupy="not installed")
    try:
        import cupy
    except Exception as error:
        return dict(cupy="not importable", cupy_error=f"{type(error).__name__}: {error}")
    return dict(cupy=cupy.__version__)


def machine_report(dry_run):
    """(facts, problem): what this machine is, and why it cannot run the GPU path (None if it can, or in a dry run)."""
    import numpy
    facts = dict(dry_run=dry_run, cpu=cpu_name(), cpu_count=os.cpu_count(), python=platform.python_version(),
                 numpy=numpy.__version__, platform=platform.platform())
    problem = None
    if dry_run:
        facts.update(cupy_facts_if_any())
    else:
        try:
            facts["nvidia_driver"] = nvidia_driver_version()    # known even where CuPy does not import
            import cupy
            add_gpu_facts(facts, cupy)
            from scratchvit.backend import get_backend
            get_backend("gpu")          # scratchvit's own check: CuPy compiles and runs a kernel on the device
        except Exception as error:
            problem = f"{type(error).__name__}: {error}"
            if "cupy" not in facts:
                facts.update(cupy_facts_if_any())
    facts.update(torch_facts(with_gpu=not dry_run))
    return facts, problem


def machine_main(dry_run):
    """Print the machine report, one fact a line, then as one JSON line; exit status 1 if the GPU is unusable."""
    facts, problem = machine_report(dry_run)
    print("dry run: every stage on the CPU, tiny sizes" if dry_run else "GPU run")
    for key, value in facts.items():
        print(f"{key}: {value}")
    if problem:
        print(f"error: the GPU path cannot run here: {problem}")
    print(json.dumps(dict(facts, problem=problem)))
    return 1 if problem else 0


# ------------------------------------------------------------------------------------------------
# the inference stage: `predict` and the demo's inference on two devices (runs in its own process)

def first_test_digits(data_dir, count=INFERENCE_IMAGES):
    """The first `count` MNIST test images, (count, 28, 28) uint8, light ink on dark."""
    from scratchvit.data import read_idx
    folder = Path(data_dir)
    name = MNIST_FILES["test_images"]
    path = folder / name if (folder / name).is_file() else folder / (name + ".gz")
    return read_idx(path, ndim=3)[:count]


def predict_command_rows(checkpoint, paths, device):
    """(K,) probabilities per image, as `python -m scratchvit.predict --device DEVICE --json` prints them."""
    import contextlib
    import io
    from scratchvit.predict import main as predict_main
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = predict_main(["--checkpoint", str(checkpoint), "--device", device, "--json", *map(str, paths)])
    if status != 0:
        raise RuntimeError(f"predict --device {device} exited with status {status}")
    return [record["probabilities"] for record in parse_json_objects(printed.getvalue())]


def demo_rows(checkpoint, digits, device):
    """(K,) probabilities per image from the demo's inference (scratchvit.demo.api.Demo) on `device`."""
    from scratchvit.demo.api import Demo
    from scratchvit.predict import load_trained_model
    model, _ = load_trained_model(checkpoint, device)
    demo = Demo(model)
    return [demo.predict(digit)["probabilities"] for digit in digits]


def compare_rows(reference, other, tolerance=PROBABILITY_TOLERANCE):
    """{"images", "same_digits", "digit_mismatches", "max_probability_difference", "passed"}: `other`'s rows
    against `reference`'s. A digit that differs is a failure unless the reference's two most probable
    classes lie within `tolerance` of each other (a tie, which rounding may break either way)."""
    import numpy
    reference, other = numpy.asarray(reference, dtype=float), numpy.asarray(other, dtype=float)
    if reference.shape != other.shape or reference.size == 0:
        return dict(images=len(other), same_digits=False, digit_mismatches=None, max_probability_difference=None,
                    passed=False)
    difference = float(numpy.max(numpy.abs(reference - other)))
    top_two = numpy.sort(reference, axis=1)[:, -2:]
    mismatched = reference.argmax(axis=1) != other.argmax(axis=1)
    real = mismatched & (top_two[:, 1] - top_two[:, 0] > tolerance)
    return dict(images=len(reference), same_digits=not mismatched.any(), digit_mismatches=int(real.sum()),
                max_probability_difference=difference, passed=bool(difference <= tolerance and not real.any()))


def inference_main(checkpoint, data_dir, reference_device="cpu", device="gpu", count=INFERENCE_IMAGES):
    """Classify the first test digits with `predict` (the command, on PNG files) and with the demo's inference,
    on both devices; print one JSON line {"inference": {...}}; exit status 1 where they disagree."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        print(f"error: no checkpoint at {checkpoint}: the train stage wrote none")
        return 1
    from PIL import Image
    digits = first_test_digits(data_dir, count)
    with tempfile.TemporaryDirectory(prefix="scratchvit-inference-") as folder:
        paths = []
        for index, digit in enumerate(digits):
            paths.append(Path(folder) / f"digit-{index:02d}.png")
            Image.fromarray(digit).save(paths[-1])
        predicted = {name: predict_command_rows(checkpoint, paths, name) for name in (reference_device, device)}
    demo = {name: demo_rows(checkpoint, digits, name) for name in (reference_device, device)}
    result = dict(devices=[reference_device, device], tolerance=PROBABILITY_TOLERANCE,
                  predict=compare_rows(predicted[reference_device], predicted[device]),
                  demo=compare_rows(demo[reference_device], demo[device]))
    result["passed"] = result["predict"]["passed"] and result["demo"]["passed"]
    for name in ("predict", "demo"):
        figures = result[name]
        print(f"{name}: {figures['images']} digits on {reference_device} and {device}: same digits "
              f"{figures['same_digits']}, largest probability difference {figures['max_probability_difference']}")
    print(json.dumps(dict(inference=result)))
    return 0 if result["passed"] else 1


# ------------------------------------------------------------------------------------------------
# the MPI stage: is there an MPI runtime?

def find_mpiexec():
    """mpiexec beside this Python (the mpich wheel's) or on PATH, or None."""
    beside_python = Path(sys.executable).parent / "mpiexec"
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


def mpi_runtime_problem():
    """None where mpi4py is installed and mpiexec found, else why not (a few words)."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    if find_mpiexec() is None:
        return "no mpiexec"
    return None
