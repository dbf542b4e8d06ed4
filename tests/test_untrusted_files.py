"""Trust no file, and no option: issue 16's cases 6 to 9 and 14.

A checkpoint, a data file or an option value can be damaged, crafted or mistyped. Each is checked
before anything is allocated from it, and every failure is one line naming the file (or option)
and the field, with exit status 1 (a file) or 2 (an option), never a traceback:
    6  resume and --eval-only from a checkpoint with wrong arrays or meta fields;
    7  a checkpoint declaring a huge model, a deflate bomb member, a 10^12-element .npy header;
    8  labels outside 0-9; a gzip file that promises or inflates to more than its header says;
    9  weights that are not finite (predict, the demo, --eval-only); a PNG given as a checkpoint;
    14 option values: inf, negative seeds, too many threads, models too large, a huge batch's img/s.
Every crafted file is written here, from a real checkpoint or dataset made by the test. The last
test is a Hypothesis property: random byte-level damage to a real checkpoint either leaves it
loading with identical arrays or gives the one-line CheckpointError, never another exception.
"""
import gzip
import io
import json
import math
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_train import (IMAGE_SIZE, TINY_MODEL, TINY_MODEL_ARGS, assert_one_line_error, cli, quiet, read_metrics,
                        write_dataset)
from scratchvit import vit as vit_module
from scratchvit import config as config_module
from scratchvit.checkpoint_file import DEFLATE_MAX_RATIO, CheckpointError, read_checkpoint
from scratchvit.data import MNIST_FILES, DataError, load_mnist, read_idx, write_idx
from scratchvit.distributed import usable_cores
from scratchvit.optim import AdamW
from scratchvit.checkpoint import load_checkpoint, save_checkpoint
from scratchvit.config import ConfigError, TrainConfig
from scratchvit.optim import parameter_groups
from scratchvit.train import run
from scratchvit.vit import MAX_PARAMETERS, ViT, check_config, parameter_count, parameter_shapes

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_COUNT = 64
BATCH = 16                      # 4 steps per epoch
RUN_OPTIONS = dict(TINY_MODEL, epochs=2, batch_size=BATCH, lr=5e-3, ema_decay=0.9)
DIGIT_MODEL = dict(image_size=28, patch_size=7, num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32)


# ------------------------------------------------------------------------------------------------
# real files, and crafted copies of them

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "trust", train_count=TRAIN_COUNT, test_count=32)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """The checkpoint of a finished 2-epoch run (with a weight average): its path."""
    out_dir = tmp_path_factory.mktemp("trained")
    run(TrainConfig(**RUN_OPTIONS, data_dir=str(dataset), out_dir=str(out_dir)), log=quiet)
    return out_dir / "checkpoint.npz"


@pytest.fixture(scope="module")
def digit_checkpoint(tmp_path_factory):
    """A checkpoint of an untrained model for 28x28 images, as predict and the demo take."""
    path = tmp_path_factory.mktemp("digit") / "checkpoint.npz"
    model = ViT(**DIGIT_MODEL, seed=1)
    optimizer = AdamW(parameter_groups(model, 0.05), lr=1e-3, weight_decay=0.05)
    save_checkpoint(path, model=model, optimizer=optimizer, config=TrainConfig(patch_size=7, dim=16, depth=1, heads=2,
                                                                               mlp_dim=32),
                    epoch=1, step_in_epoch=0, random_state=None, history=[dict(epoch=1, elapsed=1.0)])
    return path


def checkpoint_arrays(path):
    """{key: array} of a checkpoint as numpy writes it (meta as a dict)."""
    with numpy.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["meta"] = json.loads(bytes(arrays["meta"]).decode())
    return arrays


def write_arrays(path, arrays):
    arrays = dict(arrays)
    arrays["meta"] = numpy.frombuffer(json.dumps(arrays["meta"]).encode(), dtype=numpy.uint8)
    buffer = io.BytesIO()
    numpy.savez(buffer, **arrays)
    Path(path).write_bytes(buffer.getvalue())
    return path


