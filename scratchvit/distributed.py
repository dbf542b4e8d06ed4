"""Data-parallel training across processes and machines: MPI through mpi4py, as ChainerMN does it.

    mpiexec -n 4 python train_mnist.py ...          # 4 processes ("ranks"), on one machine or many

Why processes. TrainStep's threads (train_step.py) use one machine's cores. To use several machines,
or one GPU per process, every process holds a whole replica of the model and the processes talk
through MPI, the standard engine of clusters.

What every rank does, for a global batch of B images split over N ranks:
- it starts from the same weights: drawn on the host from the seed (vit.py), so identical on every
  rank without sending them; `check_same` verifies it once, with a checksum Allreduce;
- it draws the same shuffle and the same augmentation of the whole batch (same generators, same
  seeds), then trains on its contiguous shard, images [r B / N, (r + 1) B / N), n_r of them;
- it computes the gradient of its shard's mean loss weighted by its share of the batch, as
  TrainStep's threads do with their chunks:

      L = sum_r (n_r / B) * loss_r          loss_r = the mean loss over rank r's n_r images
      dL/dtheta = sum_r (n_r / B) * dloss_r/dtheta

  so after one in-place Allreduce (SUM) of AdamW's flat gradient buffer (optim.py keeps every
  gradient in one array: one call per step), every rank holds dL/dtheta of the whole batch;
- clipping and AdamW then run on every rank on the same numbers, so the weights stay identical and
  are never sent. (Every rank receives the same sum: an Allreduce's result "appears in the receive
  buffer of all the group members" (MPI standard, MPI_ALLREDUCE), and the algorithms MPICH and Open
  MPI use either reduce each element once and broadcast it or add the same pairs in both orders,
  which IEEE addition makes equal. The checksum at the start, and the per-epoch check in train.py,
  would show a library where this fails.)

So N ranks compute what one process computes on the whole batch, up to float rounding, and
--batch-size stays the global batch: a result does not depend on N.

Communicators. `world()` returns the one of this process:
- `SingleProcess`: started without mpiexec. Every operation is a no-op on one process, and mpi4py is
  never imported, so the plain launch behaves exactly as before and costs nothing.
- `MpiCommunicator`: started by mpiexec with more than one process (the launcher's environment says
  so: `launcher_world_size`). mpi4py is imported only then; without it, one line says what to install.

Gradient exchange (`choose_exchange`): NumPy arrays go to MPI through the buffer protocol. CuPy
arrays go, in this order of preference: to a CUDA-aware MPI directly (where the library says it
takes device memory: `mpi_takes_cuda_memory`); to NCCL (cupy.cuda.nccl, the unique id broadcast over
MPI); else through host memory (copied down, reduced by MPI, copied up). The environment variable
SCRATCHVIT_GPU_ALLREDUCE=cuda-aware-mpi|nccl|host-staged forces one. Which one runs is printed.

Failures. An exception on one rank must end the whole job, never leave the others waiting in a
collective: `fail` prints that rank's one-line error and calls MPI_Abort, and on connecting, an
exception hook does the same for anything uncaught (as `python -m mpi4py` would). Ctrl-C: mpiexec
(MPICH's Hydra) forwards the first SIGINT to every process; train.py makes the ranks agree on the
step to stop at, then rank 0 alone writes the checkpoint.
"""
import os
import sys
import zlib

import numpy

from .backend import to_host

# The launcher's environment: how many processes it started, read without importing MPI.
# Open MPI sets OMPI_COMM_WORLD_SIZE ("Environment variables set for MPI applications", Open MPI 5 docs);
# MPICH's Hydra, Intel MPI and Slurm's PMI-2 set PMI_SIZE and PMI_RANK (seen with the mpich wheel 5.0.2:
# PMI_RANK, PMI_SIZE, PMI_FD, MPI_LOCALRANKID, MPI_LOCALNRANKS); MVAPICH sets MV2_COMM_WORLD_SIZE. A PMIx
# launcher (srun --mpi=pmix) sets PMIX_RANK without a size: MPI is then asked.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_ONLY_VARIABLES = ("PMIX_RANK",)

MPI_INSTALL_HINT = ('pip install "scratchvit[mpi]" (mpi4py and MPICH, from wheels), or pip install mpi4py '
                    "against your cluster's MPI (see the README, Scaling out)")

