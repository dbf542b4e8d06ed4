"""Tests of `python -m scratchvit.gpu_acceptance`, the GPU acceptance command, on a machine without a GPU.

The command is first run for real on a GPU machine that nobody here can try. So its dry run (every stage on
the CPU, tiny sizes) is run in full here, once per module, through `main` as the command line calls it. The
data are a small MNIST-format folder written with `write_idx` into a temporary folder. The other tests
cover the parsing of what the stages print, a stage that fails, times out or cannot start (the next
stages still run, the exit status is 1), and the checks made before anything runs.

Time, measured on the 2-core machine: the whole file takes 10 s without CuPy and 17 s with it. Most of
that is the dry run: the nested `pytest -m gpu` collecting the whole suite (about 4 s), NVRTC compiling
every kernel where CuPy is installed (about 13 s; that needs no GPU), and importing PyTorch where it is
installed. That fits, so the dry run runs the same pytest selection as a GPU run.
"""
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy
import pytest

from scratchvit import gpu_acceptance
from scratchvit.data import MNIST_FILES, write_idx
from scratchvit.gpu_acceptance import (Stage, build_stages, bench_figures, count_no_gpu_skips, figures_text,
                                       format_table, judge_pytest, main, parse_json_objects, parse_pytest_summary,
                                       run_acceptance, stage_timeout, training_figures)

STAGE_NAMES = ["machine", "gpu-tests", "compile-tests", "equivalence", "bench-16", "bench-32", "train"]


def write_mnist_folder(folder, train_count=600, test_count=200, seed=0):
    """The four MNIST files (28x28 noise, labels 0..9), the training images gzipped as NAME.gz."""
    rng = numpy.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_count), ("test", test_count)):
        images = rng.integers(0, 256, size=(count, 28, 28)).astype(numpy.uint8)
        labels = rng.integers(0, 10, size=count).astype(numpy.uint8)
        suffix = ".gz" if split == "train" else ""
        write_idx(folder / (MNIST_FILES[f"{split}_images"] + suffix), images)
        write_idx(folder / MNIST_FILES[f"{split}_labels"], labels)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_folder(tmp_path_factory.mktemp("acceptance") / "mnist")


