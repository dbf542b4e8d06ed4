"""One training step: zero the gradients, forward, loss, backward, clip the gradient norm, AdamW.

On the GPU, and on a CPU with one thread, that is all: `TrainStep(model, optimizer, loss_fn)`.

On a CPU with several cores the step runs data-parallel over threads: the batch is cut into one
chunk per thread, each chunk goes through its own replica of the model (the replicas share the
weights, and each keeps its own activations and gradients), and the gradients are added up:

    loss = sum_i (n_i / B) * loss_i          loss_i = the mean loss over chunk i, of n_i images
    dL/dtheta = sum_i (n_i / B) * dloss_i/dtheta

which is exactly the gradient of the mean loss over the whole batch (up to float rounding), so
the step computes the same thing as the single-threaded one. Why it pays: NumPy runs each
elementwise operation (softmax, GELU, LayerNorm, ...) on one core, but releases Python's GIL
while it runs, so two threads on two halves of a batch keep two cores busy. BLAS is limited to one
thread inside each worker, otherwise each worker would start its own BLAS thread pool and four busy
threads would fight over two cores. This needs OpenBLAS's per-thread limit (NumPy's own wheels
have it); elsewhere the step quietly stays single-threaded.

Across processes (MPI, distributed.py), the same rule one level up: `communicator` gives this
process (rank) its contiguous shard of the batch, [r B / N, (r + 1) B / N); the rank's threads cut
the shard into chunks, every chunk's loss is weighted by n_i / B with B the whole batch, and one
Allreduce (SUM) of the flat gradient buffer adds the ranks' gradients before clipping and AdamW,
which then run identically on every rank. The step returns the rank's share of the loss,
sum over its chunks of (n_i / B) loss_i: the batch's mean loss is the sum over the ranks. A rank's
main thread may run BLAS on at most its share of the node's cores (`threads`), so that ranks
sharing a machine do not each run a BLAS pool as wide as the machine.
"""
import copy
import os
from concurrent.futures import ThreadPoolExecutor

import numpy

from .backend import get_array_module
from .cpu_threads import can_limit_blas_threads, limit_blas_threads_here, limit_blas_to_one_thread_here
from .distributed import SINGLE_PROCESS

MIN_IMAGES_PER_THREAD = 16   # below this a chunk is too small for its thread to pay off


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:           # not Linux
        return os.cpu_count() or 1


class TrainStep:
    """`step(images, labels)` trains on one batch and returns its mean loss as a 0-d array (not read
    from the device, so a GPU step never waits); under MPI, with every rank passing the same whole
    batch, this rank's share of it. `threads`: worker threads on the CPU (None = one per core); the
    GPU and a single thread take the plain path. `communicator`: distributed.py's, for training
    across processes (None: this process alone)."""

    def __init__(self, model, optimizer, loss_fn, clip_grad_norm=None, threads=None, communicator=None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.clip_grad_norm = clip_grad_norm
        self.communicator = SINGLE_PROCESS if communicator is None else communicator
        on_cpu = model.device == "cpu"
        threads = available_cores() if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads!r}")
        if self.communicator.size > 1 and on_cpu and can_limit_blas_threads():
            limit_blas_threads_here(threads)
        self.threads = threads if on_cpu and threads > 1 and can_limit_blas_threads() else 1
        self.replicas = []        # [(model, loss_fn)] per thread, the first being the model itself
        self.parameter_pairs = [] # per replica after the first: [(model's parameter, replica's parameter)]
        self.pool = None
        if self.threads > 1:
            self.replicas = [(model, loss_fn)] + [self._replica() for _ in range(self.threads - 1)]
            self.parameter_pairs = [list(zip(model.parameters(), replica.parameters())) for replica, _ in self.replicas[1:]]
            self.pool = ThreadPoolExecutor(self.threads, initializer=limit_blas_to_one_thread_here)

    def _replica(self):
        """A copy of the model that shares the weight arrays but has its own gradients and caches."""
        replica = copy.deepcopy(self.model)
        for parameter, copied in zip(self.model.parameters(), replica.parameters()):
            copied.data = parameter.data
        return replica, copy.deepcopy(self.loss_fn)

    def models(self):
        """The model and its replicas: everything whose dropout layers draw random numbers."""
        return [model for model, _ in self.replicas] or [self.model]

    def __call__(self, images, labels):
        self.optimizer.zero_grad()
        batch = images.shape[0]
        start, end = self.communicator.shard(batch)       # the whole batch, without MPI
        images, labels = images[start:end], labels[start:end]
        shard = end - start
        if shard == 0:              # more ranks than images in the last batch: this rank adds nothing
            loss = get_array_module(self.optimizer.grad).zeros((), dtype=self.optimizer.grad.dtype)
        elif self.threads == 1 or shard < 2 * MIN_IMAGES_PER_THREAD:   # too small to split: BLAS keeps both cores
            loss = self.loss_fn.forward(self.model.forward(images), labels)
            if shard == batch:
                self.model.backward(self.loss_fn.backward())
            else:                   # the shard's share of the batch's mean loss: n_r / B
                self.model.backward(self.loss_fn.backward(shard / batch))
                loss = loss * (shard / batch)
        else:
            loss = self._parallel_forward_backward(images, labels, batch)
        self.communicator.allreduce_gradients(self.optimizer.grad)      # dL/dtheta = sum over ranks
        if self.clip_grad_norm:
            self.optimizer.clip_grad_norm(self.clip_grad_norm)
        self.optimizer.step()
        return loss

    def _parallel_forward_backward(self, images, labels, batch):
        """The chunks of `images` (this rank's shard of a batch of `batch` images) in the worker threads."""
        shard = images.shape[0]
        chunks = min(self.threads, shard // MIN_IMAGES_PER_THREAD)
        bounds = [shard * index // chunks for index in range(chunks + 1)]
        for index in range(1, chunks):
            self._follow_main_model(index)
        error_settings = numpy.geterr()     # NumPy's floating-point error settings are per thread: pass ours on
        futures = [self.pool.submit(self._chunk_forward_backward, self.replicas[index], images[start:end],
                                    labels[start:end], (end - start) / batch, error_settings)
                   for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))]
        loss = sum(future.result() for future in futures)
        for pairs in self.parameter_pairs[:chunks - 1]:      # dL/dtheta = sum over chunks
            for parameter, copied in pairs:
                parameter.grad += copied.grad
        return loss

    @staticmethod
    def _chunk_forward_backward(replica, images, labels, weight, error_settings):
        model, loss_fn = replica
        with numpy.errstate(**error_settings):
            loss = loss_fn.forward(model.forward(images), labels)
            model.backward(loss_fn.backward(weight))        # weight = n_i / B: the chunk's share of the mean
        return loss * weight

    def _follow_main_model(self, index):
        """Point replica `index` at the model's current weight arrays and mode, and clear its gradients."""
        for parameter, copied in self.parameter_pairs[index - 1]:
            if copied.data is not parameter.data:
                copied.data = parameter.data
            copied.grad.fill(0)
        replica = self.replicas[index][0]
        if replica.training != self.model.training:
            replica.train(self.model.training)
