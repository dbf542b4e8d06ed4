"""Training across processes (scratchvit/distributed.py): the pieces on their own, then real 2-rank jobs.

Part 1 needs no MPI: launcher detection, shards, threads per rank, the choice of the GPU gradient
exchange and each exchange against stand-ins for mpi4py, CuPy and NCCL, the shard weighting of
TrainStep (each "rank" computed in turn, the Allreduce replaced by a sum), the random state of a
mid-epoch checkpoint under another number of ranks, the one-line abort.

Part 2 runs `mpiexec -n 2` (tests/mpi_job.py, train_mnist.py, the benchmark) on the tiny synthetic
MNIST of test_train.py; it skips, with the reason, where mpi4py or mpiexec is missing. Two ranks are
compared with one process in float64, to 1e-10 relative (the error of scratchvit/equivalence.py: the
largest difference over a tensor divided by its largest entry): losses, accuracies, every weight, the
weight average and AdamW's moments.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

import mpi_job
from scratchvit import distributed, train
from scratchvit.cpu_threads import can_limit_blas_threads
from scratchvit.data import MNIST_FILES
from scratchvit.distributed import (DistributedError, HostStagedAllreduce, MpiAllreduce, MpiCommunicator,
                                    NcclAllreduce, SingleProcess, choose_exchange, launcher_world_size,
                                    make_gpu_exchange, mpi_takes_cuda_memory, shard_bounds,
                                    threads_for_rank)
from scratchvit.layers import SoftmaxCrossEntropy
from scratchvit.optim import AdamW
from scratchvit.checkpoint import load_checkpoint
from scratchvit.config import TrainConfig, build_model, load_data
from scratchvit.optim import parameter_groups
from scratchvit.randomness import EpochRandomness
from scratchvit.run_folder import LOCK_NAME
from scratchvit.train import run
from scratchvit.train_step import TrainStep
from scratchvit.vit import ViT
from test_train import TINY_MODEL, TINY_MODEL_ARGS, read_metrics, write_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def quiet(message):
    pass


# ------------------------------------------------------------------------------------------------
# 1. without MPI: stand-ins

class FakeMPI:
    """The few names of mpi4py.MPI that distributed.py uses."""
    IN_PLACE, SUM, MIN, MAX, COMM_TYPE_SHARED = "IN_PLACE", "SUM", "MIN", "MAX", "SHARED"

    @staticmethod
    def Get_library_version():
        return "Fake MPI 1.0, for tests\n"


class FakeComm:
    """A communicator of `size` ranks seen from `rank`: Allreduce adds `others` (what the other ranks would
    contribute, for SUM) and records every call; info holds `kinds` (MPI 4.1 memory kinds) or raises."""

    def __init__(self, rank=0, size=2, others=None, kinds="mpi,system"):
        self.rank, self.size, self.others, self.kinds = rank, size, others, kinds
        self.calls, self.broadcast, self.aborted = [], [], None

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind, key=0):
        return FakeComm(rank=self.rank, size=self.size, others=self.others)

    def Allreduce(self, sendbuf, recvbuf, op):
        self.calls.append(("Allreduce", sendbuf, op, recvbuf.copy()))
        if op == "SUM" and self.others is not None:
            recvbuf += self.others
        elif op == "SUM":
            recvbuf *= self.size

    def bcast(self, value, root=0):
        self.broadcast.append(value)
        return value if self.rank == root else "id from rank 0"

    def allgather(self, value):
        return [value] * self.size

    def Get_info(self):
        if self.kinds is None:
            raise NotImplementedError("MPI_Comm_get_info")
        kinds = self.kinds

        class Info:
            def Get(self, key):
                return kinds if key == "mpi_memory_alloc_kinds" else None

            def Free(self):
                pass
        return Info()

    def Abort(self, code):
        self.aborted = code
        raise SystemExit(code)


def test_the_launcher_is_read_from_the_environment():
    assert launcher_world_size({}) is None
    assert launcher_world_size({"PMI_SIZE": "2", "PMI_RANK": "1"}) == 2               # MPICH's Hydra
    assert launcher_world_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4                    # Open MPI
    assert launcher_world_size({"PMIX_RANK": "0"}) == 0                               # PMIx: size unknown
    assert launcher_world_size({"PMI_SIZE": "", "HOME": "/root"}) is None
    assert isinstance(distributed.connect({}), SingleProcess)
    assert isinstance(distributed.connect({"PMI_SIZE": "1"}), SingleProcess)        # mpiexec -n 1


def test_the_plain_launch_never_imports_mpi4py():
    code = ("import sys; import scratchvit.train, scratchvit.bench, scratchvit.distributed as d; "
            "print(type(d.world()).__name__, 'mpi4py' in sys.modules)")
    environ = {key: value for key, value in os.environ.items() if key not in distributed.SIZE_VARIABLES}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env=dict(environ, PYTHONPATH=str(REPO_ROOT)))
    assert result.stdout.split() == ["SingleProcess", "False"], result.stderr


def test_mpiexec_without_mpi4py_is_a_one_line_error(tmp_path):
    """A stand-in package that fails to import plays a missing mpi4py; PMI_SIZE plays mpiexec."""
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    data = write_dataset(tmp_path / "data", train_count=16, test_count=8)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train_mnist.py"), "--data-dir", str(data),
                             "--out-dir", str(tmp_path / "out"), "--epochs", "1", *TINY_MODEL_ARGS],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PMI_SIZE="2", PMI_RANK="0",
                                     PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)])))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "mpi4py is not installed" in lines[0] and 'pip install "scratchvit[mpi]"' in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("count", [0, 1, 5, 11, 64, 977])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shards_cover_the_batch_contiguously_and_evenly(count, size):
    bounds = [shard_bounds(count, rank, size) for rank in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_threads_per_rank_split_shared_cores_and_keep_bound_ones():
    assert threads_for_rank([0, 1], [[0, 1], [1, 0]]) == 1              # 2 ranks, 2 cores, no binding
    assert threads_for_rank([0, 1, 2, 3], [[0, 1, 2, 3]] * 2) == 2       # 2 ranks share 4 cores
    assert threads_for_rank([2, 3], [[0, 1], [2, 3]]) == 2               # bound to 2 cores of its own
    assert threads_for_rank([0], [[0, 1, 2]] * 5 + [[0]]) == 1           # never below one
    assert threads_for_rank([0, 1, 2, 3], [[0, 1, 2, 3]]) == 4           # alone on the node


@pytest.mark.parametrize("cuda_aware, nccl, expected", [(True, True, "cuda-aware-mpi"), (True, False, "cuda-aware-mpi"),
                                                        (False, True, "nccl"), (False, False, "host-staged")])
def test_the_gpu_exchange_prefers_cuda_aware_mpi_then_nccl_then_the_host(cuda_aware, nccl, expected):
    assert choose_exchange(on_gpu=True, cuda_aware=cuda_aware, nccl_available=nccl) == expected
    assert choose_exchange(on_gpu=False, cuda_aware=cuda_aware, nccl_available=nccl) == "mpi"
    assert choose_exchange(on_gpu=True, requested="host-staged", cuda_aware=cuda_aware, nccl_available=nccl) \
        == "host-staged"


def test_nccl_is_not_chosen_for_ranks_that_share_a_gpu():
    assert choose_exchange(on_gpu=True, nccl_available=True, gpus_shared=True) == "host-staged"
    assert choose_exchange(on_gpu=True, cuda_aware=True, nccl_available=True, gpus_shared=True) == "cuda-aware-mpi"


def test_a_forced_exchange_must_exist_and_be_possible():
    with pytest.raises(DistributedError, match="SCRATCHVIT_GPU_ALLREDUCE must be one of"):
        choose_exchange(on_gpu=True, requested="gloo")
    with pytest.raises(DistributedError, match="cannot load NCCL"):
        choose_exchange(on_gpu=True, requested="nccl", nccl_available=False)
    with pytest.raises(DistributedError, match="share a GPU"):
        choose_exchange(on_gpu=True, requested="nccl", nccl_available=True, gpus_shared=True)
    assert choose_exchange(on_gpu=True, requested="cuda-aware-mpi") == "cuda-aware-mpi"


@pytest.mark.parametrize("kinds, query, expected", [
    ("mpi,system", 0, False),               # what the mpich wheel 5.0.2 reports (and MPIX_Query_cuda_support 0)
    ("mpi,system,cuda:device", 0, True),
    ("system,cuda", 0, True),               # a kind without restrictors: all of them
    ("system,cuda:host", 0, False),         # pinned host memory only: device arrays would not do
    ("system,cuda:host:managed", 0, False),
    ("mpi,system", 1, True),                # Open MPI built with CUDA, before MPI 4.1 memory kinds
    (None, None, False),                    # neither way of asking exists
    (None, 1, True),
])
def test_cuda_awareness_is_what_the_library_says(kinds, query, expected):
    assert mpi_takes_cuda_memory(FakeComm(kinds=kinds), FakeMPI, query=lambda: query) is expected


def test_query_cuda_support_loads_no_library():
    assert distributed.query_cuda_support(names=("libno-such-mpi.so.99",)) is None


def test_the_cpu_exchange_is_one_in_place_allreduce():
    comm = FakeComm(others=numpy.full(4, 10.0))
    gradients = numpy.arange(4.0)
    MpiAllreduce(comm, FakeMPI, name="mpi")(gradients)
    assert [call[:3] for call in comm.calls] == [("Allreduce", "IN_PLACE", "SUM")]
    numpy.testing.assert_array_equal(gradients, numpy.arange(4.0) + 10)


def test_the_cuda_aware_exchange_waits_for_the_stream_before_mpi_reads():
    events = []
    comm = FakeComm()
    comm.Allreduce = lambda sendbuf, recvbuf, op: events.append(("Allreduce", sendbuf, op))
    MpiAllreduce(comm, FakeMPI, name="cuda-aware-mpi", synchronize=lambda: events.append("synchronize"))(numpy.ones(3))
    assert events == ["synchronize", ("Allreduce", "IN_PLACE", "SUM")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_host_staged_exchange_sums_through_a_kept_host_buffer(dtype):
    others = numpy.linspace(-1, 1, 5).astype(dtype)
    comm = FakeComm(others=others)
    exchange = HostStagedAllreduce(comm, FakeMPI, *mpi_job.numpy_copies())
    gradients = numpy.arange(5, dtype=dtype)
    exchange(gradients)
    numpy.testing.assert_array_equal(gradients, numpy.arange(5, dtype=dtype) + others)
    buffer = exchange.host_buffer
    assert buffer is not gradients and buffer.dtype == dtype
    _, sent_buffer, op, sent = comm.calls[0]
    assert (sent_buffer, op) == ("IN_PLACE", "SUM")
    numpy.testing.assert_array_equal(sent, numpy.arange(5, dtype=dtype))       # MPI got the gradients, on the host
    exchange(gradients)
    assert exchange.host_buffer is buffer                                        # allocated once


class FakeNccl:
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    available = True

    def __init__(self):
        self.unique_ids, self.created, self.reductions = 0, [], []
        fake = self

        class NcclCommunicator:
            def __init__(self, ranks, unique_id, rank):
                fake.created.append((ranks, unique_id, rank))

            def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
                fake.reductions.append((sendbuf, recvbuf, count, datatype, op, stream))
        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        self.unique_ids += 1
        return b"\x01" * 128


class FakeCupy:
    """What the GPU exchanges touch of CuPy: the current stream, and an array's pointer, size and dtype."""

    class cuda:
        class Stream:
            ptr = 4242

            def __init__(self):
                self.synchronized = 0

            def synchronize(self):
                self.synchronized += 1

        stream = Stream()

        @classmethod
        def get_current_stream(cls):
            return cls.stream


