"""The random state of training (issue 15, items 6 and 8): no generator for a dropout that never draws, and a
run resumed in the middle of an epoch continues that epoch's draws on either device.

NumPy's generator state can be saved as it is; CuPy's cannot be read or written, so on CuPy a generator is a
`ReplayableGenerator` (backend.py) whose state is its seed and the draws made. Its logic is the same on NumPy,
so the CPU tests put it in place of NumPy's generators (`replay_everywhere`) and hold a resumed run to an
uninterrupted one exactly; the GPU tests check the same on CuPy, draws against draws of one uninterrupted run.
"""
import json
import os
import signal

import numpy
import pytest

from conftest import on_gpu
from scratchvit import randomness as randomness_module
from scratchvit.backend import ReplayableGenerator, get_backend, to_host
from scratchvit.layers import Dropout
from scratchvit.checkpoint import load_checkpoint
from scratchvit.randomness import EpochRandomness
from scratchvit.train import run
from scratchvit.vit import ViT
from test_train import assert_same_checkpoint_state, quiet, resume_config, write_dataset


def models(count=1, dropout=0.1, emb_dropout=0.1):
    return [ViT(image_size=8, patch_size=2, num_classes=4, dim=8, depth=1, heads=2, mlp_dim=16, dropout=dropout,
                emb_dropout=emb_dropout, seed=0) for _ in range(count)]


@pytest.fixture
def replay_everywhere(monkeypatch):
    """Training's device generators are ReplayableGenerators on NumPy too, as they are on CuPy."""
    monkeypatch.setattr(randomness_module, "epoch_generator", ReplayableGenerator)


def draw_a_step(randomness, xp, batch=6):
    """What one training step draws: the augmentation's shifts and uniforms, then every dropout mask."""
    draws = [to_host(randomness.augmentation.integers(-2, 3, size=(batch, 2))),
             to_host(randomness.augmentation.random((batch, 5), dtype="float64"))]
    for layer in randomness.dropout_layers:
        if layer.generator is not None:
            draws.append(to_host(layer.generator.random((batch, 3, 8), dtype=xp.float32)))
    return draws


def assert_same_draws(a, b):
    assert len(a) == len(b)
    for first, second in zip(a, b):
        numpy.testing.assert_array_equal(first, second)


# ------------------------------------------------------------------------------------------------
# item 6: a dropout of p = 0 has no generator

def test_no_generator_is_made_for_a_dropout_of_p_0(monkeypatch):
    made = []

    def counting_generator(xp, seed):
        made.append(seed)
        return numpy.random.default_rng(seed)

    monkeypatch.setattr(randomness_module, "epoch_generator", counting_generator)
    model = models(dropout=0.0, emb_dropout=0.0)[0]
    randomness = EpochRandomness([model], numpy, seed=0, epoch=3)
    assert len(randomness.dropout_layers) == 4
    assert all(layer.generator is None for layer in randomness.dropout_layers)
    assert len(made) == 1                               # the augmentation's, nothing for the dropout layers
    model.train(True)
    assert model.forward(numpy.zeros((2, 1, 8, 8), dtype=numpy.float32)).shape == (2, 4)
    assert all(layer.generator is None for layer in randomness.dropout_layers)     # forward drew nothing
    assert randomness.state()["generators"][1:] == [None] * 4
    assert randomness.restore(randomness.state(), first_step=2) is None           # and nothing to restore


def test_a_dropout_above_0_gets_its_generator_and_one_set_to_p_later_makes_it_at_its_first_draw():
    with_dropout = EpochRandomness(models(dropout=0.1, emb_dropout=0.0), numpy, seed=0, epoch=0)
    assert [layer.generator is not None for layer in with_dropout.dropout_layers] == [False, True, True, True]
    layer = Dropout(0.0, seed=5)
    layer.reseed(numpy, 7)
    assert layer.generator is None and layer.seed == 7
    layer.p = 0.5
    first = layer.forward(numpy.ones((4, 4)))
    assert layer.generator is not None
    numpy.testing.assert_array_equal(first, (numpy.random.default_rng(7).random((4, 4)) >= 0.5) * 2.0)


# ------------------------------------------------------------------------------------------------
# item 8: the replayable generator, and EpochRandomness continuing an epoch's draws

def test_a_replayed_generator_draws_what_the_original_draws_next():
    original = ReplayableGenerator(numpy, 11)
    for size in [(3, 2), (3, 2), (3, 2), 5, (4,)]:
        original.random(size, dtype="float32")
    original.integers(-2, 3, size=(6, 2))
    original.random((3, 2), dtype=numpy.float64)
    state = json.loads(json.dumps(original.state()))            # what a checkpoint holds: plain JSON
    assert state["draws"][0] == ["random", [[3, 2], "float32"], 3]   # repeated calls: one entry
    replayed = ReplayableGenerator.replayed(numpy, state)
    numpy.testing.assert_array_equal(replayed.random((2, 2)), original.random((2, 2)))
    numpy.testing.assert_array_equal(replayed.integers(0, 10, size=7), original.integers(0, 10, size=7))
    assert replayed.state() == original.state()
    # the same draws as NumPy's own generator with that seed: the wrapper changes no number
    plain = numpy.random.default_rng(11)
    numpy.testing.assert_array_equal(ReplayableGenerator(numpy, 11).random((3, 2), dtype="float32"),
                                     plain.random((3, 2), dtype="float32"))


