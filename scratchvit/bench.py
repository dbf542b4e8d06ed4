"""Benchmark one scratchvit training step, optionally against the same ViT written in PyTorch.

What is timed: the whole training step of `scratchvit.train.TrainStep`, exactly as training runs
it: zero the gradients, forward, softmax cross-entropy, backward, clip the global gradient norm
(--clip-grad-norm, 1.0 like training; 0 disables it), AdamW (lr 2e-3, weight decay 0.05 on the
weight matrices only, as in training). The data are one random batch of the right shape (standard
normal images, uniform random labels), made once and reused, so no data loading or augmentation is
timed. `--warmup` untimed steps come first (on the GPU they also compile CuPy's kernels), then
`--steps` timed steps.

How it is timed
- CPU: the host clock, `time.perf_counter()` around each step (NumPy and PyTorch on the CPU both
  finish their work before returning).
- GPU: CUDA events, never the host clock. An event is recorded on the current stream before and
  after each step; the steps are queued back to back as in training (no wait between steps) and
  the last event is waited for at the end of each block; a step's time is
  `cupy.cuda.get_elapsed_time(start, end)` (`torch.cuda.Event.elapsed_time` for PyTorch), in ms.
  That is the time the GPU spent from reaching the step to finishing it, idle gaps while it waited
  for the host to queue kernels included.
Reported per library: the median time per step, the minimum, the interquartile range (25th-75th
percentile), images per second (batch size / median) and memory:
- CPU, scratchvit: the peak of the bytes NumPy allocated during one extra, untimed step traced with
  `tracemalloc` (NumPy reports its data buffers to tracemalloc; tracing slows the step, so it is
  not timed). It counts what a step allocates (activations, gradients of activations,
  temporaries), not the parameters and optimiser state that exist before it (reported separately
  as `state_bytes`). PyTorch's CPU allocations are invisible to tracemalloc: shown as n/a.
- GPU, scratchvit: CuPy's default memory pool after the steps: bytes held by the pool (its
  high-water mark, since the pool keeps freed blocks) and bytes in use. PyTorch:
  `torch.cuda.max_memory_reserved()` (its caching allocator's high-water mark, the counterpart of
  CuPy's held bytes) and `max_memory_allocated()`.

GPU work per step: a small ViT's GPU step may cost more in kernel launches than in the kernels
themselves, so the bench traces one training step and reports what it put on the GPU: the number of
kernels (`kernels_per_step`), and apart from them memory copies (memcpy) and fills (memset); the
summed duration of those kernels (`kernel_ms`, each event's `self_device_time_total`) beside the wall
time of the same traced step (`profiled_step_ms`); and the verdict `bound`: "compute-bound" where the
kernels keep the GPU busy for at least COMPUTE_BOUND_SHARE of the step, else "launch-bound" (the GPU
waits on the host between kernels, so fewer or fused launches would shorten the step, and faster
kernels would not). The traced step runs under the profiler, whose per-launch bookkeeping lengthens
it a little, so read the verdict beside the untraced steps' `median_ms`. CuPy has no launch hook; all of it
comes from PyTorch's profiler (`torch.profiler.profile(activities=[ProfilerActivity.CUDA])`), which
asks CUPTI for every kernel, memcpy and memset the process runs on the GPU (`cuptiActivityEnable`,
not per library), so CuPy's and cuBLAS's kernels are seen as well as PyTorch's. One extra, untimed
step is traced after the timed ones, with the GPU synchronised before it and at its end, so that no
other step's work falls inside the trace. torch is imported for this on the GPU even without
--compare-torch; where it is missing, is a CPU build, or its profiler cannot trace the GPU, and on the
CPU, the figures are n/a with the reason (the benchmark itself never fails for it). See
`count_gpu_operations` for how the profiler's events are told apart.

--compare-torch builds the same architecture in PyTorch (`torch_vit`: the same patchify layout,
Linear patch embedding, CLS token, position embedding, pre-LN blocks with one qkv Linear viewed as
(B, T, 3, heads, head_dim), scores scaled by 1/sqrt(head_dim), explicit softmax and attn @ v,
GELU (tanh), final LayerNorm on the CLS token, head), copies scratchvit's initial weights into it,
and trains it with `torch.optim.AdamW` (same hyper-parameters and weight-decay groups),
`cross_entropy` and `clip_grad_norm_`, on the same batch. The parameter counts must be equal (the
run stops otherwise), and the first step's loss of both is printed: they start from the same
weights and data, so it agrees to float rounding. The timed steps are split into `--repeats`
blocks that alternate between the two libraries (scratchvit first, then torch first, ...), so that
noise from other processes hits both alike. PyTorch runs with its default settings: its default
thread count unless --threads, its default (per-parameter, on the CPU) AdamW implementation, and no
TF32 on the GPU (CuPy does not use TF32 either).

Reading the ratio: `ratio scratchvit/torch` is scratchvit's median ms per step divided by PyTorch's.
Below 1.0, scratchvit is faster; 1.25 means scratchvit takes 25% longer per step.

Threads: on the CPU scratchvit's step is data-parallel over one thread per core (see
scratchvit/train_step.py), and PyTorch uses its default of one thread per core too. `--threads N`
sets both: scratchvit's worker threads and `torch.set_num_threads(N)`. For a like-for-like
single-thread comparison (NumPy's BLAS reads its own thread count from the environment):

    OPENBLAS_NUM_THREADS=1 python -m scratchvit.bench --compare-torch --threads 1

Across processes (MPI, scratchvit/distributed.py): under `mpiexec -n N python -m scratchvit.bench`
every rank runs the benchmark; --batch-size stays the global batch, each rank trains on its shard
and the step includes the Allreduce of the gradients. Threads per rank default to the rank's share
of its node's cores (2 ranks on 2 cores: one thread each). Rank 0 prints; images per second are
those of the whole job (global batch / median step), and the report adds the time spent in the
gradient exchange per step (host clock on the CPU, CUDA events around it on the GPU; it includes
waiting for the slowest rank) and its share of the step. --compare-torch and the GPU work per step run
in one process only. To compare 2 ranks x 1 thread with 1 rank x 2 threads:

    mpiexec -n 2 python -m scratchvit.bench --steps 60
    python -m scratchvit.bench --steps 60 --threads 2

Examples
    python -m scratchvit.bench                                  # CPU, the MNIST model at batch 128
    python -m scratchvit.bench --compare-torch --steps 60       # and the same ViT in PyTorch
    python -m scratchvit.bench --device gpu --compare-torch --batch-size 512
    python -m scratchvit.bench --depth 2 --dim 32 --json > bench.json     # one JSON object, for scripts

JSON report (--json): one object with
- `device`, `config` (the model, batch, dtype, clip, lr, weight decay, seed), `timing` (clock, steps,
  warmup, rounds), `scratchvit_threads`, `ratio` (scratchvit median / torch median, or null);
- `machine`: processor, cpu_count, usable_cpus, platform, python, numpy, blas, thread_environment;
  on the GPU also `gpu` (its name), `gpu_compute_capability` ("90" for 9.0), `gpu_memory_bytes`,
  `cupy`, `cuda_driver` (the CUDA version the driver supports, "12.8"), `cuda_runtime` (CuPy's
  CUDA runtime), `nvidia_driver` (the kernel module's version from /proc/driver/nvidia/version, or
  null); with torch: `torch`, `torch_threads`, and on the GPU `torch_cuda` (the CUDA torch was built
  with);
- `mpi` (under mpiexec, else null): `ranks`, `nodes`, `threads_per_rank`, `library`, `exchange`
  (mpi, cuda-aware-mpi, nccl or host-staged), `exchange_median_ms`, `exchange_q1_ms`, `exchange_q3_ms`,
  `exchange_share` (exchange median / step median);
- `results`: one object per library ("scratchvit", "torch") with `library`, `label`, `median_ms`,
  `min_ms`, `max_ms`, `q1_ms`, `q3_ms`, `iqr_ms`, `img_per_s` (images per second at the median),
  `steps`, `times_ms`, `parameters`, `first_loss`, `memory` (the details above,
  with a `note`), `peak_bytes` and `used_bytes` (copied from `memory`; null where not measured:
  used_bytes is in use after the steps: CuPy's pool on the GPU, `torch.cuda.memory_allocated()`
  for PyTorch), `kernels_per_step` (kernels one step runs, or null) and `gpu_operations` (`kernels`,
  `memcpy`, `memset`, `total`, `kernel_ms`, `profiled_step_ms`, `kernel_share` (kernel_ms /
  profiled_step_ms), `bound` ("launch-bound" or "compute-bound"), and `reason`: null when traced,
  else why not; the figures are then null).

Exit status: 0 after a run; 2 for a bad option, no usable GPU backend, or torch missing for
--compare-torch; 1 if the two models' parameter counts differ.
"""
import argparse
import json
import math
import os
import platform
import sys
import time
import tracemalloc