class FakeDeviceArray:
    def __init__(self, size, dtype):
        self.size, self.dtype = size, numpy.dtype(dtype)
        self.flags = type("Flags", (), {"c_contiguous": True})()
        self.data = type("Memory", (), {"ptr": 123456})()


@pytest.mark.parametrize("rank", [0, 1])
def test_nccl_joins_with_rank_0s_unique_id_and_reduces_in_place_on_the_current_stream(rank):
    nccl, comm = FakeNccl(), FakeComm(rank=rank, size=2)
    exchange = NcclAllreduce(comm, nccl, FakeCupy)
    assert nccl.unique_ids == (1 if rank == 0 else 0)                  # only rank 0 asks NCCL for an id
    assert comm.broadcast == [b"\x01" * 128 if rank == 0 else None]    # ... and MPI broadcasts it
    expected_id = b"\x01" * 128 if rank == 0 else "id from rank 0"
    assert nccl.created == [(2, expected_id, rank)]
    exchange(FakeDeviceArray(1000, "float32"))
    exchange(FakeDeviceArray(10, "float64"))
    assert nccl.reductions == [(123456, 123456, 1000, 7, 0, 4242), (123456, 123456, 10, 8, 0, 4242)]


def test_make_gpu_exchange_builds_each_kind(monkeypatch):
    monkeypatch.setattr(distributed, "nccl_module", lambda cupy: FakeNccl())
    assert isinstance(make_gpu_exchange("nccl", FakeComm(), FakeMPI, FakeCupy), NcclAllreduce)
    staged = make_gpu_exchange("host-staged", FakeComm(), FakeMPI, FakeCupy)
    assert isinstance(staged, HostStagedAllreduce)
    aware = make_gpu_exchange("cuda-aware-mpi", FakeComm(), FakeMPI, FakeCupy)
    before = FakeCupy.cuda.stream.synchronized
    aware(numpy.ones(2))
    assert FakeCupy.cuda.stream.synchronized == before + 1


