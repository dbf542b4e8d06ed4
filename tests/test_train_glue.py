"""Tests of the glue around scratchvit.train that the end-to-end tests pass over: the learning-rate
schedule `run()` builds, which parameters `optim.parameter_groups` decays, and the evaluation split over
threads when the test set takes several evaluation batches (evaluation.evaluate).

Each test is meant to fail for a realistic bug: an off-by-one in the schedule or its warmup cap
dropped, LayerNorm gammas or biases decayed, a thread's evaluation batches lost or run in training
mode, a model left in eval mode after a failed evaluation. The runs use the tiny synthetic data set of
test_train.py.
"""
import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor

import numpy
import pytest

import scratchvit.train
from scratchvit import ViT
from scratchvit.config import TrainConfig
from scratchvit.cpu_threads import can_limit_blas_threads
from scratchvit.evaluation import evaluate
from scratchvit.layers import Dropout, Layer
from scratchvit.optim import AdamW, parameter_groups
from scratchvit.train import learning_rate_schedule, run
from test_train import CLASSES, IMAGE_SIZE, TINY_MODEL, quiet, saved_model_accuracy, write_dataset

PEAK_LR = 1e-3


def cosine_tail(step, total_steps, warmup_steps):
    """What the cosine half of the schedule gives step `step` (from 0), written out here on its own."""
    return 0.5 * PEAK_LR * (1.0 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


# ------------------------------------------------------------------------------------------------
# 1. the learning-rate schedule

# (epochs, steps per epoch, warmup epochs, the warmup steps that must come out: worked out by hand)
SCHEDULES = [
    pytest.param(4, 25, 1.0, 10, id="capped-at-a-tenth"),        # 25 warmup steps asked, 100 // 10 = 10 allowed
    pytest.param(1, 50, 1.0, 5, id="one-epoch-capped"),          # a 1-epoch run still decays
    pytest.param(10, 10, 0.5, 5, id="below-the-cap"),            # 5 asked, 10 allowed
    pytest.param(10, 7, 1.5, 7, id="fractional-epochs-below-cap"),  # int(10.5) = 10 asked, 7 allowed
]


@pytest.mark.parametrize("epochs, steps_per_epoch, warmup_epochs, warmup_steps", SCHEDULES)
def test_learning_rate_schedule_first_warmup_end_and_last_values(epochs, steps_per_epoch, warmup_epochs,
                                                                 warmup_steps):
    config = TrainConfig(epochs=epochs, lr=PEAK_LR, warmup_epochs=warmup_epochs)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    total_steps = epochs * steps_per_epoch

    assert len(schedule) == total_steps                                  # one rate per step of the run
    assert schedule[0] == pytest.approx(PEAK_LR / warmup_steps, rel=1e-12)     # the first step already trains
    assert schedule[warmup_steps - 2] == pytest.approx(PEAK_LR * (warmup_steps - 1) / warmup_steps, rel=1e-12)
    assert schedule[warmup_steps - 1] == pytest.approx(PEAK_LR, rel=1e-12)     # the warmup ends at the peak
    assert schedule[warmup_steps] == pytest.approx(PEAK_LR, rel=1e-12)         # where the cosine starts
    assert schedule[-1] == pytest.approx(cosine_tail(total_steps - 1, total_steps, warmup_steps), rel=1e-12)
    assert 0 < schedule[-1] < schedule[-2]                               # the last step still trains, a little
    assert all(earlier < later for earlier, later in zip(schedule[:warmup_steps], schedule[1:warmup_steps]))
    assert all(earlier > later for earlier, later in zip(schedule[warmup_steps:], schedule[warmup_steps + 1:]))


def test_learning_rate_schedule_without_warmup_starts_at_the_peak():
    schedule = learning_rate_schedule(TrainConfig(epochs=3, lr=PEAK_LR, warmup_epochs=0.0), 10)
    assert len(schedule) == 30
    assert schedule[0] == PEAK_LR
    assert schedule[-1] == pytest.approx(cosine_tail(29, 30, 0), rel=1e-12)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """200 training images (7 steps of 32 per epoch, the last one of 8), 128 test images."""
    return write_dataset(tmp_path_factory.mktemp("data") / "glue", train_count=200, test_count=128, seed=2)


def test_run_steps_the_optimizer_along_the_schedule(dataset, tmp_path, monkeypatch):
    """Every step of a real run uses the schedule's rate for that step, and metrics.jsonl records it."""
    steps_per_epoch = 7
    config = TrainConfig(data_dir=str(dataset), out_dir=str(tmp_path), epochs=3, batch_size=32, lr=PEAK_LR,
                         warmup_epochs=1.0, max_shift=1, **TINY_MODEL)
    learning_rates = []                         # the rate each optimizer step used, in order
    original_step = AdamW.step

    def recording_step(optimizer):
        original_step(optimizer)
        learning_rates.append(optimizer.lr)    # set by the step itself, from the schedule

    monkeypatch.setattr(AdamW, "step", recording_step)
    history = run(config, log=quiet)

    schedule = learning_rate_schedule(config, steps_per_epoch)
    assert learning_rates == schedule
    assert learning_rates[0] == pytest.approx(PEAK_LR / 2, rel=1e-12)  # warmup capped at 21 // 10 = 2 steps, not 7
    assert [record["lr"] for record in history] == [schedule[(epoch + 1) * steps_per_epoch - 1] for epoch in range(3)]
    assert history[-1]["lr"] == schedule[-1]


# ------------------------------------------------------------------------------------------------
# 2. weight decay: the weight matrices only

def test_parameter_groups_decay_exactly_the_weight_matrices():
    model = ViT(image_size=IMAGE_SIZE, num_classes=CLASSES, **dict(TINY_MODEL, depth=2))
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    decayed, not_decayed = parameter_groups(model, 0.05)

    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (0.05, 0.0)
    assert [names[id(parameter)] for parameter in decayed["params"]] == [
        "patch_embed.weight",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.fc1.weight", "blocks.0.fc2.weight",
        "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.1.fc1.weight", "blocks.1.fc2.weight",
        "head.weight",
    ]
    block_rest = ["attn_norm.weight", "attn_norm.bias", "attn.qkv.bias", "attn.proj.bias",
                  "mlp_norm.weight", "mlp_norm.bias", "fc1.bias", "fc2.bias"]
    assert [names[id(parameter)] for parameter in not_decayed["params"]] == [
        "cls_token", "pos_embedding", "patch_embed.bias",
        *[f"blocks.0.{name}" for name in block_rest], *[f"blocks.1.{name}" for name in block_rest],
        "norm.weight", "norm.bias", "head.bias",
    ]


# ------------------------------------------------------------------------------------------------
# 3. evaluation split over threads

@pytest.mark.skipif(not can_limit_blas_threads(), reason="the training step cannot limit BLAS threads here, "
                                                         "so it stays single-threaded and evaluates serially")
def test_threaded_evaluation_over_several_batches_equals_a_serial_evaluation(dataset, tmp_path, monkeypatch):
    """128 test images in evaluation batches of 40 (40, 40, 40, 8): the model evaluates batches 1 and
    3, its replica batches 2 and 4, in two threads. Dropout is on, so a replica left in training mode
    would also change the predictions."""
    config = TrainConfig(data_dir=str(dataset), out_dir=str(tmp_path), epochs=4, batch_size=16, lr=1e-2,
                         warmup_epochs=0.5, dropout=0.3, threads=2, eval_batch_size=40, seed=0, **TINY_MODEL)
    splits = []                                 # (models, thread pool given) of every evaluation in the run
    original_evaluate = scratchvit.train.evaluate

    def recording_evaluate(model, images, labels, batch_size=500, *, replicas=(), pool=None, communicator=None):
        splits.append((1 + len(replicas), pool is not None))
        return original_evaluate(model, images, labels, batch_size, replicas=replicas, pool=pool,
                                 communicator=communicator)

    monkeypatch.setattr(scratchvit.train, "evaluate", recording_evaluate)
    history = run(config, log=quiet)
    assert splits == [(2, True)] * 4            # the run really evaluated in two threads, every epoch

    accuracy = history[-1]["test_accuracy"]
    assert 0.3 < accuracy < 0.95, accuracy       # neither chance nor perfect: a wrong count would show
    serial = dataclasses.replace(config, threads=1, eval_batch_size=128)    # one batch, one model, no threads
    assert saved_model_accuracy(tmp_path / "checkpoint.npz", serial) == accuracy


class Classifier(Layer):
    """A stand-in model with a dropout sub-layer: records (its mode, the sub-layer's) at every forward and
    raises MemoryError at forward number `fail_at` (None: never)."""

    def __init__(self, fail_at=None):
        self.dropout = Dropout(0.5)
        self.fail_at, self.modes = fail_at, []

    def forward(self, images):
        self.modes.append((self.training, self.dropout.training))
        if len(self.modes) == self.fail_at:
            raise MemoryError("out of memory in the middle of the evaluation")
        return numpy.zeros((images.shape[0], 2))


@pytest.mark.parametrize("threads", [1, 2])
def test_evaluation_gives_every_model_its_mode_back_also_when_a_forward_fails(threads):
    """evaluate runs the model and its replicas in eval mode, then gives each layer its mode back, also
    when a forward raises midway: a replica left in eval mode would train on without dropout."""
    images, labels = numpy.zeros((6, 1, 2, 2)), numpy.zeros(6, dtype=numpy.int64)
    model, replica = Classifier(), Classifier()
    replica.dropout.eval()                              # a mixed mode comes back as it was, too
    with ThreadPoolExecutor(threads) as pool:
        assert evaluate(model, images, labels, 2, replicas=[replica], pool=pool) == 1.0
    assert (model.training, model.dropout.training, replica.training, replica.dropout.training) == (
        True, True, True, False)
    failing = Classifier(fail_at=2)
    with ThreadPoolExecutor(threads) as pool, pytest.raises(MemoryError):
        evaluate(failing, images, labels, 2, replicas=[replica], pool=pool)
    assert all(mode == (False, False) for mode in model.modes + failing.modes + replica.modes)
    assert (failing.training, failing.dropout.training, replica.training, replica.dropout.training) == (
        True, True, True, False)