import numpy

from .backend import BackendUnavailable, get_backend, keep_freed_host_memory, to_host
from .config import TrainConfig
from .distributed import SINGLE_PROCESS, DistributedError, world
from .layers import SoftmaxCrossEntropy
from .optim import AdamW, parameter_groups
from .train_step import TrainStep
from .vit import ViT

BENCH_BATCH_SIZE = 128   # the batch of the PyTorch reference figures in the README (training uses 64)

MIB = 2 ** 20
TORCH_NEEDED = "torch is needed only for --compare-torch: pip install torch"
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
# the PyTorch reference model (imported lazily: torch is not a dependency of scratchvit)

_TORCH_VIT = None


def _torch_vit_class():
    global _TORCH_VIT
    if _TORCH_VIT is not None:
        return _TORCH_VIT
    import torch
    nn, F = torch.nn, torch.nn.functional

    class TorchAttention(nn.Module):
        def __init__(self, dim, heads, **factory):
            super().__init__()
            self.heads, self.head_dim = heads, dim // heads
            self.scale = 1.0 / math.sqrt(self.head_dim)
            self.qkv = nn.Linear(dim, 3 * dim, **factory)
            self.proj = nn.Linear(dim, dim, **factory)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)   # (B, H, T, d)
            attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)                    # (B, H, T, T)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, T, D))

    class TorchEncoderBlock(nn.Module):
        def __init__(self, dim, heads, mlp_dim, eps, **factory):
            super().__init__()
            self.attn_norm = nn.LayerNorm(dim, eps=eps, **factory)
            self.attn = TorchAttention(dim, heads, **factory)
            self.mlp_norm = nn.LayerNorm(dim, eps=eps, **factory)
            self.fc1 = nn.Linear(dim, mlp_dim, **factory)
            self.fc2 = nn.Linear(mlp_dim, dim, **factory)

        def forward(self, x):
            x = x + self.attn(self.attn_norm(x))
            return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x)), approximate="tanh"))

    class TorchViT(nn.Module):
        """scratchvit's ViT (dropout 0) in PyTorch, with the same parameter names, in the same order."""

        def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels=1,
                     eps=1e-5, dtype=torch.float32, device="cpu"):
            super().__init__()
            factory = dict(dtype=dtype, device=device)
            self.patch_size = patch_size
            num_patches = (image_size // patch_size) ** 2
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **factory))
            self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim, **factory))
            self.patch_embed = nn.Linear(patch_size * patch_size * channels, dim, **factory)
            self.blocks = nn.ModuleList(TorchEncoderBlock(dim, heads, mlp_dim, eps, **factory) for _ in range(depth))
            self.norm = nn.LayerNorm(dim, eps=eps, **factory)
            self.head = nn.Linear(dim, num_classes, **factory)

        def forward(self, images):
            B, C, H, W = images.shape
            p = self.patch_size
            patches = (images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
                       .reshape(B, (H // p) * (W // p), p * p * C))                               # like Patchify
            tokens = self.patch_embed(patches)                                                     # (B, N, D)
            x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1) + self.pos_embedding  # (B, T, D)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x[:, 0]))                                                   # (B, K)

        @staticmethod
        def _is_linear_weight(name, tensor):
            return name.endswith(".weight") and tensor.ndim == 2     # torch stores (out, in), scratchvit (in, out)

        def load_scratchvit_state(self, state):
            """Copy a scratchvit `state_dict()` (NumPy arrays, Linear weights (in, out)) into this model."""
            own = dict(self.named_parameters())
            if set(own) != set(state):
                difference = sorted(set(own) ^ set(state))
                raise ValueError(f"the PyTorch model and scratchvit's differ in parameter {difference[0]!r}")
            with torch.no_grad():
                for name, parameter in own.items():
                    value = torch.from_numpy(numpy.ascontiguousarray(to_host(state[name])))
                    if self._is_linear_weight(name, parameter):
                        value = value.T
                    if tuple(value.shape) != tuple(parameter.shape):
                        raise ValueError(f"parameter {name!r}: scratchvit has shape {tuple(state[name].shape)}, "
                                         f"the PyTorch model {tuple(parameter.shape)}")
                    parameter.copy_(value)
            return self

        def scratchvit_gradients(self):
            """{name: NumPy gradient} in scratchvit's layout (Linear weights (in, out))."""
            return {name: (p.grad.T if self._is_linear_weight(name, p) else p.grad).detach().cpu().numpy()
                    for name, p in self.named_parameters()}

        def scratchvit_state(self):
            """{name: NumPy copy of the parameter} in scratchvit's layout."""
            return {name: (p.T if self._is_linear_weight(name, p) else p).detach().cpu().numpy().copy()
                    for name, p in self.named_parameters()}

    _TORCH_VIT = TorchViT
    return TorchViT


def torch_vit(config, *, dtype="float32", device="cpu", state=None):
    """The PyTorch twin of `ViT(**config)`; with `state` (a scratchvit state_dict) its weights are copied in."""
    import torch
    model = _torch_vit_class()(**config, dtype=getattr(torch, str(dtype)), device=device)
    if state is not None:
        model.load_scratchvit_state(state)
    return model


class TorchTrainStep:
    """PyTorch's version of `TrainStep`: zero_grad, forward, cross_entropy, backward, clip_grad_norm_, AdamW."""

    def __init__(self, model, *, lr=TRAINING.lr, weight_decay=TRAINING.weight_decay, clip_grad_norm=None):
        import torch
        self.torch, self.model, self.clip_grad_norm = torch, model, clip_grad_norm
        decayed, not_decayed = [], []
        for name, parameter in model.named_parameters():     # the rule of scratchvit.train.parameter_groups
            (decayed if name.endswith(".weight") and parameter.ndim == 2 else not_decayed).append(parameter)
        self.optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                            {"params": not_decayed, "weight_decay": 0.0}], lr=lr)

    def __call__(self, images, labels):
        self.optimizer.zero_grad()
        loss = self.torch.nn.functional.cross_entropy(self.model(images), labels)
        loss.backward()
        if self.clip_grad_norm:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        return loss


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


