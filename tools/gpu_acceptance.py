"""The GPU acceptance run: the one command that shows scratchvit's GPU path works on a real GPU.

    python tools/gpu_acceptance.py --data-dir DIR [--out-dir runs/gpu-acceptance] [--work-dir W] [--dry-run]

DIR holds MNIST's four IDX files. Each stage (the machine report, the GPU tests, the kernels compiled,
CPU-GPU equivalence, the benchmark against PyTorch, a training run, inference on both devices, a 2-rank
MPI job) is its own process with its own timeout, judged on what it prints; a stage that fails or hangs
is recorded and the next one runs, within a shared time budget. OUT gets a log, summary.json,
summary.md, the training metrics and the checkpoint. --dry-run runs every stage on the CPU at tiny
sizes, so that tests/test_gpu_acceptance.py can run it anywhere.

It is a tool of the checkout, not of the installed package: it runs `tests/...` and `train_mnist.py` by
path, and tests the scratchvit beside it. This file builds the stages, runs them within the budget and
holds the command line; acceptance_probes.py is what runs inside the machine and inference stages,
acceptance_judging.py reads and judges what a stage printed, acceptance_report.py writes the summary.
What each stage runs and how it is judged, what OUT holds and how to read the table:
docs/gpu-acceptance.md.

Exit status: 0 when every stage passed (or was skipped); 1 when one failed or timed out; 2 for a bad
option or a missing precondition (one line, before anything runs); 130 after Ctrl-C or SIGTERM.
"""
import argparse
import dataclasses
import datetime
import functools
import importlib.util
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:      # run as a script: the checkout's scratchvit, the one being tested
    sys.path.insert(0, str(REPO_ROOT))

from scratchvit.cupy_check import GPU_INSTALL_HINT  # noqa: E402
from scratchvit.data import MNIST_FILES, file_list  # noqa: E402
from scratchvit.recipes import RECIPES  # noqa: E402
from tools.acceptance_judging import (Outcome, judge_bench, judge_equivalence, judge_inference,  # noqa: E402
                                      judge_machine, judge_mpi, judge_pytest, judge_training)
from tools.acceptance_probes import find_mpiexec, mpi_runtime_problem  # noqa: E402
from tools.acceptance_report import figures_text, format_table, write_summary  # noqa: E402

TRAIN_SCRIPT = REPO_ROOT / "train_mnist.py"

BUDGET_S = 450                  # all stages together, on an H200: 7.5 of the 8 minutes this command may take
BENCH_BATCHES = (512, 2048)
DRY_RUN_BENCH_BATCHES = (16, 32)
TAIL_LINES = 25                 # lines of a failed stage's log shown and kept in the summary
STOP_GRACE_S = 5                # after SIGTERM, seconds before SIGKILL
LOG_NAME = "acceptance.log"     # every stage's output, one section each, in OUT
# What comes back from the device tool's $OUT: at most 8 files, names of letters, digits, ".", "_", "-"
# only, 16 MiB each. OUT holds 5 files (module docstring); a stage's log is cut to LOG_KEEP_BYTES
# (its head and its tail) in the combined log, so 9 stages stay under 16 MiB.
LOG_KEEP_BYTES = (256 * 1024, 1024 * 1024)
RETURNED_FILE_LIMIT = 16 * 2 ** 20

# name: (timeout, minimum) in seconds on an H200. The minimum is kept free for a stage while earlier stages
# run (`stage_timeout`). The minimums add up to 400 s, within BUDGET_S; the timeouts add up to more, so
# that a stage may use what quicker stages left.
STAGE_LIMITS = {
    "machine": (60, 20),
    "gpu-tests": (180, 90),
    "compile-tests": (60, 30),
    "equivalence": (90, 40),
    "bench": (75, 35),          # each of the two
    "train": (150, 100),
    "inference": (60, 25),
    "mpi": (60, 25),
}

