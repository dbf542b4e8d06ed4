"""`python -m scratchvit.bench`: it runs, reports sane fields, and compares like with like.

No timing thresholds: a benchmark measures, these tests check that what it measures is the right
thing and that it reports it. The PyTorch reference it compares with (tools/torch_reference.py) is held
against scratchvit in tests/test_torch_parity.py.
"""
import importlib.util
import json
import pathlib
import sys
import types

import numpy
import pytest

from conftest import on_gpu   # tests/ is on sys.path under pytest's default import mode
from scratchvit import bench, bench_report, gpu_trace, machine
from scratchvit.backend import get_backend
from scratchvit.cupy_check import BackendUnavailable
from scratchvit.vit import ViT

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--image-size", "8", "--patch-size", "4", "--dim", "8", "--depth", "1", "--heads", "2", "--mlp-dim", "16",
        "--num-classes", "5", "--batch-size", "4"]
QUICK = ["--steps", "2", "--warmup", "1"]
TINY_CONFIG = dict(image_size=8, patch_size=4, num_classes=5, dim=8, depth=1, heads=2, mlp_dim=16, channels=1)


def run_json(capsys, *options):
    assert bench.main([*QUICK, *TINY, *options, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_has_positive_measurements(capsys):
    report = run_json(capsys)
    result = report["results"]["scratchvit"]
    for field in ("median_ms", "min_ms", "q1_ms", "q3_ms", "img_per_s", "peak_bytes"):
        assert result[field] > 0, field
    assert result["min_ms"] <= result["q1_ms"] <= result["median_ms"] <= result["q3_ms"]
    assert result["img_per_s"] == pytest.approx(4 * 1e3 / result["median_ms"])
    assert result["used_bytes"] is None                              # the CPU figure is the traced peak only
    assert result["steps"] == len(result["times_ms"]) == 2
    assert result["parameters"] == sum(p.size for p in ViT(**TINY_CONFIG).parameters())
    assert result["memory"]["state_bytes"] > 0
    assert report["ratio"] is None and "torch" not in report["results"]
    assert report["config"]["batch_size"] == 4 and report["config"]["dim"] == 8
    assert report["timing"]["steps"] == 2 and report["timing"]["warmup"] == 1


def test_table_output(capsys):
    assert bench.main([*QUICK, *TINY]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device cpu  config image 8 patch 4 dim 8 depth 1 heads 2 mlp 16 batch 4 float32")
    assert "scratchvit  median" in out and "img/s" in out and "numpy" in out


def test_bad_options_exit_2(capsys):
    assert bench.main(["--steps", "0"]) == 2
    assert bench.main([*QUICK, *TINY, "--heads", "3"]) == 2          # dim 8 is not divisible by 3 heads
    assert bench.main(["--device", "tpu"]) == 2                      # argparse's own error
    err = capsys.readouterr().err
    assert "--steps must be at least 1" in err and "divisible" in err


def test_compare_torch_without_torch_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)                  # makes `import torch` fail
    assert bench.main([*QUICK, *TINY, "--compare-torch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install torch" in err and "--compare-torch" in err


def _torch_counts_gpu_launches():
    """True where torch imports, is a CUDA build that sees the GPU, and its profiler can trace it."""
    return gpu_trace.torch_for_launch_counting("gpu")[0] is not None


@on_gpu
def test_gpu_json_report(capsys):
    assert bench.main(["--steps", "3", "--warmup", "2", *TINY, "--device", "gpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["results"]["scratchvit"]
    assert report["timing"]["clock"] == "CUDA events" and "cuda_graph" not in report["config"]
    assert result["median_ms"] > 0 and result["peak_bytes"] > 0 and result["memory"]["state_bytes"] > 0
    assert 0 < result["used_bytes"] <= result["peak_bytes"]
    assert result["img_per_s"] > 0
    assert numpy.isfinite(result["first_loss"])
    machine = report["machine"]
    assert machine["gpu"] and machine["cupy"] and machine["gpu_memory_bytes"] > 0
    for key in ("cuda_driver", "cuda_runtime"):
        major, minor = machine[key].split(".")
        assert int(major) >= 11 and int(minor) >= 0, (key, machine[key])
    work = result["gpu_operations"]
    if _torch_counts_gpu_launches():
        # a training step runs far more kernels than a handful: forward, backward and AdamW of every layer
        assert work["reason"] is None and result["kernels_per_step"] == work["kernels"] > 10
        assert work["total"] == work["kernels"] + work["memcpy"] + work["memset"]
        assert 0 < work["kernel_ms"] and 0 < work["profiled_step_ms"]
        assert work["kernel_share"] == pytest.approx(work["kernel_ms"] / work["profiled_step_ms"])
        assert work["bound"] in ("launch-bound", "compute-bound")
    else:
        assert result["kernels_per_step"] is None and work["reason"]


@on_gpu
def test_profiler_counts_cupy_launches_exactly():
    """CUPTI sees CuPy's own launches: a known sequence of one kernel, one copy and one fill, counted as such."""
    torch, reason = gpu_trace.torch_for_launch_counting("gpu")
    if torch is None:
        pytest.skip(reason)
    import cupy
    a = cupy.arange(1024, dtype=cupy.float32)
    b = cupy.ones(1024, dtype=cupy.float32)
    host = numpy.empty(1024, dtype=numpy.float32)
    stream = cupy.cuda.get_current_stream()

    def step():
        total = a + b                                                      # one elementwise kernel
        total.get(out=host)                                                # one device-to-host copy
        cupy.cuda.runtime.memsetAsync(b.data.ptr, 0, b.nbytes, stream.ptr)  # one fill: b = 0
        return total

    step()                                     # compiles the kernel outside the trace (and zeroes b)
    counts = gpu_trace.profile_gpu_operations(torch, step, stream.synchronize)
    assert {key: counts[key] for key in ("kernels", "memcpy", "memset", "total")} == dict(
        kernels=1, memcpy=1, memset=1, total=3)
    # one small kernel: its time is positive and inside the traced step's wall time
    assert 0 < counts["kernel_ms"] < counts["profiled_step_ms"]
    numpy.testing.assert_array_equal(host, numpy.arange(1024, dtype=numpy.float32))      # a + 0: the step ran
    numpy.testing.assert_array_equal(b.get(), numpy.zeros(1024, dtype=numpy.float32))


@on_gpu
def test_gpu_compare_torch_report(capsys):
    """Both libraries on the GPU: same start (first loss), both timed, both counted where torch can count."""
    torch, reason = gpu_trace.torch_for_launch_counting("gpu")
    if torch is None:
        pytest.skip(reason)
    assert bench.main(["--steps", "2", "--warmup", "1", *TINY, "--device", "gpu", "--compare-torch", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ours, theirs = report["results"]["scratchvit"], report["results"]["torch"]
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-4)     # float32 on two libraries
    assert report["ratio"] == pytest.approx(ours["median_ms"] / theirs["median_ms"])
    assert 0 < theirs["used_bytes"] <= theirs["memory"]["allocated_peak_bytes"] <= theirs["peak_bytes"]
    for result in (ours, theirs):
        work = result["gpu_operations"]
        assert work["reason"] is None and result["kernels_per_step"] > 10 and work["bound"], work
    assert report["machine"]["torch_cuda"]


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_gpu_without_cupy_exits_2(capsys):
    with pytest.raises(BackendUnavailable) as expected:
        get_backend("gpu")
    assert bench.main([*QUICK, *TINY, "--device", "gpu"]) == 2
    assert capsys.readouterr().err == f"error: {expected.value}\n"


def test_cuda_event_clock_times_each_step_and_waits_for_the_last_event():
    """The GPU clock's logic, with stand-in events (a device clock that the steps advance)."""
    device_ms = [0.0]
    log = []

    class FakeEvent:
        def record(self):
            self.at = device_ms[0]
            log.append("record")

        def synchronize(self):
            log.append("synchronize")

    durations = iter([3.0, 5.0, 4.0])

    def step():
        device_ms[0] += next(durations)

    clock = bench.CudaEventClock(FakeEvent, lambda start, end: end.at - start.at)
    assert clock.time(step, 3) == [3.0, 5.0, 4.0]
    assert log == ["record"] * 6 + ["synchronize"]          # queued back to back, one wait at the end


# ------------------------------------------------------------------------------------------------
# GPU work per step, with stand-in profiler events

class FakeDeviceType:
    """Stands for torch.autograd.DeviceType: the code reads only its `name`."""

    def __init__(self, name):
        self.name = name


CPU, CUDA = FakeDeviceType("CPU"), FakeDeviceType("CUDA")


def fake_event(name, device_type, activity_type, self_device_time_total=0.0):
    """A torch.profiler FunctionEvent as count_gpu_operations sees it; activity_type None: an older torch."""
    event = types.SimpleNamespace(name=name, device_type=device_type, self_device_time_total=self_device_time_total)
    if activity_type is not None:
        event.activity_type = activity_type
    return event


# what one traced step looks like: libkineto's activity types and CUPTI's names
# (the last figure: self_device_time_total in microseconds; only the kernels' count as kernel time)
TRACE = [("cuLaunchKernel", CPU, "cuda_driver", 0.0),
         ("cudaLaunchKernel", CPU, "cuda_runtime", 0.0),
         ("cudaMemcpyAsync", CPU, "cuda_runtime", 0.0),
         ("cupy_add__float32_float32_float32", CUDA, "kernel", 250.0),
         ("void gemmSN_NN_kernel<float, 128, 2, 4, 8, 2, 4>(...)", CUDA, "kernel", 1000.0),
         ("ampere_sgemm_32x32_sliced1x4_nn", CUDA, "kernel", 750.0),
         ("Memcpy DtoH (Device -> Pageable)", CUDA, "gpu_memcpy", 400.0),
         ("Memcpy HtoD (Pageable -> Device)", CUDA, "gpu_memcpy", 400.0),
         ("Memset (Device)", CUDA, "gpu_memset", 100.0),
         ("Stream Sync", CUDA, "cuda_sync", 5000.0),          # device_type CUDA, but not a launch
         ("aten::add", CPU, "cpu_op", 2000.0)]


def test_count_gpu_operations_by_activity_type():
    events = [fake_event(*event) for event in TRACE]
    assert gpu_trace.count_gpu_operations(events) == dict(kernels=3, memcpy=2, memset=1, total=6)
    assert gpu_trace.count_gpu_operations([]) == dict(kernels=0, memcpy=0, memset=0, total=0)


def test_count_gpu_operations_without_activity_type_uses_device_and_names():
    events = [fake_event(name, device_type, None) for name, device_type, kind, _ in TRACE if kind != "cuda_sync"]
    assert gpu_trace.count_gpu_operations(events) == dict(kernels=3, memcpy=2, memset=1, total=6)


def test_count_gpu_operations_trusts_activity_type_over_the_name():
    events = [fake_event("Memcpy-like kernel name", CUDA, "kernel"), fake_event("my_kernel", CUDA, "gpu_memset")]
    assert gpu_trace.count_gpu_operations(events) == dict(kernels=1, memcpy=0, memset=1, total=2)


class FakeTorch:
    """torch as profile_gpu_operations uses it: cuda.synchronize and profiler.profile, logging the order."""

    def __init__(self, log, events):
        self.cuda = types.SimpleNamespace(synchronize=lambda: log.append("torch.cuda.synchronize"))
        outer = self

        class Profile:
            def __init__(self, activities):
                log.append(f"profile {activities}")

            def __enter__(self):
                log.append("trace starts")
                return self

            def __exit__(self, *exc_info):
                log.append("trace stops")

            def events(self):
                return outer.events

        self.events = events
        self.profiler = types.SimpleNamespace(profile=Profile, ProfilerActivity=types.SimpleNamespace(CUDA="CUDA"))


def test_kernel_milliseconds_sums_the_kernels_only():
    events = [fake_event(*event) for event in TRACE]
    assert gpu_trace.kernel_milliseconds(events) == pytest.approx(2.0)   # 250+1000+750 us
    assert gpu_trace.kernel_milliseconds([]) == 0.0


@pytest.mark.parametrize("kernel_ms, step_ms, expected", [
    (8.0, 10.0, (0.8, "compute-bound")),        # the boundary: busy for COMPUTE_BOUND_SHARE of the step
    (7.9, 10.0, (0.79, "launch-bound")),
    (1.0, 10.0, (0.1, "launch-bound")),
    (1.0, 0.0, (None, None)),
])
def test_bound_verdict(kernel_ms, step_ms, expected):
    share, bound = gpu_trace.bound_verdict(kernel_ms, step_ms)
    assert (share if share is None else pytest.approx(share), bound) == (
        expected[0] if expected[0] is None else pytest.approx(expected[0]), expected[1])


def ticking_clock(step_seconds):
    """A clock that advances `step_seconds` at each reading."""
    readings = iter(range(1000))
    return lambda: next(readings) * step_seconds


def test_profile_gpu_operations_traces_one_step_between_waits():
    log = []
    torch = FakeTorch(log, [fake_event(*event) for event in TRACE])
    work = gpu_trace.profile_gpu_operations(torch, step=lambda: log.append("step"),
                                        synchronize=lambda: log.append("synchronize"), clock=ticking_clock(0.004))
    assert work == dict(kernels=3, memcpy=2, memset=1, total=6, kernel_ms=pytest.approx(2.0),
                        profiled_step_ms=pytest.approx(4.0))
    assert log == ["synchronize", "torch.cuda.synchronize", "profile ['CUDA']", "trace starts", "step",
                   "synchronize", "trace stops"]


def test_gpu_work_gives_the_verdict_or_the_reason_instead_of_failing():
    runner = types.SimpleNamespace(step=lambda: None, synchronize=lambda: None)
    not_counted = dict(kernels=None, memcpy=None, memset=None, total=None, kernel_ms=None, profiled_step_ms=None,
                       kernel_share=None, bound=None)
    assert gpu_trace.gpu_work(runner, None, "why not") == dict(not_counted, reason="why not")
    assert gpu_trace.gpu_work(runner, FakeTorch([], [fake_event(*TRACE[0])]), None) == dict(
        not_counted, reason="the profiler recorded no GPU work in the step (CUPTI not tracing?)")
    traced = gpu_trace.gpu_work(runner, FakeTorch([], [fake_event(*event) for event in TRACE]), None)
    assert {key: traced[key] for key in ("kernels", "memcpy", "memset", "total", "reason")} == dict(
        kernels=3, memcpy=2, memset=1, total=6, reason=None)
    assert traced["kernel_ms"] == pytest.approx(2.0) and traced["profiled_step_ms"] > 0
    assert traced["kernel_share"] == pytest.approx(2.0 / traced["profiled_step_ms"])
    assert traced["bound"] == ("compute-bound" if traced["kernel_share"] >= 0.8 else "launch-bound")

    def failing_step():
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nsecond line")

    runner.step = failing_step
    failed = gpu_trace.gpu_work(runner, FakeTorch([], []), None)
    assert failed["kernels"] is None and failed["bound"] is None and failed["reason"] == (
        "tracing failed: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED second line")


def torch_module(version, sees_gpu, activities):
    """torch as torch_for_launch_counting asks it: its version, whether it sees a GPU, what its profiler traces."""
    profiler = types.SimpleNamespace(ProfilerActivity=types.SimpleNamespace(CPU="CPU", CUDA="CUDA"),
                                     supported_activities=lambda: set(activities))
    return types.SimpleNamespace(__version__=version, cuda=types.SimpleNamespace(is_available=lambda: sees_gpu),
                                 profiler=profiler)


def test_torch_for_launch_counting_says_why_not(monkeypatch):
    assert gpu_trace.torch_for_launch_counting("cpu") == (None, "counted on the GPU only: --device gpu")
    torch, reason = gpu_trace.torch_for_launch_counting("gpu", torch_module("2.13.0+cpu", False, ["CPU"]))
    assert torch is None and "torch 2.13.0+cpu sees no GPU" in reason
    torch, reason = gpu_trace.torch_for_launch_counting("gpu", torch_module("2.13.0", True, ["CPU"]))
    assert torch is None and "cannot trace the GPU here (no CUPTI)" in reason
    usable = torch_module("2.13.0", True, ["CPU", "CUDA"])
    assert gpu_trace.torch_for_launch_counting("gpu", usable) == (usable, None)
    monkeypatch.setitem(sys.modules, "torch", None)                  # makes `import torch` fail
    torch, reason = gpu_trace.torch_for_launch_counting("gpu")
    assert torch is None and "torch is not installed" in reason


def test_gpu_work_is_na_on_the_cpu(capsys):
    result = run_json(capsys)["results"]["scratchvit"]
    assert result["kernels_per_step"] is None and "launches_per_step" not in result
    assert result["gpu_operations"] == dict(gpu_trace.NOT_COUNTED, reason="counted on the GPU only: --device gpu")
    assert bench.main([*QUICK, *TINY]) == 0
    assert "\nGPU work per step: n/a (counted on the GPU only: --device gpu)\n" in capsys.readouterr().out


def fake_gpu_backend(driver_version):
    """A Backend("gpu") whose CuPy answers the questions machine_info asks, as CuPy's runtime module does."""
    properties = {"name": b"NVIDIA H200", "totalGlobalMem": 2 ** 37}
    runtime = types.SimpleNamespace(getDeviceProperties=lambda device: properties, getDeviceCount=lambda: 1,
                                    driverGetVersion=driver_version, runtimeGetVersion=lambda: 12060)
    cupy = types.SimpleNamespace(__version__="14.2.0", cuda=types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=0, compute_capability="90"), runtime=runtime))
    return types.SimpleNamespace(name="gpu", xp=cupy)


def test_machine_info_on_the_gpu(capsys, monkeypatch, tmp_path):
    version_file = tmp_path / "version"
    version_file.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                            "GCC version:  gcc version 12.3.0\n")
    read_version_file = machine.nvidia_driver_version
    monkeypatch.setattr(machine, "nvidia_driver_version", lambda: read_version_file(version_file, ask_nvidia_smi=False))
    info = machine.machine_info(fake_gpu_backend(lambda: 12080))
    assert {key: info[key] for key in ("gpu", "gpu_compute_capability", "gpu_memory_bytes", "cupy", "cuda_driver",
                                       "cuda_runtime", "nvidia_driver")} == dict(
        gpu="NVIDIA H200", gpu_compute_capability="90", gpu_memory_bytes=2 ** 37, cupy="14.2.0", cuda_driver="12.8",
        cuda_runtime="12.6", nvidia_driver="550.54.15")

    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver")

    assert machine.machine_info(fake_gpu_backend(no_driver))["cuda_driver"] is None     # unreadable: None, no failure
    report = run_json(capsys)
    report["machine"] = info
    assert "; NVIDIA H200, cupy 14.2.0, CUDA runtime 12.6, driver 12.8 (550.54.15)" in bench_report.format_table(report)


def test_nvidia_driver_version(tmp_path):
    assert machine.nvidia_driver_version(tmp_path / "missing", ask_nvidia_smi=False) is None
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  "
                                      "Release Build  (dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 2025\n")
    assert machine.nvidia_driver_version(tmp_path / "version") == "570.86.15"


def test_gpu_work_line_per_library():
    results = {"scratchvit": dict(label="scratchvit", gpu_operations=dict(
                   kernels=812, memcpy=3, memset=0, total=815, kernel_ms=4.2, profiled_step_ms=10.5,
                   kernel_share=0.4, bound="launch-bound", reason=None)),
               "torch": dict(label="torch 2.13",
                             gpu_operations=dict(gpu_trace.NOT_COUNTED, reason="tracing failed: X"))}
    assert bench_report._gpu_work_text(results) == (
        "GPU work per step: scratchvit 812 kernels (+3 memcpy, +0 memset), 4.20 ms in kernels of a 10.50 ms traced "
        "step (40%): launch-bound; torch 2.13 n/a (tracing failed: X)")


# ------------------------------------------------------------------------------------------------
# the comparison with PyTorch

def test_compare_torch_reports_both(capsys):
    pytest.importorskip("torch")
    report = run_json(capsys, "--compare-torch", "--repeats", "2")
    ours, theirs = report["results"]["scratchvit"], report["results"]["torch"]
    assert ours["parameters"] == theirs["parameters"] > 0
    assert report["ratio"] > 0
    assert report["ratio"] == pytest.approx(ours["median_ms"] / theirs["median_ms"])
    assert theirs["median_ms"] > 0 and theirs["img_per_s"] > 0 and theirs["steps"] == 2
    assert ours["kernels_per_step"] is None and theirs["kernels_per_step"] is None       # counted on the GPU only
    # same initial weights, same batch: the first step's loss agrees to float32 rounding
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-5)
    assert report["timing"]["rounds"] == 2 and "torch" in report["machine"]


def test_compare_torch_table(capsys):
    pytest.importorskip("torch")
    assert bench.main([*QUICK, *TINY, "--compare-torch"]) == 0
    out = capsys.readouterr().out
    assert "ratio scratchvit/torch:" in out and "\ntorch " in out and "in both" in out


def test_parameter_count_mismatch_is_an_error(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    reference = bench.load_torch_reference()

    def with_an_extra_parameter(*args, **kwargs):
        model = reference.torch_vit(*args, **kwargs)
        model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3, dtype=model.head.weight.dtype)))
        return model

    monkeypatch.setattr(bench, "load_torch_reference", lambda: types.SimpleNamespace(
        torch_vit=with_an_extra_parameter, TorchTrainStep=reference.TorchTrainStep))
    assert bench.main([*QUICK, *TINY, "--compare-torch"]) == 1
    assert "architectures differ" in capsys.readouterr().err


