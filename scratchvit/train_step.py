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
"""
import copy
import os
from concurrent.futures import ThreadPoolExecutor

from .backend import can_limit_blas_threads, get_array_module, host, limit_blas_to_one_thread_here

MIN_IMAGES_PER_THREAD = 16   # below this a chunk is too small for its thread to pay off


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:           # not Linux
        return os.cpu_count() or 1


class TrainStep:
    """`step(images, labels)` trains on one batch and returns its mean loss as a 0-d array (not read
    from the device, so a GPU step never waits). `threads`: worker threads on the CPU (None = one per
    core); the GPU and a single thread take the plain path."""

    def __init__(self, model, optimizer, loss_fn, clip_grad_norm=None, threads=None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.clip_grad_norm = clip_grad_norm
        on_cpu = get_array_module(model.head.weight.data).__name__ == "numpy"
        threads = available_cores() if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads!r}")
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
        if self.threads == 1 or images.shape[0] < 2 * MIN_IMAGES_PER_THREAD:   # too small to split: BLAS keeps both cores
            loss = self.loss_fn.forward(self.model.forward(images), labels)
            self.model.backward(self.loss_fn.backward())
        else:
            loss = self._parallel_forward_backward(images, labels)
        if self.clip_grad_norm:
            self.optimizer.clip_grad_norm(self.clip_grad_norm)
        self.optimizer.step()
        return loss

    def _parallel_forward_backward(self, images, labels):
        batch = images.shape[0]
        chunks = min(self.threads, batch // MIN_IMAGES_PER_THREAD)
        bounds = [batch * index // chunks for index in range(chunks + 1)]
        for index in range(1, chunks):
            self._follow_main_model(index)
        error_settings = host.geterr()     # NumPy's floating-point error settings are per thread: pass ours on
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
        with host.errstate(**error_settings):
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
