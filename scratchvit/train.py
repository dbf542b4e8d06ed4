"""Training a ViT on MNIST: the loop behind `train_mnist.py`, usable from Python as `run(TrainConfig(...))`.

One training step (`TrainStep`, in train_step.py, data-parallel over the CPU's cores): zero the
gradients, forward, softmax cross-entropy, backward, clip the global gradient norm, AdamW. The loss
stays on the device and is read every `LOSS_READ_INTERVAL` steps, so a GPU step queues work
without waiting for it.

Around it (`run`):
- the data set is uploaded to the device once; each batch is gathered there and augmented, batched:
  a random affine transform (rotation, scale, shear, translation: affine.py, off by default), then
  a random shift of whole pixels (±2 by default: data.random_shift);
- AdamW with decoupled weight decay on the weight matrices only (not biases, LayerNorm
  parameters, the CLS token or the position embeddings), a linear warmup then cosine decay of
  the learning rate, updated every step;
- with `ema_decay` > 0, an exponential moving average of the weights (weight_average.py), updated
  after every step; evaluation, plots, the checkpoint's evaluated weights and predictions use it
  (with a validation split, metrics.jsonl also records the trained weights' validation accuracy,
  so whether the average pays is measured where settings are chosen);
- after every epoch: test accuracy in eval mode (and, with `validation` N > 0, the accuracy on the
  last N training images, held out of training: settings are chosen on those, never on the test
  set), a checkpoint written atomically to OUT/checkpoint.npz (model, optimiser, random state,
  epoch, configuration), then one JSON line in OUT/metrics.jsonl: no line lists an epoch that no
  checkpoint holds;
- every `log_every` steps, one JSON line in OUT/steps.jsonl (`StepLog`), written at the loss reads
  the loop makes anyway;
- the output folder is the run's own (`RunFolder`): locked for the whole run, refused if it holds a
  run that the run neither resumes nor replaces (`overwrite`), logs never written through a link,
  cut back to the checkpoint on resume, and every OSError on output one line naming the file and
  the last checkpoint, intact;
- randomness: the shuffle, the augmentation and dropout of epoch e draw from generators seeded by
  (seed, e), and a checkpoint saves the generators' states (NumPy's own; on CuPy, whose state cannot
  be read, the seed and the draws made, which a resume replays: EpochRandomness), so a resumed run
  repeats an uninterrupted one exactly, even from a checkpoint written by Ctrl-C (or SIGTERM) in the
  middle of an epoch;
- a non-finite loss stops the run with `NonFiniteLoss` before any checkpoint is written, so the
  last good checkpoint survives;
- under mpiexec, data-parallel over processes (distributed.py): every rank holds the data and a
  replica, draws the same shuffle and augments the same whole batch, TrainStep trains each rank on its
  shard and sums the gradients with one Allreduce; the loss is summed over the ranks at the loss
  reads, and the ranks agree there whether Ctrl-C or SIGTERM came; each rank evaluates a slice of the
  test (and validation) images and the correct counts are summed; rank 0 alone logs and writes files. The
  checkpoint holds nothing that depends on the number of ranks (the loss so far is the job's, the
  augmentation generator is shared), so a checkpoint written by N ranks resumes under M.
"""
import contextlib
import dataclasses
import errno
import io
import json
import math
import numbers
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

try:
    import fcntl                 # POSIX: the output folder's lock
except ImportError:
    fcntl = None

from .backend import ReplayableGenerator, get_array_module, get_backend, host, host_generator, random_generator
from .cpu_threads import keep_freed_host_memory
from .affine import random_affine
from .checkpoint_file import CheckpointError, read_checkpoint
from .data import NUM_CLASSES, DataError, atomic_write_bytes, load_mnist, normalize, random_shift
from .distributed import SINGLE_PROCESS, usable_cores, world
from .layers import SoftmaxCrossEntropy
from .optim import AdamW, warmup_cosine
from .recipes import recipe_for_device, recipe_options
from .train_step import TrainStep
from .vit import TRAINING_COPIES, ViT, check_config, gibibytes, parameter_count
from .weight_average import WeightAverage

LOSS_READ_INTERVAL = 25        # steps between reads of the loss from the device