DRY_RUN_MODEL = ["--depth", "1", "--dim", "16", "--heads", "2", "--mlp-dim", "32"]
# -rsfE: the reasons of skips, then failures and errors last (nearest the end of the log); --durations: the
# slowest tests, to size the timeouts after the first GPU run; no .pytest_cache writes
PYTEST = ["-m", "pytest", "-q", "-rsfE", "--durations=15", "--color=no", "-p", "no:cacheprovider"]


# ------------------------------------------------------------------------------------------------
# the stages

FIND_OUT = object()             # build_stages: look for the MPI runtime here


@dataclasses.dataclass
class Stage:
    name: str
    kind: str                   # machine, pytest, equivalence, bench, train: how its figures are shown
    command: list
    timeout: float              # seconds on an H200, before --timeout-scale
    minimum: float              # seconds kept free for this stage while earlier ones run
    judge: object               # judge(Outcome) -> (figures, problems)
    env: dict = dataclasses.field(default_factory=dict)     # added to the environment
    prepare: object = None      # called just before the stage starts
    exit_ok: tuple = (0,)       # exit statuses that are not a failure by themselves
    skip: object = None         # why the stage does not run here (it is then "skipped", not failed), or None


def build_stages(data_dir, work_dir, *, dry_run, python=None, torch_importable=None, mpi_problem=FIND_OUT):
    """The stages in their order (module docstring), for a GPU run or a dry run. The training run and its
    checkpoint go to WORK/train. `mpi_problem`: why there is no MPI runtime, which skips the MPI stage, or
    None where there is one (FIND_OUT: mpi_runtime_problem())."""
    python = python or sys.executable
    if torch_importable is None:
        torch_importable = importlib.util.find_spec("torch") is not None
    if mpi_problem is FIND_OUT:
        mpi_problem = mpi_runtime_problem()
    limits = STAGE_LIMITS
    device = "cpu" if dry_run else "gpu"
    machine_code = ("import sys; from tools.acceptance_probes import machine_main; "
                    f"sys.exit(machine_main(dry_run={bool(dry_run)}))")
    # pytest's exit status 5 is "no tests collected": a module skipped whole (test_fused_compiles.py without CuPy).
    # judge_pytest judges that by the counts: fine in a dry run, "no test passed" in a GPU run.
    pytest_options = dict(env=dict(HYPOTHESIS_PROFILE="ci"), exit_ok=(0, 5))
    stages = [
        Stage("machine", "machine", [python, "-c", machine_code], *limits["machine"], judge_machine),
        Stage("gpu-tests", "pytest", [python, *PYTEST, "-m", "gpu"], *limits["gpu-tests"],
              functools.partial(judge_pytest, dry_run=dry_run), **pytest_options),
        Stage("compile-tests", "pytest", [python, *PYTEST, "tests/test_fused_compiles.py"], *limits["compile-tests"],
              functools.partial(judge_pytest, dry_run=dry_run), **pytest_options),
    ]
    equivalence = [python, "-m", "scratchvit.equivalence", "--json"]
    if dry_run:
        equivalence += ["--devices", "cpu", "cpu", "--small", "--steps", "3"]
    stages.append(Stage("equivalence", "equivalence", equivalence, *limits["equivalence"], judge_equivalence))
    # the model the GPU recipe trains (the CPU defaults have another patch size); a tiny one in a dry run
    model = DRY_RUN_MODEL if dry_run else ["--patch-size", str(RECIPES["gpu"]["patch_size"])]
    for batch_size in (DRY_RUN_BENCH_BATCHES if dry_run else BENCH_BATCHES):
        bench = [python, "-m", "scratchvit.bench", "--device", device, "--batch-size", str(batch_size), *model]
        if dry_run:
            bench += ["--steps", "2", "--warmup", "1", "--repeats", "1"]
        if torch_importable:        # without torch, a GPU run still times scratchvit, and judge_bench fails the stage
            bench.append("--compare-torch")
        stages.append(Stage(f"bench-{batch_size}", "bench", bench + ["--json"], *limits["bench"],
                            functools.partial(judge_bench, batch_size=batch_size, torch_expected=not dry_run)))
    train_dir = Path(work_dir) / "train"
    # --overwrite: a rerun with the same --work-dir replaces the last acceptance run's training (without it refused)
    train = [python, str(TRAIN_SCRIPT), "--data-dir", str(data_dir), "--out-dir", str(train_dir), "--overwrite"]
    if dry_run:
        train += ["--device", "cpu", "--recipe", "gpu", "--epochs", "1", "--train-limit", "512", "--batch-size", "64",
                  *DRY_RUN_MODEL, "--eval-batch-size", "256"]
    else:
        train += ["--device", "gpu"]
    metrics_path = train_dir / "metrics.jsonl"
    checkpoint = train_dir / "checkpoint.npz"
    stages.append(Stage("train", "train", train, *limits["train"],
                        functools.partial(judge_training, metrics_path=metrics_path),
                        prepare=functools.partial(remove_files, metrics_path, checkpoint)))
    inference_code = ("import sys; from tools.acceptance_probes import inference_main; "
                      f"sys.exit(inference_main({str(checkpoint)!r}, {str(data_dir)!r}, 'cpu', {device!r}))")
    stages.append(Stage("inference", "inference", [python, "-c", inference_code], *limits["inference"],
                        judge_inference))
    mpi_bench = [find_mpiexec() or "mpiexec", "-n", "2", python, "-m", "scratchvit.bench", "--device", device,
                 "--batch-size", str(DRY_RUN_BENCH_BATCHES[0] if dry_run else BENCH_BATCHES[0]), *model,
                 "--steps", "2" if dry_run else "10", "--warmup", "1" if dry_run else "3", "--repeats", "1", "--json"]
    # two ranks on the one GPU: NCCL refuses a shared GPU, so the exchange is forced through the host
    stages.append(Stage("mpi", "mpi", mpi_bench, *limits["mpi"],
                        functools.partial(judge_mpi, exchange=None if dry_run else "host-staged"),
                        env=dict(SCRATCHVIT_GPU_ALLREDUCE="host-staged"),
                        skip=f"no MPI runtime ({mpi_problem})" if mpi_problem else None))
    if dry_run:
        for stage in stages:
            stage.env = dict(stage.env, CUDA_VISIBLE_DEVICES="")    # the CPU only, even on a machine with a GPU
    return stages


