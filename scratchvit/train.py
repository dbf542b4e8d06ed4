"""Training a ViT on MNIST: the loop behind `train_mnist.py`, usable from Python as `run(TrainConfig(...))`
(`from scratchvit.train import TrainConfig, run`).

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
- every `log_every` steps, one JSON line in OUT/steps.jsonl (`StepLog`, run_log.py), written at the
  loss reads the loop makes anyway;
- the output folder is the run's own (`RunFolder`, run_folder.py): locked for the whole run, refused if it holds a
  run that the run neither resumes nor replaces (`overwrite`), logs never written through a link,
  cut back to the checkpoint on resume, and every OSError on output one line naming the file and
  the last checkpoint, intact;
- randomness: the shuffle, the augmentation and dropout of epoch e draw from generators seeded by
  (seed, e), and a checkpoint saves the generators' states (NumPy's own; on CuPy, whose state cannot
  be read, the seed and the draws made, which a resume replays: EpochRandomness), so a resumed run
  repeats an uninterrupted one exactly, even from a checkpoint written by Ctrl-C (or SIGTERM) in the
  middle of an epoch (randomness.py; the checkpoint itself: checkpoint.py);
- a non-finite loss stops the run with `NonFiniteLoss` before any checkpoint is written, so the
  last good checkpoint survives;
- under mpiexec, data-parallel over processes (distributed.py): every rank holds the data and a
  replica, draws the same shuffle and augments the same whole batch, TrainStep trains each rank on its
  shard and sums the gradients with one Allreduce; the loss is summed over the ranks at the loss
  reads, and the ranks agree there whether Ctrl-C or SIGTERM came; each rank evaluates a slice of the
  test (and validation) images and the correct counts are summed; rank 0 alone logs and writes files. The
  checkpoint holds nothing that depends on the number of ranks (the loss so far is the job's, the
  augmentation generator is shared), so a checkpoint written by N ranks resumes under M.

Where the rest lives: the options and what they build (config.py), evaluation and --eval-only
(evaluation.py), Ctrl-C and SIGTERM (signals.py), the learning-rate schedule's formula and the
optimiser's parameter groups (optim.py).
"""
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy

from .affine import random_affine
from .backend import get_array_module, get_backend
from .checkpoint import (check_resume_position, check_same_model, check_same_validation_split, load_checkpoint,
                         resume_weight_average, save_checkpoint)
# TrainConfig is the loop's input: imported here for users too (`from scratchvit.train import TrainConfig, run`)
from .config import LOSS_READ_INTERVAL, ConfigError, TrainConfig, build_model, check_plot_dependency, load_data
from .cpu_threads import keep_freed_host_memory
from .data import random_shift
from .distributed import SINGLE_PROCESS, world
from .evaluation import evaluate, evaluated_weights
from .layers import SoftmaxCrossEntropy
from .optim import AdamW, parameter_groups, warmup_cosine
from .randomness import EpochRandomness
from .run_folder import CHECKPOINT_NAME, RunFolder
from .run_log import METRICS_NAME, STEP_LOG_NAME, Progress, StepLog, log_line, open_log, read_step_log, writing
from .signals import StopOnInterrupt, TrainingInterrupted, stop_words
from .train_step import TrainStep
from .weight_average import WeightAverage

__all__ = ["TrainConfig", "run", "NonFiniteLoss", "train_epoch", "learning_rate_schedule"]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def augment(images, config, generator):
    """A training batch's augmentation: config's random affine transform, then its random shift."""
    images = random_affine(images, generator, rotation=config.rotation, scale=config.scale, shear=config.shear,
                           translate=config.translate)
    return random_shift(images, config.max_shift, generator)


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


def learning_rate_schedule(config, steps_per_epoch):
    """The learning rate of every step of the run: linear warmup over config.warmup_epochs (at most a
    tenth of the run), then cosine decay to 0 (optim.warmup_cosine); entry t is the rate of step t + 1."""
    total_steps = config.epochs * steps_per_epoch
    # the warmup is capped at a tenth of the run, so a short run (--epochs 1) still decays its learning rate
    warmup_steps = min(int(config.warmup_epochs * steps_per_epoch), total_steps // 10)
    return [warmup_cosine(step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=config.lr)
            for step in range(total_steps)]


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
                            optimizer.exp_avg_sq, numpy.array([optimizer.step_count]))
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
            meta, model_state, optimizer_state = load_checkpoint(checkpoint_path, resuming=True)
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
        with StopOnInterrupt() as interrupt, numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
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