EXCHANGE_VARIABLE = "SCRATCHVIT_GPU_ALLREDUCE"
GPU_EXCHANGES = ("cuda-aware-mpi", "nccl", "host-staged")
EXCHANGE_DESCRIPTIONS = {
    "mpi": "MPI Allreduce of host arrays",
    "cuda-aware-mpi": "CUDA-aware MPI Allreduce of device arrays",
    "nccl": "NCCL allReduce on the GPUs (unique id broadcast over MPI)",
    "host-staged": "device -> host copy, MPI Allreduce on the host, host -> device copy",
}


class DistributedError(RuntimeError):
    """MPI cannot be used as asked, or the ranks disagree on something they must share; one line."""


# ------------------------------------------------------------------------------------------------
# which communicator

def launcher_world_size(environ):
    """How many processes an MPI launcher started, from its environment: None when no launcher started
    this one, 0 when one did without saying how many (PMIx)."""
    for name in SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    if any(name in environ for name in RANK_ONLY_VARIABLES):
        return 0
    return None


_WORLD = []     # the communicator of this process, made once


def world(environ=None):
    """This process's communicator: SingleProcess unless mpiexec started it with other processes.

    DistributedError when mpiexec started it but mpi4py is missing or cannot load an MPI library."""
    if not _WORLD:
        _WORLD.append(connect(os.environ if environ is None else environ))
    return _WORLD[0]


def connect(environ):
    size = launcher_world_size(environ)
    if size is None or size == 1:
        return SingleProcess()
    try:
        import mpi4py
        # Only the main thread calls MPI (TrainStep's worker threads compute, never communicate), so
        # "funneled" is enough; mpi4py reads rc.thread_level when mpi4py.MPI is first imported
        # (mpi4py/__init__.py, class Rc; its default is "multiple").
        mpi4py.rc.thread_level = "funneled"
        from mpi4py import MPI
    except ImportError:
        raise DistributedError(f"started by mpiexec ({size or 'several'} processes), but mpi4py is not installed: "
                               f"{MPI_INSTALL_HINT}") from None
    except RuntimeError as error:       # mpi4py 4 loads libmpi at import: "cannot load MPI library" (_mpiabi.py)
        raise DistributedError(f"mpi4py cannot load an MPI library ({' '.join(str(error).split())[:200]}): "
                               f"{MPI_INSTALL_HINT}") from None
    if MPI.COMM_WORLD.Get_size() == 1:
        return SingleProcess()
    communicator = MpiCommunicator(MPI.COMM_WORLD, MPI)
    install_abort_hook(communicator)
    return communicator


def install_abort_hook(communicator):
    """Uncaught exceptions on this rank print their traceback, then end every rank (MPI_Abort).

    Without it a rank that dies leaves the others blocked in their next collective for ever: mpi4py
    finalises MPI at exit and the job hangs (seen with the mpich wheel: a rank raising while the other
    waits in Barrier). `python -m mpi4py script.py` does the same (mpi4py/run.py, set_abort_status)."""
    previous = sys.excepthook

    def abort_after_printing(kind, value, traceback):
        previous(kind, value, traceback)
        communicator.abort(130 if issubclass(kind, KeyboardInterrupt) else 1)

    sys.excepthook = abort_after_printing


# ------------------------------------------------------------------------------------------------
# one process

class SingleProcess:
    """The communicator of a process started without mpiexec: the whole batch, nothing to exchange."""
    size, rank, local_rank, local_size, nodes = 1, 0, 0, 1, 1
    is_root = True
    exchange = None

    def shard(self, count):
        """(start, end) of this rank's contiguous part of `count` items: all of them."""
        return 0, count

    def sum(self, value):
        return value

    def any_rank(self, flag):
        return bool(flag)

    def all_ranks(self, flag):
        return bool(flag)

    def allreduce_gradients(self, flat_gradients):
        pass

    def gather(self, value):
        """[value] (the list of every rank's value, on rank 0)."""
        return [value]

    def allgather(self, value):
        return [value]

    def check_same(self, what, *arrays, hint=None):
        pass

    def default_threads(self):
        """Worker threads per process when --threads is not given: None, TrainStep's default (one per core)."""
        return None

    def select_gpu(self):
        pass

    def prepare_exchange(self, backend, environ=None):
        return None

    def describe(self, threads):
        return None

    def fail(self, line, exit_code):
        """Print the one-line error `line` and return the exit status (the caller exits with it)."""
        print(line, file=sys.stderr, flush=True)
        return exit_code

    def abort(self, exit_code):
        raise SystemExit(exit_code)