def torch_runner(torch, config, state, args, images, labels):
    device = "cuda" if args.device == "gpu" else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = torch_vit(config, dtype=args.dtype, device=device, state=state)
    model.train()
    train_step = TorchTrainStep(model, clip_grad_norm=args.clip_grad_norm or None)
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
# GPU work per step, traced with PyTorch's profiler (CuPy has no launch hook)

# torch.profiler's events carry libkineto's activity type as a string (`FunctionEvent.activity_type`,
# filled from `KinetoEvent.activity_type()` in torch/autograd/profiler.py); the names are libkineto's
# (kineto libkineto/include/ActivityType.h). CUPTI's kernel, memcpy and memset records become these three.
GPU_OPERATION_KINDS = {"kernel": "kernels", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}
NOT_COUNTED = dict(kernels=None, memcpy=None, memset=None, total=None, kernel_ms=None, profiled_step_ms=None,
                   kernel_share=None, bound=None)
# At least this share of a step's wall time in kernels: the GPU is busy, and the step is compute-bound.
COMPUTE_BOUND_SHARE = 0.8


def count_gpu_operations(events):
    """{"kernels", "memcpy", "memset", "total"}: how many of torch.profiler's `events` ran on the GPU, by kind.

    An event's `activity_type` tells them apart: "kernel", "gpu_memcpy", "gpu_memset"; every other
    event is not a GPU operation of the step (CPU ops, CUDA runtime and driver calls, whose
    device_type is CPU; synchronisation and annotation ranges, whose device_type is CUDA like the
    kernels', which is why device_type alone would over-count). A torch whose events have no
    `activity_type` falls back on device_type CUDA and libkineto's names for copies and fills,
    "Memcpy HtoD (Pageable -> Device)", "Memset (Device)" (kineto libkineto/src/CuptiActivity.h).
    """
    counts = dict(kernels=0, memcpy=0, memset=0)
    for event in events:
        kind = _gpu_operation_kind(event)
        if kind is not None:
            counts[kind] += 1
    counts["total"] = sum(counts.values())
    return counts


