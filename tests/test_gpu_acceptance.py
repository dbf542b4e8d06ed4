"""Tests of `python tools/gpu_acceptance.py`, the GPU acceptance command, on a machine without a GPU.

The command is first run for real on a GPU machine that nobody here can try. So its dry run (every stage on
the CPU, tiny sizes) is run in full here, once per module, through `main` as the command line calls it. The
data are a small MNIST-format folder written with `write_idx` into a temporary folder. The other tests
cover the parsing of what the stages print, a stage that fails, times out, cannot start or is skipped (the
next stages still run, the exit status is 1 for a failure), the preconditions checked before anything runs,
and that what OUT holds fits the device tool's return rules.

Time, measured on the 2-core machine: the whole file takes 10 s without CuPy and 17 s with it. Most of
that is the dry run: the nested `pytest -m gpu` collecting the whole suite (about 4 s), NVRTC compiling
every kernel where CuPy is installed (about 13 s; that needs no GPU), and importing PyTorch where it is
installed. That fits, so the dry run runs the same pytest selection as a GPU run.
"""
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import numpy
import pytest

from scratchvit.data import MNIST_FILES, write_idx
from tools import acceptance_judging, acceptance_probes, gpu_acceptance
from tools.acceptance_judging import (bench_figures, count_no_gpu_skips, judge_mpi, judge_pytest, parse_json_objects,
                                      parse_pytest_summary, training_figures)
from tools.acceptance_probes import INFERENCE_IMAGES, compare_rows
from tools.acceptance_report import figures_text, format_table
from tools.gpu_acceptance import Stage, build_stages, main, run_acceptance, stage_timeout

STAGE_NAMES = ["machine", "gpu-tests", "compile-tests", "equivalence", "bench-16", "bench-32", "train", "inference",
               "mpi"]
MPI_HERE = acceptance_probes.mpi_runtime_problem() is None
# what the device tool brings back from $OUT: at most 8 files, at most two folders down, plain names, 16 MiB each
RETURNED_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def write_mnist_folder(folder, train_count=600, test_count=200, seed=0):
    """The four MNIST files (28x28, labels 0..9), the training images gzipped as NAME.gz. Each image is faint
    noise with a bright block of random place and size: ink on a dark background, as the inference stage's
    preprocessing needs (pure noise would be a blank image to it)."""
    rng = numpy.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_count), ("test", test_count)):
        images = rng.integers(0, 40, size=(count, 28, 28))
        for image in images:
            top, left = rng.integers(2, 14, size=2)
            height, width = rng.integers(4, 12, size=2)
            image[top:top + height, left:left + width] = rng.integers(200, 256)
        images = images.astype(numpy.uint8)
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
    out_dir = tmp_path_factory.mktemp("acceptance") / "out" / "acc"       # as "$OUT/acc" on the device
    work_dir = tmp_path_factory.mktemp("acceptance") / "work"
    status, printed = run_main(["--dry-run", "--data-dir", str(data_dir), "--out-dir", str(out_dir),
                                "--work-dir", str(work_dir)])
    summary = json.loads((out_dir / "summary.json").read_text())
    return dict(status=status, printed=printed, out_dir=out_dir, work_dir=work_dir, summary=summary)


# ------------------------------------------------------------------------------------------------
# the dry run, end to end

def test_dry_run_passes_every_stage(dry_run):
    stages = dry_run["summary"]["stages"]
    assert [stage["name"] for stage in stages] == STAGE_NAMES
    expected = dict(dict.fromkeys(STAGE_NAMES, "passed"), mpi="passed" if MPI_HERE else "skipped")
    assert {stage["name"]: stage["status"] for stage in stages} == expected, \
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
    assert Path(train["metrics"]).is_file() and Path(train["metrics"]).parent == dry_run["work_dir"] / "train"
    inference = figures["inference"]
    assert inference["devices"] == ["cpu", "cpu"] and inference["passed"] is True
    for name in ("predict", "demo"):
        assert inference[name]["images"] == INFERENCE_IMAGES and inference[name]["same_digits"] is True
        assert inference[name]["max_probability_difference"] == 0.0          # the CPU against itself
    if MPI_HERE:
        assert figures["mpi"]["ranks"] == 2 and figures["mpi"]["exchange"] == "mpi"
    else:
        assert figures["mpi"]["skipped"].startswith("no MPI runtime")


