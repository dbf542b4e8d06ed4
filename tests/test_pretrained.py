"""The model shipped in the package (scratchvit/models/mnist_vit.npz and its provenance, mnist_vit.json),
the commands that use it when no --checkpoint is given, and the export that makes it (tools/ship_model.py).

Each test is meant to fail for a realistic fault: a shipped file that only loads around the checkpoint
checks (or carries optimizer state, or is not the file the JSON describes), a provenance whose
configuration, classes or probabilities are not the file's, a default that silently loads another
model or writes into the installed package, a resume that crashes on weights without moments, a
recorded accuracy the file does not give, and an export that stamps the time into the zip.

The ten sample digits of the provenance are written here as PNG files and as a ten-image IDX data set
(test and training set alike) for the commands that need one; the accuracy test reads the real MNIST
test set where REPO/../shared/data/mnist or $SCRATCHVIT_MNIST_DIR holds it, and skips elsewhere.
"""
import configparser
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy
import pytest

import scratchvit
from scratchvit.checkpoint import CheckpointError, inference_checkpoint_bytes, load_checkpoint
from scratchvit.checkpoint_file import read_checkpoint
from scratchvit.config import TrainConfig
from scratchvit.data import MNIST_FILES, load_mnist, normalize, write_idx
from scratchvit.evaluation import SHIFT_AVERAGE_TEXT
from scratchvit.predict import load_trained_model, probabilities
from scratchvit.preprocess import mnist_style, to_model_input
from scratchvit.pretrained import PRETRAINED_PATH, PROVENANCE_FORMAT, PROVENANCE_PATH, pretrained_provenance
from scratchvit.report import evaluation_report
from scratchvit.train import run
from scratchvit.vit import parameter_count, parameter_shapes
from conftest import on_gpu
from test_preprocess import HAS_PILLOW, write_png
from tools import ship_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_SHIPPED_BYTES = 2 * 2**20
needs_pillow = pytest.mark.skipif(not HAS_PILLOW, reason='Pillow is not installed (pip install Pillow, or the '
                                                         '"image" extra): predict and the demo read images with it')


@pytest.fixture(scope="module")
def provenance():
    record = pretrained_provenance()
    assert record, f"{PROVENANCE_PATH} is missing or not JSON"
    return record


def sample_images(provenance):
    return numpy.array([sample["image"] for sample in provenance["samples"]], dtype=numpy.uint8)


def sample_labels(provenance):
    return numpy.array([sample["label"] for sample in provenance["samples"]], dtype=numpy.uint8)


