"""scratchvit.equivalence: the same training steps on two devices give the same losses and weights.

On a GPU the CuPy steps are held against NumPy's on the host (float64 to 1e-10, float32 to the
measured tolerances). On the CPU the same machinery compares two summation orders (one thread and
two), which keeps the float32 tolerances' measurement honest, and a planted fault must be caught."""
import json

import numpy
import pytest

from conftest import on_gpu
from scratchvit import equivalence
from scratchvit.cpu_threads import can_limit_blas_threads
from scratchvit.equivalence import DEFAULT_MODEL, SMALL_MODEL, TOLERANCES, compare_training, relative_error

needs_thread_limit = pytest.mark.skipif(not can_limit_blas_threads(),
                                        reason="this NumPy's BLAS cannot limit threads per thread: no threaded step")


def test_relative_error_is_relative_to_the_largest_entry():
    reference = numpy.array([10.0, 0.0, -2.0])
    assert relative_error(reference, reference) == 0.0
    assert relative_error(reference + numpy.array([0.0, 1e-3, 0.0]), reference) == pytest.approx(1e-4)
    assert relative_error(numpy.zeros(3), numpy.zeros(3)) == 0.0
    assert relative_error(numpy.array([0.5]), numpy.zeros(1)) == 0.5


@needs_thread_limit
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_summation_orders_agree_within_the_tolerances(dtype):
    """One thread against two on the CPU: the same math summed in another order. This is the rounding
    a GPU adds, so the tolerances the GPU is held to must cover it (float32's were measured this way)."""
    comparison = compare_training(("cpu", "cpu"), steps=10, dtype=dtype, batch_size=32, threads=(1, 2))
    assert comparison.passed, comparison.summary()
    assert comparison.loss_error > 0.0          # the two runs really summed differently


@pytest.mark.parametrize("dtype, factor", [("float64", 1.001), ("float32", 1.1)])
def test_a_planted_fault_is_caught(monkeypatch, dtype, factor):
    """A GELU backward off by `factor` in one of the two runs fails the comparison: 0.1% in float64;
    in float32 0.1% drowns in rounding (measured: parameters differ by 1.6e-3, losses by 3e-7 after 5
    steps, within the tolerances), so there a 10% fault, the size of a wrong constant, must be caught."""
    from scratchvit.layers import gelu
    kwargs = dict(steps=5, dtype=dtype, model_config=SMALL_MODEL, batch_size=16, seed=0)
    good_losses, good_parameters, good_logits = equivalence.train_steps("cpu", **kwargs)
    backward = gelu.GELU.backward
    monkeypatch.setattr(gelu.GELU, "backward", lambda self, grad_out: backward(self, grad_out) * factor)
    losses, parameters, logits = equivalence.train_steps("cpu", **kwargs)
    errors = dict(loss=max(map(relative_error, losses, good_losses)), logits=relative_error(logits, good_logits),
                  parameters=max(relative_error(parameters[name], good_parameters[name]) for name in good_parameters))
    assert any(error > TOLERANCES[dtype][kind] for kind, error in errors.items()), errors


def test_command_line_against_itself_on_the_cpu(capsys):
    assert equivalence.main(["--devices", "cpu", "cpu", "--small", "--steps", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["dtype"] for line in lines] == ["float64", "float32"]
    assert all(line["passed"] and line["loss_error"] == 0.0 for line in lines)


def test_command_line_reports_a_missing_gpu_in_one_line(capsys, monkeypatch):
    from scratchvit.cupy_check import BackendUnavailable

    def unavailable(*args, **kwargs):
        raise BackendUnavailable("CuPy is not installed")
    monkeypatch.setattr(equivalence, "compare_training", unavailable)
    assert equivalence.main(["--small", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: CuPy is not installed"


@on_gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("model_config", [SMALL_MODEL, DEFAULT_MODEL], ids=["small", "default"])
def test_gpu_training_steps_match_numpy(dtype, model_config):
    """The CuPy path (fused kernels, cuBLAS) against NumPy on the host: 10 steps from identical weights
    and batches, every loss, every parameter and the final logits."""
    comparison = compare_training(("cpu", "gpu"), steps=10, dtype=dtype, model_config=model_config, batch_size=32)
    assert comparison.passed, comparison.summary()