def test_a_mid_epoch_state_continues_the_epoch_through_replay(replay_everywhere):
    saved = EpochRandomness(models(), numpy, seed=1, epoch=2)
    for _ in range(3):
        draw_a_step(saved, numpy)
    state = json.loads(json.dumps(saved.state()))
    assert all("replay" in entry for entry in state["generators"])
    resumed = EpochRandomness(models(), numpy, seed=1, epoch=2)
    assert resumed.restore(state, first_step=3) is None
    assert_same_draws(draw_a_step(resumed, numpy), draw_a_step(saved, numpy))


def test_a_checkpoint_without_device_states_restarts_from_seeds_that_mix_in_the_step(replay_everywhere):
    """A GPU checkpoint of an older version holds None for every generator: the rest of the epoch must not
    repeat the epoch's first draws (what it did), and the log says so."""
    randomness = EpochRandomness(models(), numpy, seed=1, epoch=0)
    old_gpu_state = dict(generators=[None] * (1 + len(randomness.dropout_layers)))
    note = randomness.restore(old_gpu_state, first_step=5)
    assert "augmentation and dropout from new seeds" in note and "epoch 1" in note
    fresh = EpochRandomness(models(), numpy, seed=1, epoch=0)
    restarted, first = draw_a_step(randomness, numpy), draw_a_step(fresh, numpy)
    assert not any(numpy.array_equal(a, b) for a, b in zip(restarted[1:], first[1:]))
    again = EpochRandomness(models(), numpy, seed=1, epoch=0)
    again.restore(old_gpu_state, first_step=5)
    assert_same_draws(draw_a_step(again, numpy), restarted)             # still a function of (seed, epoch, step)


def test_a_numpy_state_on_a_device_that_replays_restarts_and_says_so(replay_everywhere):
    monkeypatched = randomness_module.epoch_generator
    cpu_state = dict(generators=[numpy.random.default_rng(0).bit_generator.state] + [None] * 4)
    randomness = EpochRandomness(models(dropout=0.0, emb_dropout=0.0), numpy, seed=1, epoch=0)
    assert isinstance(randomness.augmentation, monkeypatched)
    assert "no augmentation generator state" in randomness.restore(cpu_state, first_step=1)


def test_a_resume_mid_epoch_with_replayed_generators_repeats_the_uninterrupted_run(replay_everywhere, tmp_path):
    """train.run end to end with the generators a GPU run uses: Ctrl-C in the middle of epoch 2, resume, and the
    weights, moments and metrics are those of the uninterrupted run (dropout and the shift on)."""
    data = write_dataset(tmp_path / "data", train_count=200, seed=1)
    reference = run(resume_config(data, tmp_path / "reference"), log=quiet)

    def interrupt(epoch, step):
        if (epoch, step) == (1, 3):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="resume"):
        run(resume_config(data, tmp_path / "resumed"), log=quiet, on_step=interrupt)
    meta, _, _ = load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    states = meta["random_state"]["generators"]
    assert "replay" in states[0] and all("replay" in state for state in states if state is not None)
    assert states.count(None) < len(states) - 1              # dropout's generators are among them
    history = run(resume_config(data, tmp_path / "resumed", resume=True), log=quiet)
    assert [record["train_loss"] for record in history] == [record["train_loss"] for record in reference]
    assert_same_checkpoint_state(tmp_path / "resumed" / "checkpoint.npz", tmp_path / "reference" / "checkpoint.npz")


# ------------------------------------------------------------------------------------------------
# on the GPU: CuPy's generators, which only replay can continue

@on_gpu
def test_on_the_gpu_a_restored_epoch_draws_what_the_uninterrupted_one_draws():
    """Guards item 8 where it happens: CuPy's generators. Three steps' draws, the state through JSON, then the
    resumed randomness's next step equals the uninterrupted one's (and differs from the epoch's first step,
    which is what a re-seeded generator repeated)."""
    cupy = get_backend("gpu").xp
    first_step = draw_a_step(EpochRandomness(models(), cupy, seed=4, epoch=1), cupy)
    uninterrupted = EpochRandomness(models(), cupy, seed=4, epoch=1)
    for _ in range(3):
        draw_a_step(uninterrupted, cupy)
    state = json.loads(json.dumps(uninterrupted.state()))
    resumed = EpochRandomness(models(), cupy, seed=4, epoch=1)
    assert resumed.restore(state, first_step=3) is None
    next_step = draw_a_step(resumed, cupy)
    assert_same_draws(next_step, draw_a_step(uninterrupted, cupy))
    assert not any(numpy.array_equal(a, b) for a, b in zip(next_step, first_step))


@on_gpu
def test_on_the_gpu_a_resume_mid_epoch_trains_like_the_uninterrupted_run(tmp_path):
    """train.run on the GPU, Ctrl-C mid-epoch, resume: the final weights match the uninterrupted GPU run's to
    float32 rounding (cuBLAS may order sums differently between runs; a replay of the epoch's first masks and
    shifts instead of the right ones changes the weights far beyond that)."""
    data = write_dataset(tmp_path / "data", train_count=200, seed=1)
    options = dict(device="gpu")
    run(resume_config(data, tmp_path / "reference", **options), log=quiet)

    def interrupt(epoch, step):
        if (epoch, step) == (1, 3):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="resume"):
        run(resume_config(data, tmp_path / "resumed", **options), log=quiet, on_step=interrupt)
    run(resume_config(data, tmp_path / "resumed", resume=True, **options), log=quiet)
    _, resumed, _ = load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    _, reference, _ = load_checkpoint(tmp_path / "reference" / "checkpoint.npz")
    for name in reference:
        numpy.testing.assert_allclose(resumed[name], reference[name], rtol=1e-4, atol=1e-5, err_msg=name)