def test_prepare_exchange_agrees_across_ranks_and_honours_the_variable(monkeypatch):
    communicator = MpiCommunicator(FakeComm(), FakeMPI)
    monkeypatch.setattr(distributed, "mpi_takes_cuda_memory", lambda comm, MPI: False)
    monkeypatch.setattr(distributed, "nccl_module", lambda cupy: None)
    gpu = type("Backend", (), {"name": "gpu", "xp": FakeCupy})()
    assert communicator.prepare_exchange(gpu, environ={}) == "host-staged"
    monkeypatch.setattr(distributed, "nccl_module", lambda cupy: FakeNccl())
    communicator.gpus_on_node = 1                   # both ranks of the node on its one GPU: NCCL would refuse
    assert communicator.prepare_exchange(gpu, environ={}) == "host-staged"
    communicator.gpus_on_node = 2
    assert communicator.prepare_exchange(gpu, environ={}) == "nccl"
    assert "one GPU per rank, of 2 on this node" in communicator.describe(1)
    monkeypatch.setattr(distributed, "nccl_module", lambda cupy: None)
    forced = {"SCRATCHVIT_GPU_ALLREDUCE": "cuda-aware-mpi"}
    assert communicator.prepare_exchange(gpu, environ=forced) == "cuda-aware-mpi"
    cpu = type("Backend", (), {"name": "cpu", "xp": numpy})()
    assert communicator.prepare_exchange(cpu, environ={}) == "mpi"
    assert "gradient exchange: mpi" in communicator.describe(1) and "Fake MPI 1.0" in communicator.describe(1)