def test_dry_run_prints_the_table_last(dry_run):
    table = format_table(dry_run["summary"])
    assert dry_run["printed"].rstrip().endswith(table)
    assert table.splitlines()[0].split() == ["stage", "status", "seconds", "key", "figures"]
    assert table.splitlines()[-1].endswith(
        "PASSED: all 9 stages (exit 0)" if MPI_HERE else "PASSED: 8 of 9 stages, 1 skipped (exit 0)")
    assert f"in {dry_run['out_dir']}: acceptance.log" in dry_run["printed"]


def test_dry_run_writes_one_log_and_markdown(dry_run):
    log = (dry_run["out_dir"] / "acceptance.log").read_text()
    for index, stage in enumerate(dry_run["summary"]["stages"]):
        heading = f"[{index + 1}/9] {stage['name']}"
        assert heading in log
        section = log.split(heading, 1)[1]
        if stage["status"] == "skipped":
            assert section.split("\n", 2)[1].startswith("skipped: no MPI runtime")
        else:
            assert section.split("\n", 2)[1].startswith("$ ") and "# exit status" in section
    markdown = (dry_run["out_dir"] / "summary.md").read_text()
    assert markdown.startswith("# scratchvit GPU acceptance: PASSED")
    assert all(f"| {name} | passed |" in markdown for name in STAGE_NAMES if name != "mpi" or MPI_HERE)


def test_dry_run_out_dir_fits_what_the_device_tool_brings_back(dry_run):
    """OUT is "$OUT/acc" in the device call: what is under it must come back whole."""
    out_root = dry_run["out_dir"].parent
    files = [path for path in out_root.rglob("*") if path.is_file()]
    assert sorted(path.name for path in files) == ["acceptance.log", "checkpoint.npz", "summary.json", "summary.md",
                                                   "train-metrics.jsonl"]
    assert len(files) <= 8
    for path in files:
        relative = path.relative_to(out_root)
        assert len(relative.parts) - 1 <= 2, relative                # folders below $OUT
        assert all(RETURNED_NAME.match(part) for part in relative.parts), relative
        assert path.stat().st_size <= 16 * 2 ** 20, relative
    assert dry_run["summary"]["kept"] == ["train-metrics.jsonl", "checkpoint.npz"]


def test_a_long_stage_log_keeps_its_head_and_tail(tmp_path):
    stage_log = tmp_path / "stage.log"
    stage_log.write_bytes(b"H" * 100 + b"M" * 1000 + b"T" * 50)
    combined = tmp_path / "acceptance.log"
    gpu_acceptance.append_stage_log(combined, "[1/1] long", stage_log, keep=(100, 50))
    text = combined.read_text()
    assert "H" * 100 in text and "T" * 50 in text and "M" not in text
    assert "# ... 1000 bytes left out here ..." in text
    gpu_acceptance.append_stage_log(combined, "[1/1] short", stage_log, keep=(2000, 0))
    assert "M" * 1000 in combined.read_text()                         # at the limit: whole


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
    assert results["fine"]["log_tail"] == []
    assert "\nfine\n" in (tmp_path / "out" / "acceptance.log").read_text().split("[5/5] fine", 1)[1]
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


def test_a_skipped_stage_is_no_failure(tmp_path):
    stages = [python_stage("fine", "print('fine')"),
              Stage("mpi", "mpi", ["mpiexec"], 30, 30, lambda outcome: ({}, []), skip="no MPI runtime (no mpiexec)")]
    printed = []
    assert run_acceptance(stages, tmp_path / "out", dry_run=False, budget=60, say=printed.append) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [stage["status"] for stage in summary["stages"]] == ["passed", "skipped"] and summary["passed"] is True
    assert "skipped: no MPI runtime (no mpiexec)" in printed[-1]
    assert printed[-1].splitlines()[-1].endswith("PASSED: 1 of 2 stages, 1 skipped (exit 0)")