@dataclasses.dataclass
class TrainConfig:
    device: str = "cpu"
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    patch_size: int = 7
    dim: int = 64
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    label_smoothing: float = 0.0
    clip_grad_norm: float = 1.0
    max_shift: int = 2
    rotation: float = 0.0        # random affine augmentation (affine.py): degrees, ±
    scale: float = 0.0           # scale in [1 - scale, 1 + scale]
    shear: float = 0.0           # degrees, ±
    translate: float = 0.0       # a fraction of the image size, ±, in each direction
    ema_decay: float = 0.998     # evaluate an exponential moving average of the weights (0: off)
    data_dir: str = None
    out_dir: str = "runs/mnist"
    train_limit: int = None
    validation: int = 0          # hold out the last N training images and evaluate them every epoch (0: off)
    eval_batch_size: int = 500
    threads: int = None          # CPU worker threads for the data-parallel step (None: one per core)
    resume: bool = False
    overwrite: bool = False      # replace the run in out_dir (without it a folder holding a run is refused)
    plot: bool = False
    log_every: int = LOSS_READ_INTERVAL   # steps between lines of OUT/steps.jsonl: a multiple of it, or 0 (off)

    @classmethod
    def from_recipe(cls, recipe=None, **options):
        """A TrainConfig with recipe `recipe`'s options (recipes.py; None: the recipe of options' device)
        and then `options`, which win over the recipe. ConfigError for an unknown recipe."""
        if recipe is None:
            recipe = recipe_for_device(options.get("device", cls.device))
        try:
            preset = recipe_options(recipe)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return cls(**dict(preset, **options))

    def validate(self):
        """ConfigError naming the first option that cannot work (model options are checked by build_model)."""
        # inf and NaN pass comparisons such as `lr > 0` (or fail them with a misleading message): refused first
        for name in ("weight_decay", "warmup_epochs", "label_smoothing", "clip_grad_norm", "rotation", "scale",
                     "shear", "translate", "ema_decay", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if not (isinstance(self.lr, numbers.Real) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        positive = ("epochs", "batch_size", "eval_batch_size")
        non_negative = ("weight_decay", "warmup_epochs", "clip_grad_norm", "max_shift", "rotation", "scale", "shear",
                        "translate")
        for name in positive:
            if not getattr(self, name) >= 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run in out_dir, "
                              "overwrite replaces it")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads!r}")
        # more threads than cores only adds replicas' memory and switching: capped at what the process may use
        if self.threads is not None and self.threads > len(usable_cores()):
            raise ConfigError(f"threads must be at most {len(usable_cores())}, the CPU cores this process may use, "
                              f"got {self.threads!r}")
        if self.validation < 0:
            raise ConfigError(f"validation must be a non-negative number of images (0 turns it off), "
                              f"got {self.validation!r}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ConfigError(f"train_limit must be a positive number of images, got {self.train_limit!r}")
        for name, upper in (("rotation", 180), ("scale", 1), ("shear", 90), ("translate", 1)):
            if not getattr(self, name) < upper:
                raise ConfigError(f"{name} must be below {upper}, got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 turns the weight average off), got {self.ema_decay!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        # the step log is written when the loop reads the loss anyway; any other step would make a GPU step wait
        if self.log_every < 0 or self.log_every % LOSS_READ_INTERVAL:
            raise ConfigError(f"log_every must be a multiple of {LOSS_READ_INTERVAL} (the loss is read from the "
                              f"device every {LOSS_READ_INTERVAL} steps), or 0 to turn the step log off, "
                              f"got {self.log_every!r}")

    def validate_for_training_set(self, count):
        """ConfigError if `validation` holds out so many of the `count` training images that none is left."""
        if self.validation >= count:
            raise ConfigError(f"validation must leave at least one training image: at most {count - 1} of the "
                              f"{count} training images, got {self.validation}")

    def validate_for_images(self, image_size):
        """ConfigError for an option that cannot work on images of image_size x image_size pixels."""
        # a shift of s pixels keeps image_size - s rows (columns) of the image: at s >= image_size
        # some images become blank, and a model trained on them learns nothing
        if self.max_shift >= image_size:
            raise ConfigError(f"max_shift must be smaller than the image size {image_size}, got {self.max_shift}")

    def model_config(self, image_size, channels=1, num_classes=10):
        return dict(image_size=image_size, patch_size=self.patch_size, num_classes=num_classes, dim=self.dim,
                    depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim, channels=channels,
                    dropout=self.dropout, emb_dropout=0.0)


class ConfigError(ValueError):
    """An option that cannot work: a bad value, a model that does not fit the data, a missing extra."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class OutputError(RuntimeError):
    """The output folder (out_dir) cannot be created or written to."""


# ------------------------------------------------------------------------------------------------
# optimiser groups and evaluation

def parameter_groups(model, weight_decay):
    """Weight decay on the weight matrices (2-D), none on biases, LayerNorm, cls_token, pos_embedding."""
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        (decayed if name.endswith(".weight") and parameter.data.ndim == 2 else not_decayed).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]


def evaluate(model, images, labels, batch_size=500, *, replicas=(), pool=None, communicator=None):
    """Accuracy (a float in [0, 1]) in eval mode; restores each model's mode.

    With `replicas` (copies sharing the model's weights, as TrainStep keeps) and a thread `pool`,
    model k evaluates batches k, k + M, k + 2M, ... in its own thread (M models in all). With an MPI
    `communicator` (distributed.py; collective), each rank evaluates its contiguous slice of the
    images and the correct counts, integers, are summed over the ranks: the same accuracy as one
    process, exactly."""
    count = images.shape[0]
    if communicator is not None and communicator.size > 1:
        start, end = communicator.shard(count)
        images, labels = images[start:end], labels[start:end]
    models = [model, *replicas]
    modes = [one.training for one in models]
    batch_starts = list(range(0, images.shape[0], batch_size))

    def count_correct(index):
        correct = 0
        for start in batch_starts[index::len(models)]:
            logits = models[index].forward(images[start:start + batch_size])
            correct = correct + (logits.argmax(axis=1) == labels[start:start + batch_size]).sum()
        return correct

    for one in models:
        one.eval()
    if pool is None or len(models) == 1:
        correct = count_correct(0)
    else:
        correct = sum(future.result() for future in [pool.submit(count_correct, index) for index in range(len(models))])
    for one, mode in zip(models, modes):
        one.train(mode)
    if communicator is not None and communicator.size > 1:
        correct = communicator.sum(int(correct))
    return float(correct) / count


# ------------------------------------------------------------------------------------------------
# randomness: everything an epoch draws comes from generators seeded by (seed, epoch)

def epoch_seed(seed, epoch, stream):
    """A distinct integer seed per (run seed, epoch, stream): NumPy and CuPy both take plain ints."""
    return (seed * 1_000_003 + epoch * 101 + stream) % (2**63)


def dropout_seed(seed, epoch, index, rank=0, restart_step=0):
    """The seed of dropout generator `index` of an MPI rank in an epoch: epoch_seed's stream 2 + index
    on rank 0 (a single process is rank 0), and apart from every other stream on other ranks, or when
    the generators restart at step `restart_step` of the epoch (a resume under another layout)."""
    return restart_seed(epoch_seed(seed, epoch, 2 + index), rank, restart_step)


def restart_seed(base, rank=0, restart_step=0):
    """`base` itself on rank 0 at step 0, else a seed apart from every other stream: mixing the step in
    keeps a generator restarted mid-epoch from repeating the epoch's first draws."""
    if rank == 0 and restart_step == 0:
        return base
    return int(host.random.SeedSequence([base, rank, restart_step]).generate_state(1, dtype=host.uint64)[0] % 2**63)


def epoch_generator(xp, seed):
    """A device generator whose state a checkpoint can hold: NumPy's own (its bit generator's state is a
    JSON-ready dict); elsewhere (CuPy, whose generator state cannot be read or written) a
    backend.ReplayableGenerator, whose state is its seed and the draws made so far."""
    return random_generator(xp, seed) if xp is host else ReplayableGenerator(xp, seed)


class EpochRandomness:
    """The generators one epoch draws from: the shuffle (host), the augmentation and dropout (device).

    Under MPI the shuffle and the augmentation are the job's: every rank draws them alike, for the
    whole batch. Dropout is each rank's own: its layers draw masks for its own images, seeded apart
    by `rank` (rank 0's seeds are those of a single process). A dropout of p = 0 has no generator.

    A checkpoint's state for each device generator is NumPy's bit generator state, or on CuPy a
    ReplayableGenerator's {"replay": {seed, draws}}, so a run resumed mid-epoch continues the epoch's
    draws on either device instead of repeating its first ones."""

    def __init__(self, models, xp, seed, epoch, rank=0):
        self.xp, self.seed, self.epoch, self.rank = xp, seed, epoch, rank
        self.shuffle = host_generator(epoch_seed(seed, epoch, 0))   # on the host: the same order on CPU and GPU
        self.augmentation = epoch_generator(xp, epoch_seed(seed, epoch, 1))
        self.dropout_layers = [layer for model in models for layer in model.dropout_layers()]
        for index, layer in enumerate(self.dropout_layers):
            layer.reseed(xp, dropout_seed(seed, epoch, index, rank), epoch_generator)

    @staticmethod
    def _saved(generator):
        """A generator's state as a JSON-ready dict (None for a dropout of p = 0, which has none)."""
        if isinstance(generator, ReplayableGenerator):
            return dict(replay=generator.state())
        return generator.bit_generator.state if isinstance(generator, host.random.Generator) else None

    def _loaded(self, generator, state):
        """The generator that continues from `state`: `generator` itself with NumPy's state loaded, or a
        replayed one; None where `state` cannot be continued on this device (a NumPy state on CuPy, or
        None: a checkpoint written on a GPU before generator states were saved)."""
        if isinstance(state, dict) and "replay" in state:
            return ReplayableGenerator.replayed(self.xp, state["replay"])
        if isinstance(state, dict) and isinstance(generator, host.random.Generator):
            generator.bit_generator.state = state
            return generator
        return None

    def state(self, communicator=SINGLE_PROCESS):
        """{"generators": [the augmentation's state, then every rank's dropout generators in rank order],
        "dropout_per_rank": [how many each rank has]}; under MPI collective, and None on ranks but 0."""
        gathered = communicator.gather([self._saved(layer.generator) for layer in self.dropout_layers])
        if gathered is None:
            return None
        return dict(generators=[self._saved(self.augmentation)] + [state for states in gathered for state in states],
                    dropout_per_rank=[len(states) for states in gathered])

    def restore(self, random_state, communicator=SINGLE_PROCESS, first_step=0):
        """Continue the epoch's draws from a checkpoint's `random_state` (`state()`'s; collective under MPI).

        The augmentation is the job's and resumes under any number of ranks. The dropout generators resume
        where the checkpoint was written with the same layout (the same dropout generators on each rank:
        the same ranks and threads); under another layout they restart from seeds of their own
        (`dropout_seed` with `first_step`), since the masks an uninterrupted run draws depend on the layout
        anyway. A state this device cannot continue restarts its generator the same way. Returns a line
        for the log when that changes what is drawn, else None."""
        states = random_state["generators"]
        saved_layout = random_state.get("dropout_per_rank", [len(states) - 1])   # older checkpoints: one process
        notes = []
        augmentation = self._loaded(self.augmentation, states[0])
        if augmentation is None:
            augmentation = epoch_generator(self.xp, restart_seed(epoch_seed(self.seed, self.epoch, 1), 0, first_step))
            notes.append("augmentation")
        self.augmentation = augmentation
        layout = communicator.allgather(len(self.dropout_layers))
        same_layout = layout == saved_layout
        first = 1 + sum(layout[:communicator.rank])
        for index, layer in enumerate(self.dropout_layers):
            if layer.generator is None:                 # p = 0: nothing drawn, nothing to continue
                continue
            generator = self._loaded(layer.generator, states[first + index]) if same_layout else None
            if generator is None:
                layer.reseed(self.xp, dropout_seed(self.seed, self.epoch, index, communicator.rank, first_step),
                             epoch_generator)
                if same_layout and "dropout" not in notes:
                    notes.append("dropout")
            else:
                layer.use_generator(self.xp, generator)
        if not same_layout and any(layer.p > 0 for layer in self.dropout_layers):
            return (f"the checkpoint was written mid-epoch with {saved_layout} dropout generators per rank, this run "
                    f"has {layout} (other ranks or --threads): the rest of epoch {self.epoch + 1} draws its dropout "
                    f"masks from new seeds")
        if notes:
            return (f"the checkpoint holds no {' or '.join(notes)} generator state this device can continue (written "
                    f"on another device, or on a GPU by an older version): the rest of epoch {self.epoch + 1} draws "
                    f"its {' and '.join(notes)} from new seeds")
        return None


# ------------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, *, model, optimizer, config, epoch, step_in_epoch, random_state, history,
                    weight_average=None):
    """Write the run's state atomically: "model/NAME" the trained weights, "average/NAME" the weight
    average when the run keeps one, the optimiser's moments, and a JSON "meta" (configuration, epoch,
    step, random state, metrics so far)."""
    arrays = {f"model/{name}": value for name, value in model.state_dict().items()}
    if weight_average is not None:
        arrays.update({f"average/{name}": value for name, value in weight_average.model_state(model).items()})
    optimizer_state = optimizer.state_dict()
    arrays["optimizer/exp_avg"] = optimizer_state["exp_avg"]
    arrays["optimizer/exp_avg_sq"] = optimizer_state["exp_avg_sq"]
    meta = dict(format="scratchvit-checkpoint-1", model_config=model.config, train_config=dataclasses.asdict(config),
                epoch=epoch, step_in_epoch=step_in_epoch, optimizer_step=optimizer_state["step_count"],
                optimizer_lr=optimizer_state["lr"], random_state=random_state, history=history,
                average_updates=None if weight_average is None else weight_average.updates)
    arrays["meta"] = host.frombuffer(json.dumps(meta).encode(), dtype=host.uint8)
    buffer = io.BytesIO()
    host.savez(buffer, **arrays)
    with writing(path):
        atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path, *, averaged=False):
    """(meta dict, model state dict, optimizer arrays) from a checkpoint file, or CheckpointError: every
    field, array header and size is checked before anything is read from it (checkpoint_file.py).

    averaged=True: the weights to evaluate, which are the weight average where the run kept one
    (--ema-decay) and else the trained weights; False: the trained weights, which training resumes."""
    return read_checkpoint(path, averaged=averaged,
                           train_options={field.name for field in dataclasses.fields(TrainConfig)})


REGULARISATION_OPTIONS = ("dropout", "emb_dropout")   # change training, not the shapes of the weights


def check_same_model(path, saved_config, model_config):
    differences = [f"{key}={saved_config.get(key)!r} (this run: {value!r})" for key, value in model_config.items()
                   if key not in REGULARISATION_OPTIONS and saved_config.get(key) != value]
    if differences:
        raise CheckpointError(f"{path}: checkpoint was made with another model configuration: "
                              + ", ".join(differences) + "; pass the same model options")


def check_resume_position(path, meta, steps_per_epoch, config):
    """CheckpointError unless the checkpoint's step lies inside an epoch of this run: a checkpoint written
    mid-epoch resumes at step_in_epoch, which must be below the steps an epoch has here (another
    --batch-size or --train-limit changes them)."""
    step = meta["step_in_epoch"]
    if step >= steps_per_epoch:
        raise CheckpointError(f"{path}: meta field step_in_epoch is {step}, but an epoch of this run has "
                              f"{steps_per_epoch} steps (batch size {config.batch_size}): not a step to resume at")


def resume_weight_average(path, meta, model, weight_average):
    """Restore the weight average saved in the checkpoint at `path`; one written without an average
    (a run that had no --ema-decay) starts the average from the resumed weights."""
    if meta.get("average_updates") is None:
        return
    _, average_state, _ = load_checkpoint(path, averaged=True)
    weight_average.load_model_state(model, average_state, meta["average_updates"])


def check_same_validation_split(path, saved_train_config, config):
    """CheckpointError unless a resumed run holds out the same validation images as the saved one.

    Other training options may change on resume (more epochs, another learning rate: the command
    line wins). The split may not: the saved weights have trained on every image outside it, so
    another --validation would validate on images already trained on, or train on images already
    used to choose settings, and validation_accuracy would no longer measure unseen images. Keeping
    the saved value instead would silently override the command line (and a TrainConfig cannot tell
    a typed --validation 0 from the default), so it is an error, like another model configuration."""
    saved = saved_train_config.get("validation", 0)       # checkpoints from before --validation held none out
    if saved != config.validation:
        raise CheckpointError(f"{path}: checkpoint was trained with validation={saved!r} (this run: "
                              f"{config.validation!r}); resume with --validation {saved} to keep the same "
                              f"held-out images")


# ------------------------------------------------------------------------------------------------
# progress display: tqdm when installed (pip install "scratchvit[progress]"), else one line on a terminal

def log_line(message):
    print(message, flush=True)


class Progress:
    """Steps done, loss, images per second and time left, for one epoch."""

    def __init__(self, total, description, batch_size, show=True):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        # no progress display in logs and pipes, only the epoch lines; under MPI only rank 0 shows it (`show`)
        self.terminal = show and sys.stderr.isatty()
        self.bar = None
        if tqdm is not None and self.terminal:
            self.bar = tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)
        self.total, self.done, self.description, self.batch_size = total, 0, description, batch_size

    def update(self, steps, loss, images_per_second):
        self.done += steps
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_per_s=f"{images_per_second:.0f}", refresh=False)
            self.bar.update(steps)
        elif self.terminal:                          # tqdm not installed: one line, redrawn
            left = (self.total - self.done) * self.batch_size / max(images_per_second, 1e-9)
            print(f"\r{self.description}  {self.done}/{self.total}  loss {loss:.4f}  {images_per_second:.0f} img/s  "
                  f"left {left:.0f}s ", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.terminal:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the step log: OUT/steps.jsonl

STEP_LOG_NAME = "steps.jsonl"


class StepLog:
    """One JSON line in `path` every `every` steps of an epoch, at the epoch's last step and at Ctrl-C:
        step               the optimiser steps taken so far in the run (1-based, continues across --resume)
        epoch              the epoch the line belongs to (1-based, as in metrics.jsonl)
        loss               the mean training loss over the steps since the previous line of the same epoch
        lr                 the learning rate of the line's last step
        images_per_second  over those steps (wall time between the two loss reads)

    It is written only where the loop reads the loss from the device anyway (`every` is a multiple of
    LOSS_READ_INTERVAL, the epoch's end, Ctrl-C), so it adds no wait to a GPU step. Windows restart at
    every epoch: the lines of an epoch, each weighted by its steps, average to that epoch's train_loss,
    and when `every` divides the steps of an epoch their plain mean does."""

    def __init__(self, path, every, batch_size, train_count):
        self.path, self.every = Path(path), every
        self.batch_size, self.train_count = batch_size, train_count

    def begin(self, steps_done, loss_sum, now):
        """Start a window after `steps_done` steps of the epoch, whose losses summed to `loss_sum`."""
        self.start_steps, self.start_sum, self.start_time = steps_done, loss_sum, now

    def images_after(self, steps_done):
        return min(steps_done * self.batch_size, self.train_count)     # the epoch's last batch may be partial

    def at_read(self, *, epoch, steps_done, global_step, loss_sum, lr, now, end):
        """Called at every read of the loss (`loss_sum`: the epoch's so far, on the host); writes a line
        when the window is `every` steps long or `end` (the epoch's last step, or Ctrl-C) says so."""
        steps = steps_done - self.start_steps
        if steps == 0 or not (steps_done % self.every == 0 or end):
            return
        record = dict(step=global_step, epoch=epoch + 1, loss=(loss_sum - self.start_sum) / steps, lr=lr,
                      images_per_second=(self.images_after(steps_done) - self.images_after(self.start_steps))
                      / max(now - self.start_time, 1e-9))
        with writing(self.path), open_log(self.path) as file:
            file.write(json.dumps(record) + "\n")
        self.begin(steps_done, loss_sum, now)


def read_step_log(path):
    """The records of a steps.jsonl ([] if there is none). A line cut short by a crash while it was
    being written is skipped: it is the only line such a crash can damage, and it is the last."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def keep_steps_up_to(path, last_step):
    """Rewrite steps.jsonl without the lines after global step `last_step`: a resumed run repeats the
    steps its checkpoint does not hold, and their lines would otherwise appear twice."""
    path = Path(path)
    if not path.exists():
        return
    kept = [record for record in read_step_log(path) if record["step"] <= last_step]
    text = "".join(json.dumps(record) + "\n" for record in kept)
    if text != path.read_text():
        check_writable(path)
        atomic_write_bytes(path, text.encode())


# ------------------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM (what `kill`, batch schedulers and container runtimes send) during
    training sets a flag that the loop checks between steps, so the checkpoint it then writes never holds
    a half-applied optimiser step. `signal_number`: the signal that came (SIGTERM if both did)."""

    def __enter__(self):
        self.signal_number = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._request) for number in STOP_SIGNALS}
        return self

    @property
    def requested(self):
        return self.signal_number is not None

    def _request(self, signum, frame):
        self.signal_number = max(signum, self.signal_number or 0)

    def agreed_signal(self, communicator=SINGLE_PROCESS):
        """The signal every rank stops for (collective under MPI; called once the ranks agree to stop): SIGTERM
        if any rank got it, so that every rank exits with the same status."""
        return max(communicator.allgather(self.signal_number or 0)) or signal.SIGINT

    def __exit__(self, *exc_info):
        for number, previous in self.previous.items():
            if previous is not None:           # None: a handler not installed from Python, which cannot be restored
                signal.signal(number, previous)