def test_a_failing_rank_prints_one_line_with_its_rank_and_aborts_the_job(capsys):
    comm = FakeComm(rank=1, size=2)
    communicator = MpiCommunicator(comm, FakeMPI)
    with pytest.raises(SystemExit):
        communicator.fail("error: the training images are truncated", 1)
    assert comm.aborted == 1
    assert capsys.readouterr().err == "error: rank 1 of 2: the training images are truncated\n"


def test_check_same_names_what_differs():
    class DifferentComm(FakeComm):
        def Allreduce(self, sendbuf, recvbuf, op):
            if op == "MIN":
                recvbuf[0] -= 1                 # another rank holds other bytes

    communicator = MpiCommunicator(DifferentComm(), FakeMPI)
    with pytest.raises(DistributedError, match="the ranks differ in starting weights .*same options, data"):
        communicator.check_same("starting weights", numpy.arange(3.0), b"options")
    with pytest.raises(DistributedError, match="try another MPI library"):
        communicator.check_same("weights after epoch 1", numpy.arange(3.0), hint="try another MPI library")
    MpiCommunicator(FakeComm(), FakeMPI).check_same("starting weights", numpy.arange(3.0))     # alike: silent


class ChecksumRecorder(MpiCommunicator):
    """The real check_same on a FakeComm, remembering {what: the checksum this rank sent} (the value
    of its MIN Allreduce; alike on every rank, so nothing is refused)."""

    def __init__(self):
        super().__init__(FakeComm(), FakeMPI)
        self.checksums = {}

    def check_same(self, what, *arrays, hint=None):
        super().check_same(what, *arrays, hint=hint)
        (_, _, op, sent), _ = self.comm.calls[-2:]
        assert op == "MIN"
        self.checksums[what] = int(sent[0])


def test_the_checksum_covers_every_byte_of_every_array():
    """Each of the arrays (and bytes) given to check_same, changed alone, in its first or its last
    element, changes the checksum: a checksum of the last array only, or of a part, would not."""
    rng = numpy.random.default_rng(0)
    things = [rng.standard_normal((3, 4)).astype(numpy.float32), rng.standard_normal(5),
              numpy.arange(6, dtype=numpy.int64).reshape(2, 3)[:, ::2],          # not contiguous
              b"options", numpy.array([7])]

    def checksum(items):
        recorder = ChecksumRecorder()
        recorder.check_same("things", *items)
        return recorder.checksums["things"]

    base = checksum(things)
    assert checksum([bytes(thing) if isinstance(thing, bytes) else thing.copy() for thing in things]) == base
    for index, thing in enumerate(things):
        for position in (0, -1):
            changed = list(things)
            if isinstance(thing, bytes):
                changed[index] = b"O" + thing[1:] if position == 0 else thing[:-1] + b"S"
            else:
                changed[index] = numpy.ascontiguousarray(thing)
                changed[index].reshape(-1)[position] += 1
            assert checksum(changed) != base, (index, position)


def test_the_ranks_check_every_option_the_data_and_the_whole_optimiser_state(tmp_path):
    """train.describe_ranks, the check before training under MPI: each thing every rank must share,
    changed alone, changes the checksum of the check that covers it, and only that one."""
    from scratchvit.backend import get_backend
    config = TrainConfig(data_dir=str(write_dataset(tmp_path / "data", train_count=32, test_count=8)),
                         out_dir=str(tmp_path / "run"), epochs=1, batch_size=16, threads=1, **TINY_MODEL)
    data = load_data(config, get_backend("cpu"))
    model = build_model(config, data)
    optimizer = AdamW(parameter_groups(model, config.weight_decay), lr=1e-3, weight_decay=config.weight_decay)
    step = TrainStep(model, optimizer, SoftmaxCrossEntropy(), threads=1)
    step(data["train_images"][:16], data["train_labels"][:16])      # moments and step count not at their start

    def checksums():
        recorder = ChecksumRecorder()
        train.describe_ranks(config, data, optimizer, step, recorder, log=lambda message: None)
        return recorder.checksums

    base = checksums()
    assert sorted(base) == ["options", "starting weights and optimiser state", "training data"]

    def assert_changes(what, target, name, value):
        """Set target.name (an attribute) or target[name] (an element) to value, compare, put it back."""
        is_array = isinstance(target, numpy.ndarray)
        saved = target[name].copy() if is_array else getattr(target, name)
        if is_array:
            target[name] = value
        else:
            setattr(target, name, value)
        try:
            after = checksums()
        finally:
            if is_array:
                target[name] = saved
            else:
                setattr(target, name, saved)
        assert after[what] != base[what], (what, name)
        assert {key: after[key] for key in base if key != what} == {key: base[key] for key in base if key != what}

    assert_changes("options", config, "seed", 1)
    assert_changes("options", config, "rotation", 5.0)
    assert_changes("training data", data["train_images"], (-1, 0, -1, -1), 9.0)
    assert_changes("training data", data["train_labels"], 0, (int(data["train_labels"][0]) + 1) % 4)
    for moment in (optimizer.data, optimizer.exp_avg, optimizer.exp_avg_sq):
        assert_changes("starting weights and optimiser state", moment, -1, 0.5)
    assert_changes("starting weights and optimiser state", optimizer, "step_count", 2)
    assert checksums() == base                                       # everything put back