def crafted(good, path, change):
    """A copy of checkpoint `good` with change(arrays) applied (arrays["meta"] is the meta dict)."""
    arrays = checkpoint_arrays(good)
    change(arrays)
    return write_arrays(path, arrays)


def set_meta(name, value):
    def change(arrays):
        arrays["meta"][name] = value
    return change


def drop_meta(name):
    def change(arrays):
        del arrays["meta"][name]
    return change


def set_array(key, value):
    def change(arrays):
        arrays[key] = value
    return change


def drop_array(key):
    def change(arrays):
        del arrays[key]
    return change


def bad_random_state(arrays):
    arrays["meta"].update(step_in_epoch=1, epoch=1, history=arrays["meta"]["history"][:1],
                          random_state=dict(generators=[{"bit_generator": "PCG64", "state": "nonsense"}], loss_sum=1.0))


def replay_state(draws, seed=3):
    """A mid-epoch random state whose one generator is a GPU run's (backend.ReplayableGenerator's record)."""
    def change(arrays):
        bad_random_state(arrays)
        arrays["meta"]["random_state"]["generators"] = [{"replay": {"seed": seed, "draws": draws}}]
    return change


NOT_REPLAYABLE = "generators[0] is not a replayable"

# 6. each damage: the change, and what the one-line error must name
DAMAGES = {
    "wrong weight shape": (set_array("model/head.weight", numpy.zeros((16, 3), numpy.float32)), "model/head.weight"),
    "missing weight": (drop_array("model/norm.bias"), "model/norm.bias"),
    "extra weight": (set_array("model/extra", numpy.zeros(3, numpy.float32)), "model/extra"),
    "string dtype": (set_array("model/head.bias", numpy.array(["a", "b", "c", "d"])), "model/head.bias"),
    "0-d weight": (set_array("model/norm.weight", numpy.float32(1.0)), "model/norm.weight"),
    "bad optimizer array": (set_array("optimizer/exp_avg", numpy.zeros(5, numpy.float32)), "optimizer/exp_avg"),
    "model_config a string": (set_meta("model_config", "vit"), "model_config"),
    "model_config missing dim": (lambda arrays: arrays["meta"]["model_config"].pop("dim"), "dim"),
    "train_config null": (set_meta("train_config", None), "train_config"),
    "epoch a string": (set_meta("epoch", "x"), "epoch"),
    "epoch -5": (set_meta("epoch", -5), "epoch"),
    "epoch past the run": (set_meta("epoch", 3), "epoch"),
    "history a string": (set_meta("history", "x"), "history"),
    "bad random_state": (bad_random_state, "random_state"),
    "replay of an unknown draw": (replay_state([["normal", [[4], "float32"], 1]]), NOT_REPLAYABLE),
    "replay of a negative seed": (replay_state([], seed=-1), NOT_REPLAYABLE),
    "replay of a huge draw": (replay_state([["random", [[2**16, 2**16], "float32"], 1]]), NOT_REPLAYABLE),
    "replay of too many draws": (replay_state([["integers", [-2, 3, [8]], 10**6 + 1]]),
                                 "records more than 1,000,000 draws"),
    "no optimizer_step": (drop_meta("optimizer_step"), "optimizer_step"),
    "optimizer_lr NaN": (set_meta("optimizer_lr", float("nan")), "optimizer_lr"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_the_field(trained, tmp_path, damage):
    change, fragment = DAMAGES[damage]
    path = crafted(trained, tmp_path / "checkpoint.npz", change)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and fragment in message, message


def test_the_genuine_checkpoint_loads_and_its_arrays_are_the_files(trained):
    """The accepted side of every check above: a real checkpoint, trained and averaged weights."""
    arrays = checkpoint_arrays(trained)
    for averaged, prefix in ((False, "model/"), (True, "average/")):
        meta, model_state, optimizer_state = load_checkpoint(trained, averaged=averaged)
        assert meta == arrays["meta"]
        assert list(model_state) == list(parameter_shapes(**meta["model_config"]))
        for name, value in model_state.items():
            numpy.testing.assert_array_equal(value, arrays[prefix + name])
        for name, value in optimizer_state.items():
            numpy.testing.assert_array_equal(value, arrays["optimizer/" + name])


def test_a_gpu_runs_replayable_generator_state_is_accepted_up_to_the_limits(trained, tmp_path):
    """The accepted side of the replay checks: what ReplayableGenerator records, at the draw-count limit."""
    from scratchvit.checkpoint_file import MAX_REPLAYED_DRAWS, MAX_REPLAYED_VALUES
    draws = [["random", [[128, 5], "float64"], 7], ["integers", [-2, 3, [128, 2]], MAX_REPLAYED_DRAWS - 8],
             ["random", [[MAX_REPLAYED_VALUES], "float32"], 1]]
    path = crafted(trained, tmp_path / "checkpoint.npz", replay_state(draws))
    meta, _, _ = load_checkpoint(path)
    assert meta["random_state"]["generators"] == [{"replay": {"seed": 3, "draws": draws}}]


@pytest.mark.parametrize("damage", ["epoch -5", "wrong weight shape", "no optimizer_step", "bad random_state"])
def test_cli_resume_from_a_damaged_checkpoint_is_one_line_exit_1(dataset, trained, tmp_path, damage):
    change, fragment = DAMAGES[damage]
    crafted(trained, tmp_path / "checkpoint.npz", change)
    result = cli("--data-dir", dataset, "--out-dir", tmp_path, "--resume", "--epochs", 3, "--batch-size", BATCH,
                 *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, "checkpoint.npz", fragment)


def test_resume_at_a_step_past_the_epochs_end_is_refused_before_training(dataset, trained, tmp_path):
    """step_in_epoch 10^9 passed once, and trained nonsense (negative img/s) with exit 0."""
    def mid_epoch(arrays):
        bad_random_state(arrays)
        arrays["meta"]["random_state"]["generators"] = [None]        # a state a GPU run writes: re-seeded
        arrays["meta"]["step_in_epoch"] = 10**9
    crafted(trained, tmp_path / "checkpoint.npz", mid_epoch)
    steps = []
    with pytest.raises(CheckpointError, match="step_in_epoch"):
        run(TrainConfig(**RUN_OPTIONS, data_dir=str(dataset), out_dir=str(tmp_path), resume=True), log=quiet,
            on_step=lambda epoch, step: steps.append(step))
    assert steps == []


def test_resume_at_the_last_step_of_an_epoch_is_accepted(dataset, trained, tmp_path):
    """The boundary: step_in_epoch = steps per epoch - 1 resumes and runs that one step."""
    def mid_epoch(arrays):
        bad_random_state(arrays)
        arrays["meta"]["random_state"]["generators"] = [None]
        arrays["meta"]["step_in_epoch"] = TRAIN_COUNT // BATCH - 1
    crafted(trained, tmp_path / "checkpoint.npz", mid_epoch)
    steps = []
    run(TrainConfig(**RUN_OPTIONS, data_dir=str(dataset), out_dir=str(tmp_path), resume=True), log=quiet,
        on_step=lambda epoch, step: steps.append((epoch, step)))
    assert steps == [(1, TRAIN_COUNT // BATCH - 1)]


@pytest.mark.parametrize("damage", ["model_config a string", "string dtype", "train_config null"])
def test_cli_eval_only_from_a_damaged_checkpoint_is_one_line_exit_1(dataset, trained, tmp_path, damage):
    change, fragment = DAMAGES[damage]
    path = crafted(trained, tmp_path / "checkpoint.npz", change)
    result = cli("--data-dir", dataset, "--eval-only", "--checkpoint", path, *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, "checkpoint.npz", fragment)
    assert not (tmp_path / "evaluation.json").exists()


# ------------------------------------------------------------------------------------------------
# 7. nothing is allocated from what a checkpoint declares before it is checked

def peak_memory_of(function):
    """(the exception function raised, the peak of memory traced while it ran, in bytes)."""
    tracemalloc.start()
    try:
        function()
    except Exception as error:          # noqa: BLE001 - the caller asserts which
        raised = error
    else:
        raised = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


def test_a_checkpoint_declaring_a_huge_model_is_refused_before_building_it(digit_checkpoint, tmp_path):
    """dim 200000, depth 50: 894 GiB once asked of the allocator; now refused from the configuration."""
    from scratchvit.predict import load_trained_model

    def huge(arrays):
        arrays["meta"]["model_config"].update(dim=200000, depth=50)
    path = crafted(digit_checkpoint, tmp_path / "huge.npz", huge)
    raised, peak = peak_memory_of(lambda: load_trained_model(path))
    assert isinstance(raised, CheckpointError), raised
    message = str(raised)
    assert "model_config" in message and "parameters" in message and "GiB" in message and str(path) in message
    assert peak < 16 * 2**20, peak


def npy_member(header_shape, data=b""):
    """The bytes of an .npy file whose header declares `header_shape` float32, followed by `data`."""
    header = io.BytesIO()
    numpy.lib.format.write_array_header_1_0(header, dict(descr="<f4", fortran_order=False, shape=header_shape))
    return header.getvalue() + data


def copy_members(source, target, leave_out):
    """Every member of zip `source` but `leave_out` into the open ZipFile `target`."""
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            if info.filename != leave_out:
                target.writestr(info.filename, archive.read(info))


BOMB_ZEROS = 128 * 2**20        # inflated size of the bombs below; about 130 kB each on disk


def test_a_deflate_bomb_member_is_refused_before_it_is_inflated(digit_checkpoint, tmp_path):
    """A 128 MB deflated member (130 kB on disk) whose header declares another shape: only its header is
    read. np.load inflated all of it before the shape was compared."""
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        copy_members(digit_checkpoint, archive, leave_out="model/head.weight.npy")
        with archive.open("model/head.weight.npy", "w") as member:
            member.write(npy_member((BOMB_ZEROS // 4,)))
            chunk = bytes(2**20)
            for _ in range(BOMB_ZEROS // len(chunk)):
                member.write(chunk)
    assert bomb.stat().st_size < 2**20
    raised, peak = peak_memory_of(lambda: load_checkpoint(bomb))
    assert peak < 16 * 2**20, peak
    assert isinstance(raised, CheckpointError) and "model/head.weight" in str(raised), raised


def test_a_member_declaring_more_than_deflate_can_give_is_refused(digit_checkpoint, tmp_path):
    """The zip directory's declared size is compared with the bytes stored, before any inflating."""
    path = tmp_path / "checkpoint.npz"
    content = bytearray(digit_checkpoint.read_bytes())
    name = b"model/head.weight.npy"
    entry = content.rindex(b"PK\x01\x02", 0, content.rindex(name))         # its central directory entry
    compressed = struct.unpack_from("<I", content, entry + 20)[0]
    struct.pack_into("<H", content, entry + 10, zipfile.ZIP_DEFLATED)                # said to be deflated,
    struct.pack_into("<I", content, entry + 24, (DEFLATE_MAX_RATIO + 1) * compressed)  # to more than it can
    path.write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match="model/head.weight.npy.*declares"):
        load_checkpoint(path)


def test_an_npy_header_declaring_10_to_the_12_elements_is_refused_on_resume(dataset, trained, tmp_path):
    """np.load allocated what the header declared (4 TB: a MemoryError) before anything compared it."""
    with zipfile.ZipFile(tmp_path / "checkpoint.npz", "w") as archive:
        copy_members(trained, archive, leave_out="model/head.weight.npy")
        archive.writestr("model/head.weight.npy", npy_member((10**12,), bytes(16)))
    with pytest.raises(CheckpointError, match="model/head.weight"):
        run(TrainConfig(**dict(RUN_OPTIONS, epochs=3), data_dir=str(dataset), out_dir=str(tmp_path), resume=True),
            log=quiet)


# ------------------------------------------------------------------------------------------------
# 9. weights that are not finite; a file that is no checkpoint at all

def nan_weights(good, path):
    def change(arrays):
        weight = arrays["average/head.weight" if "average/head.weight" in arrays else "model/head.weight"].copy()
        weight[0, 0] = numpy.nan
        arrays["average/head.weight" if "average/head.weight" in arrays else "model/head.weight"] = weight
    return crafted(good, path, change)


def predict_cli(*args):
    return subprocess.run([sys.executable, "-m", "scratchvit.predict", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    pytest.importorskip("PIL", reason="Pillow is not installed: predict reads images with it")
    from PIL import Image
    pixels = numpy.zeros((28, 28), numpy.uint8)
    pixels[6:22, 12:16] = 255
    path = tmp_path_factory.mktemp("png") / "digit.png"
    Image.fromarray(pixels).save(path)
    return path


def test_predict_refuses_weights_that_are_not_finite(digit_checkpoint, tmp_path, png):
    path = nan_weights(digit_checkpoint, tmp_path / "nan.npz")
    result = predict_cli("--checkpoint", path, png)
    assert_one_line_error(result, 1, "nan.npz", "head.weight", "not finite")
    assert result.stdout == ""


def test_predict_with_finite_weights_predicts(digit_checkpoint, png):
    result = predict_cli("--checkpoint", digit_checkpoint, png)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{png}: ")


class ServerStarted(Exception):
    """Raised in place of starting the demo's server: the checkpoint was accepted."""


def test_the_demo_refuses_weights_that_are_not_finite(digit_checkpoint, tmp_path, capsys, monkeypatch):
    from scratchvit.demo import server
    from scratchvit.demo.__main__ import main

    def no_server(*args, **kwargs):
        raise ServerStarted()
    monkeypatch.setattr(server, "make_server", no_server)
    path = nan_weights(digit_checkpoint, tmp_path / "nan.npz")
    assert main(["--checkpoint", str(path), "--port", "0"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not finite" in lines[0] and "nan.npz" in lines[0], lines


def test_eval_only_refuses_weights_that_are_not_finite_and_writes_no_report(dataset, trained, tmp_path):
    path = nan_weights(trained, tmp_path / "checkpoint.npz")
    result = cli("--data-dir", dataset, "--eval-only", "--checkpoint", path, *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, "checkpoint.npz", "not finite")
    assert not (tmp_path / "evaluation.json").exists()


def test_predict_given_a_png_as_checkpoint_says_it_is_no_checkpoint(png):
    result = predict_cli("--checkpoint", png, png)
    line = assert_one_line_error(result, 1, "digit.png", "not a scratchvit checkpoint")
    assert "pickle" not in line


# ------------------------------------------------------------------------------------------------
# 8. data: labels outside 0-9, gzip files that promise or hold more than their header

@pytest.mark.parametrize("split, value, index", [("train_labels", 200, 5), ("test_labels", 255, 0)])
def test_a_label_outside_0_to_9_names_the_file_and_the_first_bad_index(tmp_path, split, value, index):
    folder = write_dataset(tmp_path / "data", train_count=16, test_count=8)
    labels = read_idx(folder / MNIST_FILES[split])
    labels[index] = value
    labels[index + 1] = 10                 # a later bad label: the first one is named
    write_idx(folder / MNIST_FILES[split], labels)
    with pytest.raises(DataError) as error:
        load_mnist(folder)
    message = str(error.value)
    assert MNIST_FILES[split] in message and f"label {value} at index {index}" in message, message


def test_cli_a_label_outside_0_to_9_is_exit_1(tmp_path):
    folder = write_dataset(tmp_path / "data", train_count=16, test_count=8)
    labels = read_idx(folder / MNIST_FILES["train_labels"])
    labels[3] = 200
    write_idx(folder / MNIST_FILES["train_labels"], labels)
    result = cli("--data-dir", folder, "--out-dir", tmp_path / "out", "--epochs", 1, *TINY_MODEL_ARGS)
    assert_one_line_error(result, 1, MNIST_FILES["train_labels"], "index 3")


def test_label_9_is_accepted(tmp_path):
    folder = write_dataset(tmp_path / "data", train_count=16, test_count=8)
    labels = read_idx(folder / MNIST_FILES["test_labels"])
    labels[0] = 9
    write_idx(folder / MNIST_FILES["test_labels"], labels)
    assert load_mnist(folder)["test_labels"][0] == 9


def gzip_bomb(path, labels, zeros):
    """A gzipped labels file: an honest header and labels, then `zeros` more zero bytes in the same stream."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [compressor.compress(bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + bytes(labels))]
    chunk = bytes(2**20)
    for _ in range(zeros // len(chunk)):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    Path(path).write_bytes(b"".join(parts))
    return path


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    """128 MB of zeros after 8 labels, 130 kB on disk: only the header's bytes and one more are inflated
    (gzip.decompress took all 128 MB, and a larger bomb was a MemoryError)."""
    path = gzip_bomb(tmp_path / "labels.gz", [1, 2, 3, 4, 5, 6, 7, 8], BOMB_ZEROS)
    assert path.stat().st_size < 2**20
    raised, peak = peak_memory_of(lambda: read_idx(path, 1))
    assert peak < 16 * 2**20, peak
    assert isinstance(raised, DataError) and "labels.gz" in str(raised) and "more than" in str(raised), raised


def test_a_gzip_header_promising_more_than_the_file_can_hold_is_refused(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (10**6).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                                   + bytes(784)))
    with pytest.raises(DataError, match="images.gz.*can hold"):
        read_idx(path, 3)


@pytest.mark.parametrize("layout", ["one member", "two members", "zero padding"])
def test_gzip_files_as_gunzip_reads_them_are_accepted(tmp_path, layout):
    """The boundary: a file exactly as long as its header says, in one gzip member, in two, or padded."""
    content = bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes([9, 8, 7, 6, 5])
    data = {"one member": gzip.compress(content),
            "two members": gzip.compress(content[:6]) + gzip.compress(content[6:]),
            "zero padding": gzip.compress(content) + bytes(16)}[layout]
    path = tmp_path / "labels.gz"
    path.write_bytes(data)
    assert gzip.decompress(data) == content
    numpy.testing.assert_array_equal(read_idx(path, 1), [9, 8, 7, 6, 5])


# ------------------------------------------------------------------------------------------------
# 14. limits and option values

BAD_OPTIONS = [
    pytest.param(["--warmup-epochs", "inf"], "error: --warmup-epochs must be", id="warmup-inf"),
    pytest.param(["--lr", "nan"], "error: --lr must be", id="lr-nan"),
    pytest.param(["--seed", "-5"], "error: --seed must be", id="negative-seed"),
    pytest.param(["--threads", "100000"], "error: --threads must be", id="threads-100000"),
    pytest.param(["--dim", "100000", "--heads", "1"], "parameters", id="dim-100000"),
    pytest.param(["--depth", "100000000"], "parameters", id="depth-1e8"),
    pytest.param(["--mlp-dim", "2000000000"], "parameters", id="mlp-dim-2e9"),
]


@pytest.mark.parametrize("options, fragment", BAD_OPTIONS)
def test_cli_option_out_of_range_is_one_line_exit_2_naming_it(dataset, tmp_path, options, fragment):
    result = cli("--data-dir", dataset, "--out-dir", tmp_path, "--epochs", 1, *TINY_MODEL_ARGS, *options)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "checkpoint.npz").exists()


def test_help_states_the_limits():
    result = cli("--help")
    text = " ".join(result.stdout.split())
    assert f"{MAX_PARAMETERS:,} parameters" in text
    assert f"at most the cores this process may use ({len(usable_cores())} here)" in text


def test_threads_up_to_the_cores_are_accepted():
    TrainConfig(threads=len(usable_cores())).validate()
    with pytest.raises(ConfigError, match="threads"):
        TrainConfig(threads=len(usable_cores()) + 1).validate()


def test_seed_0_is_accepted():
    TrainConfig(seed=0).validate()


@pytest.mark.parametrize("config", [DIGIT_MODEL, dict(image_size=8, patch_size=2, num_classes=4, dim=8, depth=3,
                                                      heads=2, mlp_dim=12, channels=3)])
def test_parameter_shapes_and_count_are_the_models(config):
    """What a checkpoint is checked against is what ViT builds: names, order, shapes, count."""
    model = ViT(**config)
    assert list(parameter_shapes(**config).items()) == [(name, parameter.shape)
                                                        for name, parameter in model.named_parameters()]
    assert parameter_count(**config) == sum(parameter.size for parameter in model.parameters())


def test_the_model_size_limit_is_exact(monkeypatch):
    count = parameter_count(**DIGIT_MODEL)
    monkeypatch.setattr(vit_module, "MAX_PARAMETERS", count)
    ViT(**DIGIT_MODEL)
    monkeypatch.setattr(vit_module, "MAX_PARAMETERS", count - 1)
    with pytest.raises(ValueError, match=f"{count:,} parameters"):
        check_config(**DIGIT_MODEL)


def test_a_model_that_cannot_fit_in_memory_is_refused_before_it_is_built(dataset, tmp_path, monkeypatch):
    config = TrainConfig(**RUN_OPTIONS, data_dir=str(dataset), out_dir=str(tmp_path))
    count = parameter_count(**config.model_config(IMAGE_SIZE))
    built = []
    monkeypatch.setattr(config_module, "ViT", lambda **options: built.append(options))
    monkeypatch.setattr(config_module, "physical_memory", lambda: 4 * 4 * count - 1)     # 4 float32 copies, less 1
    with pytest.raises(ConfigError, match="memory"):
        run(config, log=quiet)
    assert built == []


def test_a_model_that_just_fits_in_memory_trains(dataset, tmp_path, monkeypatch):
    config = TrainConfig(**dict(RUN_OPTIONS, epochs=1), data_dir=str(dataset), out_dir=str(tmp_path))
    count = parameter_count(**config.model_config(IMAGE_SIZE))
    monkeypatch.setattr(config_module, "physical_memory", lambda: 4 * 4 * count)
    assert len(run(config, log=quiet)) == 1


def test_a_batch_larger_than_the_training_set_reports_the_images_it_trained_on(dataset, tmp_path):
    """--batch-size 100000000 once printed 2930790181 img/s: the rate counted batch_size images per step."""
    history = run(TrainConfig(**dict(RUN_OPTIONS, epochs=1, batch_size=100_000_000), data_dir=str(dataset),
                              out_dir=str(tmp_path)), log=quiet)
    record = history[0]
    assert math.isclose(record["images_per_second"] * record["train_seconds"], TRAIN_COUNT, rel_tol=1e-9)
    assert read_metrics(tmp_path)[0]["images_per_second"] == record["images_per_second"]


# ------------------------------------------------------------------------------------------------
# the property: byte-level damage to a real checkpoint loads identically or is the one-line error

@pytest.fixture(scope="module")
def original(trained):
    """The trained checkpoint's bytes, and what it loads as: (trained weights, averaged weights)."""
    return trained.read_bytes(), (read_checkpoint(trained), read_checkpoint(trained, averaged=True))


DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("truncate"), st.integers(min_value=0)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
)


def damaged(content, damages):
    content = bytearray(content)
    for damage in damages:
        position = damage[1] % (len(content) + 1)
        if damage[0] == "flip" and position < len(content):
            content[position] ^= damage[2]
        elif damage[0] == "truncate":
            del content[position:]
        elif damage[0] == "insert":
            content[position:position] = damage[2]
    return bytes(content)


@settings(max_examples=60, deadline=None)
@given(damages=st.lists(DAMAGE, min_size=1, max_size=3))
def test_damaged_checkpoint_bytes_load_identically_or_give_the_one_line_error(original, tmp_path_factory, damages):
    """Flipped, cut and inserted bytes anywhere (zip structure, .npy headers, meta, data): CRC-32, the member
    list and the header checks turn each into CheckpointError, or the damage missed everything that is read."""
    content, expected = original
    path = tmp_path_factory.mktemp("damaged") / "checkpoint.npz"
    path.write_bytes(damaged(content, damages))
    for averaged, (expected_meta, expected_model, expected_optimizer) in zip((False, True), expected):
        try:
            meta, model_state, optimizer_state = read_checkpoint(path, averaged=averaged)
        except CheckpointError as error:
            assert "\n" not in str(error) and str(path) in str(error), str(error)
            continue
        assert meta == expected_meta
        for loaded, wanted in ((model_state, expected_model), (optimizer_state, expected_optimizer)):
            assert list(loaded) == list(wanted)
            for name in wanted:
                numpy.testing.assert_array_equal(loaded[name], wanted[name], err_msg=name)