def run_main(argv):
    """main(argv) in this process: (exit status, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(argv)
    return status, printed.getvalue()


@pytest.fixture(scope="module")
def dry_run(data_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("acceptance") / "out"
    status, printed = run_main(["--dry-run", "--data-dir", str(data_dir), "--out-dir", str(out_dir)])
    summary = json.loads((out_dir / "summary.json").read_text())
    return dict(status=status, printed=printed, out_dir=out_dir, summary=summary)


# ------------------------------------------------------------------------------------------------
# the dry run, end to end

def test_dry_run_passes_every_stage(dry_run):
    stages = dry_run["summary"]["stages"]
    assert [stage["name"] for stage in stages] == STAGE_NAMES
    assert {stage["name"]: stage["status"] for stage in stages} == dict.fromkeys(STAGE_NAMES, "passed"), \
        "\n".join(line for stage in stages for line in stage["log_tail"])
    assert dry_run["status"] == 0
    assert dry_run["summary"]["passed"] is True and dry_run["summary"]["exit_status"] == 0
    assert dry_run["summary"]["dry_run"] is True


def test_dry_run_summary_has_the_figures(dry_run):
    figures = {stage["name"]: stage["figures"] for stage in dry_run["summary"]["stages"]}
    assert figures["machine"]["dry_run"] is True and figures["machine"]["numpy"] == numpy.__version__
    assert figures["gpu-tests"]["failed"] == 0 and figures["gpu-tests"]["errors"] == 0
    assert set(figures["equivalence"]) == {"float64", "float32"}
    assert all(entry["passed"] is True for entry in figures["equivalence"].values())
    for name, batch_size in (("bench-16", 16), ("bench-32", 32)):
        assert figures[name]["batch_size"] == batch_size
        assert figures[name]["scratchvit"]["images_per_second"] > 0
    train = figures["train"]
    assert train["epochs"] == 1 and 0.0 <= train["final_accuracy"] <= 1.0
    assert train["target_epoch"] is None          # one epoch on noise: 99% is not reached, and that is no failure
    assert train["process_seconds"] > 0
    assert Path(train["metrics"]).is_file()


def test_dry_run_prints_the_table_last(dry_run):
    table = format_table(dry_run["summary"])
    assert dry_run["printed"].rstrip().endswith(table)
    assert table.splitlines()[0].split() == ["stage", "status", "seconds", "key", "figures"]
    assert table.splitlines()[-1].endswith("PASSED: all 7 stages (exit 0)")
    assert f"logs: {dry_run['out_dir'] / 'logs'}" in dry_run["printed"]


def test_dry_run_writes_logs_and_markdown(dry_run):
    for stage in dry_run["summary"]["stages"]:
        log = Path(stage["log"])
        assert log.parent == dry_run["out_dir"] / "logs"
        text = log.read_text()
        assert text.startswith("$ ") and "# exit status" in text
    markdown = (dry_run["out_dir"] / "summary.md").read_text()
    assert markdown.startswith("# scratchvit GPU acceptance: PASSED")
    assert all(f"| {name} | passed |" in markdown for name in STAGE_NAMES)


# ------------------------------------------------------------------------------------------------
# failures: each is recorded, the next stage still runs, the exit status says so

def python_stage(name, code, timeout=30, judge=lambda outcome: ({}, [])):
    return Stage(name, "other", [sys.executable, "-c", code], timeout=timeout, minimum=timeout, judge=judge)


def test_failing_stages_are_recorded_and_the_next_ones_still_run(tmp_path):
    stages = [python_stage("crashes", "print('boom before the crash'); raise SystemExit(3)"),
              python_stage("hangs", "import time; print('waiting', flush=True); time.sleep(60)", timeout=1),
              Stage("cannot-start", "other", [str(tmp_path / "no-such-program")], 30, 30, lambda outcome: ({}, [])),
              python_stage("judged-bad", "print('fine')", judge=lambda outcome: ({}, ["the judge says no"])),
              python_stage("fine", "print('fine')")]
    printed = []
    status = run_acceptance(stages, tmp_path / "out", dry_run=True, budget=300, say=printed.append)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    results = {stage["name"]: stage for stage in summary["stages"]}
    assert status == 1 and summary["exit_status"] == 1 and summary["passed"] is False
    assert [stage["status"] for stage in summary["stages"]] == ["failed", "timed out", "failed", "failed", "passed"]
    assert results["crashes"]["exit_status"] == 3 and "exit status 3" in results["crashes"]["problems"]
    assert any("boom before the crash" in line for line in results["crashes"]["log_tail"])
    assert results["hangs"]["seconds"] < 15 and "waiting" in results["hangs"]["log_tail"]
    assert results["cannot-start"]["problems"][0].startswith("could not start")
    assert results["judged-bad"]["problems"] == ["the judge says no"]
    assert results["fine"]["log_tail"] == [] and "\nfine\n" in Path(results["fine"]["log"]).read_text()
    assert printed[-1] == format_table(summary)
    assert printed[-1].splitlines()[-1].endswith(
        "FAILED: 4 of 5 stages (crashes, hangs, cannot-start, judged-bad) (exit 1)")


def test_an_interrupted_run_writes_what_it_has(tmp_path):
    def interrupt():
        raise KeyboardInterrupt
    stages = [python_stage("fine", "print('fine')"), python_stage("interrupted", "print('never')"),
              python_stage("never-started", "print('never')")]
    stages[1].prepare = interrupt
    printed = []
    assert run_acceptance(stages, tmp_path, dry_run=True, say=printed.append) == 130
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True and [stage["name"] for stage in summary["stages"]] == ["fine"]
    assert printed[-1].splitlines()[-1].endswith("INTERRUPTED after 1 stage(s) (exit 130)")


def test_every_real_stage_times_out_and_is_still_reported(data_dir, tmp_path):
    # a timeout scale so small that no stage can even import NumPy in time: all 7 start, all 7 fail
    status, printed = run_main(["--dry-run", "--data-dir", str(data_dir), "--out-dir", str(tmp_path),
                                "--timeout-scale", "0.0002"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert status == 1
    assert [stage["name"] for stage in summary["stages"]] == STAGE_NAMES
    assert all(stage["status"] == "timed out" for stage in summary["stages"])
    assert printed.rstrip().endswith(format_table(summary))
    assert summary["stages"][-1]["figures"]["epochs"] == 0
    assert figures_text(summary["stages"][-1]).startswith("no epoch recorded")


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "{missing}"], "no such folder"),
    (["--data-dir", "{empty}"], "missing train-images-idx3-ubyte"),
    (["--data-dir", "{data}", "--timeout-scale", "0"], "--timeout-scale must be a positive number"),
])
def test_bad_arguments_stop_before_anything_runs(argv, message, data_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    folders = dict(missing=tmp_path / "missing", empty=tmp_path / "empty", data=data_dir)
    argv = [part.format(**folders) for part in argv] + ["--out-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert not (tmp_path / "out").exists()


def test_data_dir_is_required(capsys):
    assert main([]) == 2
    assert "--data-dir" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the stages' commands

def test_gpu_run_commands():
    stages = build_stages(Path("/data"), Path("/out"), dry_run=False, python="python", torch_importable=True)
    commands = {stage.name: stage.command for stage in stages}
    assert list(commands) == ["machine", "gpu-tests", "compile-tests", "equivalence", "bench-512", "bench-2048",
                              "train"]
    assert commands["gpu-tests"][:3] == ["python", "-m", "pytest"] and commands["gpu-tests"][-2:] == ["-m", "gpu"]
    assert commands["compile-tests"][-1] == "tests/test_fused_compiles.py"
    assert commands["equivalence"] == ["python", "-m", "scratchvit.equivalence", "--json"]
    for batch_size in (512, 2048):
        bench = commands[f"bench-{batch_size}"]
        assert bench[:3] == ["python", "-m", "scratchvit.bench"] and "--compare-torch" in bench and "--json" in bench
        assert bench[bench.index("--device") + 1] == "gpu" and bench[bench.index("--batch-size") + 1] == str(batch_size)
    assert commands["train"][1].endswith("train_mnist.py") and commands["train"][-2:] == ["--device", "gpu"]
    assert commands["train"][commands["train"].index("--out-dir") + 1] == str(Path("/out/train"))
    assert "--overwrite" in commands["train"]            # a rerun replaces the last acceptance run's training
    assert all("CUDA_VISIBLE_DEVICES" not in stage.env for stage in stages)
    assert {stage.name: stage.env.get("HYPOTHESIS_PROFILE") for stage in stages}["gpu-tests"] == "ci"


def test_dry_run_commands_stay_on_the_cpu():
    stages = build_stages(Path("/data"), Path("/out"), dry_run=True, python="python", torch_importable=False)
    commands = {stage.name: stage.command for stage in stages}
    assert commands["equivalence"][-6:] == ["--devices", "cpu", "cpu", "--small", "--steps", "3"]
    assert all("--compare-torch" not in commands[name] for name in ("bench-16", "bench-32"))
    assert commands["bench-16"][commands["bench-16"].index("--device") + 1] == "cpu"
    assert commands["train"][commands["train"].index("--device") + 1] == "cpu"
    assert commands["train"][commands["train"].index("--recipe") + 1] == "gpu"
    assert all(stage.env.get("CUDA_VISIBLE_DEVICES") == "" for stage in stages)


@pytest.mark.parametrize("timeout, minimum, remaining, later, expected", [
    (180, 90, 450, 285, 165),      # the budget cuts the timeout so the later stages keep their minimums
    (60, 20, 450, 100, 60),        # plenty left: the stage's own timeout
    (120, 45, 100, 160, 45),       # over budget already: the stage still gets its minimum
])
def test_stage_timeout(timeout, minimum, remaining, later, expected):
    assert stage_timeout(timeout, minimum, remaining, later) == expected


def test_stage_minimums_fit_the_budget():
    limits = gpu_acceptance.STAGE_LIMITS
    minimums = sum(minimum for name, (timeout, minimum) in limits.items()) + limits["bench"][1]   # two bench stages
    assert minimums <= gpu_acceptance.BUDGET_S <= 8 * 60


# ------------------------------------------------------------------------------------------------
# reading pytest's output

@pytest.mark.parametrize("line, expected", [
    ("3 passed, 2 skipped in 1.2s", dict(passed=3, skipped=2)),
    ("1 failed, 2 passed", dict(failed=1, passed=2)),
    ("5 deselected", dict(deselected=5)),
    ("317 skipped, 352 deselected in 3.50s", dict(skipped=317, deselected=352)),
    ("no tests ran in 0.01s", {}),
    ("no tests ran", {}),
    ("1 passed, 2 errors in 0.30s", dict(passed=1, errors=2)),
    ("1 error in 0.10s", dict(errors=1)),
    ("===== 2 failed, 1 passed, 1 warning in 3.00s =====", dict(failed=2, passed=1, warnings=1)),
    ("1 passed, 1 xfailed, 1 xpassed in 75.12s (0:01:15)", dict(passed=1, xfailed=1, xpassed=1)),
    ("\x1b[32m4 passed\x1b[0m\x1b[32m in 0.5s\x1b[0m", dict(passed=4)),
])
def test_parse_pytest_summary(line, expected):
    counts = parse_pytest_summary(f"collecting ...\n...ss.\n{line}\n")
    assert counts == dict(dict.fromkeys(gpu_acceptance.PYTEST_KEYS, 0), **expected)


def test_parse_pytest_summary_takes_the_last_line_and_ignores_look_alikes():
    text = "1 passed in 0.1s\n3 passed the review\nSKIPPED [2] tests/x.py:3: 2 skipped\n2 failed in 0.2s\nbye\n"
    assert parse_pytest_summary(text)["failed"] == 2
    assert parse_pytest_summary("Traceback (most recent call last):\nImportError: no\n") is None
    assert parse_pytest_summary("") is None


def test_count_no_gpu_skips():
    text = ("SKIPPED [2] tests/test_optim.py:292: no GPU backend: the GPU backend needs CuPy, which is not installed\n"
            "SKIPPED [1] tests/test_fused_compiles.py:43: needs CuPy and NVRTC: ModuleNotFoundError: no cupy\n"
            "SKIPPED [1] tests/test_data.py:460: could not import 'cupy': No module named 'cupy'\n"
            "SKIPPED [4] tests/test_torch_parity.py:9: could not import 'torch': No module named 'torch'\n"
            "SKIPPED [1] tests/test_train.py:416: matplotlib is installed\n")
    assert count_no_gpu_skips(text) == 4


def pytest_outcome(text, returncode=0):
    return gpu_acceptance.Outcome(returncode=returncode, timed_out=False, seconds=1.0, log_text=text)


def test_judge_pytest():
    all_skipped = pytest_outcome("SKIPPED [5] tests/a.py:1: no GPU backend: none\n5 skipped, 9 deselected in 1.0s\n")
    assert judge_pytest(all_skipped, dry_run=True)[1] == []
    assert judge_pytest(all_skipped, dry_run=False)[1] == ["no test passed", "5 skipped for want of a GPU"]
    assert judge_pytest(pytest_outcome("40 passed, 9 deselected in 30.0s\n"), dry_run=False) == (
        dict(dict.fromkeys(gpu_acceptance.PYTEST_KEYS, 0), passed=40, deselected=9, no_gpu_skips=0), [])
    assert judge_pytest(pytest_outcome("1 failed, 39 passed in 30.0s\n", 1), dry_run=False)[1] == ["1 failed, 0 errors"]
    assert judge_pytest(pytest_outcome("Killed\n", -9), dry_run=True)[1] == ["no pytest summary line in the log"]


# ------------------------------------------------------------------------------------------------
# reading the other stages' output

def test_parse_json_objects_skips_text_and_survives_glued_stderr():
    text = ('$ python -m scratchvit.bench\nwarning: something\n{"a": 1}\n'
            '{"b": [1, 2]}UserWarning: printed onto the same line\n{"cut": \nnot json {\n')
    assert parse_json_objects(text) == [{"a": 1}, {"b": [1, 2]}]


def test_bench_figures_read_missing_keys_as_none():
    report = {"ratio": 0.8, "results": {
        "scratchvit": {"img_per_s": 1000.0, "median_ms": 5.0, "memory": {"peak_bytes": 3 * 2 ** 30}},
        "torch": {"img_per_s": 1250.0, "launches_per_step": 420}}}
    figures = bench_figures(report, 512)
    assert figures["scratchvit"] == dict(images_per_second=1000.0, median_ms=5.0, launches_per_step=None,
                                         peak_bytes=3 * 2 ** 30, used_bytes=None)
    assert figures["torch"]["launches_per_step"] == 420 and figures["torch"]["peak_bytes"] is None
    text = figures_text(dict(kind="bench", figures=figures))
    assert text == ("batch 512: scratchvit 1,000 img/s, torch 1,250 img/s, ratio 0.80; launches/step n/a vs 420; "
                    "scratchvit peak 3.00 GiB")
    assert bench_figures({}, 16)["torch"] is None and bench_figures(None, 16)["scratchvit"]["median_ms"] is None
    assert "n/a img/s" in figures_text(dict(kind="bench", figures=bench_figures({"results": {}}, 16)))


def test_training_figures():
    records = [dict(epoch=1, test_accuracy=0.97, wall_seconds=10.0),
               dict(epoch=2, test_accuracy=0.991, wall_seconds=18.5),
               dict(epoch=3, test_accuracy=0.989, wall_seconds=27.0)]
    figures = training_figures(records)
    assert (figures["target_epoch"], figures["target_wall_seconds"]) == (2, 18.5)
    assert (figures["final_epoch"], figures["final_accuracy"], figures["epochs"]) == (3, 0.989, 3)
    text = figures_text(dict(kind="train", figures=dict(figures, process_seconds=30.0)))
    assert text == "99% at epoch 2 (18.5 s); final 98.90% after 3 epochs; process 30.0 s"
    assert training_figures(records[:1])["target_epoch"] is None
    assert training_figures([])["final_accuracy"] is None