SINGLE_PROCESS = SingleProcess()


# ------------------------------------------------------------------------------------------------
# several processes

def shard_bounds(count, rank, size):
    """(start, end) of rank `rank`'s contiguous part when `count` items are split over `size` ranks,
    as evenly as integers allow (sizes differ by at most one); the same rule as TrainStep's chunks."""
    return count * rank // size, count * (rank + 1) // size


def threads_for_rank(own_cores, local_masks):
    """Worker threads for a rank whose usable cores are `own_cores` (its affinity mask), given the masks
    of every rank on its node.

    Ranks that share the same cores split them: two ranks started on a 2-core machine without binding
    both see both cores and get one thread each, instead of four busy threads on two cores. A rank that
    the launcher bound to cores of its own (mpiexec -bind-to core) uses all of those."""
    own = sorted(own_cores)
    sharing = sum(1 for mask in local_masks if sorted(mask) == own)
    return max(1, len(own) // max(1, sharing))


def usable_cores():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:           # not Linux: no affinity masks, every rank sees the whole machine
        return list(range(os.cpu_count() or 1))


class MpiCommunicator:
    """`comm` (an mpi4py Intracomm: MPI.COMM_WORLD) with the few collectives training needs.

    Every method that communicates is collective: each rank must call it, in the same order."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        # the ranks that share this node: MPI_COMM_TYPE_SHARED splits a communicator into groups that can
        # share memory, i.e. one per node (MPI standard, MPI_COMM_SPLIT_TYPE); key=rank keeps their order
        self.local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = self.local.Get_rank(), self.local.Get_size()
        self.nodes = int(self.sum(1 if self.local_rank == 0 else 0))
        self.exchange = MpiAllreduce(comm, MPI, name="mpi")
        self.gpus_on_node = None          # select_gpu: how many GPUs this node's ranks share

    # -- small collectives, all through NumPy buffers (exact for integers, IEEE sums for floats)

    def _allreduce(self, value, dtype, op):
        buffer = numpy.array([value], dtype=dtype)
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=op)
        return buffer[0]

    def shard(self, count):
        return shard_bounds(count, self.rank, self.size)

    def sum(self, value):
        """The sum over ranks of a Python number (int stays int)."""
        if isinstance(value, (int, numpy.integer)) and not isinstance(value, bool):
            return int(self._allreduce(value, "int64", self.MPI.SUM))
        return float(self._allreduce(value, "float64", self.MPI.SUM))

    def any_rank(self, flag):
        return bool(self._allreduce(int(bool(flag)), "int32", self.MPI.MAX))

    def all_ranks(self, flag):
        return bool(self._allreduce(int(bool(flag)), "int32", self.MPI.MIN))

    def gather(self, value):
        """Every rank's `value` (any picklable object) as a list on rank 0, None on the others."""
        return self.comm.gather(value, root=0)

    def allgather(self, value):
        return self.comm.allgather(value)

    def check_same(self, what, *arrays, hint=None):
        """DistributedError unless every rank holds the same bytes in `arrays` (host or device arrays, or
        bytes): a CRC-32 per rank, compared through one Allreduce of its minimum and maximum. `hint`: what
        to do about it (default: what must be the same on every rank)."""
        checksum = 0
        for array in arrays:
            if not isinstance(array, bytes):        # the array's own memory as bytes: no copy on the host
                array = numpy.ascontiguousarray(to_host(array)).reshape(-1).view("uint8")
            checksum = zlib.crc32(array, checksum)
        lowest = int(self._allreduce(checksum, "int64", self.MPI.MIN))
        highest = int(self._allreduce(checksum, "int64", self.MPI.MAX))
        if lowest != highest:
            hint = hint or "every rank needs the same options, data, checkpoint and NumPy version"
            raise DistributedError(f"the ranks differ in {what} (checksums {lowest:#010x} to {highest:#010x}): {hint}")

    def allreduce_gradients(self, flat_gradients):
        """Sum `flat_gradients` (AdamW's flat gradient buffer) over the ranks, in place."""
        self.exchange(flat_gradients)

    # -- placement

    def default_threads(self):
        """Worker threads per rank when --threads is not given: this rank's share of its node's cores."""
        own = usable_cores()
        return threads_for_rank(own, self.local.allgather(own))

    def select_gpu(self):
        """Make GPU (local rank mod the node's GPUs) this process's current device, before CuPy allocates
        anything: one GPU per rank. `cupy.cuda.Device(i).use()` calls cudaSetDevice (cupy/cuda/device.pyx),
        which sets the device of the calling host thread, the thread that runs the whole GPU step. Where
        CuPy is missing or sees no GPU this does nothing, and get_backend("gpu") then says why."""
        try:
            import cupy
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:
            return None
        if count < 1:
            return None
        device = self.local_rank % count
        cupy.cuda.Device(device).use()
        self.gpus_on_node = count
        return device

    def prepare_exchange(self, backend, environ=None):
        """Choose how gradients on `backend` are summed (the same choice on every rank) and set it up."""
        environ = os.environ if environ is None else environ
        if backend.name != "gpu":
            self.exchange = MpiAllreduce(self.comm, self.MPI, name="mpi")
            return self.exchange.name
        cupy = backend.xp
        # every rank must make the same choice, or they would wait in different calls: a capability
        # counts only where all ranks have it
        cuda_aware = self.all_ranks(mpi_takes_cuda_memory(self.comm, self.MPI))
        nccl = self.all_ranks(nccl_module(cupy) is not None)
        shared = self.any_rank(self.gpus_on_node is not None and self.local_size > self.gpus_on_node)
        name = choose_exchange(on_gpu=True, requested=environ.get(EXCHANGE_VARIABLE), cuda_aware=cuda_aware,
                               nccl_available=nccl, gpus_shared=shared)
        self.exchange = make_gpu_exchange(name, self.comm, self.MPI, cupy)
        return name

    def describe(self, threads):
        """One line for the log: ranks, nodes, threads, the MPI library and the gradient exchange."""
        library = self.library()
        exchange = self.exchange.name
        if self.gpus_on_node is None:
            placement = f"{threads} thread{'s' * (threads > 1)} per rank"
        else:
            shared = " (shared: more ranks than GPUs)" if self.local_size > self.gpus_on_node else ""
            placement = f"one GPU per rank, of {self.gpus_on_node} on this node{shared}"
        return (f"data-parallel over {self.size} MPI ranks on {self.nodes} node{'s' * (self.nodes > 1)} "
                f"({self.local_size} on this one), {placement}; gradient exchange: {exchange} "
                f"({EXCHANGE_DESCRIPTIONS[exchange]}); {library}")

    def library(self):
        """The MPI library in a few words: "MPICH Version: 5.0.2", "Open MPI v5.0.7"."""
        lines = self.MPI.Get_library_version().strip().splitlines() or ["unknown MPI"]
        return " ".join(lines[0].split()).split(",")[0]

    # -- ending the job

    def fail(self, line, exit_code):
        """Print this rank's one-line error `line` ("error: ..." gets the rank after "error:") and end every
        rank with `exit_code` (MPI_Abort: mpiexec then exits with it, as the mpich wheel's Hydra does)."""
        prefix = f"rank {self.rank} of {self.size}: "
        line = f"error: {prefix}{line[len('error: '):]}" if line.startswith("error: ") else prefix + line
        # one write, newline included: print() writes the text and the newline separately, and MPI_Abort from
        # another rank can kill this one in between, gluing the next rank's line onto this one
        sys.stderr.write(line + "\n")
        self.abort(exit_code)

    def abort(self, exit_code):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(exit_code)


# ------------------------------------------------------------------------------------------------
# the gradient exchange

def choose_exchange(*, on_gpu, requested=None, cuda_aware=False, nccl_available=False, gpus_shared=False):
    """The name of the way to sum gradients: "mpi" for host arrays; on the GPU `requested` (the value of
    SCRATCHVIT_GPU_ALLREDUCE) if set, else "cuda-aware-mpi" where the MPI library takes device memory,
    else "nccl" where CuPy has NCCL and no two ranks share a GPU, else "host-staged". NCCL 2.5 and later
    refuse two ranks on one GPU at ncclCommInitRank ("Duplicate GPU detected", ncclInvalidUsage: NVIDIA/nccl
    issue #418), hence `gpus_shared` (a node with more ranks than GPUs). DistributedError for an unknown
    or impossible request."""
    if not on_gpu:
        return "mpi"
    if requested:
        if requested not in GPU_EXCHANGES:
            raise DistributedError(f"{EXCHANGE_VARIABLE} must be one of {', '.join(GPU_EXCHANGES)}, got {requested!r}")
        if requested == "nccl" and not nccl_available:
            raise DistributedError(f"{EXCHANGE_VARIABLE}=nccl, but CuPy cannot load NCCL on every rank "
                                   "(cupy.cuda.nccl.available is False): pip install nvidia-nccl-cu12 (or -cu13)")
        if requested == "nccl" and gpus_shared:
            raise DistributedError(f"{EXCHANGE_VARIABLE}=nccl, but some ranks share a GPU, which NCCL refuses: start "
                                   "at most as many ranks per node as it has GPUs")
        return requested
    if cuda_aware:
        return "cuda-aware-mpi"
    if nccl_available and not gpus_shared:
        return "nccl"
    return "host-staged"


def memory_kinds(comm):
    """The memory kinds the MPI library supports on `comm`, e.g. ["mpi", "system"] or [..., "cuda:device"]:
    the info key "mpi_memory_alloc_kinds" of MPI 4.1 (memory allocation kinds: a comma-separated list of
    kinds, each with optional ":"-separated restrictors). [] where the library predates it."""
    try:
        info = comm.Get_info()
        try:
            value = info.Get("mpi_memory_alloc_kinds")
        finally:
            info.Free()
    except Exception:           # an MPI before 4.1, or an mpi4py without the call
        return []
    return [kind.strip() for kind in value.split(",") if kind.strip()] if value else []


LIBMPI_NAMES = ("libmpi.so.12", "libmpi.so.40", "libmpi_abi.so.0", "libmpi.so")   # MPICH ABI, Open MPI, MPI 5 ABI


def query_cuda_support(names=LIBMPI_NAMES):
    """MPIX_Query_cuda_support() of the MPI library this process has loaded: 1 if it "was built with the
    NVIDIA CUDA library and the runtime supports CUDA buffers" (Open MPI's mpi-ext.h extension, man page
    MPIX_Query_cuda_support(3)); MPICH exports it too (the mpich 5.0.2 wheel: it returns 0 there). mpi4py
    does not wrap it, so it is called through ctypes; RTLD_NOLOAD only finds a library already loaded
    (by mpi4py), never loads another. None where no loaded library has it."""
    import ctypes
    for name in names:
        try:
            library = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except (OSError, AttributeError):
            continue
        function = getattr(library, "MPIX_Query_cuda_support", None)
        if function is None:
            continue
        function.restype, function.argtypes = ctypes.c_int, []
        return int(function())
    return None


def mpi_takes_cuda_memory(comm, MPI, query=query_cuda_support):
    """Whether the MPI library says it accepts CUDA device memory in its calls: an MPI 4.1 memory kind
    "cuda" or "cuda:device...", or MPIX_Query_cuda_support() == 1. mpi4py passes a CuPy array's device
    pointer through __cuda_array_interface__ or DLPack, but "whether or not a MPI call can work for GPU
    arrays depends on the underlying MPI implementation, not on mpi4py" (mpi4py docs, overview: Support
    for GPU-aware MPI), and the MPI wheels "may lack support for GPU awareness" (mpi4py INSTALL.rst)."""
    for kind in memory_kinds(comm):
        name, _, restrictors = kind.partition(":")
        if name == "cuda" and (not restrictors or "device" in restrictors.split(":")):
            return True
    return query() == 1


def nccl_module(cupy):
    """cupy.cuda.nccl where CuPy can load NCCL, else None (cupy/cuda/nccl.py sets `available` to False when
    its import of the NCCL bindings fails, e.g. no NCCL library installed)."""
    try:
        from cupy.cuda import nccl
    except Exception:
        return None
    return nccl if getattr(nccl, "available", False) else None


class MpiAllreduce:
    """comm.Allreduce(MPI.IN_PLACE, array, SUM): host (NumPy) arrays through the buffer protocol, or device
    arrays through a CUDA-aware MPI. mpi4py cannot wait for the GPU itself: "GPU buffers must be fully
    ready before any MPI routines operate on them ... mpi4py does not have access to any GPU-specific
    functionality" (mpi4py tutorial, GPU-aware MPI), hence `synchronize` (the current stream's) first."""

    def __init__(self, comm, MPI, name, synchronize=None):
        self.comm, self.MPI, self.name, self.synchronize = comm, MPI, name, synchronize

    def __call__(self, array):
        if self.synchronize is not None:
            self.synchronize()
        self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)