def test_compare_torch_outside_a_checkout_exits_2(capsys, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(bench, "load_torch_reference", lambda: None)     # installed without the repository
    assert bench.main([*QUICK, *TINY, "--compare-torch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkout" in err and "tools/torch_reference.py" in err


def test_the_torch_reference_is_found_in_a_checkout_only(tmp_path):
    assert bench.load_torch_reference(roots=[tmp_path]) is None          # no tools/torch_reference.py there
    pytest.importorskip("torch")
    reference = bench.load_torch_reference()                              # this checkout's, beside the package
    assert reference is not None and callable(reference.torch_vit) and callable(reference.TorchTrainStep)
    assert bench.load_torch_reference(roots=[REPO_ROOT]) is reference     # imported once per process


def test_cuda_version_text():
    assert machine.cuda_version(lambda: 12080) == "12.8" and machine.cuda_version(lambda: 13000) == "13.0"
    assert machine.cuda_version(lambda: 0) == "none"                   # no driver

    def unreadable():
        raise RuntimeError("cudaErrorInsufficientDriver")

    assert machine.cuda_version(unreadable) is None


def test_gpu_facts_keep_what_was_learnt_before_a_failure(monkeypatch):
    """A driver too old for CuPy's CUDA fails at the device: the versions read before it stay in the facts."""
    monkeypatch.setattr(machine, "nvidia_driver_version", lambda: "535.0")
    cupy = fake_gpu_backend(lambda: 12020).xp

    def no_device(device):
        raise RuntimeError("cudaErrorInsufficientDriver")

    cupy.cuda.runtime.getDeviceProperties = no_device
    facts = {}
    with pytest.raises(RuntimeError, match="InsufficientDriver"):
        machine.add_gpu_facts(facts, cupy)
    assert facts == dict(nvidia_driver="535.0", cupy="14.2.0", cuda_runtime="12.6", cuda_driver="12.2", gpu_count=1)
