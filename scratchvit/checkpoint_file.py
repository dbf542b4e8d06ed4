"""Reading a checkpoint without trusting it: everything is checked before anything is allocated from it.

A checkpoint (checkpoint.save_checkpoint) is an .npz archive, a zip file of .npy members:
    meta.npy                     uint8 (n,): UTF-8 JSON, the run's configuration, position and history
    model/NAME.npy               the trained weights, one per ViT parameter (vit.parameter_shapes names them)
    average/NAME.npy             the weight average, the same names (only when the run kept one)
    optimizer/exp_avg.npy        AdamW's moments over the flat weight buffer: (P,) for P parameters
    optimizer/exp_avg_sq.npy

An inference-only checkpoint (meta's "inference_only": true, as the shipped model scratchvit/models/
mnist_vit.npz) holds meta and model/NAME alone: the weights to predict with, without the optimizer's
moments or a weight average, written at the end of an epoch (step_in_epoch 0, random_state null). It
is read through the same checks; it can be evaluated and predicted with, but not resumed.

`read_checkpoint` reads it in this order, so that a damaged or crafted file costs no more memory than
the model its configuration is allowed to describe:
    1. the zip's member list: known names only, each once; each member's declared size plausible for
       the bytes stored (a deflated member cannot inflate past DEFLATE_MAX_RATIO times its size, so a
       3 MB archive declaring a 2 GB member is refused before inflating it);
    2. meta: its .npy header (uint8, 1-D, at most MAX_META_BYTES), then the JSON, then every field
       type- and range-checked (`check_meta`): the model configuration through vit.check_config, which
       refuses a model above vit.MAX_PARAMETERS with what it would need;
    3. every array's .npy header (shape, dtype) against what that configuration implies, and the member's
       declared size against the header's, before a byte of its data is read;
    4. then the data, read to the end of each member, so zipfile checks its CRC-32;
    5. the weights and moments must be finite.
Every failure is a CheckpointError whose message is one line naming the file and the member or field.
"""
import json
import math
import numbers
import zipfile
import zlib
from pathlib import Path

import numpy
from numpy.lib import format as npy_format

from .vit import check_config, parameter_shapes

FORMAT = "scratchvit-checkpoint-1"
MAX_META_BYTES = 64 * 2**20     # the JSON meta: configuration and per-epoch history, a few kB per epoch
# deflate emits at least one bit per 258 repeated bytes, plus block overhead: no stream inflates by more than
# 1032:1 (zlib's technical details, https://zlib.net/zlib_tech.html, "Maximum Compression Factor")
DEFLATE_MAX_RATIO = 1032
MODEL_PREFIXES = ("model/", "average/")
OPTIMIZER_ARRAYS = ("exp_avg", "exp_avg_sq")
MODEL_CONFIG_KEYS = ("image_size", "patch_size", "num_classes", "dim", "depth", "heads", "mlp_dim", "channels",
                     "dropout", "emb_dropout")