@pytest.fixture(scope="module")
def sample_pngs(provenance, tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    return [write_png(folder / f"digit-{sample['label']}.png", numpy.array(sample["image"], dtype=numpy.uint8))
            for sample in provenance["samples"]]


@pytest.fixture(scope="module")
def sample_dataset(provenance, tmp_path_factory):
    """A data folder whose training and test sets are both the ten sample digits."""
    folder = tmp_path_factory.mktemp("sample-data")
    images, labels = sample_images(provenance), sample_labels(provenance)
    for split in ("train", "test"):
        write_idx(folder / MNIST_FILES[f"{split}_images"], images)
        write_idx(folder / MNIST_FILES[f"{split}_labels"], labels)
    return folder


def subprocess_env():
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_module(args, cwd, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# 1. the shipped file and its provenance

def test_the_shipped_file_loads_through_the_checkpoint_checks_as_inference_only_weights(provenance):
    """Read by the same reader as any checkpoint: model weights in float32 and nothing else, the file the
    JSON describes (its SHA-256), small enough for the wheel."""
    data = PRETRAINED_PATH.read_bytes()
    assert len(data) <= MAX_SHIPPED_BYTES
    assert hashlib.sha256(data).hexdigest() == provenance["sha256"]
    meta, weights, optimizer_state = read_checkpoint(PRETRAINED_PATH)
    assert meta["inference_only"] is True and optimizer_state is None
    with zipfile.ZipFile(PRETRAINED_PATH) as archive:
        names = archive.namelist()
    assert names == sorted(names) and all(name == "meta.npy" or name.startswith("model/") for name in names)
    assert all(value.dtype == numpy.float32 for value in weights.values())


def test_the_recorded_configuration_is_the_files_and_fits_its_arrays(provenance):
    meta, weights, _ = read_checkpoint(PRETRAINED_PATH)
    config = provenance["model_config"]
    assert config == meta["model_config"]
    assert {name: value.shape for name, value in weights.items()} == parameter_shapes(**config)
    assert provenance["parameters"] == parameter_count(**config) == sum(value.size for value in weights.values())
    assert provenance["seed"] == meta["train_config"]["seed"] and provenance["epoch"] == meta["epoch"]


def test_the_provenance_records_what_the_readme_shows(provenance):
    """Every field the README's table is made from, of the right type; one sample per class; no invented
    validation accuracy when the run held no image out."""
    for name in ("command", "commit", "machine"):
        assert isinstance(provenance[name], str) and provenance[name], name
    assert provenance["wall_seconds"] > 0 and 0 <= provenance["test_accuracy"] <= 1
    assert provenance["format"] == PROVENANCE_FORMAT and provenance["prediction"] == SHIFT_AVERAGE_TEXT
    assert 0 <= provenance["one_pass_test_accuracy"] <= 1
    assert len(provenance["per_class_test_accuracy"]) == provenance["model_config"]["num_classes"]
    if provenance["validation_images"] == 0:
        assert provenance["validation_accuracy"] is None
        assert any("validation_accuracy is null" in note for note in provenance["notes"])
    classes = provenance["model_config"]["num_classes"]
    assert [sample["label"] for sample in provenance["samples"]] == list(range(classes))       # one of each
    assert all(numpy.array(sample["image"]).shape == (28, 28) for sample in provenance["samples"])


def test_load_pretrained_gives_the_shipped_weights_in_eval_mode():
    model = scratchvit.load_pretrained(device="cpu")
    _, weights, _ = read_checkpoint(PRETRAINED_PATH)
    assert not model.training
    for name, value in model.state_dict().items():
        numpy.testing.assert_array_equal(value, weights[name], err_msg=name)
    assert scratchvit.PRETRAINED_PATH == PRETRAINED_PATH and scratchvit.pretrained_provenance()["sha256"]


@on_gpu
def test_load_pretrained_on_the_gpu_gives_the_cpu_probabilities(provenance):
    """The shipped weights on the device: the samples' probabilities as NumPy computes them on the host."""
    inputs = normalize(sample_images(provenance), "cpu")
    on_cpu = probabilities(scratchvit.load_pretrained("cpu"), inputs)
    on_device = probabilities(scratchvit.load_pretrained("gpu"), inputs)
    numpy.testing.assert_allclose(on_device, on_cpu, atol=1e-5)
    assert (on_device.argmax(axis=1) == on_cpu.argmax(axis=1)).all()


def test_the_shipped_files_are_package_data():
    """setup.cfg installs both files, or an installed predict would find no default model."""
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    entries = [entry.strip() for entry in config["options.package_data"]["scratchvit"].split(",")]
    for path in (PRETRAINED_PATH, PROVENANCE_PATH):
        assert f"models/{path.name}" in entries
        assert path.is_file()


# ------------------------------------------------------------------------------------------------
# 2. the commands without --checkpoint

@needs_pillow
def test_predict_without_checkpoint_gives_the_recorded_classes_and_probabilities(provenance, sample_pngs, tmp_path):
    result = run_module(["-m", "scratchvit.predict", "--json", *sample_pngs], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first_line = result.stderr.splitlines()[0]
    assert "shipped model" in first_line and str(PRETRAINED_PATH) in first_line, result.stderr
    assert f"test accuracy {provenance['test_accuracy']:.2%} (averaged over" in first_line
    answers = [json.loads(line) for line in result.stdout.splitlines()]      # stdout is the JSON alone
    assert len(answers) == len(provenance["samples"])
    for answer, path, sample in zip(answers, sample_pngs, provenance["samples"]):
        assert answer["path"] == str(path)
        assert answer["top"][0]["class"] == sample["predicted_class"]
        assert abs(answer["top"][0]["probability"] - sample["probability"]) <= 1e-4
    assert list(tmp_path.iterdir()) == []


@needs_pillow
def test_predict_without_checkpoint_in_one_pass_names_the_one_pass_accuracy(provenance, sample_pngs, tmp_path):
    result = run_module(["-m", "scratchvit.predict", "--json", "--no-shift-average", *sample_pngs], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first_line = result.stderr.splitlines()[0]
    assert f"test accuracy {provenance['one_pass_test_accuracy']:.2%} (one forward pass)" in first_line, first_line
    expected = probabilities(scratchvit.load_pretrained(), to_model_input(numpy.stack(
        [mnist_style(image) for image in sample_images(provenance)])), shift_average=False)
    answers = [json.loads(line)["probabilities"] for line in result.stdout.splitlines()]
    numpy.testing.assert_allclose(answers, expected, atol=1e-6)
    recorded = [sample["probability"] for sample in provenance["samples"]]      # the shift average's
    assert numpy.abs(expected.max(axis=1) - recorded).max() > 1e-3


@needs_pillow
def test_the_demo_on_the_shipped_model_gives_the_recorded_classes(provenance):
    from scratchvit.demo.api import Demo
    demo = Demo(scratchvit.load_pretrained())
    try:
        for sample in provenance["samples"]:
            answer = demo.predict(sample["image"])
            assert answer["prediction"] == sample["predicted_class"]
            assert abs(answer["probabilities"][sample["predicted_class"]] - sample["probability"]) <= 1e-4
    finally:
        demo.close()


@needs_pillow
def test_the_demo_command_without_checkpoint_names_the_shipped_model_first(provenance, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "scratchvit.demo", "--port", "0", "--quiet"], cwd=tmp_path,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stdout.readline()
        assert first_line.startswith("scratchvit demo: http://127.0.0.1:"), (first_line, process.stderr.read())
        assert "shipped model" in first_line and str(PRETRAINED_PATH) in first_line
        assert f"test accuracy {provenance['test_accuracy']:.2%} (averaged over" in first_line
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_eval_only_without_checkpoint_reports_the_shipped_model_into_out_dir(sample_dataset, tmp_path):
    """The report goes into --out-dir, never beside the shipped file; its numbers are the shipped model's."""
    models_before = sorted(PRETRAINED_PATH.parent.iterdir())
    out_dir = tmp_path / "out"
    result = run_module([REPO_ROOT / "train_mnist.py", "--eval-only", "--data-dir", sample_dataset,
                         "--out-dir", out_dir], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "shipped model" in result.stdout.splitlines()[0], result.stdout
    report = json.loads((out_dir / "evaluation.json").read_text())
    assert report["checkpoint"] == str(PRETRAINED_PATH) and report["images"] == 10
    images = load_mnist(str(sample_dataset), download=False)
    expected = evaluation_report(scratchvit.load_pretrained(), normalize(images["test_images"], "cpu"),
                                 images["test_labels"], shift_average=True)
    assert report["confusion_matrix"]["counts"] == expected.confusion.tolist()
    assert report["prediction"] == SHIFT_AVERAGE_TEXT
    assert sorted(PRETRAINED_PATH.parent.iterdir()) == models_before


def test_resume_from_the_shipped_model_is_refused_in_one_line(sample_dataset, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.copyfile(PRETRAINED_PATH, out_dir / "checkpoint.npz")
    result = run_module([REPO_ROOT / "train_mnist.py", "--resume", "--data-dir", sample_dataset, "--out-dir", out_dir,
                         "--threads", "1"], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "inference-only" in lines[0], result.stderr
    with pytest.raises(CheckpointError, match="cannot resume"):
        load_checkpoint(PRETRAINED_PATH, resuming=True)
    assert load_checkpoint(PRETRAINED_PATH)[2] is None            # evaluating and predicting read it


def mnist_test_folder():
    """The real MNIST folder: $SCRATCHVIT_MNIST_DIR, else REPO/../shared/data/mnist; None when neither holds it."""
    for folder in (os.environ.get("SCRATCHVIT_MNIST_DIR"), REPO_ROOT.parent / "shared" / "data" / "mnist"):
        name = MNIST_FILES["test_images"]
        if folder and ((Path(folder) / name).exists() or (Path(folder) / f"{name}.gz").exists()):
            return Path(folder)
    return None


@pytest.mark.skipif(mnist_test_folder() is None, reason="MNIST is not in REPO/../shared/data/mnist nor in "
                                                        "$SCRATCHVIT_MNIST_DIR: the recorded accuracy needs its "
                                                        "test set")
def test_the_recorded_test_accuracy_is_reproduced_on_mnist(provenance):
    """The same file on the same 10,000 images, averaged over the shifts as the commands predict, and in
    one pass. Float32 sums ordered otherwise by another BLAS can move an image that sits on a class
    boundary, so a difference of up to two images is accepted, not more."""
    arrays = load_mnist(str(mnist_test_folder()), download=False)
    model, images = scratchvit.load_pretrained(), normalize(arrays["test_images"], "cpu")
    report = evaluation_report(model, images, arrays["test_labels"], shift_average=True)
    assert report.images == provenance["test_images"]
    assert abs(report.correct - round(provenance["test_accuracy"] * report.images)) <= 2
    for measured, recorded, count in zip(report.per_class_accuracy, provenance["per_class_test_accuracy"],
                                         report.class_images):
        assert abs(measured - recorded) * count <= 2 + 1e-9
    one_pass = evaluation_report(model, images, arrays["test_labels"])
    assert abs(one_pass.correct - round(provenance["one_pass_test_accuracy"] * report.images)) <= 2


# ------------------------------------------------------------------------------------------------
# 3. the export

@pytest.fixture(scope="module")
def finished_run(sample_dataset, tmp_path_factory):
    """A tiny finished run on the sample digits: its checkpoint (metrics.jsonl beside it)."""
    out_dir = tmp_path_factory.mktemp("run") / "run"
    config = TrainConfig(data_dir=str(sample_dataset), out_dir=str(out_dir), epochs=1, batch_size=5, patch_size=7,
                         dim=8, depth=1, heads=2, mlp_dim=16, threads=1, seed=0)
    run(config, log=lambda message: None)
    return out_dir / "checkpoint.npz"


GIVEN = dict(command="python train_mnist.py --epochs 1", commit="0123abc", machine="a test machine")


@needs_pillow
def test_two_exports_of_the_same_checkpoint_are_byte_identical(finished_run, sample_dataset, tmp_path, monkeypatch):
    """An hour later, the same bytes: the zip records no time of writing, and the JSON the same numbers."""
    first = ship_model.ship(finished_run, sample_dataset, tmp_path / "first", **GIVEN)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    second = ship_model.ship(finished_run, sample_dataset, tmp_path / "second", **GIVEN)
    assert first == second
    for name in (PRETRAINED_PATH.name, PROVENANCE_PATH.name):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    with zipfile.ZipFile(tmp_path / "first" / PRETRAINED_PATH.name) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    _, trained, _ = load_checkpoint(finished_run, averaged=True)
    _, shipped, _ = read_checkpoint(tmp_path / "first" / PRETRAINED_PATH.name)
    assert shipped.keys() == trained.keys()
    for name, value in trained.items():
        numpy.testing.assert_array_equal(shipped[name], value, err_msg=name)


@needs_pillow
def test_the_export_command_records_the_run_and_reuses_what_it_was_given_for_the_same_weights(
        finished_run, sample_dataset, tmp_path):
    out_dir = tmp_path / "models"
    given = [f"--{name}={value}" for name, value in GIVEN.items()]
    result = run_module([REPO_ROOT / "tools" / "ship_model.py", finished_run, "--data-dir", sample_dataset,
                         "--out-dir", out_dir, *given], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((out_dir / PROVENANCE_PATH.name).read_text())
    metrics = [json.loads(line) for line in (finished_run.parent / "metrics.jsonl").read_text().splitlines()]
    assert {name: record[name] for name in GIVEN} == GIVEN
    assert record["wall_seconds"] == metrics[-1]["wall_seconds"] and record["epoch"] == 1
    assert record["test_images"] == 10 and record["validation_accuracy"] is None
    assert [sample["label"] for sample in record["samples"]] == list(range(10))
    # the samples' probabilities: the exported file's, as predict answers by default
    model, _ = load_trained_model(out_dir / PRETRAINED_PATH.name)
    arrays = load_mnist(str(sample_dataset), download=False)
    averaged = probabilities(model, to_model_input(numpy.stack([mnist_style(image) for image in arrays["test_images"]])))
    numpy.testing.assert_allclose([sample["probability"] for sample in record["samples"]],
                                  averaged.max(axis=1), rtol=1e-6)
    before = {name: (out_dir / name).read_bytes() for name in (PRETRAINED_PATH.name, PROVENANCE_PATH.name)}
    again = run_module([REPO_ROOT / "tools" / "ship_model.py", finished_run, "--data-dir", sample_dataset,
                        "--out-dir", out_dir], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert {name: (out_dir / name).read_bytes() for name in before} == before
    elsewhere = run_module([REPO_ROOT / "tools" / "ship_model.py", finished_run, "--data-dir", sample_dataset,
                            "--out-dir", tmp_path / "elsewhere"], cwd=tmp_path)
    assert elsewhere.returncode == 1 and elsewhere.stderr.count("\n") == 1 and "--command" in elsewhere.stderr


@needs_pillow
def test_the_export_records_the_shift_averaged_accuracy_and_the_one_pass_one_beside_it(finished_run, tmp_path):
    """On test images where the two ways disagree (noise, labelled with the one-pass answer), the record
    says which is which: one_pass_test_accuracy 1, test_accuracy lower by the images that differ."""
    model, _ = load_trained_model(finished_run)
    noise = numpy.zeros((200, 28, 28), dtype=numpy.uint8)
    # inside a black frame, or the preprocessing finds no background to tell ink from
    noise[:, 3:-3, 3:-3] = numpy.random.default_rng(0).integers(0, 256, size=(200, 22, 22))
    inputs = normalize(noise, "cpu")
    one_pass = probabilities(model, inputs, shift_average=False).argmax(axis=1)
    differ = int((probabilities(model, inputs).argmax(axis=1) != one_pass).sum())
    assert differ > 0
    data_dir = tmp_path / "noise"
    data_dir.mkdir()
    for split in ("train", "test"):
        write_idx(data_dir / MNIST_FILES[f"{split}_images"], noise)
        write_idx(data_dir / MNIST_FILES[f"{split}_labels"], one_pass.astype(numpy.uint8))
    record = ship_model.ship(finished_run, data_dir, tmp_path / "out", **GIVEN)
    assert record["one_pass_test_accuracy"] == 1.0
    assert record["test_accuracy"] == (200 - differ) / 200


@needs_pillow
def test_a_reexport_elsewhere_takes_what_it_was_given_from_the_shipped_json_of_the_same_weights(
        finished_run, sample_dataset, tmp_path, monkeypatch):
    """How anyone checks the shipped file: export their checkpoint into another folder and compare."""
    first = ship_model.ship(finished_run, sample_dataset, tmp_path / "shipped", **GIVEN)
    monkeypatch.setattr(ship_model, "PROVENANCE_PATH", tmp_path / "shipped" / PROVENANCE_PATH.name)
    assert ship_model.ship(finished_run, sample_dataset, tmp_path / "check") == first


def test_the_export_refuses_a_run_stopped_before_its_last_epoch(finished_run, tmp_path):
    meta, weights, _ = load_checkpoint(finished_run)
    meta = dict(meta, train_config=dict(meta["train_config"], epochs=2))
    stopped = tmp_path / "checkpoint.npz"
    stopped.write_bytes(inference_checkpoint_bytes(weights, meta))
    with pytest.raises(ship_model.ShipError, match="epoch 1 of 2"):
        ship_model.finished_model(stopped)


# ------------------------------------------------------------------------------------------------
# 4. an inference-only file is checked like any checkpoint

def inference_only_variant(finished_run, path, change):
    meta, weights, optimizer_state = load_checkpoint(finished_run)
    data = inference_checkpoint_bytes(weights, meta)
    members = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in archive.namelist():
            members[name] = archive.read(name)
    change(members, meta, optimizer_state)
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in members.items():
            archive.writestr(name, value)
    return path


def npy_bytes(array):
    buffer = io.BytesIO()
    numpy.save(buffer, array)
    return buffer.getvalue()


def with_meta(**fields):
    def change(members, meta, optimizer_state):
        inner = json.loads(numpy.load(io.BytesIO(members["meta.npy"])).tobytes())
        inner.update(fields)
        members["meta.npy"] = npy_bytes(numpy.frombuffer(json.dumps(inner).encode(), dtype=numpy.uint8))
    return change


def with_optimizer(members, meta, optimizer_state):
    members["optimizer/exp_avg.npy"] = npy_bytes(optimizer_state["exp_avg"])
    members["optimizer/exp_avg_sq.npy"] = npy_bytes(optimizer_state["exp_avg_sq"])


INFERENCE_ONLY_DAMAGES = {
    "optimizer arrays in an inference-only file": (with_optimizer, "meta says inference_only"),
    "inference_only not a boolean": (with_meta(inference_only="yes"), "inference_only must be true or false"),
    "inference_only with a weight average": (with_meta(average_updates=3), "average_updates null"),
    "a training checkpoint without its moments": (with_meta(inference_only=False), "optimizer/exp_avg is missing"),
}


@pytest.mark.parametrize("damage", INFERENCE_ONLY_DAMAGES)
def test_an_inconsistent_inference_only_file_is_a_one_line_checkpoint_error(finished_run, tmp_path, damage):
    change, fragment = INFERENCE_ONLY_DAMAGES[damage]
    path = inference_only_variant(finished_run, tmp_path / "model.npz", change)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert "\n" not in str(error.value) and fragment in str(error.value), str(error.value)


def test_an_unchanged_inference_only_file_rewritten_by_zipfile_loads(finished_run, tmp_path):
    """The accepted side of the cases above: the same members, written by another zip writer."""
    path = inference_only_variant(finished_run, tmp_path / "model.npz", lambda *unchanged: None)
    meta, weights, optimizer_state = read_checkpoint(path)
    assert meta["inference_only"] is True and optimizer_state is None and weights