def stop_words(signal_number):
    """How the line after a stop begins: "interrupted" for Ctrl-C, "terminated by SIGTERM" for SIGTERM."""
    return "interrupted" if signal_number == signal.SIGINT else f"terminated by {signal.Signals(signal_number).name}"


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (loading the data, evaluating, plotting): raised by the handler
    that `terminate_like_ctrl_c` installs, so the process ends as after Ctrl-C, in one line."""


@contextlib.contextmanager
def terminate_like_ctrl_c():
    """For a command-line program: while inside, SIGTERM raises Terminated where Ctrl-C would raise
    KeyboardInterrupt (the default action kills the process without a word). During training run()'s
    StopOnInterrupt takes both signals over, and a checkpoint is written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def augment(images, config, generator):
    """A training batch's augmentation: config's random affine transform, then its random shift."""
    images = random_affine(images, generator, rotation=config.rotation, scale=config.scale, shear=config.shear,
                           translate=config.translate)
    return random_shift(images, config.max_shift, generator)


def evaluated_weights(weight_average):
    """The context in which the model holds the weights to evaluate: the average when there is one."""
    return weight_average.in_place_of_weights() if weight_average is not None else contextlib.nullcontext()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training between two steps, after the checkpoint was written (under MPI:
    every rank stops at the same step, and rank 0 wrote the checkpoint). `exit_status`: 128 + the signal's
    number, as a shell reports a process the signal ended: 130 for Ctrl-C, 143 for SIGTERM."""

    def __init__(self, message, signal_number=signal.SIGINT):
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_status = 128 + signal_number


def train_epoch(epoch, config, data, model, optimizer, train_step, interrupt, on_step, *, first_step, resume_state,
                steps_per_epoch, checkpoint_path, history, step_log=None, weight_average=None,
                communicator=SINGLE_PROCESS, log=None):
    """One pass over the shuffled training set (from `first_step` when resuming); returns its metrics.

    Under MPI every rank runs it (collective): each gathers and augments the whole batch with the same
    generator, so that all ranks see the same images, and TrainStep trains on the rank's shard; the
    loss summed here is the rank's share, and the ranks' sums are added at each loss read."""
    xp = get_array_module(data["train_images"])
    train_count = data["train_images"].shape[0]

    def images_after(steps):       # images trained on in the epoch's first `steps` steps: the last batch may be
        return min(steps * config.batch_size, train_count)     # partial, and a batch above the set is the set

    randomness = EpochRandomness(train_step.models(), xp, config.seed, epoch, rank=communicator.rank)
    order = xp.asarray(randomness.shuffle.permutation(data["train_images"].shape[0]))
    loss_sum = xp.zeros((), dtype=model.dtype)        # summed on the device, step by step, read now and then
    if resume_state is not None:
        note = randomness.restore(resume_state, communicator, first_step)
        if note is not None and log is not None:
            log(note)
        if communicator.is_root:                      # the checkpoint's loss is the job's: counted once
            loss_sum += resume_state["loss_sum"]
    progress = Progress(steps_per_epoch - first_step, f"epoch {epoch + 1}/{config.epochs}", config.batch_size,
                        show=communicator.is_root)
    started = shown_at = time.perf_counter()
    shown_sum, shown_step = communicator.sum(float(loss_sum)), first_step
    total = shown_sum
    if step_log is not None:
        step_log.begin(first_step, shown_sum, started)
    for step in range(first_step, steps_per_epoch):     # the learning rate follows optimizer.set_schedule
        batch = order[step * config.batch_size:(step + 1) * config.batch_size]
        images = augment(data["train_images"][batch], config, randomness.augmentation)   # all of it, on every rank
        loss_sum += train_step(images, data["train_labels"][batch])
        if weight_average is not None:
            weight_average.update()
        if on_step is not None:
            on_step(epoch, step)
        last_step = step == steps_per_epoch - 1
        read_now = (step + 1) % LOSS_READ_INTERVAL == 0 or last_step
        # one process stops at the step after Ctrl-C (or SIGTERM); MPI ranks stop together, at the first loss read
        # after it reached any of them (mpiexec passes both on to every rank, not necessarily at the same step)
        stopping = (interrupt.requested if communicator.size == 1
                    else read_now and communicator.any_rank(interrupt.requested))
        if read_now or stopping:
            total = communicator.sum(float(loss_sum))
            if not math.isfinite(total):
                progress.close()
                raise NonFiniteLoss(
                    f"the training loss became {total / (step + 1)} at epoch {epoch + 1}, step {step + 1}: stopped "
                    f"without writing a checkpoint (the last good one, if any, is {checkpoint_path}); "
                    f"try a lower --lr (now {config.lr})")
            now = time.perf_counter()
            progress.update(step + 1 - shown_step, (total - shown_sum) / (step + 1 - shown_step),
                            (images_after(step + 1) - images_after(shown_step)) / (now - shown_at))
            shown_sum, shown_step, shown_at = total, step + 1, now
            if step_log is not None:
                step_log.at_read(epoch=epoch, steps_done=step + 1, global_step=optimizer.step_count, loss_sum=total,
                                 lr=optimizer.lr, now=now, end=last_step or stopping)
        if stopping and not last_step:
            progress.close()
            signal_number = interrupt.agreed_signal(communicator)
            random_state = randomness.state(communicator)          # rank 0 gathers every rank's dropout states
            if communicator.is_root:
                save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, config=config, epoch=epoch,
                                step_in_epoch=step + 1, history=history, weight_average=weight_average,
                                random_state=dict(random_state, loss_sum=total))
            raise TrainingInterrupted(f"{stop_words(signal_number)}: checkpoint written to {checkpoint_path} "
                                      f"(epoch {epoch + 1}, step {step + 1}); continue with --resume", signal_number)
    progress.close()
    train_seconds = time.perf_counter() - started
    record = dict(epoch=epoch + 1, train_loss=total / steps_per_epoch)      # total: the last step's read
    # the validation images are measured exactly as the test images: same function, threads, batch size
    splits = (["validation"] if config.validation > 0 else []) + ["test"]

    def accuracy(split):
        return evaluate(model, data[f"{split}_images"], data[f"{split}_labels"], config.eval_batch_size,
                        replicas=train_step.models()[1:], pool=train_step.pool, communicator=communicator)

    with evaluated_weights(weight_average):
        record.update({f"{split}_accuracy": accuracy(split) for split in splits})
    if weight_average is not None and config.validation > 0:
        # what the average is worth, measured where settings are chosen: the trained weights' accuracy
        record["validation_accuracy_trained_weights"] = accuracy("validation")
    return dict(record, lr=optimizer.lr, seconds=time.perf_counter() - started, train_seconds=train_seconds,
                images_per_second=(images_after(steps_per_epoch) - images_after(first_step)) / train_seconds)


def check_plot_dependency(config):
    """ConfigError before any work when config.plot asks for plots and matplotlib is missing."""
    if config.plot:
        from .plots import MATPLOTLIB_HINT, matplotlib_available
        if not matplotlib_available():
            raise ConfigError(f"--plot: {MATPLOTLIB_HINT}")


# ------------------------------------------------------------------------------------------------
# the output folder: one run's own

CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".lock"
# what else training and --eval-only write into the folder: --overwrite removes them with the run they describe
RUN_PLOT_NAMES = ("curves.png", "attention.png", "attention_heads.png")
EVALUATION_NAME = "evaluation.json"
EVALUATION_FILE_NAMES = (EVALUATION_NAME, "confusion.png", "misclassified.png")
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)       # POSIX; Windows has none, and no symbolic links a user can plant


class OutputWriteError(OutputError):
    """A write into the output folder failed (a full disk, a read-only file); run() adds which checkpoint is intact."""


@contextlib.contextmanager
def writing(what):
    """Turn an OSError raised while writing `what` (a path, or words naming files) into a one-line OutputWriteError."""
    try:
        yield
    except OSError as error:
        # O_NOFOLLOW refuses a link with ELOOP, whose own words ("too many levels of symbolic links") mislead
        reason = ("it is a symbolic link, which the run does not follow" if error.errno == errno.ELOOP
                  else error.strerror or str(error))
        raise OutputWriteError(f"cannot write {what}: {reason}") from None


def open_log(path, mode="a"):
    """A log of the output folder opened for appending ("a") or emptied ("w"), never through a symbolic link:
    with O_NOFOLLOW a link in its place is an error (ELOOP), not a way to truncate or fill the link's target."""
    flags = os.O_WRONLY | os.O_CREAT | NO_FOLLOW | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o666), mode)


