"""The gradient checker's reports: what `scratchvit.gradcheck` found, tensor by tensor, and its table.

TensorCheck        one tensor (an input, or a parameter by its dotted name): the numeric and analytic
                   gradients element by element, the worst error against atol + rtol * |numeric|
GradCheckReport    what `check_layer` returns: one TensorCheck per input and parameter, plus problems
DirectionalReport  what `check_directional` returns: one directional derivative, two ways
format_table       the aligned text table `python -m scratchvit.gradcheck` prints (columns TABLE_HEADER)

The checker builds these; nothing here differentiates or runs a layer.
"""
import math

import numpy

__all__ = ["TensorCheck", "GradCheckReport", "DirectionalReport", "format_table", "TABLE_HEADER"]


def _fmt(value, digits=2):
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}e}"


def format_table(header, rows):
    """An aligned text table: `header` a tuple of column titles, `rows` tuples of strings."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)).rstrip(),
             "  ".join("-" * width for width in widths)]
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


class TensorCheck:
    """The comparison for one tensor (an input, or a parameter by its dotted name).

    max_abs_error   max |numeric - analytic|
    max_rel_error   max |numeric - analytic| / max(|numeric|, |analytic|) over the elements whose
                    gradient exceeds atol in magnitude (smaller ones are judged by the absolute error)
    max_abs_numeric max |numeric|, the scale of the gradient
    max_error_ratio max |numeric - analytic| / (atol + rtol |numeric|): <= 1 everywhere means passed
    num_failed      how many elements broke the tolerance
    worst_index, worst_numeric, worst_analytic   the element with the largest error ratio
    accumulates     for parameters: whether a second backward (without zero_grad) doubled the
                    gradient, i.e. backward ADDS into param.grad; None for inputs
    numeric, analytic   the two full gradients, as NumPy arrays
    """

    def __init__(self, name, numeric, analytic, *, atol, rtol, accumulates=None):
        self.name = name
        self.numeric = numeric = numpy.asarray(numeric, dtype=numpy.float64)
        self.analytic = analytic = numpy.asarray(analytic, dtype=numpy.float64)
        self.shape = tuple(numeric.shape)
        self.size = numeric.size
        self.atol, self.rtol = atol, rtol
        self.accumulates = accumulates
        with numpy.errstate(invalid="ignore", over="ignore"):
            error = numpy.abs(numeric - analytic)
        error = numpy.where(numpy.isfinite(error), error, numpy.inf)        # NaN or inf: fails
        allowed = atol + rtol * numpy.abs(numeric)
        positive = allowed > 0
        ratio = numpy.where(positive, error / numpy.where(positive, allowed, 1.0), numpy.where(error > 0, numpy.inf, 0.0))
        scale = numpy.maximum(numpy.abs(numeric), numpy.abs(analytic))
        scale = numpy.where(numpy.isfinite(scale), scale, numpy.inf)
        significant = scale > atol
        with numpy.errstate(divide="ignore", invalid="ignore"):
            relative = numpy.where(significant, error / numpy.where(significant, scale, 1), 0.0)
        relative = numpy.where(numpy.isnan(relative), numpy.inf, relative)
        self.num_failed = int(numpy.count_nonzero(~(error <= allowed)))
        if self.size:
            self.max_abs_error = float(error.max())
            self.max_rel_error = float(relative.max())
            self.max_abs_numeric = float(numpy.abs(numeric).max())
            flat = int(numpy.argmax(numpy.where(numpy.isnan(ratio), numpy.inf, ratio)))
            self.worst_index = tuple(int(i) for i in numpy.unravel_index(flat, self.shape))
            self.max_error_ratio = float(ratio.reshape(-1)[flat])
            self.worst_numeric = float(numeric.reshape(-1)[flat])
            self.worst_analytic = float(analytic.reshape(-1)[flat])
        else:
            self.max_abs_error = self.max_rel_error = self.max_abs_numeric = self.max_error_ratio = 0.0
            self.worst_index = self.worst_numeric = self.worst_analytic = None

    @property
    def passed(self):
        return self.num_failed == 0 and self.accumulates is not False

    def verdict(self):
        if self.passed:
            return "ok"
        parts = []
        if self.num_failed:
            parts.append(f"FAIL {self.num_failed}/{self.size} elements, worst at {self.worst_index}: "
                         f"numeric {self.worst_numeric:.6g} analytic {self.worst_analytic:.6g}")
        if self.accumulates is False:
            parts.append("FAIL backward overwrites .grad instead of adding")
        return "; ".join(parts)

    def row(self):
        accum = "-" if self.accumulates is None else ("yes" if self.accumulates else "NO")
        return (self.name, str(self.shape), _fmt(self.max_abs_numeric), _fmt(self.max_abs_error),
                _fmt(self.max_rel_error), _fmt(self.max_error_ratio), accum, self.verdict())

    def __repr__(self):
        return (f"TensorCheck({self.name!r}, shape={self.shape}, max_abs_error={self.max_abs_error:.3g}, "
                f"max_rel_error={self.max_rel_error:.3g}, passed={self.passed})")


TABLE_HEADER = ("check", "tensor", "shape", "max|numeric|", "max abs err", "max rel err", "err/tol", "adds", "result")


class GradCheckReport:
    """The result of `check_layer`: one TensorCheck per input and parameter.

    report.passed        True if every tensor passed
    report.worst()       the TensorCheck with the largest error relative to its tolerance
    report.failures()    the TensorChecks that failed
    report.problems      other failures, as sentences (forward or backward modifying its argument in place)
    report["weight"]     a TensorCheck by name
    str(report), report.table()   an aligned table
    """

    def __init__(self, title, checks, *, eps, atol, rtol, device, problems=()):
        self.title, self.checks, self.problems = title, list(checks), list(problems)
        self.eps, self.atol, self.rtol, self.device = eps, atol, rtol, device

    @property
    def passed(self):
        return all(check.passed for check in self.checks) and not self.problems

    def failures(self):
        return [check for check in self.checks if not check.passed]

    def worst(self):
        if not self.checks:
            return None
        return max(self.checks, key=lambda check: (not check.passed, check.max_error_ratio))

    def names(self):
        return [check.name for check in self.checks]

    def __getitem__(self, name):
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no tensor named {name!r} in this report; it has {self.names()}")

    def __iter__(self):
        return iter(self.checks)

    def __len__(self):
        return len(self.checks)

    def rows(self):
        rows = [(self.title,) + check.row() for check in self.checks]
        return rows + [(self.title, "-", "-", "-", "-", "-", "-", "-", f"FAIL {problem}") for problem in self.problems]

    def summary(self):
        return (f"gradient check of {self.title} on {self.device}: {'PASSED' if self.passed else 'FAILED'} "
                f"(central differences, eps={self.eps:g}; element passes if |numeric - analytic| <= "
                f"{self.atol:g} + {self.rtol:g}*|numeric|)")

    def table(self):
        text = self.summary() + "\n" + format_table(TABLE_HEADER[1:], [row[1:] for row in self.rows()])
        return text + "".join(f"\nFAIL {problem}" for problem in self.problems)

    __str__ = table

    def __repr__(self):
        return f"GradCheckReport({self.title!r}, passed={self.passed}, tensors={self.names()})"


class DirectionalReport:
    """The result of `check_directional`: the directional derivative two ways.

    numeric    (L(theta + eps d) - L(theta - eps d)) / (2 eps)
    analytic   sum over tensors of sum(grad * d)
    abs_error, rel_error (|numeric - analytic| / max(|numeric|, |analytic|)), passed
    """

    def __init__(self, title, numeric, analytic, *, eps, atol, rtol, device, num_elements, tensors):
        self.title, self.numeric, self.analytic = title, float(numeric), float(analytic)
        self.eps, self.atol, self.rtol, self.device = eps, atol, rtol, device
        self.num_elements, self.tensors = num_elements, list(tensors)
        error = abs(self.numeric - self.analytic)
        self.abs_error = error if math.isfinite(error) else math.inf
        scale = max(abs(self.numeric), abs(self.analytic))
        self.rel_error = self.abs_error / scale if scale > 0 else (0.0 if self.abs_error == 0 else math.inf)
        allowed = atol + rtol * abs(self.numeric)
        self.error_ratio = self.abs_error / allowed if allowed > 0 else (0.0 if self.abs_error == 0 else math.inf)
        self.passed = self.abs_error <= allowed

    def rows(self):
        verdict = "ok" if self.passed else f"FAIL numeric {self.numeric:.9g} analytic {self.analytic:.9g}"
        return [(self.title, f"direction over {len(self.tensors)} tensors", f"({self.num_elements},)",
                 _fmt(abs(self.numeric)), _fmt(self.abs_error), _fmt(self.rel_error), _fmt(self.error_ratio),
                 "-", verdict)]

    def table(self):
        return (f"directional check of {self.title} on {self.device}: {'PASSED' if self.passed else 'FAILED'}\n"
                f"  numeric  (L(theta + eps d) - L(theta - eps d)) / 2eps = {self.numeric:.12g}   (eps={self.eps:g})\n"
                f"  analytic sum(grad * d)                             = {self.analytic:.12g}\n"
                f"  abs error {self.abs_error:.3g}, rel error {self.rel_error:.3g} "
                f"(passes if abs error <= {self.atol:g} + {self.rtol:g}*|numeric|); "
                f"d is a random unit vector over {self.num_elements} numbers in {len(self.tensors)} tensors")

    __str__ = table

    def __repr__(self):
        return (f"DirectionalReport({self.title!r}, numeric={self.numeric:.12g}, analytic={self.analytic:.12g}, "
                f"rel_error={self.rel_error:.3g}, passed={self.passed})")
