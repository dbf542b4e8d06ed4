"""The exponential moving average of the weights (scratchvit/weight_average.py) and how training uses it."""
import os
import signal

import numpy
import pytest

from scratchvit.optim import AdamW
from scratchvit.checkpoint import load_checkpoint
from scratchvit.config import TrainConfig
from scratchvit.train import run
from scratchvit.vit import ViT
from scratchvit.weight_average import WeightAverage

from conftest import on_gpu
from test_train import TINY_MODEL, write_dataset


def small_model(seed=0):
    return ViT(image_size=8, patch_size=4, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=16, seed=seed)


def test_the_average_of_a_constant_model_is_that_model():
    model = small_model()
    optimizer = AdamW(model.parameters(), lr=1e-3)
    before = model.state_dict()
    average = WeightAverage(optimizer.data, decay=0.9)
    for _ in range(50):
        average.update()
    for name, value in average.model_state(model).items():
        numpy.testing.assert_array_equal(value, before[name])
    assert average.updates == 50


def test_update_follows_the_formula_with_its_decay_warmup():
    weights = numpy.zeros(3)
    average = WeightAverage(weights, decay=0.5)
    expected = weights.copy()
    for step, value in enumerate([1.0, 4.0, -2.0, 8.0, 3.0, 0.5, -1.0, 2.0, 6.0, -4.0], start=1):
        weights[...] = value                                # the optimiser updates the buffer in place
        decay = min(0.5, (1 + step) / (10 + step))
        assert average.current_decay() == decay
        average.update()
        expected = decay * expected + (1 - decay) * value
        numpy.testing.assert_allclose(average.average, expected, rtol=1e-15)
    assert average.current_decay() == 0.5                   # (1 + 11) / (10 + 11) > 0.5: the cap


def test_in_place_of_weights_swaps_the_average_in_and_the_weights_back():
    model = small_model()
    optimizer = AdamW(model.parameters(), lr=1e-3)
    average = WeightAverage(optimizer.data, decay=0.9)
    optimizer.data += 1.0                                   # the weights move; the average has not been updated
    trained = {name: value.copy() for name, value in model.state_dict().items()}
    images = numpy.random.default_rng(0).standard_normal((2, 1, 8, 8))
    with average.in_place_of_weights():
        numpy.testing.assert_array_equal(optimizer.data, average.average)
        averaged_logits = model.forward(images)
    assert not numpy.allclose(averaged_logits, model.forward(images))
    for name, value in model.state_dict().items():
        numpy.testing.assert_array_equal(value, trained[name])


