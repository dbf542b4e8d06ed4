"""The GPU acceptance run's summary: summary.json, the table printed last and summary.md, from each
stage's figures (how to read the table: docs/gpu-acceptance.md).
"""
import json

from tools.acceptance_judging import _is_number


# ------------------------------------------------------------------------------------------------
# the summary: JSON, the table, Markdown

def _fmt(value, spec, suffix=""):
    return format(value, spec) + suffix if _is_number(value) else "n/a"


def _bytes(value):
    if not _is_number(value):
        return "n/a"
    return f"{value / 2 ** 30:.2f} GiB" if value >= 2 ** 30 else f"{value / 2 ** 20:.1f} MiB"


def _integer(value):
    return str(int(value)) if _is_number(value) else "n/a"


def machine_text(figures):
    def fact(key):
        return figures.get(key) or "n/a"
    versions = f"cupy {fact('cupy')}, numpy {fact('numpy')}, torch {fact('torch')}"
    if figures.get("dry_run"):
        return f"dry run on the CPU: {fact('cpu')} ({fact('cpu_count')} CPUs); {versions}"
    if "gpu" in figures:
        gpu = f"{figures['gpu']} ({_bytes(figures.get('gpu_memory_bytes'))}, sm_{fact('gpu_compute_capability')})"
    else:
        gpu = f"no GPU ({figures.get('problem') or 'not found'})"
    return (f"{gpu}; driver {fact('nvidia_driver')}, CUDA runtime {fact('cuda_runtime')} "
            f"(driver supports {fact('cuda_driver')}); {versions}")


def pytest_text(figures):
    text = ", ".join(f"{figures.get(key, 0)} {key}" for key in ("passed", "failed", "errors", "skipped"))
    return text + (f" ({figures['no_gpu_skips']} for no GPU)" if figures.get("no_gpu_skips") else "")


def equivalence_text(figures):
    return "; ".join(f"{dtype} loss {_fmt(entry.get('loss_error'), '.1e')}, "
                     f"params {_fmt(entry.get('parameter_error'), '.1e')}, "
                     f"logits {_fmt(entry.get('logits_error'), '.1e')}: "
                     + ("ok" if entry.get("passed") is True else "FAILED")
                     for dtype, entry in figures.items())


def bound_text(library):
    """`launch-bound (kernels 4.1 of 9.8 ms)` for one library's bench figures, or n/a."""
    if not library.get("bound"):
        return "n/a"
    return (f"{library['bound']} (kernels {_fmt(library.get('kernel_ms'), '.1f')} of "
            f"{_fmt(library.get('profiled_step_ms'), '.1f')} ms)")


def bench_text(figures):
    scratch, torch = figures.get("scratchvit") or {}, figures.get("torch") or {}
    return (f"batch {figures.get('batch_size', 'n/a')}: "
            f"scratchvit {_fmt(scratch.get('images_per_second'), ',.0f')} img/s, "
            f"torch {_fmt(torch.get('images_per_second'), ',.0f')} img/s, ratio {_fmt(figures.get('ratio'), '.2f')}; "
            f"kernels/step {_integer(scratch.get('kernels_per_step'))} "
            f"vs {_integer(torch.get('kernels_per_step'))}; "
            f"scratchvit {bound_text(scratch)}, torch {bound_text(torch)}; "
            f"scratchvit peak {_bytes(scratch.get('peak_bytes'))}")


def inference_text(figures):
    devices = " vs ".join(figures.get("devices") or ["n/a"])
    parts = []
    for name in ("predict", "demo"):
        entry = figures.get(name) or {}
        parts.append(f"{name} {_integer(entry.get('images'))} digits "
                     f"{'same' if entry.get('same_digits') else 'DIFFER'}, "
                     f"max |dp| {_fmt(entry.get('max_probability_difference'), '.1e')}")
    return f"{devices}: " + "; ".join(parts) + f" (tolerance {_fmt(figures.get('tolerance'), '.0e')})"


def mpi_text(figures):
    if figures.get("skipped"):
        return f"skipped: {figures['skipped']}"
    return (f"{_integer(figures.get('ranks'))} ranks, {figures.get('exchange') or 'n/a'} exchange "
            f"{_fmt(figures.get('exchange_median_ms'), '.2f', ' ms')} per step "
            f"({_fmt(figures.get('exchange_share'), '.0%')} of it), "
            f"{_fmt(figures.get('images_per_second'), ',.0f')} img/s")