def test_one_process_fails_by_returning_the_status(capsys):
    assert SingleProcess().fail("error: bad option", 2) == 2
    assert capsys.readouterr().err == "error: bad option\n"


# TrainStep: each rank's gradient, weighted by its share, adds up to the whole batch's

class RecordingCommunicator(SingleProcess):
    """Rank `rank` of `size`, whose Allreduce only records the rank's own gradient (the sum is done by the test)."""

    def __init__(self, rank, size):
        self.rank, self.size, self.is_root = rank, size, rank == 0
        self.sent = []

    def shard(self, count):
        return shard_bounds(count, self.rank, self.size)

    def allreduce_gradients(self, flat_gradients):
        self.sent.append(flat_gradients.copy())


def make_step(communicator, threads=1):
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=8, depth=2, heads=2, mlp_dim=16, dtype="float64", seed=3)
    optimizer = AdamW(parameter_groups(model, 0.05), lr=1e-2, weight_decay=0.05)
    return TrainStep(model, optimizer, SoftmaxCrossEntropy(label_smoothing=0.1), clip_grad_norm=0.5, threads=threads,
                     communicator=communicator), optimizer


@pytest.mark.parametrize("size, batch, threads", [(2, 40, 1), (3, 50, 1), (2, 33, 1), (2, 70, 2), (4, 3, 1)])
def test_the_ranks_gradients_add_up_to_the_whole_batchs(size, batch, threads):
    if threads > 1 and not can_limit_blas_threads():
        pytest.skip("this NumPy's BLAS cannot limit threads per thread: no threaded step")
    rng = numpy.random.default_rng(0)
    images, labels = rng.standard_normal((batch, 1, 8, 8)), rng.integers(0, 4, batch)
    whole = RecordingCommunicator(0, 1)
    whole_step, _ = make_step(whole)
    whole_loss = float(whole_step(images, labels))
    losses, gradients = [], []
    for rank in range(size):
        communicator = RecordingCommunicator(rank, size)
        step, _ = make_step(communicator, threads)
        losses.append(float(step(images, labels)))
        gradients.append(communicator.sent[0])
    assert sum(losses) == pytest.approx(whole_loss, rel=1e-13)
    numpy.testing.assert_allclose(sum(gradients), whole.sent[0], rtol=1e-12, atol=1e-15)
    if batch < size:                             # a rank with no image adds nothing
        assert losses[0] == 0.0 and not gradients[0].any()


# the random state of a mid-epoch checkpoint, under another number of ranks

def dropout_models(count, dropout):
    return [ViT(image_size=8, patch_size=2, num_classes=4, dim=8, depth=1, heads=2, mlp_dim=16, dropout=dropout,
                emb_dropout=dropout, seed=0)
            for _ in range(count)]


class LayoutCommunicator(SingleProcess):
    def __init__(self, rank, layout):
        self.rank, self.size, self.layout, self.is_root = rank, len(layout), layout, rank == 0

    def allgather(self, value):
        assert value == self.layout[self.rank]
        return list(self.layout)

    def gather(self, value):
        return [value] * self.size if self.rank == 0 else None


def test_dropout_is_seeded_apart_on_each_rank_and_like_one_process_on_rank_0():
    single = EpochRandomness(dropout_models(1, 0.1), numpy, seed=5, epoch=2)
    rank_0 = EpochRandomness(dropout_models(1, 0.1), numpy, seed=5, epoch=2, rank=0)
    rank_1 = EpochRandomness(dropout_models(1, 0.1), numpy, seed=5, epoch=2, rank=1)
    draws = [[layer.generator.random() for layer in randomness.dropout_layers]
             for randomness in (single, rank_0, rank_1)]
    assert draws[0] == draws[1]
    assert not set(draws[0]) & set(draws[2])
    assert single.augmentation.random() == rank_1.augmentation.random()      # the job's: the same on every rank


def test_a_mid_epoch_state_resumes_exactly_with_the_same_layout_and_reseeds_dropout_otherwise():
    layers = len(dropout_models(1, 0.1)[0].dropout_layers())
    saved = EpochRandomness(dropout_models(1, 0.1), numpy, seed=1, epoch=0, rank=1)
    saved.augmentation.random(10)
    for layer in saved.dropout_layers:
        layer.generator.random(3)
    state = saved.state(LayoutCommunicator(0, [layers, layers]))
    assert state["dropout_per_rank"] == [layers, layers] and len(state["generators"]) == 1 + 2 * layers

    same = EpochRandomness(dropout_models(1, 0.1), numpy, seed=1, epoch=0, rank=1)
    assert same.restore(state, LayoutCommunicator(1, [layers, layers]), first_step=4) is None
    next_augmentation = same.augmentation.random()
    assert next_augmentation == saved.augmentation.random()
    assert [layer.generator.random() for layer in same.dropout_layers] == \
        [layer.generator.random() for layer in saved.dropout_layers]

    other = EpochRandomness(dropout_models(2, 0.1), numpy, seed=1, epoch=0)         # one process, two threads
    note = other.restore(state, LayoutCommunicator(0, [2 * layers]), first_step=4)
    assert "new seeds" in note and "epoch 1" in note
    assert other.augmentation.random() == next_augmentation                         # the job's draws go on
    fresh = EpochRandomness(dropout_models(2, 0.1), numpy, seed=1, epoch=0)
    assert [layer.generator.random() for layer in other.dropout_layers] != \
        [layer.generator.random() for layer in fresh.dropout_layers]                 # not the epoch's first masks

    without_dropout = EpochRandomness(dropout_models(2, 0.0), numpy, seed=1, epoch=0)
    assert without_dropout.restore(state, LayoutCommunicator(0, [2 * layers]), first_step=4) is None