def kernel_milliseconds(events):
    """The summed duration of the kernels among torch.profiler's `events`, in ms. A kernel event's
    `self_device_time_total` is its own time on the GPU in microseconds (for a CUDA event torch returns
    `time_range.elapsed_us()`: torch/autograd/profiler_util.py, FunctionEvent.self_device_time_total)."""
    return sum(event.self_device_time_total for event in events if _gpu_operation_kind(event) == "kernels") / 1000.0


def bound_verdict(kernel_ms, step_ms):
    """(kernel share of the step, "compute-bound" or "launch-bound"), or (None, None) without a step time."""
    if not step_ms or step_ms <= 0:
        return None, None
    share = kernel_ms / step_ms
    return share, "compute-bound" if share >= COMPUTE_BOUND_SHARE else "launch-bound"


def _gpu_operation_kind(event):
    activity_type = getattr(event, "activity_type", None)
    if activity_type is not None:
        return GPU_OPERATION_KINDS.get(activity_type)
    if getattr(event.device_type, "name", None) != "CUDA":          # torch.autograd.DeviceType.CUDA
        return None
    if event.name.startswith("Memcpy"):
        return "memcpy"
    if event.name.startswith("Memset"):
        return "memset"
    return "kernels"


def torch_for_launch_counting(device, torch=None):
    """(torch, None) where torch's profiler can trace the GPU here, else (None, the reason in a few words)."""
    if device != "gpu":
        return None, "counted on the GPU only: --device gpu"
    try:
        if torch is None:
            import torch
        if not torch.cuda.is_available():
            return None, f"torch {torch.__version__} sees no GPU (a CPU build?); its profiler does the counting"
        if torch.profiler.ProfilerActivity.CUDA not in torch.profiler.supported_activities():
            return None, f"torch {torch.__version__}'s profiler cannot trace the GPU here (no CUPTI)"
    except ImportError:
        return None, "torch is not installed; its profiler does the counting (pip install torch, a CUDA build)"
    except Exception as error:      # a broken CUDA install can raise anything on import or on the first query
        return None, f"torch is unusable here: {_one_line(error)}"
    return torch, None


