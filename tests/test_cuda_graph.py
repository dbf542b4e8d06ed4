"""The training step replayed from a CUDA graph (scratchvit/cuda_graph.py).

On the GPU (marked `gpu`, skipped elsewhere with the reason): the replayed step gives the same
weights and losses as the plain step, step after step, through a changing learning rate, dropout,
a shorter batch (run plainly) and re-seeded dropout generators (recorded again); a whole training
run with `cuda_graph=True` matches the plain run; and a step that cannot be recorded gives
`CudaGraphError` and leaves the optimiser's step count alone.

Everywhere: asking for a CUDA graph without the GPU is refused with a message naming the option.
"""
import numpy
import pytest

from conftest import on_gpu   # tests/ is on sys.path under pytest's default import mode
from scratchvit.backend import get_backend, to_host
from scratchvit.cuda_graph import CudaGraphError, GraphedTrainStep
from scratchvit.layers import SoftmaxCrossEntropy
from scratchvit.optim import AdamW, warmup_cosine
from scratchvit.train import ConfigError, TrainConfig
from scratchvit.train_step import TrainStep
from scratchvit.vit import ViT

MODEL = dict(image_size=8, patch_size=2, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32, dropout=0.1)


def make_step(device, *, steps=20):
    model = ViT(**MODEL, seed=3).to(get_backend(device))
    model.train()
    optimizer = AdamW(model.parameters(), lr=1.0, weight_decay=0.05)
    optimizer.set_schedule([warmup_cosine(step, total_steps=steps, warmup_steps=3, peak_lr=3e-3)
                            for step in range(steps)])
    return model, TrainStep(model, optimizer, SoftmaxCrossEntropy(), clip_grad_norm=1.0)


def batches(backend, sizes, seed=4):
    rng = numpy.random.default_rng(seed)
    for size in sizes:
        yield (backend.asarray(rng.standard_normal((size, 1, 8, 8)), dtype="float32"),
               backend.asarray(rng.integers(0, 4, size), dtype="int64"))


def test_cuda_graph_option_needs_the_gpu():
    with pytest.raises(ConfigError, match="cuda_graph needs device 'gpu'"):
        TrainConfig(cuda_graph=True).validate()


def test_graphed_step_refuses_a_model_on_the_cpu():
    _, train_step = make_step("cpu")
    with pytest.raises(ValueError, match="on the GPU"):
        GraphedTrainStep(train_step)


def test_train_mnist_cuda_graph_on_cpu_is_a_one_line_error(capsys):
    import train_mnist
    assert train_mnist.main(["--cuda-graph", "--data-dir", "unused"]) == 2
    assert "cuda_graph needs device 'gpu'" in capsys.readouterr().err


@on_gpu
def test_replayed_steps_match_plain_steps():
    gpu = get_backend("gpu")
    plain_model, plain_step = make_step("gpu")
    graph_model, train_step = make_step("gpu")
    graphed = GraphedTrainStep(train_step)
    sizes = [16] * 5 + [10] + [16] * 3
    for index, (images, labels) in enumerate(batches(gpu, sizes)):
        if index == 7:                # a new epoch: new dropout generators, so the step is recorded again
            for model in (plain_model, graph_model):
                for number, layer in enumerate(model.dropout_layers()):
                    layer.reseed(gpu.xp, 100 + number)
        plain_loss = float(plain_step(images, labels))
        graph_loss = float(graphed(images, labels))
        assert graph_loss == pytest.approx(plain_loss, rel=1e-6), f"step {index}"
        assert train_step.optimizer.step_count == plain_step.optimizer.step_count == index + 1
        assert train_step.optimizer.lr == plain_step.optimizer.lr
        for (name, a), (_, b) in zip(plain_model.named_parameters(), graph_model.named_parameters()):
            numpy.testing.assert_allclose(to_host(b.data), to_host(a.data), rtol=1e-5, atol=1e-6,
                                          err_msg=f"{name} after step {index}")
    # steps 0, 5 (short batch), 7 (new generators) ran plainly; 1 and 8 recorded; the rest replayed
    assert graphed.replays == 6


@on_gpu
def test_failed_recording_raises_and_keeps_the_step_count():
    gpu = get_backend("gpu")
    _, train_step = make_step("gpu")
    loss_fn = train_step.loss_fn
    plain_forward = loss_fn.forward

    def forward_that_reads_the_loss(logits, labels):      # a host read: not allowed while recording
        loss = plain_forward(logits, labels)
        float(loss)
        return loss

    graphed = GraphedTrainStep(train_step)
    (images, labels), = batches(gpu, [16])
    graphed(images, labels)                               # plain
    loss_fn.forward = forward_that_reads_the_loss
    with pytest.raises(CudaGraphError, match="without --cuda-graph"):
        graphed(images, labels)                           # recording
    assert train_step.optimizer.step_count == 1


@on_gpu
def test_training_run_with_cuda_graph_matches_the_plain_run(tmp_path):
    from scratchvit.data import write_idx
    from scratchvit.train import run
    rng = numpy.random.default_rng(0)
    for prefix, count in (("train", 200), ("t10k", 64)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 8, 8)).astype(numpy.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 4, count).astype(numpy.uint8))
    histories = []
    for cuda_graph in (False, True):
        config = TrainConfig(device="gpu", data_dir=str(tmp_path), out_dir=str(tmp_path / f"out{cuda_graph}"),
                             epochs=2, batch_size=32, patch_size=2, dim=16, depth=1, heads=2, mlp_dim=32,
                             dropout=0.1, cuda_graph=cuda_graph)
        histories.append(run(config, log=lambda *args: None))
    for plain, graphed in zip(*histories):
        assert graphed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
        assert graphed["test_accuracy"] == plain["test_accuracy"]
        assert graphed["lr"] == plain["lr"]
