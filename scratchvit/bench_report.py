"""The benchmark's report: the figures of the timed steps, and the text `python -m scratchvit.bench` prints.

summarize       one library's step times (ms) as median, minimum, quartiles and images per second
format_table    the whole report (the dict `bench` builds, or prints with --json) as aligned lines:
                configuration, machine, clock, one line per library, GPU work per step, the ratio

bench.py measures and builds the report dict; this module only turns it into numbers and text.
"""
import numpy

__all__ = ["summarize", "format_table"]

MIB = 2 ** 20


def summarize(times_ms, batch_size):
    times = numpy.asarray(times_ms, dtype=float)
    q1, median, q3 = numpy.percentile(times, [25, 50, 75])
    return dict(median_ms=float(median), min_ms=float(times.min()), max_ms=float(times.max()), q1_ms=float(q1),
                q3_ms=float(q3), iqr_ms=float(q3 - q1), img_per_s=batch_size * 1e3 / float(median),
                steps=int(times.size), times_ms=[round(float(t), 4) for t in times])


def _mib(value):
    return f"{value / MIB:.1f} MiB" if value is not None else "n/a"


def _memory_text(result, device):
    memory = result["memory"]
    if device == "gpu" and result["library"] == "scratchvit":
        return f"peak {_mib(memory['peak_bytes'])} (pool held; {_mib(memory['used_bytes'])} in use)"
    if device == "gpu":
        return f"peak {_mib(memory['peak_bytes'])} (reserved; {_mib(memory['allocated_peak_bytes'])} allocated)"
    if memory["peak_bytes"] is None:
        return "peak n/a"
    return f"peak {_mib(memory['peak_bytes'])} (one step, traced)"


def _gpu_work_text(results):
    """One line: each library's GPU work per step and its verdict, or n/a with the reason (said once if shared)."""
    reasons = {result["gpu_operations"]["reason"] for result in results.values()}
    if len(reasons) == 1 and None not in reasons:
        return f"GPU work per step: n/a ({reasons.pop()})"
    parts = []
    for result in results.values():
        work = result["gpu_operations"]
        if work["reason"] is None:
            parts.append(f"{result['label']} {work['kernels']} kernels (+{work['memcpy']} memcpy, "
                         f"+{work['memset']} memset), {work['kernel_ms']:.2f} ms in kernels of a "
                         f"{work['profiled_step_ms']:.2f} ms traced step ({work['kernel_share']:.0%}): {work['bound']}")
        else:
            parts.append(f"{result['label']} n/a ({work['reason']})")
    return "GPU work per step: " + "; ".join(parts)


def format_table(report):
    c, t, m = report["config"], report["timing"], report["machine"]
    lines = [f"device {report['device']}  config image {c['image_size']} patch {c['patch_size']} dim {c['dim']} "
             f"depth {c['depth']} heads {c['heads']} mlp {c['mlp_dim']} batch {c['batch_size']} {c['dtype']}  "
             f"clip {c['clip_grad_norm']:g}"]
    machine = f"machine {m['processor']}, {m['cpu_count']} CPUs"
    if "usable_cpus" in m and m["usable_cpus"] != m["cpu_count"]:
        machine += f" ({m['usable_cpus']} usable)"
    machine += f"; numpy {m['numpy']}" + (f" ({m['blas']})" if m["blas"] else "")
    if m["thread_environment"]:
        machine += " " + " ".join(f"{key}={value}" for key, value in m["thread_environment"].items())
    if "gpu" in m:
        machine += f"; {m['gpu']}, cupy {m['cupy']}, CUDA runtime {m['cuda_runtime']}, driver {m['cuda_driver']}"
        if m.get("nvidia_driver"):
            machine += f" ({m['nvidia_driver']})"
    if "torch" in m:
        machine += f"; torch {m['torch']} ({m['torch_threads']} threads)"
    lines.append(machine)
    mpi = report.get("mpi")
    if mpi:
        lines.append(f"MPI: {mpi['ranks']} ranks on {mpi['nodes']} node(s) x {mpi['threads_per_rank']} thread(s) each "
                     f"({mpi['library']}); batch {c['batch_size']} split over the ranks; img/s of the whole job")
        lines.append(f"gradient exchange ({mpi['exchange']}): median {mpi['exchange_median_ms']:.2f} ms per step "
                     f"(IQR {mpi['exchange_q1_ms']:.2f}-{mpi['exchange_q3_ms']:.2f}), "
                     f"{mpi['exchange_share']:.1%} of the step")
    else:
        lines.append(f"scratchvit step threads: {report['scratchvit_threads']}")
    lines.append(f"timing {t['clock']}: {t['steps']} steps per library after {t['warmup']} warm-up"
                 + (f", in {t['rounds']} alternating blocks" if len(report["results"]) > 1 else ""))
    results = list(report["results"].values())
    width = max(len(result["label"]) for result in results)
    number_width = max(len(f"{result['median_ms']:.1f}") for result in results)
    for result in results:
        lines.append(f"{result['label']:<{width}}  median {result['median_ms']:>{number_width}.1f} ms  "
                     f"(min {result['min_ms']:.1f}, IQR {result['q1_ms']:.1f}-{result['q3_ms']:.1f})  "
                     f"{result['img_per_s']:>6.0f} img/s  {_memory_text(result, report['device'])}")
    lines.append(_gpu_work_text(report["results"]))
    if report.get("ratio") is not None:
        torch_result = report["results"]["torch"]
        scratch = report["results"]["scratchvit"]
        lines.append(f"ratio scratchvit/torch: {report['ratio']:.2f}  (below 1 = scratchvit faster)")
        loss = ""
        if scratch["first_loss"] is not None and torch_result["first_loss"] is not None:
            loss = f"; first-step loss {scratch['first_loss']:.5f} vs {torch_result['first_loss']:.5f}"
        lines.append(f"parameters {scratch['parameters']:,} in both{loss}")
    else:
        lines.append(f"parameters {results[0]['parameters']:,}")
    return "\n".join(lines)