def profile_gpu_operations(torch, step, synchronize, clock=time.perf_counter):
    """Run `step()` once under torch.profiler, tracing the GPU only: count_gpu_operations' dict plus
    `kernel_ms` (the kernels' summed time) and `profiled_step_ms` (the traced step's wall time, the GPU
    waited for at its end).

    libkineto drops GPU records that fall outside the trace's window (GenericActivityProfiler::outOfRange),
    so waiting for the GPU before the trace keeps earlier steps' work out of it, and waiting at the end
    of the step (`synchronize`, the step's own library's wait) keeps none of this step's work out.
    """
    synchronize()
    torch.cuda.synchronize()     # every stream of the device; also sets up torch's CUDA state outside the trace
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        started = clock()
        step()
        synchronize()
        step_ms = (clock() - started) * 1000.0
    events = profiler.events()
    return dict(count_gpu_operations(events), kernel_ms=kernel_milliseconds(events), profiled_step_ms=step_ms)


def gpu_work(runner, torch, reason):
    """The runner's GPU work in one untimed, traced step: profile_gpu_operations' dict plus `kernel_share`,
    `bound` and `reason`, which is None when traced; where it cannot be traced the figures are None and
    `reason` says why."""
    if torch is not None:
        try:
            work = profile_gpu_operations(torch, runner.step, runner.synchronize)
            if work["total"] > 0:
                share, bound = bound_verdict(work["kernel_ms"], work["profiled_step_ms"])
                return dict(work, kernel_share=share, bound=bound, reason=None)
            reason = "the profiler recorded no GPU work in the step (CUPTI not tracing?)"
        except Exception as error:        # tracing is extra: report it, never fail the benchmark for it
            reason = f"tracing failed: {_one_line(error)}"
    return dict(NOT_COUNTED, reason=reason)


def _one_line(error, limit=200):
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# the report