class NcclAllreduce:
    """An in-place ncclAllReduce (SUM) on the current CuPy stream: no host wait at all.

    Set-up as cupyx.distributed's NCCLBackend._init_with_mpi does it: rank 0 asks NCCL for a unique id
    (`nccl.get_unique_id()`: bytes since CuPy 14, a tuple of ints before; either pickles), MPI broadcasts
    it, and every rank joins with NcclCommunicator(ranks, unique_id, rank) (ncclCommInitRank: collective,
    on the current device). The call is cupy_backends/cuda/libs/nccl.pyx's
    allReduce(sendbuf, recvbuf, count, datatype, op, stream), raw pointers; sendbuf == recvbuf is NCCL's
    in-place form. The kernels that follow (clipping, AdamW) run on the same stream, after it."""
    name = "nccl"

    def __init__(self, comm, nccl, cupy):
        self.nccl, self.cupy = nccl, cupy
        unique_id = nccl.get_unique_id() if comm.Get_rank() == 0 else None
        unique_id = comm.bcast(unique_id, root=0)
        self.communicator = nccl.NcclCommunicator(comm.Get_size(), unique_id, comm.Get_rank())
        self.datatypes = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def __call__(self, array):
        if not array.flags.c_contiguous:
            raise ValueError("NCCL needs a contiguous gradient buffer")
        stream = self.cupy.cuda.get_current_stream()
        self.communicator.allReduce(array.data.ptr, array.data.ptr, array.size, self.datatypes[array.dtype.name],
                                    self.nccl.NCCL_SUM, stream.ptr)


