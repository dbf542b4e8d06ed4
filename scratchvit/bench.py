"""Benchmark one scratchvit training step, optionally against the same ViT written in PyTorch.

    python -m scratchvit.bench [--device gpu] [--compare-torch] [--json] [--help for the rest]

What is timed is `TrainStep` exactly as training runs it (zero the gradients, forward, softmax
cross-entropy, backward, clip the global gradient norm, AdamW with the training's lr and weight decay)
on one random batch made once, so no data loading is timed. The CPU is timed with the host clock, the
GPU with CUDA events (the GPU's own time from reaching the step to finishing it), in blocks that
alternate between the libraries so that noise hits both alike. The report gives, per library, the
median, minimum and interquartile range per step, images per second and memory; on the GPU also what
one traced step put on the GPU (gpu_trace.py); under mpiexec the gradient exchange's time. The machine
that ran it is part of the report (machine.py). bench_report.py turns the timings into the report's
figures and its text.

--compare-torch needs a checkout: the PyTorch model is tools/torch_reference.py, loaded from beside the
package or the current directory. How each figure is measured, the JSON report's fields and the
figures measured so far: docs/bench.md and the README's "Speed" section.

Exit status: 0 after a run; 2 for a bad option, no usable GPU backend, torch missing or no checkout for
--compare-torch; 1 if the two models' parameter counts differ.
"""
import argparse
import importlib.util
import json
import math
import sys
import time
import tracemalloc
from pathlib import Path

import numpy

from .backend import get_backend
from .bench_report import format_table, summarize
from .config import TrainConfig
from .cpu_threads import keep_freed_host_memory
from .cupy_check import BackendUnavailable
from .distributed import SINGLE_PROCESS, DistributedError, world
from .gpu_trace import gpu_work, torch_for_launch_counting
from .layers import SoftmaxCrossEntropy
from .machine import machine_info
from .optim import AdamW, parameter_groups
from .train_step import TrainStep
from .vit import ViT

BENCH_BATCH_SIZE = 128   # the training defaults' batch, and that of the README's PyTorch reference figures

TORCH_NEEDED = "torch is needed only for --compare-torch: pip install torch"
CHECKOUT_NEEDED = ("--compare-torch needs a checkout of the scratchvit repository: its PyTorch reference, "
                   "tools/torch_reference.py, is not installed with the package (run from the checkout)")
TORCH_REFERENCE = Path("tools") / "torch_reference.py"
TRAINING = TrainConfig()          # lr and weight decay as in training
DTYPES = ("float32", "float64")


# ------------------------------------------------------------------------------------------------
# options

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m scratchvit.bench",
        description="Time scratchvit's full training step (forward, loss, backward, clip, AdamW) on random data, "
                    "optionally against the same ViT in PyTorch. Defaults: the MNIST model at batch 128.",
        epilog="NumPy's BLAS threads come from the environment: set OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS / "
               "MKL_NUM_THREADS) before starting Python. Ratio = scratchvit ms / torch ms: below 1 means "
               "scratchvit is faster.")
    default = " (default: %(default)s)"
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="cpu: NumPy, timed with the host clock; gpu: CuPy, timed with CUDA events" + default)
    model = parser.add_argument_group("model and batch")
    for option, value, text in (("--batch-size", BENCH_BATCH_SIZE, "images per step"),
                                ("--image-size", 28, "image height and width"),
                                ("--patch-size", TRAINING.patch_size, "patch height and width"),
                                ("--dim", TRAINING.dim, "token width"),
                                ("--depth", TRAINING.depth, "encoder blocks"),
                                ("--heads", TRAINING.heads, "attention heads"),
                                ("--mlp-dim", TRAINING.mlp_dim, "hidden width of the MLPs"),
                                ("--channels", 1, "image channels"),
                                ("--num-classes", 10, "classes")):
        model.add_argument(option, type=int, default=value, help=text + default)
    model.add_argument("--dtype", choices=DTYPES, default="float32", help=default.strip())
    model.add_argument("--clip-grad-norm", type=float, default=TRAINING.clip_grad_norm,
                       help="global gradient-norm clipping in the step, as in training; 0 disables it" + default)
    model.add_argument("--seed", type=int, default=0, help="seed of the weights and of the random batch" + default)
    timing = parser.add_argument_group("timing")
    timing.add_argument("--steps", type=int, default=30, help="timed steps, per library" + default)
    timing.add_argument("--warmup", type=int, default=5, help="untimed steps before timing, per library" + default)
    timing.add_argument("--repeats", type=int, default=3,
                        help="split the timed steps into this many blocks, alternating between scratchvit and torch "
                             "with --compare-torch" + default)
    timing.add_argument("--compare-torch", action="store_true",
                        help="also time the same ViT in PyTorch (needs torch) and print the ratio")
    timing.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both libraries: scratchvit's data-parallel step and "
                             "torch.set_num_threads(N) (default: one per core for scratchvit, torch's own choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def _check_options(args):
    """A one-line problem with the options, or None."""
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if args.warmup < 0:
        return f"--warmup must be 0 or more, got {args.warmup}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be at least 1, got {args.threads}"
    if not (args.clip_grad_norm >= 0 and math.isfinite(args.clip_grad_norm)):
        return f"--clip-grad-norm must be a finite number >= 0, got {args.clip_grad_norm}"
    return None