def test_checkpoints_from_before_mpi_still_resume():
    randomness = EpochRandomness(dropout_models(1, 0.1), numpy, seed=1, epoch=0)
    old_format = dict(generators=[randomness._saved(randomness.augmentation)]
                      + [randomness._saved(layer.generator) for layer in randomness.dropout_layers])
    assert EpochRandomness(dropout_models(1, 0.1), numpy, seed=1, epoch=0).restore(old_format) is None


# ------------------------------------------------------------------------------------------------
# 2. real jobs under mpiexec -n 2

def find_mpiexec():
    beside_python = Path(sys.executable).parent / "mpiexec"       # the mpich wheel's, in the same environment
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
MPI_SKIP_REASON = ("mpi4py is not installed (pip install -e \".[mpi]\")" if importlib.util.find_spec("mpi4py") is None
                   else "no mpiexec on PATH (pip install -e \".[mpi]\" brings MPICH's)" if MPIEXEC is None else None)
needs_mpi = pytest.mark.skipif(MPI_SKIP_REASON is not None, reason=MPI_SKIP_REASON or "")

JOB = str(REPO_ROOT / "tests" / "mpi_job.py")
# 1011 training images, the last 40 held out: 971 to train on, 31 steps of 32 per epoch, the last of 11 images
# (shards of 5 and 6). Both augmentations, a validation split and a weight average are on: everything the
# loop does per rank. Dropout is off: its masks depend on how the batch is split, by design.
OPTIONS = dict(TINY_MODEL, epochs=2, batch_size=32, lr=5e-3, seed=3, max_shift=1, rotation=10.0, ema_decay=0.9,
               validation=40, dropout=0.0)
STEPS_PER_EPOCH = 31
RELATIVE = 1e-10


def option_args(options):
    return [text for name, value in options.items() for text in (f"--{name.replace('_', '-')}", str(value))]


def mpiexec(*command, timeout=90, ranks=2):
    """Run `mpiexec -n 2 python COMMAND` from the repository root; returns the CompletedProcess. On a
    timeout the whole process group is killed and the test fails: no job may outlive its test."""
    return run_mpiexec([MPIEXEC, "-n", str(ranks), sys.executable, *map(str, command)], timeout)


