"""What machine a measurement ran on: processor, BLAS, GPU, CUDA and driver versions.

The benchmark's JSON report (`machine`) and the GPU acceptance run's machine stage both state these
facts, so that a figure can be read with the machine that made it; both read them here.
"""
import os
import platform
import shutil
import subprocess

import numpy

NVIDIA_VERSION_FILE = "/proc/driver/nvidia/version"


def cpu_name():
    """The processor's model name ("AMD EPYC 9654 96-Core Processor"), or the machine type where unknown."""
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


def blas_name():
    """NumPy's BLAS and its version ("scipy-openblas 0.3.29"), or None."""
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:       # older NumPy: no mode="dicts"; not worth printing the whole configuration
        return None


def cuda_version(get_version):
    """CUDA's version integer from `get_version()` (1000 * major + 10 * minor) as "major.minor", "none" for 0
    (no driver), or None where it cannot be read."""
    try:
        number = int(get_version())
    except Exception:
        return None
    return f"{number // 1000}.{number % 1000 // 10}" if number else "none"


def nvidia_driver_version(path=NVIDIA_VERSION_FILE, ask_nvidia_smi=True):
    """The NVIDIA driver's version ("570.86.15") from the kernel module's version file, else (where
    `ask_nvidia_smi`) from nvidia-smi, else None."""
    try:
        with open(path) as file:
            # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Wed Jan 22 ..."
            words = file.readline().split()
        return next((word for word in words if word[:1].isdigit() and "." in word), None)
    except OSError:
        pass
    if not ask_nvidia_smi or shutil.which("nvidia-smi") is None:
        return None
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return answer.stdout.strip().splitlines()[0] if answer.returncode == 0 and answer.stdout.strip() else None


def add_gpu_facts(facts, cupy):
    """Add the driver's and CuPy's view of the current GPU to `facts`, one fact at a time, so that what was
    learnt before a failure is kept (a driver too old for CuPy's CUDA fails at the device, after the
    versions). Raises whatever CuPy raises where there is no usable GPU."""
    if "nvidia_driver" not in facts:        # the caller may have read it before importing CuPy
        facts["nvidia_driver"] = nvidia_driver_version()
    facts["cupy"] = cupy.__version__
    runtime = cupy.cuda.runtime
    facts["cuda_runtime"] = cuda_version(runtime.runtimeGetVersion)   # the runtime CuPy uses
    facts["cuda_driver"] = cuda_version(runtime.driverGetVersion)     # the newest CUDA the driver runs
    facts["gpu_count"] = int(runtime.getDeviceCount())
    device = cupy.cuda.Device()
    properties = runtime.getDeviceProperties(device.id)
    name = properties["name"]
    facts["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    facts["gpu_compute_capability"] = device.compute_capability
    facts["gpu_memory_bytes"] = int(properties["totalGlobalMem"])
    return facts


def machine_info(backend, torch=None):
    """The benchmark's `machine` facts: processor, cores, platform, Python, NumPy and its BLAS, the thread
    variables set; on the GPU the GPU facts; with torch its version, threads (and CUDA on the GPU)."""
    thread_variables = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    info = dict(processor=cpu_name(), cpu_count=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), numpy=numpy.__version__, blas=blas_name(),
                thread_environment={name: os.environ[name] for name in thread_variables if name in os.environ})
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if backend.name == "gpu":
        add_gpu_facts(info, backend.xp)
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if backend.name == "gpu":
            info["torch_cuda"] = torch.version.cuda
    return info