def model_config(args):
    return dict(image_size=args.image_size, patch_size=args.patch_size, num_classes=args.num_classes, dim=args.dim,
                depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim, channels=args.channels)


# ------------------------------------------------------------------------------------------------
# clocks

class HostClock:
    name = "host clock (time.perf_counter)"

    def time(self, step, count):
        times = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times


class CudaEventClock:
    """Events recorded on the current stream around each step; steps are queued back to back and the
    last event is waited for at the end of the block."""
    name = "CUDA events"

    def __init__(self, new_event, elapsed_ms):
        self.new_event, self.elapsed_ms = new_event, elapsed_ms

    def time(self, step, count):
        pairs = []
        for _ in range(count):
            start = self.new_event()
            start.record()
            step()
            end = self.new_event()
            end.record()
            pairs.append((start, end))
        pairs[-1][1].synchronize()
        return [float(self.elapsed_ms(start, end)) for start, end in pairs]


# ------------------------------------------------------------------------------------------------
# what is measured, per library

class Runner:
    def __init__(self, name, label, step, clock, synchronize, parameters):
        self.name, self.label, self.step, self.clock = name, label, step, clock
        self.synchronize, self.parameters = synchronize, parameters
        self.times_ms, self.first_loss, self.memory, self.gpu_operations = [], None, {}, None

    def warm_up(self, count):
        for index in range(count):
            loss = self.step()
            if index == 0:
                self.first_loss = float(loss.item())     # NumPy, CuPy and torch 0-d arrays all have item()
        self.synchronize()

    def measure(self, count):
        self.times_ms += self.clock.time(self.step, count)


class TimedExchange:
    """A communicator's gradient exchange, timed while `recording`: the host clock around the call on the
    CPU (the Allreduce blocks), CUDA events before and after it on the GPU (NCCL only queues work)."""

    def __init__(self, exchange, backend):
        self.exchange, self.backend, self.name = exchange, backend, exchange.name
        self.recording, self.times_ms, self.events = False, [], []

    def __call__(self, array):
        if not self.recording:
            return self.exchange(array)
        if self.backend.name == "gpu":
            start, end = self.backend.xp.cuda.Event(), self.backend.xp.cuda.Event()
            start.record()
            self.exchange(array)
            end.record()
            self.events.append((start, end))
        else:
            started = time.perf_counter()
            self.exchange(array)
            self.times_ms.append((time.perf_counter() - started) * 1e3)

    def collected_ms(self):
        if self.events:
            self.events[-1][1].synchronize()
            self.times_ms += [float(self.backend.xp.cuda.get_elapsed_time(start, end)) for start, end in self.events]
            self.events = []
        return self.times_ms


def scratchvit_runner(model, backend, images, labels, clip_grad_norm, threads=None, communicator=SINGLE_PROCESS):
    optimizer = AdamW(parameter_groups(model, TRAINING.weight_decay), lr=TRAINING.lr)
    if threads is None:
        threads = communicator.default_threads()
    train_step = TrainStep(model, optimizer, SoftmaxCrossEntropy(), clip_grad_norm or None, threads=threads,
                           communicator=communicator)
    exchange_timer = None
    if communicator.size > 1:
        communicator.prepare_exchange(backend)
        exchange_timer = communicator.exchange = TimedExchange(communicator.exchange, backend)
    images, labels = backend.asarray(images), backend.asarray(labels)
    xp = backend.xp
    if backend.name == "gpu":
        clock = CudaEventClock(xp.cuda.Event, xp.cuda.get_elapsed_time)
    else:
        clock = HostClock()
    runner = Runner("scratchvit", "scratchvit", lambda: train_step(images, labels), clock, backend.synchronize,
                    sum(parameter.size for parameter in model.parameters()))
    runner.state_bytes = sum(array.nbytes for array in (optimizer.data, optimizer.grad, optimizer.exp_avg,
                                                        optimizer.exp_avg_sq, optimizer.update)
                             if array is not None)          # no CPU scratch buffer on the GPU

    def measure_memory():
        if backend.name == "gpu":
            pool = xp.get_default_memory_pool()
            return dict(peak_bytes=int(pool.total_bytes()), used_bytes=int(pool.used_bytes()),
                        state_bytes=runner.state_bytes,
                        note="CuPy's default memory pool after the steps: peak_bytes = bytes held by the pool "
                             "(its high-water mark), used_bytes = in use")
        return dict(peak_bytes=traced_peak_bytes(runner.step), state_bytes=runner.state_bytes,
                    note="peak of the NumPy bytes allocated during one untimed step (tracemalloc); parameters, "
                         "gradients and AdamW state that exist before the step are state_bytes")

    runner.measure_memory = measure_memory
    runner.threads = train_step.threads
    runner.exchange_timer = exchange_timer
    return runner