def check_writable(path):
    """OSError unless the existing file `path` opens for writing as it is (a file of its own, not read-only);
    the open changes nothing. Checked before a log is replaced, which a read-only file would not stop."""
    os.close(os.open(path, os.O_WRONLY | NO_FOLLOW))


def make_output_folder(out_dir):
    """Create `out_dir` (and its parents) and check that it can be written to, or OutputError:
    called before the data are loaded, so a bad --out-dir costs no loading and no training."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "a file of that name exists" if out_dir.is_file() else (error.strerror or str(error))
        raise OutputError(f"cannot create the output folder {out_dir}: {reason}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the output folder {out_dir}: permission denied")


def printable(text, limit=200):
    """`text` on one line of printable characters (a lock file is read from disk: it may hold anything)."""
    return "".join(character if character.isprintable() else "?" for character in " ".join(text.split()))[:limit]


class FolderLock:
    """An exclusive lock (fcntl.flock) on OUT/.lock, held while a run writes into OUT.

    flock belongs to the open file, and the kernel drops it when the process ends however it ends, so a
    crashed or killed run leaves no stale lock. The file names its holder (pid, host, start time) for the
    line a second run gets, and is removed on release: a run that opened it just before and then locked
    the removed file finds that the name no longer leads to its file, and locks the new one instead.
    Where fcntl is missing (Windows) a run is not locked."""

    def __init__(self, folder):
        self.folder, self.path, self.descriptor = Path(folder), Path(folder) / LOCK_NAME, None

    def acquire(self):
        if fcntl is None:
            return
        while self.descriptor is None:
            with writing(self.path):
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | NO_FOLLOW | getattr(os, "O_CLOEXEC", 0),
                                     0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = printable(os.pread(descriptor, 1000, 0).decode(errors="replace")) or "it has not said who"
                os.close(descriptor)
                raise OutputError(f"the output folder {self.folder} is in use by another run ({holder}): wait for "
                                  f"it to end, or choose another --out-dir") from None
            except OSError as error:
                os.close(descriptor)
                raise OutputError(f"cannot lock {self.path}: {error.strerror or error}") from None
            try:
                ours = os.path.samestat(os.fstat(descriptor), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                ours = False
            if ours:
                self.descriptor = descriptor
            else:
                os.close(descriptor)
        holder = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
        with writing(self.path):
            os.ftruncate(self.descriptor, 0)
            os.pwrite(self.descriptor, holder.encode() + b"\n", 0)

    def release(self):
        if self.descriptor is None:
            return
        with contextlib.suppress(OSError):      # removed while still locked: no run can take it in between
            os.unlink(self.path)
        os.close(self.descriptor)
        self.descriptor = None


def describe_log(path, record_name):
    """What a non-empty log at `path` holds, in a few words for the --overwrite line and the refusal; None if empty."""
    try:
        if path.stat().st_size == 0:
            return None
        records = read_step_log(path)
    except FileNotFoundError:
        return None
    except OSError:
        return path.name
    last = records[-1] if records and isinstance(records[-1], dict) else {}
    accuracy = last.get("test_accuracy")
    accuracy = f", the last at test accuracy {accuracy:.2%}" if isinstance(accuracy, float) else ""
    return f"{path.name} ({len(records)} {record_name}{'' if len(records) == 1 else 's'}{accuracy})"


class RunFolder:
    """The output folder while a run writes into it (under MPI, rank 0's): made, locked and checked on entry.

    Entering it creates OUT, takes the lock (a second run on OUT stops there, in one line naming the
    holder), refuses symbolic links in place of the logs, and refuses a folder that holds a run (a
    checkpoint or a non-empty log) unless the run resumes it or config.overwrite replaces it, which the
    first log line then says, with what it replaces. Nothing in the folder changes until `begin`, called
    once the data, the model and the checkpoint have been checked: a run that fails before it leaves the
    folder as it was. Leaving releases the lock and completes an OutputWriteError with the state of the
    last checkpoint (`saved`, which run() keeps up to date)."""

    def __init__(self, config, log):
        self.config, self.log, self.path = config, log, Path(config.out_dir)
        self.checkpoint, self.metrics, self.steps = (self.path / name
                                                     for name in (CHECKPOINT_NAME, METRICS_NAME, STEP_LOG_NAME))
        self.lock = FolderLock(self.path)
        self.saved = None            # (epoch, step_in_epoch) of the checkpoint on disk that belongs to this run

    def __enter__(self):
        make_output_folder(self.path)
        self.lock.acquire()
        try:
            self.check()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, kind, error, traceback):
        self.lock.release()
        if isinstance(error, OutputWriteError):
            raise OutputError(f"{error}; {self.checkpoint_note()}") from None
        return False

    def check(self):
        for path in (self.metrics, self.steps):
            if path.is_symlink():
                raise OutputError(f"{path} is a symbolic link: a run writes its logs into files of its own, never "
                                  f"through a link; remove it or choose another --out-dir")
        if self.config.resume:
            return
        found = [CHECKPOINT_NAME] if self.checkpoint.exists() else []
        found += [text for text in (describe_log(self.metrics, "epoch"), describe_log(self.steps, "line")) if text]
        if found and not self.config.overwrite:
            raise OutputError(f"the output folder {self.path} holds a run ({', '.join(found)}): continue it with "
                              f"--resume, replace it with --overwrite, or choose another --out-dir")
        if self.config.overwrite:
            found += [name for name in RUN_PLOT_NAMES + EVALUATION_FILE_NAMES if (self.path / name).exists()]
            if found:
                self.log(f"--overwrite: replacing the run in {self.path}: {', '.join(found)}")

    def begin(self, *, history, optimizer_step, saved=None):
        """Make the folder this run's: a new run removes what --overwrite replaces and starts from empty
        logs; a resumed one (`saved`: its checkpoint's epoch and step) cuts metrics.jsonl and steps.jsonl
        back to that checkpoint, so every line in them belongs to the saved run."""
        self.saved = saved
        if self.config.resume:
            with writing(self.metrics):
                keep_metrics_of(self.metrics, history)
            with writing(self.steps):
                keep_steps_up_to(self.steps, optimizer_step)
            return
        if self.config.overwrite:
            for name in (CHECKPOINT_NAME, *RUN_PLOT_NAMES, *EVALUATION_FILE_NAMES):
                with writing(self.path / name):
                    (self.path / name).unlink(missing_ok=True)
        with writing(self.metrics), open_log(self.metrics, "w"):
            pass
        # a new run's step log starts empty; with the log off, an older run's would be plotted as this one's
        with writing(self.steps):
            if self.config.log_every:
                open_log(self.steps, "w").close()
            else:
                self.steps.unlink(missing_ok=True)

    def checkpoint_note(self):
        if self.saved is None:
            return "no checkpoint of this run was written yet"
        epoch, step = self.saved
        at = f"epoch {epoch + 1}, step {step}" if step else f"after epoch {epoch}"
        return f"the last checkpoint, {self.checkpoint} ({at}), is intact: continue from it with --resume"


def keep_metrics_of(path, history):
    """Rewrite metrics.jsonl to hold exactly the checkpoint's `history`, one line per epoch it finished: a
    line written after the checkpoint (before a crash) goes, and one lost to a failed write comes back.
    (The lines are the records themselves: a JSON round trip gives every float back exactly.)"""
    path = Path(path)
    text = "".join(json.dumps(record) + "\n" for record in history)
    if path.exists() and text == path.read_text():
        return
    if path.exists():
        check_writable(path)
    atomic_write_bytes(path, text.encode())


def learning_rate_schedule(config, steps_per_epoch):
    """The learning rate of every step of the run: linear warmup over config.warmup_epochs (at most a
    tenth of the run), then cosine decay to 0 (optim.warmup_cosine); entry t is the rate of step t + 1."""
    total_steps = config.epochs * steps_per_epoch
    # the warmup is capped at a tenth of the run, so a short run (--epochs 1) still decays its learning rate
    warmup_steps = min(int(config.warmup_epochs * steps_per_epoch), total_steps // 10)
    return [warmup_cosine(step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=config.lr)
            for step in range(total_steps)]


def physical_memory():
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def build_model(config, data, *, training=True):
    """The ViT for `config` and the data's image size and classes; ConfigError if the options do not fit,
    before any weight is allocated: a configuration vit.check_config refuses (above vit.MAX_PARAMETERS,
    among others), or one whose weights (training: with their gradients and Adam's two moments) exceed
    this machine's memory on the CPU."""
    model_config = config.model_config(data["image_size"], num_classes=data["num_classes"])
    try:
        check_config(**model_config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    count, memory = parameter_count(**model_config), physical_memory()
    needed = count * 4 * (TRAINING_COPIES if training else 1)          # float32
    if config.device == "cpu" and memory is not None and needed > memory:
        raise ConfigError(f"the model (dim {config.dim}, depth {config.depth}, mlp_dim {config.mlp_dim}) has "
                          f"{count:,} parameters and needs at least {gibibytes(needed)} "
                          f"{'to train' if training else 'for its weights'}, more than this machine's "
                          f"{gibibytes(memory)} of memory")
    return ViT(**model_config, seed=config.seed)


def load_data(config, backend):
    """The training and test sets on the device, normalised, and with config.validation = N > 0 the
    validation set: the last N images of the training file, never augmented. They are split off
    first, and config.train_limit then takes the first images of the rest, so the validation images
    stay the same whatever the limit."""
    arrays = load_mnist(config.data_dir)
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    config.validate_for_training_set(train_images.shape[0])
    kept = train_images.shape[0] - config.validation
    validation_images, validation_labels = train_images[kept:], train_labels[kept:]
    train_images, train_labels = train_images[:kept], train_labels[:kept]
    if config.train_limit is not None:
        train_images, train_labels = train_images[:config.train_limit], train_labels[:config.train_limit]
    height, width = train_images.shape[1:]
    if height != width:
        raise DataError(f"images are {height}x{width}: this ViT needs square images")
    data = dict(train_images=normalize(train_images, backend), train_labels=backend.asarray(train_labels, dtype="int64"),
                test_images=normalize(arrays["test_images"], backend),
                test_labels=backend.asarray(arrays["test_labels"], dtype="int64"),
                image_size=height, num_classes=NUM_CLASSES)     # load_mnist checked the labels
    if config.validation > 0:
        data.update(validation_images=normalize(validation_images, backend),
                    validation_labels=backend.asarray(validation_labels, dtype="int64"))
    return data


def quiet(message):
    pass


def check_ranks(config, communicator):
    """ConfigError when the global batch cannot give every MPI rank an image."""
    if config.batch_size < communicator.size:
        raise ConfigError(f"batch_size must be at least the number of MPI ranks ({communicator.size}): it is the "
                          f"global batch, split over the ranks; got {config.batch_size}")


def describe_ranks(config, data, optimizer, train_step, communicator, log):
    """Under MPI: check that every rank starts from the same options, data, weights and optimiser state
    (they must, for the ranks' steps to stay identical; DistributedError if not), then log how the work
    is spread and how gradients are exchanged."""
    options = {name: value for name, value in dataclasses.asdict(config).items() if name != "data_dir"}
    communicator.check_same("options", json.dumps(options, sort_keys=True).encode())
    communicator.check_same("training data", data["train_images"], data["train_labels"])
    communicator.check_same("starting weights and optimiser state", optimizer.data, optimizer.exp_avg,
                            optimizer.exp_avg_sq, host.array([optimizer.step_count]))
    log(communicator.describe(train_step.threads))


def run(config, *, log=log_line, on_step=None, communicator=None):
    """Train (or resume) as `config` says; returns the list of per-epoch metrics dicts.

    `on_step(epoch, step)` is called after every step (tests use it to interrupt a run).
    `communicator`: distributed.py's; None takes this process's (`distributed.world()`): under mpiexec
    every rank calls run, trains data-parallel, and gets the same history; rank 0 alone logs and writes."""
    run_started = time.perf_counter()      # wall_seconds counts from here: device set-up and data loading included
    communicator = world() if communicator is None else communicator
    root = communicator.is_root
    log = log if root else quiet
    config.validate()
    check_ranks(config, communicator)
    if config.device == "gpu":
        communicator.select_gpu()          # one GPU per rank, chosen before CuPy allocates anything
    backend = get_backend(config.device)
    if backend.name == "cpu":
        keep_freed_host_memory()
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    metrics_path = out_dir / METRICS_NAME
    step_log_path = out_dir / STEP_LOG_NAME
    check_plot_dependency(config)
    # rank 0 alone writes files, so rank 0 alone holds the folder: locked from here until run returns
    with RunFolder(config, log) if root else contextlib.nullcontext() as folder:
        data = load_data(config, backend)
        config.validate_for_images(data["image_size"])
        model = build_model(config, data).to(backend)
        optimizer = AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                          weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(data["train_images"].shape[0] / config.batch_size)
        optimizer.set_schedule(learning_rate_schedule(config, steps_per_epoch))
        threads = config.threads if config.threads is not None else communicator.default_threads()
        train_step = TrainStep(model, optimizer, SoftmaxCrossEntropy(config.label_smoothing), config.clip_grad_norm,
                               threads=threads, communicator=communicator)
        communicator.prepare_exchange(backend)
        weight_average = WeightAverage(optimizer.data, config.ema_decay) if config.ema_decay else None

        start_epoch, start_step, random_state, history = 0, 0, None, []
        if config.resume:
            meta, model_state, optimizer_state = load_checkpoint(checkpoint_path)
            check_same_model(checkpoint_path, meta["model_config"], model.config)
            check_same_validation_split(checkpoint_path, meta["train_config"], config)
            check_resume_position(checkpoint_path, meta, steps_per_epoch, config)
            model.load_state_dict(model_state)
            optimizer.load_state_dict(dict(optimizer_state, step_count=meta["optimizer_step"],
                                           lr=meta["optimizer_lr"]))
            if weight_average is not None:
                resume_weight_average(checkpoint_path, meta, model, weight_average)
            start_epoch, start_step = meta["epoch"], meta["step_in_epoch"]
            random_state, history = meta["random_state"], meta["history"]
            log(f"resumed from {checkpoint_path}: epoch {start_epoch + 1}, step {start_step}")
        if communicator.size > 1:
            describe_ranks(config, data, optimizer, train_step, communicator, log)
        if root:       # everything is checked: only now does the run change what the folder holds
            folder.begin(history=history, optimizer_step=optimizer.step_count,
                         saved=(start_epoch, start_step) if config.resume else None)
        step_log = (StepLog(step_log_path, config.log_every, config.batch_size, data["train_images"].shape[0])
                    if config.log_every and root else None)

        model.train()
        # a diverging run is caught by the NonFiniteLoss check; NumPy's overflow warnings on the way would only
        # add noise
        with StopOnInterrupt() as interrupt, host.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for epoch in range(start_epoch, config.epochs):
                # Ctrl-C or SIGTERM came during the last evaluation (on any rank): its checkpoint is written
                if communicator.any_rank(interrupt.requested):
                    signal_number = interrupt.agreed_signal(communicator)
                    raise TrainingInterrupted(f"{stop_words(signal_number)}: checkpoint of epoch {epoch} in "
                                              f"{checkpoint_path}; continue with --resume", signal_number)
                resuming_here = epoch == start_epoch and start_step > 0
                record = train_epoch(epoch, config, data, model, optimizer, train_step, interrupt, on_step,
                                     first_step=start_step if resuming_here else 0,
                                     resume_state=random_state if resuming_here else None,
                                     steps_per_epoch=steps_per_epoch, checkpoint_path=checkpoint_path,
                                     history=history, step_log=step_log, weight_average=weight_average,
                                     communicator=communicator, log=log)
                record["elapsed"] = (history[-1]["elapsed"] if history else 0.0) + record["seconds"]
                record["wall_seconds"] = time.perf_counter() - run_started
                history.append(record)
                # rank 0's files stand for every rank: their weights must still be equal (see distributed.py)
                communicator.check_same(f"weights after epoch {epoch + 1}", optimizer.data,
                                        hint="the MPI library's Allreduce gave the ranks different sums (see "
                                             "scratchvit/distributed.py); try another MPI library")
                if root:
                    # the checkpoint first: metrics.jsonl never lists an epoch that no checkpoint holds
                    save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, config=config,
                                    epoch=epoch + 1, step_in_epoch=0, random_state=None, history=history,
                                    weight_average=weight_average)
                    folder.saved = (epoch + 1, 0)
                    with writing(metrics_path), open_log(metrics_path) as file:
                        file.write(json.dumps(record) + "\n")
                validation = (f"validation accuracy {record['validation_accuracy']:.2%}  "
                              if "validation_accuracy" in record else "")
                log(f"epoch {epoch + 1}/{config.epochs}  loss {record['train_loss']:.4f}  {validation}"
                    f"test accuracy {record['test_accuracy']:.2%}  lr {record['lr']:.2e}  {record['seconds']:.1f}s  "
                    f"({record['images_per_second']:.0f} img/s)")
        if config.plot and history and root:
            from .plots import write_plots
            with evaluated_weights(weight_average), writing(f"the plots in {out_dir}"):
                paths = write_plots(out_dir, model, data["test_images"], data["test_labels"], history,
                                    steps=read_step_log(step_log_path))
            for path in paths:
                log(f"wrote {path}")
    log(f"done in {time.perf_counter() - run_started:.1f}s; metrics in {metrics_path}, checkpoint in {checkpoint_path}")
    return history


def load_for_evaluation(path, config):
    """(checkpoint meta, model on config's device, data) for evaluating a saved model;
    the checkpoint's model configuration must match `config`'s."""
    config.validate()
    backend = get_backend(config.device)
    meta, model_state, _ = load_checkpoint(path, averaged=True)
    data = load_data(config, backend)
    model = build_model(config, data, training=False)
    check_same_model(path, meta["model_config"], model.config)
    model.load_state_dict(model_state)
    model.to(backend)
    return meta, model, data


def evaluate_checkpoint(path, config, *, log=log_line):
    """Test accuracy of a saved model (always the test set, whatever config.validation says); the
    checkpoint's model configuration must match `config`'s."""
    meta, model, data = load_for_evaluation(path, config)
    accuracy = evaluate(model, data["test_images"], data["test_labels"], config.eval_batch_size)
    log(f"test accuracy {accuracy:.2%} ({path}, epoch {meta['epoch']})")
    return accuracy


def report_checkpoint(path, config, *, log=log_line):
    """The evaluation report of a saved model on the test set (report.EvaluationReport), what
    `train_mnist.py --eval-only` does: logs the test accuracy, then per-class accuracy and the
    confusion matrix as a table, and writes them to evaluation.json in the checkpoint's folder (with
    config.plot, also confusion.png and misclassified.png there). Fixed names, like the other files of
    a run folder; the JSON names the checkpoint and its epoch."""
    from .report import evaluation_report, write_report_json
    check_plot_dependency(config)
    meta, model, data = load_for_evaluation(path, config)
    report = evaluation_report(model, data["test_images"], data["test_labels"], config.eval_batch_size)
    log(f"test accuracy {report.accuracy:.2%} ({path}, epoch {meta['epoch']})")
    log(report.table())
    folder = Path(path).parent
    json_path = folder / EVALUATION_NAME
    try:
        write_report_json(json_path, report, checkpoint=str(path), epoch=meta["epoch"], split="test")
        log(f"wrote {json_path}")
        if config.plot:
            from .plots import write_evaluation_plots
            for plot_path in write_evaluation_plots(folder, report, data["test_images"]):
                log(f"wrote {plot_path}")
    except OSError as error:
        raise OutputError(f"cannot write the evaluation report into {folder}: "
                          f"{error.strerror or error}") from None
    return report