def remove_files(*paths):
    """Remove a previous run's files, so that a stage that fails early is not judged by them."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


def stage_timeout(timeout, minimum, remaining, later_minimums):
    """A stage's timeout: its own, cut so that the stages after it keep their minimums from what remains of the
    budget, but never below its own minimum."""
    return min(timeout, max(minimum, remaining - later_minimums))


# ------------------------------------------------------------------------------------------------
# running a stage

def child_environment(extra):
    """This process's environment, with the repository importable, unbuffered output (a killed stage's log
    keeps everything it printed), and `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _signal_group(process_group, signal_number):
    try:
        os.killpg(process_group, signal_number)
    except (ProcessLookupError, PermissionError):      # the group has already gone
        pass


def stop_process_group(process):
    """SIGTERM to the stage's process group (it runs in a session of its own, so the group is the stage and
    the processes it started), then SIGKILL to whatever of the group is left once the stage's own process has
    ended or after STOP_GRACE_S."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def run_process(command, log_path, timeout, env=None, cwd=REPO_ROOT):
    """Run `command` with stdout and stderr in `log_path` (after a header line with the command), for at most
    `timeout` seconds; returns an Outcome. Ctrl-C stops the process and is raised again."""
    log_path = Path(log_path)
    log_path.write_text(f"$ {shlex.join(str(part) for part in command)}\n# cwd {cwd}, timeout {timeout:.0f} s\n")
    started = time.monotonic()
    returncode, timed_out, start_error = None, False, None
    with open(log_path, "ab") as log:
        try:
            process = subprocess.Popen([str(part) for part in command], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True)
        except OSError as error:
            start_error = f"could not start: {error}"
        else:
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                stop_process_group(process)
                returncode = process.returncode
            except KeyboardInterrupt:
                stop_process_group(process)
                raise
    seconds = time.monotonic() - started
    with open(log_path, "a") as log:
        if start_error:
            log.write(f"# {start_error}\n")
        elif timed_out:
            log.write(f"\n# timed out after {timeout:.0f} s: stopped\n")
        else:
            log.write(f"\n# exit status {returncode} after {seconds:.1f} s\n")
    return Outcome(returncode, timed_out, seconds, log_path.read_text(errors="replace"), start_error)


def log_tail(text, lines=TAIL_LINES):
    return text.rstrip("\n").splitlines()[-lines:]


def judge(stage, outcome):
    """The stage's result as a JSON-ready dict."""
    try:
        figures, problems = stage.judge(outcome)
    except Exception as error:          # a judge must not end the run: its own failure is the stage's problem
        figures, problems = {}, [f"could not read the stage's output: {type(error).__name__}: {error}"]
    problems = list(problems)
    if outcome.start_error:
        problems.insert(0, outcome.start_error)
    elif outcome.timed_out:
        problems.insert(0, f"timed out after {outcome.seconds:.0f} s")
    elif outcome.returncode not in stage.exit_ok:
        problems.insert(0, f"exit status {outcome.returncode}")
    status = "passed" if not problems else ("timed out" if outcome.timed_out else "failed")
    return dict(name=stage.name, kind=stage.kind, status=status, exit_status=outcome.returncode,
                seconds=round(outcome.seconds, 2), figures=figures, problems=problems,
                log_tail=log_tail(outcome.log_text) if problems else [])


def run_stage(stage, log_path, timeout):
    if stage.prepare is not None:
        stage.prepare()
    outcome = run_process(stage.command, log_path, timeout, env=child_environment(stage.env))
    return dict(judge(stage, outcome), command=shlex.join(str(part) for part in stage.command),
                timeout=round(timeout, 1))


def skipped_result(stage):
    """The result of a stage that does not run here: "skipped", with the reason as its figure."""
    return dict(name=stage.name, kind=stage.kind, status="skipped", exit_status=None, seconds=0.0,
                figures=dict(skipped=stage.skip), problems=[], log_tail=[],
                command=shlex.join(str(part) for part in stage.command), timeout=0.0)


def append_stage_log(combined, heading, stage_log, keep=LOG_KEEP_BYTES):
    """Append a stage's log to the combined log under `heading`; a log longer than head + tail bytes keeps
    its first `head` and last `tail` bytes, with a line saying how much was left out."""
    head, tail = keep
    data = Path(stage_log).read_bytes() if Path(stage_log).is_file() else b"(no log)\n"
    if len(data) > head + tail:
        data = (data[:head] + f"\n# ... {len(data) - head - tail} bytes left out here ...\n".encode()
                + data[-tail:])
    with open(combined, "ab") as log:
        log.write(f"\n{'=' * 20} {heading} {'=' * 20}\n".encode() + data)


# ------------------------------------------------------------------------------------------------
# the whole run

def say_flushed(text):
    print(text, flush=True)


def run_acceptance(stages, out_dir, *, dry_run, work_dir=None, timeout_scale=1.0, budget=BUDGET_S,
                   say=say_flushed, keep=()):
    """Run `stages` in order (each in its own process, its log in WORK/logs, then appended to OUT/acceptance.log),
    write OUT/summary.json and .md after every stage, print the failures, where the files are and the table last;
    returns the exit status. `keep`: (source, name) pairs copied into OUT at the end where they exist and fit
    the device tool's 16 MiB (the training's metrics and checkpoint)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="scratchvit-acceptance-"))
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    combined = out_dir / LOG_NAME
    combined.write_text("")
    started, clock_start = datetime.datetime.now().isoformat(timespec="seconds"), time.monotonic()
    deadline = clock_start + budget * timeout_scale
    summary = dict(dry_run=dry_run, started=started, seconds=0.0, out_dir=str(out_dir), log=str(combined),
                   work_dir=str(work_dir), budget_seconds=budget * timeout_scale, timeout_scale=timeout_scale,
                   python=sys.executable, stages=[], interrupted=False, passed=False, exit_status=1)
    say(f"scratchvit GPU acceptance: {'dry run, every stage on the CPU at tiny sizes' if dry_run else 'GPU run'}; "
        f"{len(stages)} stages, budget {budget * timeout_scale:.0f} s; log {combined}; work folder {work_dir}")
    try:
        for index, stage in enumerate(stages):
            heading = f"[{index + 1}/{len(stages)}] {stage.name}"
            if stage.skip:
                result = skipped_result(stage)
                say(f"{heading}: skipped: {stage.skip}")
                with open(combined, "a") as log:
                    log.write(f"\n{'=' * 20} {heading} {'=' * 20}\nskipped: {stage.skip}\n")
            else:
                later = sum(other.minimum for other in stages[index + 1:] if not other.skip) * timeout_scale
                timeout = stage_timeout(stage.timeout * timeout_scale, stage.minimum * timeout_scale,
                                        deadline - time.monotonic(), later)
                say(f"{heading} (timeout {timeout:.0f} s): {shlex.join(str(part) for part in stage.command)}")
                stage_log = logs / f"{index + 1:02d}-{stage.name}.log"
                try:
                    result = run_stage(stage, stage_log, timeout)
                finally:
                    if stage_log.exists():
                        append_stage_log(combined, heading, stage_log)
                detail = "; ".join(result["problems"]) if result["problems"] else figures_text(result)
                say(f"    {result['status']} in {result['seconds']:.1f} s: {detail}")
            summary["stages"].append(result)
            summary["seconds"] = time.monotonic() - clock_start
            write_summary(out_dir, summary)
    except KeyboardInterrupt:
        summary["interrupted"] = True
    summary["seconds"] = time.monotonic() - clock_start
    summary["passed"] = (not summary["interrupted"] and len(summary["stages"]) == len(stages)
                         and all(stage["status"] in ("passed", "skipped") for stage in summary["stages"]))
    summary["exit_status"] = 130 if summary["interrupted"] else (0 if summary["passed"] else 1)
    summary["kept"] = keep_files(keep, out_dir)
    write_summary(out_dir, summary)
    for stage in summary["stages"]:
        if stage["status"] not in ("passed", "skipped"):
            say(f"\n{stage['name']} {stage['status']}: {'; '.join(stage['problems'])}\n"
                f"last lines of its log (section {stage['name']} of {combined}):\n"
                + "\n".join("    " + line for line in stage["log_tail"]))
    say(f"\nin {out_dir}: {LOG_NAME} (every stage's output), summary.json, summary.md"
        + "".join(f", {name}" for name in summary["kept"]) + "\n")
    say(format_table(summary))
    return summary["exit_status"]


def keep_files(keep, out_dir):
    """Copy each (source, name) of `keep` that exists and is at most RETURNED_FILE_LIMIT bytes to OUT/name;
    the names copied."""
    kept = []
    for source, name in keep:
        source = Path(source)
        if source.is_file() and source.stat().st_size <= RETURNED_FILE_LIMIT:
            shutil.copyfile(source, Path(out_dir) / name)
            kept.append(name)
    return kept


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python tools/gpu_acceptance.py",
        description="Prove scratchvit's GPU path on this machine: machine report, GPU tests, NVRTC compile tests, "
                    "CPU/GPU equivalence, benchmarks against PyTorch at batch 512 and 2048, and MNIST training "
                    "with the GPU recipe; each stage in its own process with a timeout, a summary table last.")
    parser.add_argument("--data-dir", required=True, help="folder with MNIST's four IDX files (.gz or not)")
    parser.add_argument("--out-dir", default="runs/gpu-acceptance",
                        help="where acceptance.log, summary.json, summary.md, train-metrics.jsonl and checkpoint.npz "
                             "go, five files and no folder (default: %(default)s)")
    parser.add_argument("--work-dir", default=None,
                        help="where the stages' own logs and the training run go (default: a new temporary folder)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on the CPU at tiny sizes: checks this command itself, on any machine")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every stage's timeout, and the budget, by this (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help="seconds for all stages together, before --timeout-scale; a stage's timeout is cut so "
                             "that the later ones keep their minimums (default: %(default)s)")
    return parser


def check_arguments(args):
    """A one-line problem with the options, or None."""
    if not (args.timeout_scale > 0 and math.isfinite(args.timeout_scale)):
        return f"--timeout-scale must be a positive number, got {args.timeout_scale}"
    if not (args.budget > 0 and math.isfinite(args.budget)):
        return f"--budget must be a positive number of seconds, got {args.budget}"
    return None


def module_missing(name):
    """True where `name` cannot be found to import (the preconditions' check; tests replace it)."""
    return importlib.util.find_spec(name) is None


def cuda_device_problem():
    """None where CuPy imports and sees a CUDA device, else why not, in a few words."""
    try:
        import cupy
    except Exception as error:
        return f"CuPy does not import ({type(error).__name__}: {_first_line_of(error)}): {GPU_INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:          # no driver, or a driver too old: CuPy's runtime errors
        return f"no CUDA device: CuPy {cupy.__version__} cannot reach one ({_first_line_of(error)})"
    return None if count > 0 else f"no CUDA device: CuPy {cupy.__version__} sees none"


def _first_line_of(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def check_preconditions(args):
    """The first thing this machine lacks for the run, in one line, or None: pytest and hypothesis (the
    pytest stages; tests/conftest.py imports both), CuPy and a CUDA device (not in a dry run), the data
    folder with MNIST's four files."""
    for name in ("pytest", "hypothesis"):
        if module_missing(name):
            return (f"{name} is not installed, and the gpu-tests and compile-tests stages need it: "
                    "pip install pytest hypothesis")
    if not args.dry_run:
        if module_missing("cupy"):
            return f"CuPy is not installed: {GPU_INSTALL_HINT} (or --dry-run to check this command on the CPU)"
        problem = cuda_device_problem()
        if problem:
            return f"{problem} (or --dry-run to check this command on the CPU)"
    folder = Path(args.data_dir)
    if not folder.is_dir():
        return (f"--data-dir {args.data_dir}: no such folder (it should hold MNIST's four files {file_list()}, "
                "each may be .gz)")
    missing = [name for name in MNIST_FILES.values()
               if not (folder / name).is_file() and not (folder / (name + ".gz")).is_file()]
    if missing:
        return f"--data-dir {args.data_dir}: missing {', '.join(missing)} (each may be .gz)"
    return None


def _interrupt(signal_number, frame):
    raise KeyboardInterrupt(f"signal {signal_number}")


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:       # --help (0) or a bad option (2): return the status instead of exiting
        return exit_.code if isinstance(exit_.code, int) else 2
    problem = check_arguments(args) or check_preconditions(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir).resolve()
    work_dir = (Path(args.work_dir).resolve() if args.work_dir
                else Path(tempfile.mkdtemp(prefix="scratchvit-acceptance-")))
    stages = build_stages(Path(args.data_dir).resolve(), work_dir, dry_run=args.dry_run)
    train_dir = work_dir / "train"
    keep = [(train_dir / "metrics.jsonl", "train-metrics.jsonl"), (train_dir / "checkpoint.npz", "checkpoint.npz")]
    # The stages run in sessions of their own (so that a timeout stops a stage's children too), which also keeps
    # a SIGTERM sent to this process from reaching them: treat it as Ctrl-C, which stops the running stage.
    try:
        previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:                  # not the main thread: leave signals alone
        previous_handler = None
    try:
        return run_acceptance(stages, out_dir, dry_run=args.dry_run, work_dir=work_dir,
                              timeout_scale=args.timeout_scale, budget=args.budget, keep=keep)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    sys.exit(main())