def mpi_environment():
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT),
                # Open MPI refuses root without these (MPICH ignores them)
                OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def run_mpiexec(arguments, timeout):
    process = subprocess.Popen(arguments, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=mpi_environment(), start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"the MPI job did not end within {timeout} s: {' '.join(arguments)}")
    return subprocess.CompletedProcess(arguments, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def job_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mpi") / "data", train_count=1011, test_count=100, seed=4)


@pytest.fixture(scope="module")
def one_process(job_data, tmp_path_factory):
    """The reference: one process, one thread, float64, the whole batch per step: (history, out_dir)."""
    out_dir = tmp_path_factory.mktemp("one-process")
    patch = pytest.MonkeyPatch()
    build_model, load_data = mpi_job.float64_build_and_load()
    patch.setattr(train, "build_model", build_model)
    patch.setattr(train, "load_data", load_data)
    try:
        history = run(TrainConfig(**OPTIONS, threads=1, data_dir=str(job_data), out_dir=str(out_dir)), log=quiet)
    finally:
        patch.undo()
    return history, out_dir


def relative_error(a, b):
    """scratchvit/equivalence.py's error: max |a - b| / max |b|."""
    scale = numpy.abs(b).max()
    return float(numpy.abs(a - b).max() / scale) if scale else float(numpy.abs(a - b).max())


def assert_same_run(history, out_dir, reference_history, reference_dir, step_log=True):
    assert len(history) == len(reference_history)
    for record, expected in zip(history, reference_history):
        assert record["train_loss"] == pytest.approx(expected["train_loss"], rel=RELATIVE)
        for key in ("test_accuracy", "validation_accuracy", "validation_accuracy_trained_weights"):
            assert record[key] == expected[key], key        # correct counts summed over ranks: exact
    meta, model, optimizer = load_checkpoint(out_dir / "checkpoint.npz")
    reference_meta, reference_model, reference_optimizer = load_checkpoint(reference_dir / "checkpoint.npz")
    average, reference_average = (load_checkpoint(path / "checkpoint.npz", averaged=True)[1]
                                  for path in (out_dir, reference_dir))
    assert (meta["epoch"], meta["optimizer_step"]) == (reference_meta["epoch"], reference_meta["optimizer_step"])
    for kind, arrays, expected_arrays in (("model", model, reference_model), ("average", average, reference_average),
                                          ("optimizer", optimizer, reference_optimizer)):
        assert sorted(arrays) == sorted(expected_arrays)
        for name in arrays:
            assert arrays[name].dtype == numpy.float64
            assert relative_error(arrays[name], expected_arrays[name]) <= RELATIVE, (kind, name)
    if not step_log:        # a run stopped between two of its lines writes one more (StepLog: at Ctrl-C too)
        return
    steps = [json.loads(line) for line in (out_dir / "steps.jsonl").read_text().splitlines()]
    reference_steps = [json.loads(line) for line in (reference_dir / "steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in steps] == [line["step"] for line in reference_steps]
    for line, expected in zip(steps, reference_steps):
        assert line["loss"] == pytest.approx(expected["loss"], rel=RELATIVE)


@needs_mpi
def test_two_ranks_train_exactly_like_one_process_on_the_whole_batch(job_data, one_process, tmp_path):
    reference_history, reference_dir = one_process
    result = mpiexec(JOB, "train", "--float64", "--", "--data-dir", job_data, "--out-dir", tmp_path,
                     *option_args(OPTIONS))
    assert result.returncode == 0, result.stderr
    assert "data-parallel over 2 MPI ranks" in result.stdout and "gradient exchange: mpi" in result.stdout
    assert result.stdout.count("epoch 1/2") == 1                   # rank 0 alone prints
    assert_same_run(read_metrics(tmp_path), tmp_path, reference_history, reference_dir)


@needs_mpi
def test_ctrl_c_on_one_rank_stops_both_and_the_checkpoint_resumes_in_one_process(job_data, one_process, tmp_path):
    """SIGINT reaches rank 1 alone after step 4: both ranks stop at the next loss read, step 25; rank 0 writes
    the checkpoint once; one process resumes it and ends where the uninterrupted run ends."""
    reference_history, reference_dir = one_process
    result = mpiexec(JOB, "train", "--float64", "--interrupt-on-rank", 1, "--at", "0,3", "--",
                     "--data-dir", job_data, "--out-dir", tmp_path, *option_args(OPTIONS))
    assert result.returncode == 130, result.stderr
    assert result.stderr.count("interrupted: checkpoint written") == 1, result.stderr
    assert "Traceback" not in result.stderr
    meta, _, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert (meta["epoch"], meta["step_in_epoch"], meta["optimizer_step"]) == (0, 25, 25)
    assert meta["random_state"]["dropout_per_rank"] == [len(ViT(image_size=8, num_classes=4, **TINY_MODEL)
                                                            .dropout_layers())] * 2
    patch = pytest.MonkeyPatch()
    build_model, load_data = mpi_job.float64_build_and_load()
    patch.setattr(train, "build_model", build_model)
    patch.setattr(train, "load_data", load_data)
    try:
        history = run(TrainConfig(**OPTIONS, threads=2, data_dir=str(job_data), out_dir=str(tmp_path), resume=True),
                      log=quiet)
    finally:
        patch.undo()
    assert_same_run(history, tmp_path, reference_history, reference_dir)


def signal_mpiexec_in_training(job_data, out_dir, signal_number, ready):
    """Start a 2-rank job, send `signal_number` to mpiexec alone once it trains (after step 4, slowed down),
    and return (exit status, stderr)."""
    arguments = [MPIEXEC, "-n", "2", sys.executable, JOB, "train", "--slow-from", "0,3", "--ready-file", str(ready),
                 "--", "--data-dir", str(job_data), "--out-dir", str(out_dir), *option_args(OPTIONS)]
    process = subprocess.Popen(arguments, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=mpi_environment(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), process.communicate(timeout=10)
        process.send_signal(signal_number)                  # to mpiexec only
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, stderr


@needs_mpi
def test_ctrl_c_to_mpiexec_reaches_every_rank_and_writes_one_checkpoint(job_data, tmp_path):
    """Ctrl-C as a user gives it: SIGINT to mpiexec, which passes it on to every rank (MPICH's Hydra:
    "Sending Ctrl-C to processes as requested"), once the job is training (after step 4, slowed down)."""
    returncode, stderr = signal_mpiexec_in_training(job_data, tmp_path / "out", signal.SIGINT, tmp_path / "ready")
    assert returncode == 130, stderr
    assert stderr.count("interrupted: checkpoint written") == 1, stderr        # rank 0 alone says it
    meta, _, _ = load_checkpoint(tmp_path / "out" / "checkpoint.npz")
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 25)                   # the first loss read after it


@needs_mpi
def test_sigterm_to_mpiexec_stops_every_rank_like_ctrl_c_with_143(job_data, tmp_path):
    """SIGTERM as a scheduler or `kill` gives it: to mpiexec, which passes it on to every rank as it does
    SIGINT. The ranks stop at the same loss read, rank 0 writes the checkpoint and says so once, and the
    job ends with 143 (128 + SIGTERM), the folder's lock released."""
    returncode, stderr = signal_mpiexec_in_training(job_data, tmp_path / "out", signal.SIGTERM, tmp_path / "ready")
    assert returncode == 143, stderr
    assert stderr.count("terminated by SIGTERM: checkpoint written") == 1, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    meta, _, _ = load_checkpoint(tmp_path / "out" / "checkpoint.npz")
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 25)
    assert not (tmp_path / "out" / LOCK_NAME).exists()


@needs_mpi
def test_sigterm_on_one_rank_stops_both_with_143(job_data, tmp_path):
    """`kill` of rank 1's process alone: both ranks stop at the next loss read and agree on the signal, so
    rank 0, which got none, also exits with SIGTERM's 143."""
    result = mpiexec(JOB, "train", "--interrupt-on-rank", 1, "--signal", "TERM", "--at", "0,3", "--",
                     "--data-dir", job_data, "--out-dir", tmp_path, *option_args(OPTIONS))
    assert result.returncode == 143, result.stderr
    assert result.stderr.count("terminated by SIGTERM: checkpoint written") == 1, result.stderr
    assert "Traceback" not in result.stderr
    meta, _, _ = load_checkpoint(tmp_path / "checkpoint.npz")
    assert (meta["epoch"], meta["step_in_epoch"], meta["optimizer_step"]) == (0, 25, 25)


@needs_mpi
def test_a_one_process_checkpoint_resumes_under_two_ranks(job_data, one_process, tmp_path):
    """The other way round: Ctrl-C stops one process after step 4; two ranks continue (the loss so far is
    the job's, counted once, and the shared augmentation generator goes on where it stopped)."""
    reference_history, reference_dir = one_process

    def interrupt(epoch, step):
        if (epoch, step) == (0, 3):
            os.kill(os.getpid(), signal.SIGINT)

    patch = pytest.MonkeyPatch()
    build_model, load_data = mpi_job.float64_build_and_load()
    patch.setattr(train, "build_model", build_model)
    patch.setattr(train, "load_data", load_data)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(TrainConfig(**OPTIONS, threads=1, data_dir=str(job_data), out_dir=str(tmp_path)), log=quiet,
                on_step=interrupt)
    finally:
        patch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.npz")[0]["step_in_epoch"] == 4
    result = mpiexec(JOB, "train", "--float64", "--", "--data-dir", job_data, "--out-dir", tmp_path, "--resume",
                     *option_args(OPTIONS))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert_same_run(read_metrics(tmp_path), tmp_path, reference_history, reference_dir, step_log=False)


@needs_mpi
def test_a_rank_that_raises_ends_both_processes_with_its_one_line_error(job_data, tmp_path):
    result = mpiexec(JOB, "train", "--fail-on-rank", 1, "--at", "0,2", "--", "--data-dir", job_data,
                     "--out-dir", tmp_path, *option_args(OPTIONS), timeout=60)
    assert result.returncode == 1, result.stderr
    assert "error: rank 1 of 2: MemoryError: simulated out of memory" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoint.npz").exists()


@needs_mpi
def test_bad_data_on_one_rank_ends_the_job_never_a_hang(job_data, tmp_path):
    """Rank 1 reads a damaged copy of the data (a node with a bad disk) while rank 0 reads good files and
    waits for it in the first collective: MPMD mpiexec, one command per rank."""
    bad = tmp_path / "bad-data"
    shutil.copytree(job_data, bad)
    path = bad / MNIST_FILES["test_images"]
    path.write_bytes(path.read_bytes()[:-7])
    command = [sys.executable, str(REPO_ROOT / "train_mnist.py"), "--out-dir", str(tmp_path / "out"),
               *option_args(OPTIONS)]
    result = run_mpiexec([MPIEXEC, "-n", "1", *command, "--data-dir", str(job_data), ":",
                          "-n", "1", *command, "--data-dir", str(bad)], timeout=60)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 of 2:") and "truncated" in errors[0], result.stderr


@needs_mpi
def test_ranks_started_with_different_options_are_stopped_before_training(job_data, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "train_mnist.py"), "--data-dir", str(job_data),
               "--out-dir", str(tmp_path),
               *option_args({name: value for name, value in OPTIONS.items() if name != "seed"})]
    result = run_mpiexec([MPIEXEC, "-n", "1", *command, "--seed", "1", ":", "-n", "1", *command, "--seed", "2"],
                         timeout=60)
    assert result.returncode == 2, result.stderr
    assert "the ranks differ in options" in result.stderr
    assert not (tmp_path / "checkpoint.npz").exists()


@needs_mpi
def test_the_host_staged_exchange_sums_numpy_arrays_through_real_mpi():
    result = mpiexec(JOB, "exchange", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exchange ok"


@needs_mpi
def test_the_benchmark_under_mpiexec_reports_the_whole_jobs_speed_and_the_allreduce():
    result = mpiexec("-m", "scratchvit.bench", "--image-size", 8, "--patch-size", 2, "--dim", 16, "--depth", 1,
                     "--heads", 2, "--mlp-dim", 32, "--batch-size", 32, "--steps", 6, "--warmup", 1, "--json",
                     timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)                               # one JSON object: rank 0 alone prints
    mpi = report["mpi"]
    assert (mpi["ranks"], mpi["nodes"], mpi["exchange"]) == (2, 1, "mpi")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    expected_threads = max(1, usable // 2) if can_limit_blas_threads() else 1
    assert mpi["threads_per_rank"] == expected_threads
    assert 0 < mpi["exchange_median_ms"] and 0 < mpi["exchange_share"] < 1
    assert report["results"]["scratchvit"]["img_per_s"] > 0