def test_an_exception_inside_the_block_restores_the_trained_weights_and_propagates():
    """An evaluation that fails (out of memory, Ctrl-C) must not leave the average in place of the
    trained weights: training would go on from the average, and the checkpoint would save it as them."""
    model = small_model()
    optimizer = AdamW(model.parameters(), lr=1e-3)
    average = WeightAverage(optimizer.data, decay=0.9)
    optimizer.data += 1.0                                   # the trained weights differ from the average
    trained = {name: value.copy() for name, value in model.state_dict().items()}
    averaged = average.average.copy()
    for error in (MemoryError("out of memory in evaluation"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with average.in_place_of_weights():
                numpy.testing.assert_array_equal(optimizer.data, average.average)
                raise error
        for name, value in model.state_dict().items():          # the model's views of the buffer
            numpy.testing.assert_array_equal(value, trained[name], err_msg=name)
    numpy.testing.assert_array_equal(average.average, averaged)            # and the average is untouched


def test_load_model_state_restores_the_average_and_the_count():
    model = small_model()
    optimizer = AdamW(model.parameters(), lr=1e-3)
    average = WeightAverage(optimizer.data, decay=0.9)
    optimizer.data *= 3.0
    average.update()
    saved = average.model_state(model)
    fresh = small_model()
    other = WeightAverage(AdamW(fresh.parameters(), lr=1e-3).data, decay=0.9)
    weights_before = other.weights.copy()
    other.load_model_state(fresh, saved, average.updates)
    numpy.testing.assert_array_equal(other.average, average.average)
    numpy.testing.assert_array_equal(other.weights, weights_before)     # the trained weights are untouched
    assert other.updates == 1


@pytest.mark.parametrize("damage", ["missing", "wrong shape"])
def test_a_state_that_cannot_be_loaded_changes_neither_the_weights_nor_the_average(damage):
    """load_model_state fails half-way (a checkpoint of another model): the trained weights come back,
    the average and its update count stay as they were, and the error reaches the caller."""
    model = small_model()
    optimizer = AdamW(model.parameters(), lr=1e-3)
    average = WeightAverage(optimizer.data, decay=0.9)
    optimizer.data *= 2.0
    average.update()
    weights, averaged = optimizer.data.copy(), average.average.copy()
    state = {name: value + 1.0 for name, value in small_model(seed=1).state_dict().items()}
    last = list(state)[-1]                       # the earlier parameters are copied before it fails
    if damage == "missing":
        del state[last]
    else:
        state[last] = numpy.zeros(state[last].shape + (2,))
    with pytest.raises((KeyError, ValueError), match=last):
        average.load_model_state(model, state, updates=7)
    numpy.testing.assert_array_equal(optimizer.data, weights)
    numpy.testing.assert_array_equal(average.average, averaged)
    assert average.updates == 1


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(numpy.zeros(2), decay)


# ------------------------------------------------------------------------------------------------
# in training: evaluated, checkpointed, resumed exactly

def tiny_config(tmp_path, **options):
    folder = tmp_path / "data"
    if not folder.exists():
        write_dataset(folder, train_count=48, test_count=32)
    options = dict(dict(TINY_MODEL, epochs=2, batch_size=16, threads=1, log_every=0), **options)
    return TrainConfig(data_dir=str(folder), out_dir=str(tmp_path / options.pop("out", "run")), **options)


def test_a_run_with_ema_saves_the_average_and_evaluation_uses_it(tmp_path):
    """The checkpoint's average differs from its trained weights, and the recorded test accuracy is the
    average's: recomputed here from the average's weights, and loaded by load_checkpoint(averaged=True)."""
    from scratchvit.backend import get_backend
    from scratchvit.config import build_model, load_data
    from scratchvit.evaluation import evaluate
    config = tiny_config(tmp_path, ema_decay=0.9, rotation=10, scale=0.1, translate=0.1)
    history = run(config, log=lambda message: None)
    meta, trained, _ = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    _, averaged, _ = load_checkpoint(tmp_path / "run" / "checkpoint.npz", averaged=True)
    assert meta["average_updates"] == 2 * 3
    assert set(averaged) == set(trained)
    assert any(not numpy.array_equal(averaged[name], trained[name]) for name in trained)
    data = load_data(config, get_backend("cpu"))
    model = build_model(config, data)
    model.load_state_dict(averaged)
    assert evaluate(model, data["test_images"], data["test_labels"]) == history[-1]["test_accuracy"]


def test_in_training_the_average_takes_each_step_s_new_weights(tmp_path, monkeypatch):
    """run() with the average on, three steps: after step t the average is exactly
    average_{t-1} + (1 - d_t) (theta_t - average_{t-1}), theta_t the weights after that step's optimiser
    update and average_0 the initial weights, computed here by hand. An average updated before the
    optimiser step would hold theta_{t-1} instead: one step behind."""
    from scratchvit import train
    averages = []

    class Recorded(WeightAverage):               # the real class, only remembered, so the test can read it
        def __init__(self, weights, decay):
            super().__init__(weights, decay)
            averages.append(self)
            self.initial = weights.copy()

    seen = []                                    # (weights, average) after every step, as on_step sees them

    def on_step(epoch, step):
        seen.append((averages[0].weights.copy(), averages[0].average.copy()))

    monkeypatch.setattr(train, "WeightAverage", Recorded)
    run(tiny_config(tmp_path, epochs=1, ema_decay=0.5), log=lambda message: None, on_step=on_step)
    assert len(averages) == 1 and len(seen) == 48 // 16
    expected = averages[0].initial
    for t, (weights, average) in enumerate(seen, start=1):
        decay = min(0.5, (1 + t) / (10 + t))
        expected = expected + (1 - decay) * (weights - expected)
        assert not numpy.array_equal(weights, seen[t - 2][0] if t > 1 else averages[0].initial)   # it trained
        numpy.testing.assert_array_equal(average, expected, err_msg=f"step {t}")


def test_a_checkpoint_without_ema_gives_its_trained_weights_when_asked_for_the_average(tmp_path):
    run(tiny_config(tmp_path, epochs=1, ema_decay=0.0), log=lambda message: None)
    _, trained, _ = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    meta, averaged, _ = load_checkpoint(tmp_path / "run" / "checkpoint.npz", averaged=True)
    assert meta["average_updates"] is None
    for name in trained:
        numpy.testing.assert_array_equal(averaged[name], trained[name])


def test_resuming_a_run_with_ema_repeats_the_uninterrupted_run(tmp_path):
    """Ctrl-C in the middle of the first epoch, then --resume: the same losses, accuracies (of the
    average) and final average as a run never interrupted."""
    options = dict(ema_decay=0.8, rotation=15, scale=0.1, translate=0.1)
    whole = run(tiny_config(tmp_path, out="whole", **options), log=lambda message: None)

    def interrupt(epoch, step):
        if (epoch, step) == (0, 1):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="resume"):
        run(tiny_config(tmp_path, out="parts", **options), log=lambda message: None, on_step=interrupt)
    resumed = run(tiny_config(tmp_path, out="parts", resume=True, **options), log=lambda message: None)
    assert [(r["train_loss"], r["test_accuracy"]) for r in resumed] == [(r["train_loss"], r["test_accuracy"])
                                                                         for r in whole]
    whole_meta, whole_average, _ = load_checkpoint(tmp_path / "whole" / "checkpoint.npz", averaged=True)
    parts_meta, parts_average, _ = load_checkpoint(tmp_path / "parts" / "checkpoint.npz", averaged=True)
    assert parts_meta["average_updates"] == whole_meta["average_updates"] == 2 * 3
    for name in whole_average:
        numpy.testing.assert_array_equal(parts_average[name], whole_average[name])


def test_with_a_validation_split_metrics_also_hold_the_trained_weights_validation_accuracy(tmp_path):
    """So a user can see, where settings are chosen, whether the average pays."""
    with_split = run(tiny_config(tmp_path, ema_decay=0.9, validation=16, epochs=1, out="split"), log=lambda m: None)
    assert 0 <= with_split[-1]["validation_accuracy_trained_weights"] <= 1
    without_average = run(tiny_config(tmp_path, validation=16, epochs=1, ema_decay=0.0, out="plain"),
                          log=lambda m: None)
    assert "validation_accuracy_trained_weights" not in without_average[-1]


@on_gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_on_gpu_the_average_follows_numpys(dtype):
    """The same weight trajectory averaged on the device (kernels/weight_average.py, one kernel) and on
    the host (three array operations): the same arithmetic in the same order, so equal to rounding."""
    from scratchvit.backend import get_backend, to_host
    gpu = get_backend("gpu")
    trajectory = numpy.random.default_rng(1).standard_normal((12, 50)).astype(dtype)
    host_weights, device_weights = trajectory[0].copy(), gpu.asarray(trajectory[0])
    on_host, on_device = WeightAverage(host_weights, decay=0.7), WeightAverage(device_weights, decay=0.7)
    for weights in trajectory[1:]:
        host_weights[...] = weights
        device_weights[...] = gpu.asarray(weights)
        on_host.update()
        on_device.update()
    rtol = 1e-12 if dtype == "float64" else 1e-6
    assert on_device.average.dtype == numpy.dtype(dtype)
    numpy.testing.assert_allclose(to_host(on_device.average), on_host.average, rtol=rtol)
    with on_device.in_place_of_weights():
        numpy.testing.assert_allclose(to_host(device_weights), on_host.average, rtol=rtol)
    numpy.testing.assert_array_equal(to_host(device_weights), trajectory[-1])