def train_text(figures):
    process = f"process {_fmt(figures.get('process_seconds'), '.1f', ' s')}"
    epochs = figures.get("epochs", 0)
    if not epochs:
        return f"no epoch recorded; {process}"
    target = _fmt(figures.get("target_accuracy"), ".0%")
    if figures.get("target_epoch") is not None:
        seconds = _fmt(figures.get("target_wall_seconds"), ".1f", " s")
        reached = f"{target} at epoch {figures['target_epoch']} ({seconds})"
    else:
        reached = f"{target} not reached"
    final = f"final {_fmt(figures.get('final_accuracy'), '.2%')} after {epochs} epoch{'' if epochs == 1 else 's'}"
    return f"{reached}; {final}; {process}"


FIGURE_TEXTS = dict(machine=machine_text, pytest=pytest_text, equivalence=equivalence_text, bench=bench_text,
                    train=train_text, inference=inference_text, mpi=mpi_text)


def figures_text(stage):
    """The key figures of a stage result (an entry of summary.json's "stages") in one line."""
    figures = stage.get("figures") or {}
    if not figures:
        return "n/a"
    if stage.get("status") == "skipped":
        return f"skipped: {figures.get('skipped')}"
    text = FIGURE_TEXTS.get(stage.get("kind"))
    return text(figures) if text else json.dumps(figures)[:200]


def verdict_line(summary):
    stages = summary["stages"]
    failed = [stage["name"] for stage in stages if stage["status"] not in ("passed", "skipped")]
    if summary.get("interrupted"):
        return f"INTERRUPTED after {len(stages)} stage(s) (exit {summary['exit_status']})"
    if failed:
        return f"FAILED: {len(failed)} of {len(stages)} stages ({', '.join(failed)}) (exit {summary['exit_status']})"
    skipped = sum(stage["status"] == "skipped" for stage in stages)
    ran = (f"all {len(stages)} stages" if not skipped
           else f"{len(stages) - skipped} of {len(stages)} stages, {skipped} skipped")
    return f"PASSED: {ran} (exit {summary['exit_status']})"


def format_table(summary):
    """The text table printed last: one row per stage, then the verdict."""
    rows = [("stage", "status", "seconds", "key figures")]
    rows += [(stage["name"], stage["status"], f"{stage['seconds']:.1f}", figures_text(stage))
             for stage in summary["stages"]]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = [f"{name:<{widths[0]}}  {status:<{widths[1]}}  {seconds:>{widths[2]}}  {figures}"
             for name, status, seconds, figures in rows]
    if any(stage["kind"] == "bench" for stage in summary["stages"]):
        lines.append("(bench: ratio = scratchvit / torch median ms per step, below 1 = scratchvit faster; "
                     "kernels/step = GPU kernels one step runs, scratchvit vs torch; launch-bound = the kernels "
                     "fill less than 80% of a traced step's wall time, compute-bound = at least 80%)")
    mode = "dry run (CPU, tiny sizes)" if summary["dry_run"] else "GPU run"
    lines.append(f"{mode}, {summary['seconds']:.0f} s in all: {verdict_line(summary)}")
    return "\n".join(lines)


def format_markdown(summary):
    mode = "dry run (every stage on the CPU, tiny sizes)" if summary["dry_run"] else "GPU run"
    lines = [f"# scratchvit GPU acceptance: {verdict_line(summary)}", "",
             f"{mode}, started {summary['started']}, {summary['seconds']:.0f} s in all. Every stage's output: "
             f"`{summary['log']}`, one section per stage.", "",
             "| stage | status | seconds | key figures |", "|---|---|---|---|"]
    for stage in summary["stages"]:
        figures = figures_text(stage).replace("|", "\\|")
        lines.append(f"| {stage['name']} | {stage['status']} | {stage['seconds']:.1f} | {figures} |")
    for stage in summary["stages"]:
        if stage["status"] not in ("passed", "skipped"):
            lines += ["", f"## {stage['name']}: {stage['status']}", "", "; ".join(stage["problems"]), "",
                      f"`{stage['command']}`, last lines of its log:", "", "```", *stage["log_tail"], "```"]
    lines += ["", "## Commands", ""] + [f"- {stage['name']} (timeout {stage['timeout']:.0f} s): `{stage['command']}`"
                                        for stage in summary["stages"]]
    return "\n".join(lines) + "\n"


def write_summary(out_dir, summary):
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "summary.md").write_text(format_markdown(summary))