class HostStagedAllreduce:
    """Sum device arrays through host memory: copy down into a host buffer kept from step to step, one
    MPI Allreduce there, copy back up. Works with any MPI; costs two copies of the gradients per step.

    `download(array, host_buffer)` and `upload(host_buffer, array)` do the copies: for CuPy
    `array.get(out=host_buffer)` (blocking by default: it waits for the stream, so the gradients are
    complete) and `array.set(host_buffer)` (cupy/_core/core.pyx); for NumPy arrays, plain copies (the
    tests run this path on NumPy for real)."""
    name = "host-staged"

    def __init__(self, comm, MPI, download, upload):
        self.comm, self.MPI, self.download, self.upload = comm, MPI, download, upload
        self.host_buffer = None

    def __call__(self, array):
        if self.host_buffer is None or self.host_buffer.shape != array.shape or self.host_buffer.dtype != array.dtype:
            self.host_buffer = numpy.empty(array.shape, dtype=array.dtype)
        self.download(array, self.host_buffer)
        self.comm.Allreduce(self.MPI.IN_PLACE, self.host_buffer, op=self.MPI.SUM)
        self.upload(self.host_buffer, array)


def cupy_copies():
    """(download, upload) for HostStagedAllreduce on CuPy arrays."""
    return (lambda array, out: array.get(out=out)), (lambda buffer, array: array.set(buffer))


def make_gpu_exchange(name, comm, MPI, cupy):
    """The exchange `name` (choose_exchange's) for CuPy arrays."""
    if name == "cuda-aware-mpi":
        return MpiAllreduce(comm, MPI, name=name, synchronize=lambda: cupy.cuda.get_current_stream().synchronize())
    if name == "nccl":
        return NcclAllreduce(comm, nccl_module(cupy), cupy)
    if name == "host-staged":
        return HostStagedAllreduce(comm, MPI, *cupy_copies())
    raise ValueError(f"unknown GPU exchange {name!r}")
