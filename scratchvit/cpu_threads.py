"""CPU tuning for the NumPy training step: glibc's allocator and OpenBLAS's thread count.

Neither changes a result; both change how fast the CPU step runs. The training loop and the
benchmark call `keep_freed_host_memory` on the CPU; the data-parallel step (train_step.py) and the
MPI ranks (distributed.py) limit BLAS threads so that workers do not oversubscribe the cores.
"""
import ctypes
import glob
import os

import numpy


def keep_freed_host_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same large temporaries (a few MB each) every step.
    By default glibc returns freed memory at the top of the heap to the OS and serves big requests
    with fresh mmap()s, so every step page-faults all of that memory in again: on a small ViT this
    costs a fifth of the CPU step time, most of it in LayerNorm. With these settings freed memory
    stays in the process (the heap grows to the step's peak and stays: about 190 MiB of temporaries
    at batch 128, 95 MiB at batch 64, as `python -m scratchvit.bench` reports).
    Called by the training loop and the benchmark on the CPU; the library does not call it on
    import. Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 256 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30)
                and mallopt(M_TOP_PAD, 64 << 20))


_blas_thread_limiter = []   # [function or None], found once


def _find_blas_thread_limiter():
    """OpenBLAS's `openblas_set_num_threads_local` (OpenBLAS >= 0.3.27, as in NumPy's own wheels), or None."""
    package = os.path.dirname(numpy.__file__)
    candidates = glob.glob(os.path.join(package, "..", "numpy.libs", "*openblas*"))
    candidates += glob.glob(os.path.join(package, ".dylibs", "*openblas*"))
    for path in candidates:
        try:
            return getattr(ctypes.CDLL(path), "openblas_set_num_threads_local")
        except (OSError, AttributeError):
            continue
    return None


def can_limit_blas_threads():
    """True where `limit_blas_to_one_thread_here` works (NumPy on OpenBLAS >= 0.3.27)."""
    if not _blas_thread_limiter:
        _blas_thread_limiter.append(_find_blas_thread_limiter())
    return _blas_thread_limiter[0] is not None


def limit_blas_to_one_thread_here():
    """Make BLAS calls from the calling thread use one thread, leaving other threads' setting alone.

    Worker threads that each compute on part of a batch call this, so that two workers on two cores
    do not each start a BLAS thread pool of two (four busy threads on two cores is far slower).
    """
    limit_blas_threads_here(1)


def limit_blas_threads_here(count):
    """Make BLAS calls from the calling thread use at most `count` threads (other threads keep theirs).

    An MPI rank calls this on its main thread with its share of the node's cores (distributed.py), so
    that two ranks on two cores do not each run a BLAS pool as wide as the machine."""
    if not can_limit_blas_threads():
        raise RuntimeError("this NumPy's BLAS cannot limit its threads per calling thread")
    _blas_thread_limiter[0](int(count))
