"""The GPU training step recorded once as a CUDA graph, then replayed for every batch.

Why: one training step of the default ViT is several hundred kernel launches, and CuPy spends
about 20 microseconds of Python on each, so on a fast GPU the host, not the device, sets the pace.
Stream capture records the launches of one step without running them (`Stream.begin_capture` ...
`end_capture` gives a `cupy.cuda.Graph`); a replay (`graph.launch()`) is one call that runs them all.

A replay repeats every recorded kernel with the same arguments and the same memory addresses. So
whatever changes from one step to the next must be in device memory that the kernels read:
- the batch: copied into two fixed input arrays before each replay;
- the learning rate and AdamW's bias corrections: `AdamW.set_schedule` keeps the step counter and
  the whole schedule on the device, where a one-thread kernel looks them up (optim.py, fused.py);
- dropout's random numbers: CuPy's generators keep their state on the device and advance it in
  their kernels, so every replay draws new numbers. Re-seeding a dropout layer (each epoch) gives it
  a new generator, and the step is recorded again.

Memory: every array the recorded step allocates comes from a memory pool of its own, which nothing
outside the recording allocates from, so no later array can land on memory a replay writes. The
returned loss is one of those arrays: the next replay overwrites it, so add it up (on the device, as
the training loop does) before the next call.

When the step is recorded: the first call for a new batch shape, train/eval mode or set of dropout
generators runs the plain step, which compiles the kernels, sets cuBLAS up and fills the caches the
layers keep (the ones vectors of reductions.py, dropout's generators) outside the recording, where
they really run; the next call with the same key records the step and replays it; later calls only
replay. A last, shorter batch of an epoch therefore runs as a plain step and leaves the graph alone.
"""
from .backend import is_gpu_array


class CudaGraphError(RuntimeError):
    """Recording the training step as a CUDA graph failed; the message says to train without it."""


class GraphedTrainStep:
    """`step(images, labels)` as `TrainStep`, on the GPU, replayed from a CUDA graph where it can be.

    `train_step` is a `TrainStep` on the GPU whose optimiser has its schedule (`set_schedule`)."""

    def __init__(self, train_step):
        optimizer = train_step.optimizer
        if not is_gpu_array(optimizer.data):
            raise ValueError("CUDA graphs need the model on the GPU (device 'gpu'), got a model on the CPU")
        if optimizer.device_schedule is None:
            raise ValueError("a CUDA graph cannot take a new learning rate from the host at every step: "
                             "give the optimiser its whole schedule first with optimizer.set_schedule(...)")
        import cupy
        self.cupy = cupy
        self.train_step = train_step
        self.dropout_layers = train_step.model.dropout_layers()   # fixed; their generators are not
        self.pool = train_step.pool            # the thread pool evaluate() may use: None on the GPU
        self.memory_pool = cupy.cuda.MemoryPool()              # only the recordings allocate from it
        self.capture_stream = cupy.cuda.Stream(non_blocking=True)
        self.graph = self.graph_key = None     # the recorded step, and the key it was recorded for
        self.warm_key = None                   # the key of the last plain step
        self.images = self.labels = self.loss = None   # the graph's fixed inputs and its output
        self.replays = 0

    def models(self):
        return self.train_step.models()

    def _key(self, images, labels):
        generators = tuple(layer.generator for layer in self.dropout_layers)   # compared by identity
        return images.shape, images.dtype, labels.shape, labels.dtype, self.train_step.model.training, generators

    def __call__(self, images, labels):
        key = self._key(images, labels)
        if self.graph is not None and key == self.graph_key:
            return self._replay(images, labels)
        if key == self.warm_key:
            self._record(images, labels, key)
            return self._replay(images, labels)
        loss = self.train_step(images, labels)
        self.warm_key = self._key(images, labels)   # after the step: the first forward creates the generators
        return loss

    def _record(self, images, labels, key):
        cupy = self.cupy
        self.graph = self.graph_key = None          # an older graph is not replayed again
        self.images, self.labels = images.copy(), labels.copy()
        optimizer = self.train_step.optimizer
        host_count = optimizer.step_count, optimizer.lr
        stream = self.capture_stream
        try:
            with cupy.cuda.using_allocator(self.memory_pool.malloc), stream:
                stream.begin_capture()
                try:
                    loss = self.train_step(self.images, self.labels)
                except BaseException:
                    try:
                        stream.end_capture()        # leave capture mode; the step's own error is the one to report
                    except Exception:
                        pass
                    raise
                graph = stream.end_capture()
        except Exception as error:
            raise CudaGraphError(f"recording the training step as a CUDA graph failed ({type(error).__name__}: "
                                 f"{error}); train without --cuda-graph") from error
        finally:
            optimizer.step_count, optimizer.lr = host_count    # the recording ran nothing
        self.graph, self.graph_key, self.loss = graph, key, loss

    def _replay(self, images, labels):
        if images is not self.images:
            self.images[...] = images
        if labels is not self.labels:
            self.labels[...] = labels
        self.graph.launch(stream=self.cupy.cuda.get_current_stream())
        self.train_step.optimizer.count_replayed_step()
        self.replays += 1
        return self.loss
