"""A run's checkpoint: writing it (atomically), reading it back (checkpoint_file.py checks every byte first),
and the checks a resumed run makes against it: the same model, the same validation split, a step inside
an epoch of this run.

The file is an .npz archive: "model/NAME" the trained weights, "average/NAME" the weight average when the
run keeps one, "optimizer/exp_avg" and "optimizer/exp_avg_sq" AdamW's moments, and "meta", JSON bytes:
the model and training configurations, the epoch and step it was written at, the optimiser's step and
learning rate, the generators' states (randomness.py) and the metrics of the epochs so far.

`inference_checkpoint_bytes` makes the other kind, an inference-only file (checkpoint_file.py): the
weights and a meta that says so, written the same way byte for byte whenever its inputs are the same.
"""
import dataclasses
import io
import json
import zipfile

import numpy
from numpy.lib import format as npy_format

from .checkpoint_file import FORMAT, CheckpointError, is_inference_only, read_checkpoint
from .config import TrainConfig
from .data import atomic_write_bytes
from .run_log import writing

__all__ = ["CheckpointError", "check_resume_position", "check_same_model", "check_same_validation_split",
           "inference_checkpoint_bytes", "load_checkpoint", "resume_weight_average", "save_checkpoint"]

# a zip entry's time is its local time of writing unless given (zipfile.ZipFile.open(name, "w")): the
# earliest a zip can record, so that the same arrays always make the same bytes
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


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
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode(), dtype=numpy.uint8)
    buffer = io.BytesIO()
    numpy.savez(buffer, **arrays)
    with writing(path):
        atomic_write_bytes(path, buffer.getvalue())


def inference_checkpoint_bytes(model_state, meta):
    """The bytes of an inference-only checkpoint: "model/NAME" float32 for each of `model_state`'s
    weights and a "meta" made from a checked training checkpoint's `meta` (its configuration, epoch
    and history), marked inference_only, without optimizer moments, average or generator states.

    The same inputs give the same bytes: members in sorted order, each stored (not deflated) with a
    fixed time (numpy.savez stamps the current one), the meta's JSON with sorted keys."""
    inference_meta = dict(format=FORMAT, inference_only=True, model_config=meta["model_config"],
                          train_config=meta["train_config"], epoch=meta["epoch"], step_in_epoch=0,
                          optimizer_step=meta["optimizer_step"], optimizer_lr=meta["optimizer_lr"],
                          average_updates=None, random_state=None, history=meta["history"])
    arrays = {f"model/{name}": numpy.ascontiguousarray(value, dtype=numpy.float32)
              for name, value in model_state.items()}
    arrays["meta"] = numpy.frombuffer(json.dumps(inference_meta, sort_keys=True).encode(), dtype=numpy.uint8)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=FIXED_ZIP_TIME)
            info.external_attr = 0o644 << 16          # -rw-r--r-- where unzipped, not the writer's umask
            with archive.open(info, "w") as member:
                npy_format.write_array(member, arrays[key], allow_pickle=False)
    return buffer.getvalue()


def load_checkpoint(path, *, averaged=False, resuming=False):
    """(meta dict, model state dict, optimizer arrays) from a checkpoint file, or CheckpointError: every
    field, array header and size is checked before anything is read from it (checkpoint_file.py).

    averaged=True: the weights to evaluate, which are the weight average where the run kept one
    (--ema-decay) and else the trained weights; False: the trained weights, which training resumes.
    resuming=True refuses an inference-only checkpoint (the shipped model), which has no optimizer
    state to resume; otherwise its optimizer arrays are None."""
    meta, model_state, optimizer_state = read_checkpoint(
        path, averaged=averaged, train_options={field.name for field in dataclasses.fields(TrainConfig)})
    if resuming and is_inference_only(meta):
        raise CheckpointError(f"{path}: an inference-only model (weights without the optimizer's state): it "
                              f"predicts and evaluates, but a run cannot resume from it; train without --resume")
    return meta, model_state, optimizer_state


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
