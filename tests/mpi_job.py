"""The programs tests/test_distributed.py runs under `mpiexec -n 2` (every rank runs this file).

    python tests/mpi_job.py train [--float64] [--interrupt-on-rank R --at E,S [--signal TERM]]
                                  [--fail-on-rank R --at E,S] -- TRAIN_MNIST_OPTIONS
        train_mnist.py's main with those options, and:
        --float64             the model and the images in float64 (float32 rounding would hide a wrong
                              shard weight no better than 1e-3; float64 compares to 1e-10);
        --interrupt-on-rank   this rank alone sends itself SIGINT after step S of epoch E (0-based), as a
                              Ctrl-C that reached one rank first (--signal TERM: SIGTERM, as a `kill`
                              of that one process);
        --fail-on-rank        this rank alone raises MemoryError("simulated out of memory") there;
        --slow-from E,S --ready-file PATH
                              from step S of epoch E on, every rank sleeps 0.1 s per step, and rank 0
                              creates PATH there: the test then sends Ctrl-C (or SIGTERM) to mpiexec itself.
    Without mpiexec it runs as one process: tests/test_output_folder.py uses --slow-from to signal a
    single training process from outside.
    python tests/mpi_job.py exchange
        the host-staged gradient exchange on NumPy arrays through the real MPI, checked against the exact
        sum and against a plain Allreduce; prints "exchange ok" (rank 0) and exits 0.
"""
import argparse
import functools
import os
import signal
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy  # noqa: E402

from scratchvit import train  # noqa: E402
from scratchvit.vit import ViT  # noqa: E402


def float64_build_and_load(train_module=train):
    """(build_model, load_data) for scratchvit.train that make the model and the images float64."""
    original_load = train_module.load_data

    def build_model(config, data):
        return ViT(**config.model_config(data["image_size"], num_classes=data["num_classes"]), seed=config.seed,
                   dtype="float64")

    def load_data(config, backend):
        data = original_load(config, backend)
        return {key: value.astype("float64") if key.endswith("_images") else value for key, value in data.items()}

    return build_model, load_data


def step_hook(rank, action, at):
    """on_step for run(): `action()` on rank `rank` after step at = (epoch, step)."""
    from scratchvit.distributed import world
    own_rank = world().rank

    def on_step(epoch, step):
        if own_rank == rank and (epoch, step) == at:
            action()
    return on_step


def interrupt_myself(signal_number=signal.SIGINT):
    os.kill(os.getpid(), signal_number)


def run_out_of_memory():
    raise MemoryError("simulated out of memory")


def slow_from(at, ready_file):
    """on_step: from step `at` on, 0.1 s per step on every rank; rank 0 creates `ready_file` at `at`."""
    import time
    from scratchvit.distributed import world
    rank = world().rank

    def on_step(epoch, step):
        if (epoch, step) >= at:
            if (epoch, step) == at and rank == 0:
                Path(ready_file).touch()
            time.sleep(0.1)
    return on_step


def train_main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--interrupt-on-rank", type=int)
    parser.add_argument("--signal", choices=["INT", "TERM"], default="INT")
    parser.add_argument("--fail-on-rank", type=int)
    parser.add_argument("--at", default="0,0")
    parser.add_argument("--slow-from")
    parser.add_argument("--ready-file")
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    options = argv[split + 1:]
    sys.path.insert(0, str(REPO_ROOT))
    import train_mnist
    if args.float64:
        train.build_model, train.load_data = float64_build_and_load()
    at = tuple(int(number) for number in args.at.split(","))
    if args.interrupt_on_rank is not None:
        interrupt = functools.partial(interrupt_myself, getattr(signal, f"SIG{args.signal}"))
        train_mnist.run = functools.partial(train.run, on_step=step_hook(args.interrupt_on_rank, interrupt, at))
    if args.fail_on_rank is not None:
        train_mnist.run = functools.partial(train.run, on_step=step_hook(args.fail_on_rank, run_out_of_memory, at))
    if args.slow_from is not None:
        slow_at = tuple(int(number) for number in args.slow_from.split(","))
        train_mnist.run = functools.partial(train.run, on_step=slow_from(slow_at, args.ready_file))
    return train_mnist.main(options)


def numpy_copies():
    """(download, upload) for distributed.HostStagedAllreduce on NumPy arrays: the GPU's copies (cupy_copies)
    done on the host, so the tests run the staged exchange for real without a GPU."""
    return (lambda array, out: numpy.copyto(out, array)), (lambda buffer, array: numpy.copyto(array, buffer))


def exchange_main():
    from scratchvit.distributed import HostStagedAllreduce, MpiAllreduce, world
    communicator = world()
    comm, MPI, rank, size = communicator.comm, communicator.MPI, communicator.rank, communicator.size
    assert size > 1, "run under mpiexec with 2 or more processes"
    staged_exchange = HostStagedAllreduce(comm, MPI, *numpy_copies())
    for dtype in ("float32", "float64"):
        for count in (1, 7, 100_003):
            every_rank = [numpy.random.default_rng([seed, count]).standard_normal(count).astype(dtype)
                          for seed in range(size)]
            staged, direct = every_rank[rank].copy(), every_rank[rank].copy()
            staged_exchange(staged)
            buffer = staged_exchange.host_buffer
            MpiAllreduce(comm, MPI, name="mpi")(direct)
            numpy.testing.assert_array_equal(staged, direct)           # the very same MPI sum, through the host
            expected = functools.reduce(numpy.add, every_rank)
            if size == 2:                                             # a + b: one rounding, the same in any order
                numpy.testing.assert_array_equal(staged, expected)
            else:
                numpy.testing.assert_allclose(staged, expected, rtol=1e-5 if dtype == "float32" else 1e-12)
            again = every_rank[rank].copy()
            staged_exchange(again)                                    # the host buffer is kept between calls
            assert staged_exchange.host_buffer is buffer
            numpy.testing.assert_array_equal(again, staged)
            communicator.check_same(f"the exchanged {dtype} sums", staged)
    if rank == 0:
        print("exchange ok", flush=True)
    return 0


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    sys.exit(train_main(rest) if command == "train" else exchange_main())