OPTIONAL_MODEL_CONFIG_KEYS = ("channels", "dropout", "emb_dropout")
RANDOM_STATE_KEYS = ("generators", "dropout_per_rank", "loss_sum")
# a GPU generator's state is the draws it made (backend.ReplayableGenerator), made again on resume: bounded
MAX_REPLAYED_DRAWS = 10**6          # draws per generator in one epoch (a step makes one or two)
MAX_REPLAYED_VALUES = 2**31         # numbers per draw
# what zipfile and numpy's .npy reader raise on bytes they cannot make sense of
READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, OverflowError, NotImplementedError,
               RuntimeError, zipfile.BadZipFile, zlib.error)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to another configuration."""


def read_checkpoint(path, *, averaged=False, train_options=None):
    """(meta dict, {name: weight}, {"exp_avg": (P,), "exp_avg_sq": (P,)}) from a checkpoint, every part checked
    first (see the module docstring), or CheckpointError. An inference-only checkpoint gives None for
    the optimizer's state.

    averaged=True gives the weight average where the checkpoint holds one (else the trained weights);
    `train_options`, when given, are the names train_config may hold (TrainConfig's fields)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        with open(path, "rb") as file:
            zip_like = file.read(2) == b"PK"          # every zip file starts with a "PK" signature
        if not zip_like:
            raise CheckpointError(f"{path}: not a scratchvit checkpoint (not an .npz archive, which is a zip "
                                  f"file)") from None
        raise CheckpointError(f"{path}: not a readable scratchvit checkpoint (damaged .npz archive: "
                              f"{describe(error)})") from None
    except READ_ERRORS as error:
        raise CheckpointError(f"{path}: not a readable scratchvit checkpoint ({describe(error)})") from None
    with archive:
        members = member_list(path, archive)
        meta = read_meta(path, archive, members)
        check_meta(path, meta, train_options)
        expected = expected_arrays(path, meta, members)
        headers = {key: read_header(path, archive, members[key], key, shape) for key, shape in expected.items()}
        prefix = "average/" if averaged and meta["average_updates"] is not None else "model/"
        wanted = [key for key in expected if key.startswith((prefix, "optimizer/"))]
        arrays = {key: read_data(path, archive, members[key], key, headers[key]) for key in wanted}
    for key, array in arrays.items():
        if not numpy.isfinite(array).all():
            raise CheckpointError(f"{path}: {key} holds values that are not finite (NaN or infinity): "
                                  f"the weights of a diverged run, not a usable model")
    model_state = {key[len(prefix):]: array for key, array in arrays.items() if key.startswith(prefix)}
    optimizer_state = None if is_inference_only(meta) else {name: arrays[f"optimizer/{name}"]
                                                             for name in OPTIMIZER_ARRAYS}
    return meta, model_state, optimizer_state


def is_inference_only(meta):
    """Whether a checked meta describes an inference-only checkpoint (weights alone, nothing to resume)."""
    return meta.get("inference_only", False) is True


def describe(error):
    return " ".join(f"{type(error).__name__}: {error}".split())


# ------------------------------------------------------------------------------------------------
# 1. the member list

def member_list(path, archive):
    """{key: ZipInfo} with the ".npy" dropped from each name; CheckpointError for an unknown or repeated
    name, an unsupported compression, or a declared size that the stored bytes cannot hold."""
    members = {}
    for info in archive.infolist():
        key = info.filename[:-len(".npy")]
        if not info.filename.endswith(".npy") or not (key == "meta" or key.startswith(MODEL_PREFIXES)
                                                      or key in (f"optimizer/{name}" for name in OPTIMIZER_ARRAYS)):
            raise CheckpointError(f"{path}: not a scratchvit checkpoint: unexpected member {info.filename!r}")
        if key in members:
            raise CheckpointError(f"{path}: member {info.filename!r} appears twice")
        if info.compress_type == zipfile.ZIP_STORED:
            plausible = info.file_size == info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            plausible = info.file_size <= DEFLATE_MAX_RATIO * info.compress_size + 64
        else:
            raise CheckpointError(f"{path}: member {info.filename!r} uses zip compression method "
                                  f"{info.compress_type}; a checkpoint is stored or deflated")
        if not plausible:
            raise CheckpointError(f"{path}: member {info.filename!r} declares {info.file_size:,} bytes but stores "
                                  f"{info.compress_size:,}, more than compression can expand to: damaged or crafted")
        members[key] = info
    if "meta" not in members:
        raise CheckpointError(f"{path}: not a scratchvit checkpoint (no meta member)")
    return members


# ------------------------------------------------------------------------------------------------
# 2. meta

def read_meta(path, archive, members):
    info = members["meta"]
    if info.file_size > MAX_META_BYTES:
        raise CheckpointError(f"{path}: meta declares {info.file_size:,} bytes, more than the {MAX_META_BYTES:,} "
                              f"a checkpoint's meta may hold")
    header = read_header(path, archive, info, "meta", None)
    shape, dtype = header[0], header[2]
    if dtype != numpy.uint8 or len(shape) != 1:
        raise CheckpointError(f"{path}: meta must be a 1-D uint8 array of JSON text, got shape {shape}, dtype {dtype}")
    data = read_data(path, archive, info, "meta", header)
    try:
        meta = json.loads(data.tobytes().decode("utf-8"))
    except ValueError as error:
        raise CheckpointError(f"{path}: meta is not valid UTF-8 JSON ({describe(error)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: meta must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a scratchvit checkpoint (meta format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    return meta


def is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def field(path, meta, name, check, expected):
    """meta[name] if check(value) holds, else CheckpointError naming the field and what it must be."""
    if name not in meta:
        raise CheckpointError(f"{path}: meta has no {name} field")
    value = meta[name]
    if not check(value):
        raise CheckpointError(f"{path}: meta field {name} must be {expected}, got {short(value)}")
    return value


def short(value):
    """A field's value for a message: its repr, cut to a line."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def check_meta(path, meta, train_options=None):
    """CheckpointError naming the first field of `meta` of the wrong type or out of its range."""
    model_config = field(path, meta, "model_config", lambda value: isinstance(value, dict), "an object")
    check_model_config(path, model_config)
    train_config = field(path, meta, "train_config", lambda value: isinstance(value, dict), "an object")
    if train_options is not None:
        unknown = sorted(str(key) for key in train_config if key not in train_options)
        if unknown:
            raise CheckpointError(f"{path}: meta field train_config has an unknown option {unknown[0]!r}")
    for name, minimum in (("epochs", 1), ("batch_size", 1), ("validation", 0)):
        if name == "validation" and name not in train_config:      # older checkpoints held no images out
            continue
        field(path, train_config, name, lambda value: is_int(value) and value >= minimum,
              f"an integer of at least {minimum}")
    epochs = train_config["epochs"]
    epoch = field(path, meta, "epoch", lambda value: is_int(value) and 0 <= value <= epochs,
                  f"an integer from 0 to train_config's epochs ({epochs})")
    step = field(path, meta, "step_in_epoch", lambda value: is_int(value) and value >= 0 and
                 (value == 0 or epoch < epochs), "a non-negative integer (0 once every epoch is done)")
    field(path, meta, "optimizer_step", lambda value: is_int(value) and value >= 0, "a non-negative integer")
    field(path, meta, "optimizer_lr", lambda value: is_number(value) and value >= 0, "a non-negative finite number")
    field(path, meta, "average_updates", lambda value: value is None or (is_int(value) and value >= 0),
          "null or a non-negative integer")
    history = field(path, meta, "history", lambda value: isinstance(value, list) and len(value) <= epoch,
                    f"a list of at most one record per finished epoch ({epoch})")
    for index, record in enumerate(history):
        if not (isinstance(record, dict) and record.get("epoch") == index + 1 and is_number(record.get("elapsed"))
                and record["elapsed"] >= 0):
            raise CheckpointError(f"{path}: meta field history[{index}] must be the record of epoch {index + 1} "
                                  f"(an object with epoch and elapsed seconds), got {short(record)}")
    random_state = field(path, meta, "random_state", lambda value: value is None or isinstance(value, dict),
                         "null or an object")
    if step > 0 and random_state is None:
        raise CheckpointError(f"{path}: meta field random_state is null, but a checkpoint written mid-epoch "
                              f"(step_in_epoch {step}) needs the generators' states")
    if random_state is not None:
        check_random_state(path, random_state)
    inference_only = meta.get("inference_only", False)       # training checkpoints hold no such field
    if not isinstance(inference_only, bool):
        raise CheckpointError(f"{path}: meta field inference_only must be true or false, got {short(inference_only)}")
    if inference_only and not (step == 0 and random_state is None and meta["average_updates"] is None):
        raise CheckpointError(f"{path}: meta says inference_only, which holds one set of weights written at the end "
                              f"of an epoch: step_in_epoch must be 0 and random_state and average_updates null")


def check_model_config(path, config):
    missing = [key for key in MODEL_CONFIG_KEYS if key not in config and key not in OPTIONAL_MODEL_CONFIG_KEYS]
    unknown = sorted(str(key) for key in config if key not in MODEL_CONFIG_KEYS)
    if missing or unknown:
        what = f"has no {missing[0]}" if missing else f"has an unknown key {unknown[0]!r}"
        raise CheckpointError(f"{path}: meta field model_config {what}")
    try:
        check_config(**config)
    except ValueError as error:
        raise CheckpointError(f"{path}: meta field model_config: {' '.join(str(error).split())}") from None


def check_random_state(path, random_state):
    """The generators' states as EpochRandomness.state() writes them, each one NumPy accepts."""
    unknown = sorted(str(key) for key in random_state if key not in RANDOM_STATE_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: meta field random_state has an unknown key {unknown[0]!r}")
    generators = field(path, random_state, "generators", lambda value: isinstance(value, list) and len(value) >= 1,
                       "a non-empty list")
    if "dropout_per_rank" in random_state:
        field(path, random_state, "dropout_per_rank",
              lambda value: isinstance(value, list) and all(is_int(count) and count >= 0 for count in value)
              and sum(value) == len(generators) - 1,
              f"a list of counts adding up to the {len(generators) - 1} dropout generators")
    field(path, random_state, "loss_sum", is_number, "a finite number")
    for index, state in enumerate(generators):
        if state is None:            # an older GPU checkpoint's generator: a resume there re-seeds
            continue
        if isinstance(state, dict) and "replay" in state:
            check_replay_state(path, f"random_state generators[{index}]", state)
            continue
        try:
            numpy.random.default_rng().bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as error:
            raise CheckpointError(f"{path}: meta field random_state generators[{index}] is not a NumPy generator "
                                  f"state ({describe(error)})") from None


def is_replayed_size(size):
    return size is None or (isinstance(size, list) and all(is_int(n) and n >= 0 for n in size)
                            and math.prod(size) <= MAX_REPLAYED_VALUES)


def is_replayed_draw(draw):
    """[method, arguments, times] as backend.ReplayableGenerator records it."""
    if not (isinstance(draw, list) and len(draw) == 3 and is_int(draw[2]) and draw[2] >= 1
            and isinstance(draw[1], list)):
        return False
    method, arguments = draw[0], draw[1]
    if method == "random":
        return (len(arguments) == 2 and is_replayed_size(arguments[0]) and arguments[1] in ("float32", "float64"))
    if method == "integers":
        return (len(arguments) == 3 and is_int(arguments[0]) and (arguments[1] is None or is_int(arguments[1]))
                and is_replayed_size(arguments[2]))
    return False


def check_replay_state(path, name, state):
    """A GPU generator's {"replay": {"seed", "draws"}} (backend.ReplayableGenerator.state()): a resume makes
    every recorded draw again, so their number and sizes are bounded, not only their types."""
    replay = state["replay"]
    if not (len(state) == 1 and isinstance(replay, dict) and set(replay) == {"seed", "draws"}
            and is_int(replay["seed"]) and replay["seed"] >= 0 and isinstance(replay["draws"], list)
            and all(is_replayed_draw(draw) for draw in replay["draws"])):
        raise CheckpointError(f"{path}: meta field {name} is not a replayable generator state "
                              f"('replay' holding a non-negative 'seed' and 'draws' of [method, arguments, times])")
    if sum(draw[2] for draw in replay["draws"]) > MAX_REPLAYED_DRAWS:
        raise CheckpointError(f"{path}: meta field {name} records more than {MAX_REPLAYED_DRAWS:,} draws, "
                              f"more than an epoch makes")


# ------------------------------------------------------------------------------------------------
# 3. and 4. the arrays: headers first, data after

def expected_arrays(path, meta, members):
    """{key: shape} of every array the checkpoint must hold, from its model configuration; CheckpointError
    for a missing or an extra one."""
    shapes = parameter_shapes(**meta["model_config"])
    count = sum(math.prod(shape) for shape in shapes.values())
    prefixes = ("model/", "average/") if meta["average_updates"] is not None else ("model/",)
    expected = {f"{prefix}{name}": shape for prefix in prefixes for name, shape in shapes.items()}
    if not is_inference_only(meta):
        expected.update({f"optimizer/{name}": (count,) for name in OPTIMIZER_ARRAYS})
    missing = [key for key in expected if key not in members]
    if missing:
        raise CheckpointError(f"{path}: the arrays do not fit the model its model_config describes: "
                              f"{missing[0]} is missing")
    extra = sorted(key for key in members if key != "meta" and key not in expected)
    if extra:
        reason = ("meta's average_updates is null" if extra[0].startswith("average/") else
                  "meta says inference_only" if extra[0].startswith("optimizer/") else
                  "the model its model_config describes has no such weight")
        raise CheckpointError(f"{path}: the arrays do not fit the model its model_config describes: unexpected "
                              f"array {extra[0]} ({reason})")
    return expected


def read_header(path, archive, info, key, shape):
    """(shape, fortran_order, dtype) of a member's .npy header, checked against `shape` (None: any) and
    against the member's declared size, reading nothing beyond the header."""
    try:
        with archive.open(info) as member:
            version = npy_format.read_magic(member)
            if version == (1, 0):
                header = npy_format.read_array_header_1_0(member)
            elif version == (2, 0):
                header = npy_format.read_array_header_2_0(member)
            else:
                raise ValueError(f".npy format version {version} (a checkpoint uses 1.0 or 2.0)")
            header_size = member.tell()
    except READ_ERRORS as error:
        raise CheckpointError(f"{path}: {key}: unreadable .npy header ({describe(error)})") from None
    stored_shape, fortran_order, dtype = header
    if shape is not None:
        if dtype.kind != "f" or dtype.fields is not None or dtype.subdtype is not None:
            raise CheckpointError(f"{path}: {key} has dtype {dtype}; weights are floating point")
        if tuple(stored_shape) != tuple(shape):
            raise CheckpointError(f"{path}: the arrays do not fit the model its model_config describes: {key} "
                                  f"has shape {tuple(stored_shape)}, expected {tuple(shape)}")
    data_size = math.prod(stored_shape) * dtype.itemsize
    if info.file_size != header_size + data_size:
        raise CheckpointError(f"{path}: {key} declares {info.file_size:,} bytes, but its header describes "
                              f"{header_size + data_size:,}: damaged")
    return tuple(stored_shape), fortran_order, dtype


def read_data(path, archive, info, key, header):
    """The member's array, read to its end (which makes zipfile check the CRC-32)."""
    shape, fortran_order, dtype = header
    size = math.prod(shape) * dtype.itemsize
    try:
        with archive.open(info) as member:
            member.read(info.file_size - size)                       # the header, read and checked before
            data = member.read(size)
            if len(data) != size or member.read(1):
                raise EOFError(f"{len(data):,} bytes of data where the header says {size:,}")
    except READ_ERRORS as error:
        raise CheckpointError(f"{path}: {key}: damaged ({describe(error)})") from None
    return numpy.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C").copy()