def test_every_real_stage_times_out_and_is_still_reported(data_dir, tmp_path):
    # a timeout scale so small that no stage can even import NumPy in time: all start, all fail
    status, printed = run_main(["--dry-run", "--data-dir", str(data_dir), "--out-dir", str(tmp_path),
                                "--timeout-scale", "0.0002"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert status == 1
    assert [stage["name"] for stage in summary["stages"]] == STAGE_NAMES
    assert all(stage["status"] == ("timed out" if stage["name"] != "mpi" or MPI_HERE else "skipped")
               for stage in summary["stages"])
    assert printed.rstrip().endswith(format_table(summary))
    train = next(stage for stage in summary["stages"] if stage["name"] == "train")
    assert train["figures"]["epochs"] == 0 and figures_text(train).startswith("no epoch recorded")


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "{missing}"], "no such folder"),
    (["--data-dir", "{empty}"], "missing train-images-idx3-ubyte"),
    (["--data-dir", "{data}", "--timeout-scale", "0"], "--timeout-scale must be a positive number"),
])
def test_bad_arguments_stop_before_anything_runs(argv, message, data_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    folders = dict(missing=tmp_path / "missing", empty=tmp_path / "empty", data=data_dir)
    argv = [part.format(**folders) for part in argv] + ["--dry-run", "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing, message", [
    ({"pytest"}, "pytest is not installed"),
    ({"hypothesis"}, "hypothesis is not installed"),
    ({"pytest", "hypothesis"}, "pytest is not installed"),          # the first one missing, alone
])
def test_a_missing_test_tool_stops_even_a_dry_run_in_one_line(missing, message, data_dir, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setattr(gpu_acceptance, "module_missing", lambda name: name in missing)
    assert main(["--dry-run", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cupy_missing, device_problem, message", [
    (True, None, "CuPy is not installed"),
    (False, "no CUDA device: CuPy 14.2.0 sees none", "no CUDA device"),
])
def test_a_gpu_run_without_cupy_or_a_device_stops_in_one_line(cupy_missing, device_problem, message, data_dir,
                                                              tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_acceptance, "module_missing", lambda name: cupy_missing and name == "cupy")
    monkeypatch.setattr(gpu_acceptance, "cuda_device_problem", lambda: device_problem)
    assert main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err
    assert "--dry-run" in captured.err and not (tmp_path / "out").exists()


def test_the_gpu_preconditions_pass_the_data_check_only_with_a_device(data_dir, tmp_path, monkeypatch):
    """With the tools, CuPy and a device all present (stood in), the next check is the data folder's."""
    monkeypatch.setattr(gpu_acceptance, "module_missing", lambda name: False)
    monkeypatch.setattr(gpu_acceptance, "cuda_device_problem", lambda: None)
    args = gpu_acceptance.build_parser().parse_args(["--data-dir", str(tmp_path / "nothing")])
    assert "no such folder" in gpu_acceptance.check_preconditions(args)
    args = gpu_acceptance.build_parser().parse_args(["--data-dir", str(data_dir)])
    assert gpu_acceptance.check_preconditions(args) is None


def test_on_this_machine_a_gpu_run_stops_before_anything_runs_where_there_is_no_gpu(data_dir, tmp_path, capsys):
    if gpu_acceptance.cuda_device_problem() is None:
        pytest.skip("this machine has a CUDA device")
    assert main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("CuPy" in err or "CUDA device" in err)


def test_data_dir_is_required(capsys):
    assert main([]) == 2
    assert "--data-dir" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the stages' commands

def test_gpu_run_commands():
    stages = build_stages(Path("/data"), Path("/work"), dry_run=False, python="python", torch_importable=True,
                          mpi_problem=None)
    commands = {stage.name: stage.command for stage in stages}
    assert list(commands) == ["machine", "gpu-tests", "compile-tests", "equivalence", "bench-512", "bench-2048",
                              "train", "inference", "mpi"]
    assert commands["gpu-tests"][:3] == ["python", "-m", "pytest"] and commands["gpu-tests"][-2:] == ["-m", "gpu"]
    assert commands["compile-tests"][-1] == "tests/test_fused_compiles.py"
    assert commands["equivalence"] == ["python", "-m", "scratchvit.equivalence", "--json"]
    for batch_size in (512, 2048):
        bench = commands[f"bench-{batch_size}"]
        assert bench[:3] == ["python", "-m", "scratchvit.bench"] and "--compare-torch" in bench and "--json" in bench
        assert bench[bench.index("--device") + 1] == "gpu" and bench[bench.index("--batch-size") + 1] == str(batch_size)
        assert bench[bench.index("--patch-size") + 1] == "4"
    assert commands["train"][1].endswith("train_mnist.py") and commands["train"][-2:] == ["--device", "gpu"]
    assert commands["train"][commands["train"].index("--out-dir") + 1] == str(Path("/work/train"))
    assert "--overwrite" in commands["train"]            # a rerun replaces the last acceptance run's training
    assert "inference_main('/work/train/checkpoint.npz', '/data', 'cpu', 'gpu')" in commands["inference"][-1]
    mpi = commands["mpi"]
    assert mpi[1:3] == ["-n", "2"] and mpi[3:6] == ["python", "-m", "scratchvit.bench"]
    assert mpi[mpi.index("--device") + 1] == "gpu" and "--compare-torch" not in mpi
    stage = {stage.name: stage for stage in stages}
    assert stage["mpi"].env["SCRATCHVIT_GPU_ALLREDUCE"] == "host-staged" and stage["mpi"].skip is None
    assert all("CUDA_VISIBLE_DEVICES" not in stage.env for stage in stages)
    assert stage["gpu-tests"].env.get("HYPOTHESIS_PROFILE") == "ci"


def test_without_an_mpi_runtime_the_mpi_stage_is_skipped():
    stages = build_stages(Path("/data"), Path("/work"), dry_run=False, python="python", torch_importable=True,
                          mpi_problem="mpi4py is not installed")
    assert stages[-1].name == "mpi" and stages[-1].skip == "no MPI runtime (mpi4py is not installed)"


def test_dry_run_commands_stay_on_the_cpu():
    stages = build_stages(Path("/data"), Path("/work"), dry_run=True, python="python", torch_importable=False,
                          mpi_problem=None)
    commands = {stage.name: stage.command for stage in stages}
    assert commands["equivalence"][-6:] == ["--devices", "cpu", "cpu", "--small", "--steps", "3"]
    assert all("--compare-torch" not in commands[name] for name in ("bench-16", "bench-32"))
    assert commands["bench-16"][commands["bench-16"].index("--device") + 1] == "cpu"
    assert commands["train"][commands["train"].index("--device") + 1] == "cpu"
    assert commands["train"][commands["train"].index("--recipe") + 1] == "gpu"
    assert commands["inference"][-1].endswith("'cpu', 'cpu'))")
    assert commands["mpi"][commands["mpi"].index("--device") + 1] == "cpu"
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
    assert len(build_stages(Path("/data"), Path("/work"), dry_run=False, mpi_problem=None)) == len(limits) + 1


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
    assert counts == dict(dict.fromkeys(acceptance_judging.PYTEST_KEYS, 0), **expected)


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
    return acceptance_judging.Outcome(returncode=returncode, timed_out=False, seconds=1.0, log_text=text)


def test_judge_pytest():
    all_skipped = pytest_outcome("SKIPPED [5] tests/a.py:1: no GPU backend: none\n5 skipped, 9 deselected in 1.0s\n")
    assert judge_pytest(all_skipped, dry_run=True)[1] == []
    assert judge_pytest(all_skipped, dry_run=False)[1] == ["no test passed", "5 skipped for want of a GPU"]
    assert judge_pytest(pytest_outcome("40 passed, 9 deselected in 30.0s\n"), dry_run=False) == (
        dict(dict.fromkeys(acceptance_judging.PYTEST_KEYS, 0), passed=40, deselected=9, no_gpu_skips=0), [])
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
        "scratchvit": {"img_per_s": 1000.0, "median_ms": 5.0, "memory": {"peak_bytes": 3 * 2 ** 30},
                       "gpu_operations": {"kernel_ms": 2.1, "profiled_step_ms": 6.0, "kernel_share": 0.35,
                                          "bound": "launch-bound"}},
        "torch": {"img_per_s": 1250.0, "kernels_per_step": 420}}}
    figures = bench_figures(report, 512)
    assert figures["scratchvit"] == dict(images_per_second=1000.0, median_ms=5.0, kernels_per_step=None,
                                         kernel_ms=2.1, profiled_step_ms=6.0, kernel_share=0.35, bound="launch-bound",
                                         peak_bytes=3 * 2 ** 30, used_bytes=None)
    assert figures["torch"]["kernels_per_step"] == 420 and figures["torch"]["peak_bytes"] is None
    assert figures["torch"]["bound"] is None
    text = figures_text(dict(kind="bench", figures=figures))
    assert text == ("batch 512: scratchvit 1,000 img/s, torch 1,250 img/s, ratio 0.80; kernels/step n/a vs 420; "
                    "scratchvit launch-bound (kernels 2.1 of 6.0 ms), torch n/a; scratchvit peak 3.00 GiB")
    assert bench_figures({}, 16)["torch"] is None and bench_figures(None, 16)["scratchvit"]["median_ms"] is None
    assert "n/a img/s" in figures_text(dict(kind="bench", figures=bench_figures({"results": {}}, 16)))


