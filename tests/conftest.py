"""Shared fixtures: the backend every test runs on, and the Hypothesis profiles.

- `backend`: every test that takes it runs on NumPy ("cpu") and, where `get_backend("gpu")` works
  (CuPy imports, sees a GPU, and compiles and runs its test kernels there), on CuPy ("gpu") too;
  otherwise the GPU cases skip with get_backend's one-line reason (CuPy missing, no device, or what
  CuPy lacks to compile kernels, such as NVRTC or the CUDA headers). They carry the `gpu` marker,
  so `pytest -m "not gpu"` deselects them. `on_gpu` does the same for a test without the fixture.
  tests/test_fused_compiles.py needs no GPU, only CuPy and NVRTC, and decides for itself whether it
  can run: it does not use these.
- The repository's root is on sys.path (appended, so an installed scratchvit still wins), so that tests
  import the checkout's tools as `tools.torch_reference` and `tools.gpu_acceptance`.
- Hypothesis profiles: `ci` (fewer examples, used by .ci/run) and `dev` (more, the default),
  chosen by the environment variable HYPOTHESIS_PROFILE.
"""
import os
import pathlib
import sys

import pytest
from hypothesis import HealthCheck, settings

from scratchvit.backend import get_backend
from scratchvit.cupy_check import BackendUnavailable

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _gpu_skip_reason():
    try:
        get_backend("gpu")
    except BackendUnavailable as error:
        return str(error)
    return None


GPU_SKIP_REASON = _gpu_skip_reason()


def on_gpu(test):
    """Mark a test `gpu` and skip it, with the reason, where the GPU backend cannot be used (CuPy or a
    CUDA device missing, or CuPy unable to compile kernels; test modules import it:
    `from conftest import on_gpu`)."""
    test = pytest.mark.skipif(GPU_SKIP_REASON is not None, reason=f"no GPU backend: {GPU_SKIP_REASON}")(test)
    return pytest.mark.gpu(test)


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request):
    if request.param == "gpu" and GPU_SKIP_REASON:
        pytest.skip(f"no GPU backend: {GPU_SKIP_REASON}")
    return get_backend(request.param)