def summarize(times_ms, batch_size):
    times = numpy.asarray(times_ms, dtype=float)
    q1, median, q3 = numpy.percentile(times, [25, 50, 75])
    return dict(median_ms=float(median), min_ms=float(times.min()), max_ms=float(times.max()), q1_ms=float(q1),
                q3_ms=float(q3), iqr_ms=float(q3 - q1), img_per_s=batch_size * 1e3 / float(median),
                steps=int(times.size), times_ms=[round(float(t), 4) for t in times])


def cpu_name():
    name = platform.processor()
    if not name or name == platform.machine():
        try:
            with open("/proc/cpuinfo") as file:
                for line in file:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return name or platform.machine()


def _blas():
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:       # older NumPy: no mode="dicts"; not worth printing the whole configuration
        return None


def machine_info(backend, torch=None):
    info = dict(processor=cpu_name(), cpu_count=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), numpy=numpy.__version__, blas=_blas(),
                thread_environment={name: os.environ[name] for name in
                                    ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if name in os.environ})
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if backend.name == "gpu":
        cupy = backend.xp
        device = cupy.cuda.Device()
        properties = cupy.cuda.runtime.getDeviceProperties(device.id)
        name = properties["name"]
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        info["gpu_compute_capability"] = device.compute_capability
        info["gpu_memory_bytes"] = int(properties["totalGlobalMem"])
        info["cupy"] = cupy.__version__
        info["cuda_driver"] = _cuda_version(cupy.cuda.runtime.driverGetVersion)     # newest CUDA the driver runs
        info["cuda_runtime"] = _cuda_version(cupy.cuda.runtime.runtimeGetVersion)   # the runtime CuPy uses
        info["nvidia_driver"] = _nvidia_driver()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if backend.name == "gpu":
            info["torch_cuda"] = torch.version.cuda
    return info


def _cuda_version(get_version):
    """CUDA's version integer (1000 * major + 10 * minor) as "major.minor", or None if it cannot be read."""
    try:
        version = int(get_version())
    except Exception:
        return None
    return f"{version // 1000}.{version % 1000 // 10}"


def _nvidia_driver(path="/proc/driver/nvidia/version"):
    """The NVIDIA kernel module's version ("550.54.15"), read from `path` (Linux), or None."""
    try:
        with open(path) as file:
            words = file.readline().split()
    except OSError:
        return None
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024"
    return next((word for word in words if word[:1].isdigit() and "." in word), None)


def _mib(value):
    return f"{value / MIB:.1f} MiB" if value is not None else "n/a"


def _memory_text(result, device):
    memory = result["memory"]
    if device == "gpu" and result["library"] == "scratchvit":
        return f"peak {_mib(memory['peak_bytes'])} (pool held; {_mib(memory['used_bytes'])} in use)"
    if device == "gpu":
        return f"peak {_mib(memory['peak_bytes'])} (reserved; {_mib(memory['allocated_peak_bytes'])} allocated)"
    if memory["peak_bytes"] is None:
        return "peak n/a"
    return f"peak {_mib(memory['peak_bytes'])} (one step, traced)"


def _gpu_work_text(results):
    """One line: each library's GPU work per step and its verdict, or n/a with the reason (said once if shared)."""
    reasons = {result["gpu_operations"]["reason"] for result in results.values()}
    if len(reasons) == 1 and None not in reasons:
        return f"GPU work per step: n/a ({reasons.pop()})"
    parts = []
    for result in results.values():
        work = result["gpu_operations"]
        if work["reason"] is None:
            parts.append(f"{result['label']} {work['kernels']} kernels (+{work['memcpy']} memcpy, "
                         f"+{work['memset']} memset), {work['kernel_ms']:.2f} ms in kernels of a "
                         f"{work['profiled_step_ms']:.2f} ms traced step ({work['kernel_share']:.0%}): {work['bound']}")
        else:
            parts.append(f"{result['label']} n/a ({work['reason']})")
    return "GPU work per step: " + "; ".join(parts)


