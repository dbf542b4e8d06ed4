"""What one training step puts on the GPU, traced with PyTorch's profiler (CuPy has no launch hook).

A small ViT's GPU step may cost more in kernel launches than in the kernels themselves, so the
benchmark traces one untimed step and reports the kernels it ran (and apart from them memory copies
and fills), their summed time beside the traced step's wall time, and the verdict "compute-bound"
where the kernels fill at least COMPUTE_BOUND_SHARE of the step, else "launch-bound" (the GPU waits on
the host between kernels, so fewer or fused launches would shorten the step, faster kernels would
not). torch.profiler asks CUPTI for every kernel, memcpy and memset the process runs
(`cuptiActivityEnable`, not per library), so CuPy's and cuBLAS's kernels are seen as well as PyTorch's.
"""
import time


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