def traced_peak_bytes(step):
    """Peak bytes allocated (and traced by tracemalloc: NumPy's data buffers included) while `step()` runs."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        step()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        if not was_tracing:
            tracemalloc.stop()


def load_torch_reference(roots=None):
    """The checkout's tools/torch_reference.py, imported, or None outside a checkout. It is looked for
    beside the scratchvit folder (a checkout, or an editable install of one), then in the current directory."""
    path = next((Path(root) / TORCH_REFERENCE for root in roots or (Path(__file__).resolve().parents[1], Path.cwd())
                 if (Path(root) / TORCH_REFERENCE).is_file()), None)
    if path is None:
        return None
    name = "scratchvit_tools_torch_reference"      # imported once per process, whichever checkout found it first
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def torch_runner(torch, reference, config, state, args, images, labels):
    """The Runner of `reference` (tools/torch_reference.py): the same ViT in PyTorch, from the same weights."""
    device = "cuda" if args.device == "gpu" else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = reference.torch_vit(config, dtype=args.dtype, device=device, state=state)
    model.train()
    train_step = reference.TorchTrainStep(model, lr=TRAINING.lr, weight_decay=TRAINING.weight_decay,
                                          clip_grad_norm=args.clip_grad_norm or None)
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    if device == "cuda":
        clock = CudaEventClock(lambda: torch.cuda.Event(enable_timing=True), lambda start, end: start.elapsed_time(end))
        synchronize = torch.cuda.synchronize
    else:
        clock, synchronize = HostClock(), (lambda: None)
    label = "torch " + ".".join(torch.__version__.split("+")[0].split(".")[:2])
    runner = Runner("torch", label, lambda: train_step(images, labels), clock, synchronize,
                    sum(parameter.numel() for parameter in model.parameters()))

    def measure_memory():
        if device == "cuda":
            return dict(peak_bytes=int(torch.cuda.max_memory_reserved()),
                        allocated_peak_bytes=int(torch.cuda.max_memory_allocated()),
                        used_bytes=int(torch.cuda.memory_allocated()),
                        note="torch.cuda.max_memory_reserved (the caching allocator's high-water mark), "
                             "max_memory_allocated, and memory_allocated after the steps (used_bytes)")
        return dict(peak_bytes=None, note="PyTorch's CPU allocations are not visible to tracemalloc: not measured")

    runner.measure_memory = measure_memory
    return runner


# ------------------------------------------------------------------------------------------------

def _split(total, parts):
    base, extra = divmod(total, parts)
    return [base + (index < extra) for index in range(parts)]


def _error(message, code=2, communicator=SINGLE_PROCESS):
    """Print `message` as one line (once: from rank 0 under MPI) and return the exit status `code`.
    For errors every rank meets alike (options, torch under mpiexec); the others end the job (fail)."""
    if communicator.is_root:
        print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:       # --help (0) or a bad option (2): return the status instead of exiting
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    problem = _check_options(args)
    if problem:
        return _error(problem)
    try:
        communicator = world()        # this process alone, unless mpiexec started it with others
    except DistributedError as error:
        return _error(error)
    if communicator.size > 1 and args.compare_torch:
        return _error("--compare-torch times PyTorch in one process: run it without mpiexec", communicator=communicator)
    if communicator.size > 1 and args.batch_size < communicator.size:
        return _error(f"--batch-size must be at least the number of MPI ranks ({communicator.size}): it is the "
                      f"global batch, split over the ranks; got {args.batch_size}", communicator=communicator)
    if args.device == "gpu":
        communicator.select_gpu()     # one GPU per rank
    try:
        backend = get_backend(args.device)
    except BackendUnavailable as error:
        if communicator.size > 1:     # it may fail on one rank only (one node without a GPU): end the job
            return communicator.fail(f"error: {error}", 2)
        return _error(error)
    if backend.name == "cpu":
        keep_freed_host_memory()      # as the training loop does: see its docstring
    torch = reference = None
    if args.compare_torch:
        try:
            import torch
        except ImportError:
            return _error(TORCH_NEEDED)
        if args.device == "gpu" and not torch.cuda.is_available():
            return _error(f"--compare-torch --device gpu needs a CUDA build of torch (this one is {torch.__version__}, "
                          "which sees no GPU)")
        reference = load_torch_reference()
        if reference is None:
            return _error(CHECKOUT_NEEDED)
    config = model_config(args)
    try:
        model = ViT(**config, dtype=args.dtype, seed=args.seed)
    except ValueError as error:
        return _error(error)
    previous_threads = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None and args.threads:
            torch.set_num_threads(args.threads)
        return _run(args, backend, config, model, torch, communicator, reference)
    finally:
        if torch is not None:
            torch.set_num_threads(previous_threads)


def _run(args, backend, config, model, torch, communicator=SINGLE_PROCESS, reference=None):
    rng = numpy.random.default_rng(args.seed + 1)
    images = rng.standard_normal((args.batch_size, args.channels, args.image_size, args.image_size)).astype(args.dtype)
    labels = rng.integers(0, args.num_classes, args.batch_size)
    initial_state = model.state_dict()
    model.to(backend)
    model.train()
    runners = [scratchvit_runner(model, backend, images, labels, args.clip_grad_norm, args.threads, communicator)]
    exchange_timer = runners[0].exchange_timer
    if torch is not None:
        runners.append(torch_runner(torch, reference, config, initial_state, args, images, labels))
        if runners[1].parameters != runners[0].parameters:
            return _error(f"the PyTorch model has {runners[1].parameters:,} parameters and scratchvit's "
                          f"{runners[0].parameters:,}: the architectures differ", code=1)

    for runner in runners:
        runner.warm_up(args.warmup)
    if communicator.size > 1 and runners[0].first_loss is not None:
        runners[0].first_loss = communicator.sum(runners[0].first_loss)    # each rank's share of the batch's loss
    rounds = min(args.repeats, args.steps)
    if exchange_timer is not None:
        exchange_timer.recording = True
    for index, count in enumerate(_split(args.steps, rounds)):
        for runner in (runners if index % 2 == 0 else runners[::-1]):
            runner.measure(count)
    if exchange_timer is not None:
        exchange_timer.recording = False
    for runner in runners:
        runner.memory = runner.measure_memory()
    if communicator.size > 1:          # decided before torch_for_launch_counting would import torch for nothing
        counting_torch, reason = None, "not traced under mpiexec: run the benchmark in one process for it"
    else:
        counting_torch, reason = torch_for_launch_counting(args.device, torch)
    for runner in runners:             # after the timed steps and the memory figures: one more step each
        runner.gpu_operations = gpu_work(runner, counting_torch, reason)

    results = {}
    for runner in runners:
        summary = summarize(runner.times_ms, args.batch_size)
        results[runner.name] = dict(library=runner.name, label=runner.label, **summary,
                                    parameters=int(runner.parameters), first_loss=runner.first_loss,
                                    memory=runner.memory, peak_bytes=runner.memory["peak_bytes"],
                                    used_bytes=runner.memory.get("used_bytes"),
                                    kernels_per_step=runner.gpu_operations["kernels"],
                                    gpu_operations=runner.gpu_operations)
    ratio = None
    if "torch" in results:
        ratio = results["scratchvit"]["median_ms"] / results["torch"]["median_ms"]
    report = dict(
        device=args.device,
        config=dict(config, batch_size=args.batch_size, dtype=args.dtype, clip_grad_norm=args.clip_grad_norm,
                    lr=TRAINING.lr, weight_decay=TRAINING.weight_decay, seed=args.seed),
        timing=dict(clock=runners[0].clock.name, steps=args.steps, warmup=args.warmup, rounds=rounds),
        machine=machine_info(backend, torch or counting_torch),
        results=results,
        scratchvit_threads=runners[0].threads,
        ratio=ratio,
        mpi=mpi_report(communicator, runners[0], exchange_timer))
    if communicator.is_root:
        print(json.dumps(report) if args.json else format_table(report))
    return 0


def mpi_report(communicator, runner, exchange_timer):
    """The MPI part of the report (None in one process): ranks, threads and the gradient exchange's time."""
    if communicator.size == 1:
        return None
    exchange = numpy.asarray(exchange_timer.collected_ms(), dtype=float)
    q1, median, q3 = numpy.percentile(exchange, [25, 50, 75])
    step_median = float(numpy.median(runner.times_ms))
    return dict(ranks=communicator.size, nodes=communicator.nodes, threads_per_rank=runner.threads,
                library=communicator.library(), exchange=exchange_timer.name, exchange_median_ms=float(median),
                exchange_q1_ms=float(q1), exchange_q3_ms=float(q3), exchange_share=float(median) / step_median)


if __name__ == "__main__":
    sys.exit(main())