def format_table(report):
    c, t, m = report["config"], report["timing"], report["machine"]
    lines = [f"device {report['device']}  config image {c['image_size']} patch {c['patch_size']} dim {c['dim']} "
             f"depth {c['depth']} heads {c['heads']} mlp {c['mlp_dim']} batch {c['batch_size']} {c['dtype']}  "
             f"clip {c['clip_grad_norm']:g}"]
    machine = f"machine {m['processor']}, {m['cpu_count']} CPUs"
    if "usable_cpus" in m and m["usable_cpus"] != m["cpu_count"]:
        machine += f" ({m['usable_cpus']} usable)"
    machine += f"; numpy {m['numpy']}" + (f" ({m['blas']})" if m["blas"] else "")
    if m["thread_environment"]:
        machine += " " + " ".join(f"{key}={value}" for key, value in m["thread_environment"].items())
    if "gpu" in m:
        machine += f"; {m['gpu']}, cupy {m['cupy']}, CUDA runtime {m['cuda_runtime']}, driver {m['cuda_driver']}"
        if m.get("nvidia_driver"):
            machine += f" ({m['nvidia_driver']})"
    if "torch" in m:
        machine += f"; torch {m['torch']} ({m['torch_threads']} threads)"
    lines.append(machine)
    mpi = report.get("mpi")
    if mpi:
        lines.append(f"MPI: {mpi['ranks']} ranks on {mpi['nodes']} node(s) x {mpi['threads_per_rank']} thread(s) each "
                     f"({mpi['library']}); batch {c['batch_size']} split over the ranks; img/s of the whole job")
        lines.append(f"gradient exchange ({mpi['exchange']}): median {mpi['exchange_median_ms']:.2f} ms per step "
                     f"(IQR {mpi['exchange_q1_ms']:.2f}-{mpi['exchange_q3_ms']:.2f}), "
                     f"{mpi['exchange_share']:.1%} of the step")
    else:
        lines.append(f"scratchvit step threads: {report['scratchvit_threads']}")
    lines.append(f"timing {t['clock']}: {t['steps']} steps per library after {t['warmup']} warm-up"
                 + (f", in {t['rounds']} alternating blocks" if len(report["results"]) > 1 else ""))
    results = list(report["results"].values())
    width = max(len(result["label"]) for result in results)
    number_width = max(len(f"{result['median_ms']:.1f}") for result in results)
    for result in results:
        lines.append(f"{result['label']:<{width}}  median {result['median_ms']:>{number_width}.1f} ms  "
                     f"(min {result['min_ms']:.1f}, IQR {result['q1_ms']:.1f}-{result['q3_ms']:.1f})  "
                     f"{result['img_per_s']:>6.0f} img/s  {_memory_text(result, report['device'])}")
    lines.append(_gpu_work_text(report["results"]))
    if report.get("ratio") is not None:
        torch_result = report["results"]["torch"]
        scratch = report["results"]["scratchvit"]
        lines.append(f"ratio scratchvit/torch: {report['ratio']:.2f}  (below 1 = scratchvit faster)")
        loss = ""
        if scratch["first_loss"] is not None and torch_result["first_loss"] is not None:
            loss = f"; first-step loss {scratch['first_loss']:.5f} vs {torch_result['first_loss']:.5f}"
        lines.append(f"parameters {scratch['parameters']:,} in both{loss}")
    else:
        lines.append(f"parameters {results[0]['parameters']:,}")
    return "\n".join(lines)


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
    torch = None
    if args.compare_torch:
        try:
            import torch
        except ImportError:
            return _error(TORCH_NEEDED)
        if args.device == "gpu" and not torch.cuda.is_available():
            return _error(f"--compare-torch --device gpu needs a CUDA build of torch (this one is {torch.__version__}, "
                          "which sees no GPU)")
    config = model_config(args)
    try:
        model = ViT(**config, dtype=args.dtype, seed=args.seed)
    except ValueError as error:
        return _error(error)
    previous_threads = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None and args.threads:
            torch.set_num_threads(args.threads)
        return _run(args, backend, config, model, torch, communicator)
    finally:
        if torch is not None:
            torch.set_num_threads(previous_threads)


def _run(args, backend, config, model, torch, communicator=SINGLE_PROCESS):
    rng = numpy.random.default_rng(args.seed + 1)
    images = rng.standard_normal((args.batch_size, args.channels, args.image_size, args.image_size)).astype(args.dtype)
    labels = rng.integers(0, args.num_classes, args.batch_size)
    initial_state = model.state_dict()
    model.to(backend)
    model.train()
    runners = [scratchvit_runner(model, backend, images, labels, args.clip_grad_norm, args.threads, communicator)]
    exchange_timer = runners[0].exchange_timer
    if torch is not None:
        runners.append(torch_runner(torch, config, initial_state, args, images, labels))
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
