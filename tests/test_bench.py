"""`python -m scratchvit.bench`: it runs, reports sane fields, and compares like with like.

No timing thresholds: a benchmark measures, these tests check that what it measures is the right
thing (the PyTorch reference model is scratchvit's ViT, gradient for gradient) and that it reports it.
"""
import importlib.util
import json
import sys

import numpy
import pytest

from conftest import on_gpu   # tests/ is on sys.path under pytest's default import mode
from scratchvit import bench
from scratchvit.backend import BackendUnavailable, get_backend
from scratchvit.layers import SoftmaxCrossEntropy
from scratchvit.optim import AdamW
from scratchvit.train import TrainStep, parameter_groups
from scratchvit.vit import ViT

TINY = ["--image-size", "8", "--patch-size", "4", "--dim", "8", "--depth", "1", "--heads", "2", "--mlp-dim", "16",
        "--num-classes", "5", "--batch-size", "4"]
QUICK = ["--steps", "2", "--warmup", "1"]
TINY_CONFIG = dict(image_size=8, patch_size=4, num_classes=5, dim=8, depth=1, heads=2, mlp_dim=16, channels=1)


def run_json(capsys, *options):
    assert bench.main([*QUICK, *TINY, *options, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_has_positive_measurements(capsys):
    report = run_json(capsys)
    result = report["results"]["scratchvit"]
    for field in ("median_ms", "min_ms", "q1_ms", "q3_ms", "img_per_s", "peak_bytes"):
        assert result[field] > 0, field
    assert result["min_ms"] <= result["q1_ms"] <= result["median_ms"] <= result["q3_ms"]
    assert result["img_per_s"] == pytest.approx(4 * 1e3 / result["median_ms"])
    assert result["steps"] == len(result["times_ms"]) == 2
    assert result["parameters"] == sum(p.size for p in ViT(**TINY_CONFIG).parameters())
    assert result["memory"]["state_bytes"] > 0
    assert report["ratio"] is None and "torch" not in report["results"]
    assert report["config"]["batch_size"] == 4 and report["config"]["dim"] == 8
    assert report["timing"]["steps"] == 2 and report["timing"]["warmup"] == 1


def test_table_output(capsys):
    assert bench.main([*QUICK, *TINY]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device cpu  config image 8 patch 4 dim 8 depth 1 heads 2 mlp 16 batch 4 float32")
    assert "scratchvit  median" in out and "img/s" in out and "numpy" in out


def test_bad_options_exit_2(capsys):
    assert bench.main(["--steps", "0"]) == 2
    assert bench.main([*QUICK, *TINY, "--heads", "3"]) == 2          # dim 8 is not divisible by 3 heads
    assert bench.main(["--device", "tpu"]) == 2                      # argparse's own error
    err = capsys.readouterr().err
    assert "--steps must be at least 1" in err and "divisible" in err


def test_compare_torch_without_torch_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)                  # makes `import torch` fail
    assert bench.main([*QUICK, *TINY, "--compare-torch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install torch" in err and "--compare-torch" in err


@on_gpu
@pytest.mark.parametrize("cuda_graph", [[], ["--cuda-graph"]])
def test_gpu_json_report(capsys, cuda_graph):
    """On the GPU, plain and replayed from a CUDA graph (warm-up 2: one plain step, one recording)."""
    assert bench.main(["--steps", "3", "--warmup", "2", *TINY, "--device", "gpu", "--json", *cuda_graph]) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["results"]["scratchvit"]
    assert report["timing"]["clock"] == "CUDA events" and report["config"]["cuda_graph"] == bool(cuda_graph)
    assert result["median_ms"] > 0 and result["peak_bytes"] > 0 and result["memory"]["state_bytes"] > 0
    assert numpy.isfinite(result["first_loss"])


def test_cuda_graph_needs_the_gpu(capsys):
    assert bench.main([*QUICK, *TINY, "--cuda-graph"]) == 2
    assert "--cuda-graph needs --device gpu" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_gpu_without_cupy_exits_2(capsys):
    with pytest.raises(BackendUnavailable) as expected:
        get_backend("gpu")
    assert bench.main([*QUICK, *TINY, "--device", "gpu"]) == 2
    assert capsys.readouterr().err == f"error: {expected.value}\n"


def test_cuda_event_clock_times_each_step_and_waits_for_the_last_event():
    """The GPU clock's logic, with stand-in events (a device clock that the steps advance)."""
    device_ms = [0.0]
    log = []

    class FakeEvent:
        def record(self):
            self.at = device_ms[0]
            log.append("record")

        def synchronize(self):
            log.append("synchronize")

    durations = iter([3.0, 5.0, 4.0])

    def step():
        device_ms[0] += next(durations)

    clock = bench.CudaEventClock(FakeEvent, lambda start, end: end.at - start.at)
    assert clock.time(step, 3) == [3.0, 5.0, 4.0]
    assert log == ["record"] * 6 + ["synchronize"]          # queued back to back, one wait at the end


# ------------------------------------------------------------------------------------------------
# the comparison with PyTorch

def test_compare_torch_reports_both(capsys):
    pytest.importorskip("torch")
    report = run_json(capsys, "--compare-torch", "--repeats", "2")
    ours, theirs = report["results"]["scratchvit"], report["results"]["torch"]
    assert ours["parameters"] == theirs["parameters"] > 0
    assert report["ratio"] > 0
    assert report["ratio"] == pytest.approx(ours["median_ms"] / theirs["median_ms"])
    assert theirs["median_ms"] > 0 and theirs["img_per_s"] > 0 and theirs["steps"] == 2
    # same initial weights, same batch: the first step's loss agrees to float32 rounding
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-5)
    assert report["timing"]["rounds"] == 2 and "torch" in report["machine"]


def test_compare_torch_table(capsys):
    pytest.importorskip("torch")
    assert bench.main([*QUICK, *TINY, "--compare-torch"]) == 0
    out = capsys.readouterr().out
    assert "ratio scratchvit/torch:" in out and "\ntorch " in out and "in both" in out


def test_parameter_count_mismatch_is_an_error(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    original = bench.torch_vit

    def with_an_extra_parameter(*args, **kwargs):
        model = original(*args, **kwargs)
        model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3, dtype=model.head.weight.dtype)))
        return model

    monkeypatch.setattr(bench, "torch_vit", with_an_extra_parameter)
    assert bench.main([*QUICK, *TINY, "--compare-torch"]) == 1
    assert "architectures differ" in capsys.readouterr().err


def _tiny_float64_model(channels):
    model = ViT(**dict(TINY_CONFIG, channels=channels, depth=2), dtype="float64", seed=3)
    rng = numpy.random.default_rng(4)
    for name, parameter in model.named_parameters():      # LayerNorm weights away from 1, biases away from 0
        if "norm" in name:
            parameter.data = parameter.data + 0.3 * rng.standard_normal(parameter.shape)
    return model, rng


@pytest.mark.parametrize("channels", [1, 3])
def test_torch_reference_matches_scratchvit_logits_and_gradients(channels):
    torch = pytest.importorskip("torch")
    model, rng = _tiny_float64_model(channels)
    reference = bench.torch_vit(dict(TINY_CONFIG, channels=channels, depth=2), dtype="float64",
                                state=model.state_dict())
    assert list(dict(reference.named_parameters())) == list(dict(model.named_parameters()))
    images = rng.standard_normal((3, channels, 8, 8))
    labels = rng.integers(0, 5, 3)

    loss_fn = SoftmaxCrossEntropy()
    logits = model.forward(images)
    loss = loss_fn.forward(logits, labels)
    image_grad = model.backward(loss_fn.backward())

    images_t = torch.tensor(images, requires_grad=True)
    logits_t = reference(images_t)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(labels))
    loss_t.backward()

    numpy.testing.assert_allclose(logits, logits_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert float(loss) == pytest.approx(loss_t.item(), rel=1e-12)
    numpy.testing.assert_allclose(image_grad, images_t.grad.numpy(), rtol=1e-9, atol=1e-13)
    torch_grads = reference.scratchvit_gradients()
    for name, parameter in model.named_parameters():
        numpy.testing.assert_allclose(parameter.grad, torch_grads[name], rtol=1e-9, atol=1e-13,
                                      err_msg=f"gradient of {name}")


def test_torch_train_step_matches_scratchvit_train_step():
    """Two full steps (clipping active, AdamW with decay groups) leave the same weights on both sides."""
    pytest.importorskip("torch")
    import torch
    model, rng = _tiny_float64_model(channels=1)
    reference = bench.torch_vit(dict(TINY_CONFIG, depth=2), dtype="float64", state=model.state_dict())
    ours = TrainStep(model, AdamW(parameter_groups(model, 0.05), lr=2e-3), SoftmaxCrossEntropy(), clip_grad_norm=0.05)
    theirs = bench.TorchTrainStep(reference, lr=2e-3, weight_decay=0.05, clip_grad_norm=0.05)
    for _ in range(2):
        images, labels = rng.standard_normal((4, 1, 8, 8)), rng.integers(0, 5, 4)
        loss = ours(images, labels)
        loss_t = theirs(torch.from_numpy(images), torch.from_numpy(labels))
        assert float(loss) == pytest.approx(loss_t.item(), rel=1e-10)
        assert float(ours.optimizer.grad_norm()) == pytest.approx(0.05, rel=1e-4)    # the clipping was active
    after = reference.scratchvit_state()
    for name, value in model.state_dict().items():
        numpy.testing.assert_allclose(value, after[name], rtol=1e-9, atol=1e-12, err_msg=name)
