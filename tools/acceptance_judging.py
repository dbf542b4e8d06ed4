"""Reading what the GPU acceptance run's stages printed (pytest's summary, JSON lines, metrics.jsonl) and
judging each stage: `judge_*(outcome) -> (figures, problems)`.
"""
import dataclasses
import json
import math
import re
from pathlib import Path

TARGET_ACCURACY = 0.99

# A skip that means the test did not get a GPU: conftest's "no GPU backend: ...", test_fused_compiles.py's
# "needs CuPy and NVRTC", pytest.importorskip("cupy")'s "could not import 'cupy'".
NO_GPU_SKIP = re.compile(r"no GPU backend|needs CuPy|could not import 'cupy'|no CUDA device", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# reading what the stages printed

_COUNT = r"\d+ (?:passed|failed|skipped|deselected|errors?|warnings?|xfailed|xpassed|rerun)"
_SUMMARY_LINE = re.compile(rf"^=*\s*(?P<counts>{_COUNT}(?:, {_COUNT})*|no tests ran)(?:\s+in\s+[\d.]+s\b.*?)?\s*=*\s*$")
_SKIP_LINE = re.compile(r"^SKIPPED \[(?P<count>\d+)\] \S+: (?P<reason>.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
PYTEST_KEYS = ("passed", "failed", "skipped", "errors", "deselected", "xfailed", "xpassed", "warnings")


def parse_pytest_summary(text):
    """The counts of pytest's last summary line ("3 passed, 2 skipped in 1.2s", "no tests ran in 0.01s") as
    {passed, failed, skipped, errors, deselected, xfailed, xpassed, warnings}, absent ones 0; None without one."""
    for line in reversed(_ANSI.sub("", text).splitlines()):
        match = _SUMMARY_LINE.match(line.strip())
        if match is None:
            continue
        counts = dict.fromkeys(PYTEST_KEYS, 0)
        for number, word in re.findall(r"(\d+) (\w+)", match["counts"]):
            key = {"error": "errors", "warning": "warnings"}.get(word, word)
            counts[key] = counts.get(key, 0) + int(number)
        return counts
    return None


def count_no_gpu_skips(text):
    """How many tests pytest's -rs lines ("SKIPPED [3] tests/x.py:12: reason") say skipped for want of a GPU."""
    total = 0
    for line in _ANSI.sub("", text).splitlines():
        match = _SKIP_LINE.match(line.strip())
        if match and NO_GPU_SKIP.search(match["reason"]):
            total += int(match["count"])
    return total


def parse_json_objects(text):
    """Every JSON object that starts a line's first "{" (text after it on the line, such as a stray
    stderr line glued to it, is ignored), in order."""
    decoder = json.JSONDecoder()
    objects = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            value, _ = decoder.raw_decode(line, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def read_metrics(path):
    """The per-epoch records of a metrics.jsonl. A missing file gives []; a line cut short by a kill is skipped."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [record for record in parse_json_objects(text) if "epoch" in record]


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_figures(records, target=TARGET_ACCURACY):
    """The first epoch at or above `target` test accuracy (and its wall_seconds), and the final accuracy."""
    reached = next((record for record in records
                    if _is_number(record.get("test_accuracy")) and record["test_accuracy"] >= target), {})
    last = records[-1] if records else {}
    return dict(epochs=len(records), target_accuracy=target, target_epoch=reached.get("epoch"),
                target_wall_seconds=reached.get("wall_seconds"), final_epoch=last.get("epoch"),
                final_accuracy=last.get("test_accuracy"), final_wall_seconds=last.get("wall_seconds"))


def bench_figures(report, batch_size):
    """The table's figures from a bench JSON report. Every key is read defensively: absent ones are None."""
    report = report or {}
    results = report.get("results") if isinstance(report.get("results"), dict) else {}

    def library(name):
        result = results.get(name) if isinstance(results.get(name), dict) else {}
        memory = result.get("memory") if isinstance(result.get("memory"), dict) else {}
        work = result.get("gpu_operations") if isinstance(result.get("gpu_operations"), dict) else {}
        return dict(images_per_second=result.get("img_per_s"), median_ms=result.get("median_ms"),
                    kernels_per_step=result.get("kernels_per_step"), kernel_ms=work.get("kernel_ms"),
                    profiled_step_ms=work.get("profiled_step_ms"), kernel_share=work.get("kernel_share"),
                    bound=work.get("bound"),
                    peak_bytes=memory.get("peak_bytes", result.get("peak_bytes")),
                    used_bytes=memory.get("used_bytes", result.get("used_bytes")))

    machine = report.get("machine") if isinstance(report.get("machine"), dict) else {}
    return dict(batch_size=batch_size, ratio=report.get("ratio"), device=report.get("device"),
                gpu=machine.get("gpu"), scratchvit=library("scratchvit"),
                torch=library("torch") if "torch" in results else None)


# ------------------------------------------------------------------------------------------------
# judging a stage: judge(outcome) -> (figures, problems); the stage passes when it exited 0, in time,
# and its judge found no problem

@dataclasses.dataclass
class Outcome:
    """What a stage's process did."""
    returncode: object          # int, or None if it never started
    timed_out: bool
    seconds: float
    log_text: str
    start_error: object = None  # why it could not be started, or None


def judge_machine(outcome):
    reports = [obj for obj in parse_json_objects(outcome.log_text) if "python" in obj]
    if not reports:
        return {}, ["no machine report in the log"]
    facts = reports[-1]
    return facts, [f"GPU unusable: {facts['problem']}"] if facts.get("problem") else []


def judge_pytest(outcome, *, dry_run):
    counts = parse_pytest_summary(outcome.log_text)
    if counts is None:
        return {}, ["no pytest summary line in the log"]
    figures = dict(counts, no_gpu_skips=count_no_gpu_skips(outcome.log_text))
    problems = []
    if counts["failed"] or counts["errors"]:
        problems.append(f"{counts['failed']} failed, {counts['errors']} errors")
    if not dry_run and counts["passed"] == 0:
        problems.append("no test passed")
    if not dry_run and figures["no_gpu_skips"]:
        problems.append(f"{figures['no_gpu_skips']} skipped for want of a GPU")
    return figures, problems


def judge_equivalence(outcome):
    comparisons = [obj for obj in parse_json_objects(outcome.log_text) if "dtype" in obj]
    figures = {str(obj["dtype"]): dict(passed=obj.get("passed"), loss_error=obj.get("loss_error"),
                                       parameter_error=obj.get("parameter_error"), logits_error=obj.get("logits_error"),
                                       worst_parameter=obj.get("worst_parameter"), tolerance=obj.get("tolerance"))
               for obj in comparisons}
    if not figures:
        return {}, ["no comparison in the log"]
    failed = [dtype for dtype, figure in figures.items() if figure["passed"] is not True]
    return figures, [f"{dtype}: outside the tolerance" for dtype in failed]


def judge_bench(outcome, *, batch_size, torch_expected):
    reports = [obj for obj in parse_json_objects(outcome.log_text) if "results" in obj]
    if not reports:
        return bench_figures(None, batch_size), ["no benchmark report in the log"]
    figures = bench_figures(reports[-1], batch_size)
    if torch_expected and figures["torch"] is None:
        return figures, ["no PyTorch figures (torch does not import here, or its part of the run failed: see the log)"]
    return figures, []


def judge_inference(outcome):
    reports = [obj["inference"] for obj in parse_json_objects(outcome.log_text)
               if isinstance(obj.get("inference"), dict)]
    if not reports:
        return {}, ["no inference comparison in the log"]
    figures = reports[-1]
    problems = [f"{name}: outside the tolerance {figures.get('tolerance')} or other digits"
                for name in ("predict", "demo") if (figures.get(name) or {}).get("passed") is not True]
    return figures, problems


def judge_mpi(outcome, *, exchange):
    reports = [obj for obj in parse_json_objects(outcome.log_text) if "results" in obj]
    mpi = reports[-1].get("mpi") if reports and isinstance(reports[-1].get("mpi"), dict) else None
    if mpi is None:
        return {}, ["no MPI benchmark report in the log"]
    result = (reports[-1].get("results") or {}).get("scratchvit") or {}
    figures = dict(ranks=mpi.get("ranks"), exchange=mpi.get("exchange"),
                   exchange_median_ms=mpi.get("exchange_median_ms"), exchange_share=mpi.get("exchange_share"),
                   images_per_second=result.get("img_per_s"))
    problems = []
    if figures["ranks"] != 2:
        problems.append(f"ran on {figures['ranks']} ranks, not 2")
    if exchange is not None and figures["exchange"] != exchange:
        problems.append(f"exchanged gradients by {figures['exchange']}, not {exchange}")
    return figures, problems


def judge_training(outcome, *, metrics_path):
    records = read_metrics(metrics_path)
    figures = dict(training_figures(records), process_seconds=outcome.seconds, metrics=str(metrics_path))
    return figures, [] if records else [f"no epoch recorded in {metrics_path}"]
