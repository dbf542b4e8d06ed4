"""scratchvit.predict: a trained checkpoint on the user's image files, from Python and from the command line.

A tiny ViT (patch 7, dim 16, one block) is trained here, in about a second, on the synthetic digits of
test_preprocess.py (four shapes: "0", "1", "7", "L", in MNIST's format) with `train.run` on IDX files,
without the random shift, so a digit it sees off-centre or at another size is one it has not learnt:
only the preprocessing can bring it back. The checkpoint that run writes is what the CLI reads.

Each test is meant to fail for a realistic bug: an image prepared differently from what training saw
(another normalisation, no rounding to uint8, no centring or scaling), probabilities that are not the
softmax of the logits (or by default not their average over the nine 1-pixel shifts, or a CLI that
ignores --no-shift-average), a bad file or a bad checkpoint that stops the other images or ends in a traceback.
"""
import importlib.util
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy
import pytest

from conftest import GPU_SKIP_REASON, on_gpu
from scratchvit import ViT
from scratchvit.backend import to_host
from scratchvit.data import MNIST_FILES, normalize, shift_images, write_idx
from scratchvit.optim import AdamW
from scratchvit.predict import load_trained_model, main, probabilities
from scratchvit.preprocess import load_mnist_style, to_model_input
from scratchvit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scratchvit.config import TrainConfig
from scratchvit.optim import parameter_groups
from scratchvit.train import run
from test_preprocess import CLASSES, HAS_PILLOW, digit, enlarged, on_canvas, write_png

pytestmark = pytest.mark.skipif(not HAS_PILLOW, reason='Pillow is not installed (pip install Pillow, or the '
                                                       '"image" extra): predict reads images with it')

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_DIGIT_MODEL = dict(patch_size=7, dim=16, depth=1, heads=2, mlp_dim=32)
LINE = re.compile(r"^(?P<path>.+): (?P<entries>\d+ \(\d+\.\d%\)(, \d+ \(\d+\.\d%\))*)$")


# ------------------------------------------------------------------------------------------------
# a trained model and images for it

