"""The training step: the data-parallel (threaded) CPU path computes the same update as the plain one."""
import numpy
import pytest

from scratchvit import ViT
from scratchvit.cpu_threads import can_limit_blas_threads
from scratchvit.layers import SoftmaxCrossEntropy
from scratchvit.optim import AdamW
from scratchvit.optim import parameter_groups
from scratchvit.train_step import MIN_IMAGES_PER_THREAD, TrainStep

needs_thread_limit = pytest.mark.skipif(not can_limit_blas_threads(),
                                        reason="this NumPy's BLAS cannot limit threads per thread: no threaded step")


def make_step(threads, dtype="float64", batch=40, dropout=0.0):
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=8, depth=2, heads=2, mlp_dim=16,
                dropout=dropout, dtype=dtype, seed=3)
    optimizer = AdamW(parameter_groups(model, 0.05), lr=1e-2, weight_decay=0.05)
    step = TrainStep(model, optimizer, SoftmaxCrossEntropy(label_smoothing=0.1), clip_grad_norm=0.5, threads=threads)
    rng = numpy.random.default_rng(0)
    images = rng.standard_normal((batch, 1, 8, 8)).astype(dtype)
    labels = rng.integers(0, 4, batch)
    return model, step, images, labels


@needs_thread_limit
@pytest.mark.parametrize("threads, batch", [(2, 40), (3, 50), (2, 33)])
def test_threaded_step_matches_the_plain_step(threads, batch):
    plain_model, plain_step, images, labels = make_step(1, batch=batch)
    threaded_model, threaded_step, _, _ = make_step(threads, batch=batch)
    assert plain_step.threads == 1 and threaded_step.threads == threads
    for _ in range(3):
        plain_loss = plain_step(images, labels)
        threaded_loss = threaded_step(images, labels)
        assert float(threaded_loss) == pytest.approx(float(plain_loss), rel=1e-12)
    for (name, plain), (_, threaded) in zip(plain_model.named_parameters(), threaded_model.named_parameters()):
        numpy.testing.assert_allclose(threaded.data, plain.data, rtol=1e-10, atol=1e-12, err_msg=name)
        numpy.testing.assert_allclose(threaded.grad, plain.grad, rtol=1e-9, atol=1e-12, err_msg=name)


@needs_thread_limit
def test_replicas_share_the_weights_and_follow_the_mode():
    model, step, images, labels = make_step(2)
    step(images, labels)
    replica = step.models()[1]
    for parameter, copied in zip(model.parameters(), replica.parameters()):
        assert copied.data is parameter.data
        assert copied.grad is not parameter.grad
    model.eval()
    step(images, labels)
    assert not replica.training


def test_small_batches_and_one_thread_take_the_plain_path():
    _, step, images, labels = make_step(1)
    assert step.threads == 1 and step.models() == [step.model]
    _, step, images, labels = make_step(2, batch=8)     # too few images to split: one chunk
    loss = step(images, labels)
    assert numpy.isfinite(float(loss))


@needs_thread_limit
@pytest.mark.parametrize("threads, batch, chunks", [(2, 31, 1), (2, 32, 2), (3, 47, 2), (3, 48, 3)])
def test_a_batch_is_split_into_chunks_of_at_least_min_images_per_thread(threads, batch, chunks):
    """Both sides of MIN_IMAGES_PER_THREAD (16): 31 images stay in one chunk, 32 make two; with three
    threads 47 make two, 48 three. The replicas that ran a chunk hold a gradient, the others none, and
    the update is the plain step's whichever way the batch was cut."""
    assert MIN_IMAGES_PER_THREAD == 16
    plain_model, plain_step, images, labels = make_step(1, batch=batch)
    model, step, _, _ = make_step(threads, batch=batch)
    plain_step(images, labels)
    step(images, labels)
    replicas = step.models()[1:]
    assert len(replicas) == threads - 1
    used = [any(numpy.any(parameter.grad != 0) for parameter in replica.parameters()) for replica in replicas]
    assert used == [True] * (chunks - 1) + [False] * (threads - chunks)
    for (name, plain), (_, threaded) in zip(plain_model.named_parameters(), model.named_parameters()):
        numpy.testing.assert_allclose(threaded.data, plain.data, rtol=1e-10, atol=1e-12, err_msg=name)


def test_threads_must_be_positive():
    model = ViT(image_size=4, patch_size=2, num_classes=2, dim=4, depth=1, heads=1, mlp_dim=4)
    with pytest.raises(ValueError, match="threads"):
        TrainStep(model, AdamW(model.parameters(), lr=1e-3), SoftmaxCrossEntropy(), threads=0)


@needs_thread_limit
def test_parallel_evaluation_counts_the_same_as_serial():
    from scratchvit.evaluation import evaluate
    model, step, _, _ = make_step(2, dtype="float32")
    rng = numpy.random.default_rng(5)
    images = rng.standard_normal((37, 1, 8, 8)).astype("float32")
    labels = rng.integers(0, 4, 37)
    serial = evaluate(model, images, labels, batch_size=5)
    parallel = evaluate(model, images, labels, batch_size=5, replicas=step.models()[1:], pool=step.pool)
    assert parallel == serial
    assert model.training and step.models()[1].training       # modes restored


@pytest.mark.parametrize("seed", [0, 1])
def test_training_runs_end_to_end(backend, tmp_path, seed):
    """A tiny run through train.run on each backend: data upload, shifts, dropout, the fused layers and
    AdamW kernel on the GPU, evaluation, checkpoint. It asserts what holds on the CPU for these seeds
    as well (the loss falls, the checkpoint holds finite weights): whether the GPU computes the same
    numbers is tests/test_equivalence.py's business, not an accuracy threshold's."""
    from scratchvit.data import write_idx
    from scratchvit.checkpoint import load_checkpoint
    from scratchvit.config import TrainConfig
    from scratchvit.train import run
    rng = numpy.random.default_rng(seed)
    for prefix, count in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 4, count).astype(numpy.uint8)
        images = rng.integers(0, 40, (count, 8, 8)).astype(numpy.uint8)
        for index, label in enumerate(labels):       # the class decides which quadrant is bright
            row, column = divmod(int(label), 2)
            images[index, 4 * row:4 * row + 4, 4 * column:4 * column + 4] = 220
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels)
    history = run(TrainConfig(device=backend.name, data_dir=str(tmp_path), out_dir=str(tmp_path / "out"), epochs=3,
                              batch_size=32, patch_size=2, dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.1,
                              max_shift=1, seed=seed, eval_batch_size=48), log=lambda *args: None)
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(0.0 <= record["test_accuracy"] <= 1.0 for record in history)
    meta, model_state, _ = load_checkpoint(tmp_path / "out" / "checkpoint.npz")
    assert meta["epoch"] == 3
    assert all(numpy.isfinite(value).all() for value in model_state.values())