def test_compare_rows_holds_probabilities_to_the_tolerance_and_digits_to_the_same():
    tolerance = acceptance_probes.PROBABILITY_TOLERANCE
    cpu = numpy.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    assert compare_rows(cpu, cpu) == dict(images=2, same_digits=True, digit_mismatches=0,
                                          max_probability_difference=0.0, passed=True)
    within = cpu + numpy.array([[0.99 * tolerance, -0.99 * tolerance, 0.0], [0.0, 0.0, 0.0]])
    assert compare_rows(cpu, within)["passed"] is True                                 # just inside: accepted
    beyond = cpu + numpy.array([[1.01 * tolerance, -1.01 * tolerance, 0.0], [0.0, 0.0, 0.0]])
    assert compare_rows(cpu, beyond)["passed"] is False                                # just outside: refused
    other_digit = numpy.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    assert compare_rows(cpu, other_digit)["digit_mismatches"] == 1
    tie = numpy.array([[0.4, 0.4 + tolerance / 2, 0.2 - tolerance / 2]])
    flipped = numpy.array([[0.4 + tolerance / 4, 0.4 + tolerance / 4, 0.2 - tolerance / 2]])
    result = compare_rows(tie, flipped)
    assert result["same_digits"] is False and result["digit_mismatches"] == 0 and result["passed"] is True
    assert compare_rows(cpu, cpu[:1])["passed"] is False                                # a row missing
    assert compare_rows([], [])["passed"] is False


def test_judge_mpi():
    def outcome(report):
        return pytest_outcome(f"rank 0 says hello\n{json.dumps(report)}\n")
    report = {"results": {"scratchvit": {"img_per_s": 900.0}},
              "mpi": {"ranks": 2, "exchange": "host-staged", "exchange_median_ms": 1.5, "exchange_share": 0.1}}
    assert judge_mpi(outcome(report), exchange="host-staged") == (
        dict(ranks=2, exchange="host-staged", exchange_median_ms=1.5, exchange_share=0.1, images_per_second=900.0), [])
    assert judge_mpi(outcome(report), exchange="nccl")[1] == ["exchanged gradients by host-staged, not nccl"]
    assert judge_mpi(outcome(dict(report, mpi=None)), exchange=None)[1] == ["no MPI benchmark report in the log"]
    text = figures_text(dict(kind="mpi", status="passed", figures=judge_mpi(outcome(report), exchange=None)[0]))
    assert text == "2 ranks, host-staged exchange 1.50 ms per step (10% of it), 900 img/s"


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