def digit_split(rng, count):
    labels = numpy.arange(count) % CLASSES
    rng.shuffle(labels)
    return numpy.stack([digit(int(label), rng) for label in labels]), labels.astype(numpy.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, test images, test labels) of a tiny ViT that classifies the synthetic digits."""
    folder = tmp_path_factory.mktemp("digits")
    rng = numpy.random.default_rng(0)
    train_images, train_labels = digit_split(rng, 320)
    test_images, test_labels = digit_split(rng, 64)
    for key, array in [("train_images", train_images), ("train_labels", train_labels),
                       ("test_images", test_images), ("test_labels", test_labels)]:
        write_idx(folder / MNIST_FILES[key], array)
    config = TrainConfig(data_dir=str(folder), out_dir=str(folder / "run"), epochs=6, batch_size=32, lr=5e-3,
                         warmup_epochs=0.5, max_shift=0, seed=0, **TINY_DIGIT_MODEL)
    history = run(config, log=lambda message: None)
    assert history[-1]["test_accuracy"] == 1.0          # the model knows the digits: the tests below rely on it
    return folder / "run" / "checkpoint.npz", test_images, test_labels


@pytest.fixture(scope="module")
def model(trained):
    return load_trained_model(trained[0])[0]


def softmax_rows(logits):
    """The textbook softmax in float64 (the oracle)."""
    exps = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    return exps / exps.sum(axis=1, keepdims=True)


def drawn_otherwise(image, path):
    """The digit as a person might draw it: 7 times larger, dark on light paper, off-centre on a page."""
    big = enlarged(image, 200)
    page = on_canvas(255 - big, (300, 340), 20, 120, background=255)
    return write_png(path, page)


# ------------------------------------------------------------------------------------------------
# 1. from Python

def test_load_trained_model_gives_the_checkpoints_evaluated_model_in_eval_mode(trained):
    """The weights that training evaluated: the weight average (on by default), not the last trained weights."""
    path = trained[0]
    model, meta = load_trained_model(path)
    saved_meta, state, _ = load_checkpoint(path, averaged=True)
    _, trained_state, _ = load_checkpoint(path)
    assert saved_meta["average_updates"] > 0
    assert any(not numpy.array_equal(state[name], trained_state[name]) for name in state)
    assert not model.training
    assert model.config == saved_meta["model_config"] == meta["model_config"]
    for name, value in model.state_dict().items():
        numpy.testing.assert_array_equal(value, state[name], err_msg=name)


def test_probabilities_are_the_softmax_of_the_logits(model, trained):
    images = normalize(trained[1][:10], "cpu")
    model.train()                                        # probabilities always use eval mode, and restore it
    result = probabilities(model, images, shift_average=False)
    assert model.training
    model.eval()
    assert isinstance(result, numpy.ndarray) and result.shape == (10, 10)
    logits = to_host(model.forward(images)).astype(numpy.float64)
    numpy.testing.assert_allclose(result, softmax_rows(logits), rtol=1e-5, atol=1e-7)
    numpy.testing.assert_allclose(result.sum(axis=1), 1.0, rtol=1e-6)
    numpy.testing.assert_array_equal(result.argmax(axis=1), trained[2][:10])


def test_probabilities_by_default_are_their_average_over_the_image_and_its_eight_shifts(model, trained):
    images = normalize(trained[1][:10], "cpu")
    model.train()
    result = probabilities(model, images)
    assert model.training
    model.eval()
    by_hand = numpy.mean([probabilities(model, shift_images(images, numpy.tile((dy, dx), (10, 1))), shift_average=False)
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    numpy.testing.assert_allclose(result, by_hand, rtol=1e-5, atol=1e-7)
    assert numpy.abs(result - probabilities(model, images, shift_average=False)).max() > 1e-3


def test_a_png_of_an_mnist_format_image_gives_the_models_logits_on_that_array(model, trained, tmp_path):
    """What predict sees from a PNG of an MNIST image is what training fed the model: same input, same logits."""
    images = trained[1][:8]
    prepared = numpy.stack([load_mnist_style(write_png(tmp_path / f"{index}.png", image))
                            for index, image in enumerate(images)])
    model_input = to_model_input(prepared)
    numpy.testing.assert_array_equal(model_input, normalize(images, "cpu"))
    numpy.testing.assert_allclose(to_host(model.forward(model_input)), to_host(model.forward(normalize(images, "cpu"))),
                                  rtol=1e-6, atol=1e-6)


def test_the_same_digit_drawn_larger_off_centre_and_dark_on_light_is_the_same_class(model, tmp_path):
    rng = numpy.random.default_rng(7)
    for label in range(CLASSES):
        for sample in range(3):
            image = digit(label, rng)
            direct = probabilities(model, normalize(image[None], "cpu"))[0]
            page = drawn_otherwise(image, tmp_path / f"{label}-{sample}.png")
            prepared = probabilities(model, to_model_input(load_mnist_style(page)))[0]
            assert direct.argmax() == label, (label, direct)
            assert prepared.argmax() == label, (label, sample, prepared)


def test_the_page_untouched_is_not_a_digit_the_model_knows(model, tmp_path):
    """The check above is not trivial: without preprocessing (the page squeezed to 28x28, dark on light)
    the model gets most of these wrong."""
    from PIL import Image
    rng = numpy.random.default_rng(7)
    wrong = 0
    for label in range(CLASSES):
        for sample in range(3):
            page = numpy.asarray(Image.open(drawn_otherwise(digit(label, rng), tmp_path / "page.png")))
            squeezed = numpy.asarray(Image.fromarray(page).resize((28, 28), Image.Resampling.BOX))
            wrong += probabilities(model, normalize(squeezed[None], "cpu"))[0].argmax() != label
    assert wrong >= 6


def test_load_trained_model_errors_are_one_line_checkpoint_errors(trained, tmp_path):
    cases = [(tmp_path / "missing.npz", "no checkpoint"), (damaged(trained[0], tmp_path / "bad.npz"), "readable"),
             (other_image_size_checkpoint(tmp_path / "small.npz"), "8x8"),
             (mismatched_checkpoint(trained[0], tmp_path / "mismatch.npz"), "do not fit")]
    for path, fragment in cases:
        with pytest.raises(CheckpointError) as error:
            load_trained_model(path)
        message = str(error.value)
        assert "\n" not in message and str(path) in message and fragment in message, message


@on_gpu
def test_probabilities_on_the_gpu_match_the_cpu(trained):
    images = normalize(trained[1][:16], "cpu")
    on_cpu = probabilities(load_trained_model(trained[0])[0], images)
    on_gpu_result = probabilities(load_trained_model(trained[0], device="gpu")[0], images)
    assert isinstance(on_gpu_result, numpy.ndarray)
    numpy.testing.assert_allclose(on_gpu_result, on_cpu, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# checkpoints that are not right

def damaged(good, path):
    content = bytearray(Path(good).read_bytes())
    path.write_bytes(bytes(content[:len(content) // 2]))
    return path


def other_image_size_checkpoint(path):
    """A real checkpoint of a model for 8x8 images."""
    model = ViT(image_size=8, num_classes=10, **dict(TINY_DIGIT_MODEL, patch_size=2))
    optimizer = AdamW(parameter_groups(model, 0.05), lr=1e-3, weight_decay=0.05)
    save_checkpoint(path, model=model, optimizer=optimizer, config=TrainConfig(), epoch=1, step_in_epoch=0,
                    random_state=None, history=[])
    return path


def mismatched_checkpoint(good, path):
    """The good checkpoint with its configuration saying dim 32: its weights no longer fit."""
    with numpy.load(good) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["model_config"]["dim"] = 32
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode(), dtype=numpy.uint8)
    buffer = io.BytesIO()
    numpy.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return path


# ------------------------------------------------------------------------------------------------
# 2. the command line

def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "scratchvit.predict", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, exit_code, *fragments):
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


def parse_line(line):
    """`path: 7 (98.1%), 1 (1.2%), 9 (0.3%)` -> (path, [(7, 0.981), (1, 0.012), (9, 0.003)])."""
    match = LINE.match(line)
    assert match, line
    entries = [re.match(r"(\d+) \((\d+\.\d)%\)", entry).groups() for entry in match["entries"].split(", ")]
    return match["path"], [(int(label), float(percent) / 100) for label, percent in entries]


@pytest.fixture(scope="module")
def pages(trained, tmp_path_factory):
    """One PNG per class, each drawn larger, off-centre and dark on light; (paths, labels, expected probabilities)."""
    folder = tmp_path_factory.mktemp("pages")
    model = load_trained_model(trained[0])[0]
    paths = [drawn_otherwise(digit(label), folder / f"digit-{label}.png") for label in range(CLASSES)]
    expected = probabilities(model, to_model_input(numpy.stack([load_mnist_style(path) for path in paths])))
    return paths, list(range(CLASSES)), expected


def test_cli_prints_the_top_three_classes_of_each_image(trained, pages):
    paths, labels, expected = pages
    result = cli("--checkpoint", trained[0], *paths)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == len(paths)
    for line, path, label, row in zip(lines, paths, labels, expected):
        printed_path, top = parse_line(line)
        assert printed_path == str(path)
        assert [entry[0] for entry in top] == list(numpy.argsort(-row, kind="stable")[:3])
        assert top[0][0] == label
        numpy.testing.assert_allclose([entry[1] for entry in top], numpy.sort(row)[::-1][:3], atol=0.0005 + 1e-9)


def test_cli_no_shift_average_gives_the_probabilities_of_one_pass(trained, pages, model):
    paths = pages[0]
    one_pass = probabilities(model, to_model_input(numpy.stack([load_mnist_style(path) for path in paths])),
                             shift_average=False)
    assert numpy.abs(one_pass - pages[2]).max() > 1e-3            # the two ways differ on these pages
    for options, expected in ((["--no-shift-average"], one_pass), (["--shift-average"], pages[2])):
        result = cli("--checkpoint", trained[0], "--json", *options, *paths)
        assert result.returncode == 0, result.stderr
        answers = [json.loads(line)["probabilities"] for line in result.stdout.splitlines()]
        numpy.testing.assert_allclose(answers, expected, rtol=1e-6)


def test_cli_top_k(trained, pages):
    paths = pages[0][:1]
    assert len(parse_line(cli("--checkpoint", trained[0], "--top", 1, *paths).stdout.strip())[1]) == 1
    assert len(parse_line(cli("--checkpoint", trained[0], "--top", 20, *paths).stdout.strip())[1]) == 10   # all
    result = cli("--checkpoint", trained[0], "--top", 0, *paths)
    assert result.returncode == 2 and "--top" in result.stderr and "Traceback" not in result.stderr


def test_cli_json_gives_one_object_per_image(trained, pages):
    paths, labels, expected = pages
    result = cli("--checkpoint", trained[0], "--json", *paths)
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(objects) == len(paths)
    for record, path, label, row in zip(objects, paths, labels, expected):
        assert sorted(record) == ["path", "probabilities", "top"]
        assert record["path"] == str(path)
        numpy.testing.assert_allclose(record["probabilities"], row, rtol=1e-6)
        assert sum(record["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert [entry["class"] for entry in record["top"]] == list(numpy.argsort(-row, kind="stable")[:3])
        assert record["top"][0]["class"] == label
        assert [entry["probability"] for entry in record["top"]] == [record["probabilities"][entry["class"]]
                                                                     for entry in record["top"]]


def test_cli_reports_bad_images_and_still_predicts_the_others(trained, pages, tmp_path):
    paths = pages[0]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    blank = write_png(tmp_path / "blank.png", numpy.full((64, 64), 255, dtype=numpy.uint8))
    missing = tmp_path / "missing.png"
    result = cli("--checkpoint", trained[0], paths[0], not_an_image, paths[1], blank, missing, paths[2])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    printed = [parse_line(line) for line in result.stdout.splitlines()]
    assert [path for path, _ in printed] == [str(path) for path in paths[:3]]
    assert [top[0][0] for _, top in printed] == [0, 1, 2]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error:") for line in errors)
    assert str(not_an_image) in errors[0] and "not an image" in errors[0]
    assert str(blank) in errors[1] and "blank" in errors[1]
    assert str(missing) in errors[2] and "no such file" in errors[2]


def test_cli_missing_checkpoint_is_a_one_line_error(pages, tmp_path):
    result = cli("--checkpoint", tmp_path / "nothing.npz", pages[0][0])
    assert_one_line_error(result, 1, "nothing.npz", "no checkpoint")
    assert result.stdout == ""


@pytest.mark.parametrize("damage", ["truncated", "not-a-zip", "zip-without-meta"])
def test_cli_damaged_checkpoint_is_a_one_line_error(trained, pages, tmp_path, damage):
    path = tmp_path / "checkpoint.npz"
    if damage == "truncated":
        damaged(trained[0], path)
    elif damage == "not-a-zip":
        path.write_bytes(b"\x00" * 1000)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("something.npy", b"")
    assert_one_line_error(cli("--checkpoint", path, pages[0][0]), 1, str(path))


def test_cli_checkpoint_of_another_model_shape_is_a_one_line_error(trained, pages, tmp_path):
    assert_one_line_error(cli("--checkpoint", other_image_size_checkpoint(tmp_path / "small.npz"), pages[0][0]),
                          1, "small.npz", "8x8", "28x28")
    assert_one_line_error(cli("--checkpoint", mismatched_checkpoint(trained[0], tmp_path / "mismatch.npz"),
                              pages[0][0]), 1, "mismatch.npz", "do not fit", "shape")


@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="the GPU backend works here")
def test_cli_gpu_without_a_usable_gpu_says_why_in_one_line(trained, pages):
    result = cli("--device", "gpu", "--checkpoint", trained[0], pages[0][0])
    if importlib.util.find_spec("cupy") is None:
        assert_one_line_error(result, 2, "cupy", "pip install")
    else:
        assert_one_line_error(result, 2, GPU_SKIP_REASON.split(" (")[0])
    assert result.stdout == ""


def test_cli_without_pillow_names_the_extra(trained, pages, monkeypatch, capsys):
    monkeypatch.setattr("scratchvit.predict.pillow_available", lambda: False)
    assert main(["--checkpoint", str(trained[0]), str(pages[0][0])]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and 'pip install "scratchvit[image]"' in lines[0]


def test_cli_main_in_process_prints_what_the_subprocess_prints(trained, pages, capsys):
    assert main(["--checkpoint", str(trained[0]), *map(str, pages[0])]) == 0
    assert capsys.readouterr().out == cli("--checkpoint", trained[0], *pages[0]).stdout
