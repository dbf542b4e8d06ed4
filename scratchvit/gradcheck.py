"""Gradient checking: compare hand-written backward passes with finite differences.

What is checked
    A layer maps inputs x and parameters theta to an output y = f(x; theta). Its backward pass,
    given an upstream gradient G = dL/dy, returns dL/dx and adds dL/dtheta into `param.grad`.
    To test it we need a scalar L, so the checker draws a random G of y's shape and uses

        L(x, theta) = sum(G * f(x; theta))        (for a layer whose output is already a scalar
                                                   loss, L = g * loss with a random number g)

    whose gradient is exactly what `backward(G)` must return.

Central differences
    For every element t of every float input and every parameter, with a small step eps:

        dL/dt  ~  (L(t + eps) - L(t - eps)) / (2 eps)

    The error of this estimate is about eps^2 * L'''/6 (the even terms of the Taylor series cancel;
    the one-sided (L(t + eps) - L(t)) / eps has an error of order eps, far worse). Each perturbed
    value is put back exactly afterwards. Only forward passes are used, so the estimate is
    independent of the backward code it checks. An element passes when

        |numeric - analytic| <= atol + rtol * |numeric|

Why float64
    The numerator L(t + eps) - L(t - eps) is a difference of two nearly equal numbers: rounding
    errors in L of size u*|L| (u the unit roundoff) become errors of u*|L|/eps in the derivative.
    In float32 (u ~ 6e-8) with eps = 1e-6 that is ~0.1: the check would be noise. In float64
    (u ~ 1.1e-16) it is ~1e-10, while eps^2 truncation errors are ~1e-12, so a correct backward
    agrees to ~1e-9 and a wrong one is off by about the size of the gradient itself. The checker
    therefore refuses inputs or parameters that are not float64 (create layers with
    dtype="float64").

Why a random upstream gradient
    The backward formulas of softmax and LayerNorm subtract a mean over the row:

        softmax:    dL/ds = p * (g - sum(g * p))                  g = ones  ->  p * (1 - 1) = 0
        LayerNorm:  dL/dx = rstd * (h - mean(h) - xhat * mean(h * xhat))
                                                                  g = ones, gamma = 1  ->
                                                                  h - mean(h) = 0, mean(xhat) = 0

    With an all-ones G (L = sum(y)) the true input gradient of softmax is exactly zero, and
    LayerNorm's mean term contributes nothing, so a backward that forgets those terms, or gets
    them wrong, still "passes". A random G (seeded, so a failure reproduces) exercises every term.
    The same goes for parameters: LayerNorm with gamma = 1 and beta = 0 hides a swapped gamma, so
    check with random parameter values (`randomize_parameters`).

Checking your own layer
    Any object with forward(...), backward(grad_out) and (optionally) named_parameters() works:

        import numpy as np
        from scratchvit.gradcheck import check_layer, randomize_parameters
        layer = MyLayer(8, dtype="float64")
        randomize_parameters(layer, seed=1)                      # random gamma, weights, ...
        report = check_layer(layer, np.random.default_rng(0).standard_normal((2, 3, 8)))
        print(report)                                            # a table; report.passed is a bool

    `check_layer(loss, logits, labels=labels)` checks a loss (integer labels are not
    differentiated); `check_layer(model, images, loss=SoftmaxCrossEntropy(), labels=labels)`
    checks a model through a loss. Dropout layers inside the checked layer are held at one mask
    during the check (`fix_mask`), since finite differences need the same function each time.

    The reports (GradCheckReport, one TensorCheck per tensor; check_directional's DirectionalReport)
    and their table live in `scratchvit.gradcheck_report`.

Whole models
    `check_directional(model, images, labels)` draws one random unit direction d over all
    parameters (and the input) and compares (L(theta + eps d) - L(theta - eps d)) / (2 eps), two
    forward passes, with the analytic sum(grad * d): a cheap check for models too large for
    element-wise differences.

Command line
    python -m scratchvit.gradcheck [--device gpu] [--seed N]
checks every layer, the loss and a tiny ViT, prints one table of the worst errors, and exits
with status 1 if anything fails.
"""
import argparse
import math
import sys

import numpy

from .backend import get_array_module, get_backend, host_generator, to_host
from .cupy_check import BackendUnavailable
from .gradcheck_report import TABLE_HEADER, DirectionalReport, GradCheckReport, TensorCheck, format_table

DEFAULT_EPS = 1e-6
# A correct float64 backward agrees with central differences (eps = 1e-6) to ~1e-9 absolutely
# (rounding u*|L|/eps ~ 1e-10, truncation eps^2 L'''/6 ~ 1e-12) and ~1e-8 relatively even for
# steep functions (LayerNorm on near-constant rows, where rstd ~ 1/sqrt(eps_ln) ~ 300); a wrong
# formula is off by about the gradient itself. These leave a margin of ~100x on the first and
# still catch any error above ~1e-5 of the gradient.
DEFAULT_ATOL = 1e-7
DEFAULT_RTOL = 1e-5
# The directional check compares a single number, a sum over all parameters of a unit direction:
# its numeric error is ~u*|L|/eps ~ 1e-10, so it can be stricter.
DIRECTIONAL_ATOL = 1e-8
DIRECTIONAL_RTOL = 1e-6
# A second backward without zero_grad must double every parameter gradient (backward ADDS).
ACCUMULATION_RTOL = 1e-9

__all__ = ["check_layer", "check_directional", "randomize_parameters", "check_all", "main",
           "DEFAULT_EPS", "DEFAULT_ATOL", "DEFAULT_RTOL", "DIRECTIONAL_ATOL", "DIRECTIONAL_RTOL"]


# ---------------------------------------------------------------------------------------------------
# Helpers

def _is_array(value):
    return hasattr(value, "dtype") and hasattr(value, "shape") and not isinstance(value, (int, float))


def _is_float_array(value):
    return _is_array(value) and numpy.dtype(value.dtype).kind == "f"


def _require_float64(what, array):
    if numpy.dtype(array.dtype) != numpy.float64:
        raise ValueError(f"gradient checks need float64, but {what} is {array.dtype}: finite differences in "
                         f"lower precision are dominated by rounding. Create layers with dtype=\"float64\" and "
                         f"pass float64 arrays (array.astype('float64')).")


def _named_parameters(layer, prefix=""):
    if hasattr(layer, "named_parameters"):
        return [(prefix + name, parameter) for name, parameter in layer.named_parameters()]
    return []


def _sublayers(layer):
    if hasattr(layer, "layers"):
        return list(layer.layers())
    return [layer]


class _HeldMasks:
    """Hold every Dropout-like sub-layer (anything with fix_mask/release_mask) at one mask."""

    def __init__(self, *layers):
        self.layers = [sub for layer in layers if layer is not None for sub in _sublayers(layer)
                       if hasattr(sub, "fix_mask") and hasattr(sub, "release_mask")]

    def __enter__(self):
        self.previous = [getattr(sub, "mask_fixed", False) for sub in self.layers]
        for sub in self.layers:
            sub.fix_mask()
        return self

    def __exit__(self, *exc):
        for sub, was_fixed in zip(self.layers, self.previous):
            if not was_fixed:
                sub.release_mask()
        return False


def _array_module(arrays):
    modules = {get_array_module(array) for array in arrays}
    if len(modules) > 1:
        raise ValueError("the inputs and parameters are on different devices (some NumPy, some CuPy arrays): "
                         "move them all with backend.asarray(...) or model.to(device)")
    return modules.pop() if modules else numpy


def _layer_name(layer):
    return type(layer).__name__


def _draw_upstream(output, rng, xp):
    """A random upstream gradient: a number in ±[0.5, 1.5] for a scalar output, else a standard normal array."""
    if output.ndim == 0:
        return float(rng.uniform(0.5, 1.5) * rng.choice([-1.0, 1.0]))
    return xp.asarray(rng.standard_normal(output.shape))


def _value(upstream, out):
    """L = sum(G * out), or g * out for a scalar output."""
    if isinstance(upstream, float):
        return upstream * float(out)
    return float(get_array_module(out).sum(upstream * out))


def _pair(upstream, plus, minus):
    """sum(G * (y_plus - y_minus)): the difference L_plus - L_minus, formed element by element so that
    outputs the perturbation did not change cancel exactly instead of adding summation rounding."""
    if isinstance(upstream, float):
        return upstream * (float(plus) - float(minus))
    xp = get_array_module(plus)
    return float(xp.sum(upstream * (plus - minus)))


class _Function:
    """L = <upstream, f(args)>, where f is layer.forward, optionally followed by a loss."""

    def __init__(self, layer, args, labels, loss):
        self.layer, self.args, self.labels, self.loss = layer, args, labels, loss

    def output(self):
        """The (copied) output of the forward pass at the current values."""
        if self.loss is None:
            extra = () if self.labels is None else (self.labels,)
            out = self.layer.forward(*self.args, *extra)
        else:
            out = self.layer.forward(*self.args)
            out = self.loss.forward(out, self.labels) if self.labels is not None else self.loss.forward(out)
        if not _is_array(out):
            out = numpy.asarray(out, dtype=numpy.float64)
        return out.copy()   # forward may return an internal buffer, or its own input (Dropout in eval)

    def backward(self, upstream):
        if self.loss is None:
            return self.layer.backward(upstream)
        return self.layer.backward(self.loss.backward(upstream))


def _input_gradients(grads, float_positions, inputs):
    """Match backward's return value with the float inputs, in order."""
    if not float_positions:
        return []
    if isinstance(grads, (tuple, list)):
        grads = list(grads)
    elif len(float_positions) == 1:
        grads = [grads]
    else:
        raise ValueError(f"the layer takes {len(float_positions)} float inputs, so backward must return a tuple "
                         f"of {len(float_positions)} gradients, got one array")
    if len(grads) != len(float_positions):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(float_positions)} float inputs")
    for grad, position in zip(grads, float_positions):
        expected = tuple(inputs[position].shape)
        if grad is None or not _is_array(grad) or tuple(grad.shape) != expected:
            got = None if grad is None else getattr(grad, "shape", type(grad).__name__)
            raise ValueError(f"backward returned a gradient of shape {got} for input {position} of shape {expected}")
    return grads


def _numeric_gradient(array, function, upstream, eps):
    """Central differences of L = <upstream, f> for every element of `array`, perturbed in place and restored."""
    numeric = numpy.zeros(array.shape, dtype=numpy.float64)
    for index in numpy.ndindex(*array.shape):
        original = float(array[index])      # a float64 element is exactly a Python float
        plus, minus = original + eps, original - eps
        try:
            array[index] = plus
            out_plus = function.output()
            array[index] = minus
            out_minus = function.output()
        finally:                            # an exception (Ctrl-C) must not leave a weight perturbed
            array[index] = original
        numeric[index] = _pair(upstream, out_plus, out_minus) / (plus - minus)   # the step actually taken
    return numeric


# ---------------------------------------------------------------------------------------------------
# The checks

def check_layer(layer, inputs, *, labels=None, loss=None, eps=DEFAULT_EPS, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL,
                seed=0, check_inputs=True, check_parameters=True, title=None):
    """Check `layer`'s backward pass element by element against central differences.

    layer    anything with forward(*inputs) and backward(grad_out); parameters from named_parameters()
    inputs   one array or a tuple of them (float64); integer arrays (labels) are passed on, not checked
    labels   passed as the last argument of layer.forward (a loss such as SoftmaxCrossEntropy), or
             to `loss.forward` when `loss` is given
    loss     optional loss layer applied to the output: L = g * loss(layer(inputs), labels)
    eps      the finite-difference step; atol, rtol: an element passes if
             |numeric - analytic| <= atol + rtol * |numeric|
    seed     seeds the random upstream gradient G (a normal array of the output's shape; a number
             in ±[0.5, 1.5] when the output is a scalar), so L = sum(G * output)

    The analytic gradients come from zero_grad(), forward, backward(G); a second forward and backward
    without zero_grad must double every parameter gradient (backward ADDS into .grad). The layer's
    .grad arrays are restored afterwards, and every perturbed value is put back exactly; the given
    input arrays are copied, never modified. A forward that modifies its input, or a backward that
    modifies its grad_out, in place fails the report (report.problems). Returns a GradCheckReport.
    """
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    float_positions = [i for i, value in enumerate(inputs) if _is_float_array(value)]
    for position in float_positions:
        _require_float64(f"input {position}", inputs[position])
    parameters = _named_parameters(layer) + (_named_parameters(loss, "loss.") if loss is not None else [])
    for name, parameter in parameters:
        _require_float64(f"parameter {name!r}", parameter.data)
    xp = _array_module([inputs[i] for i in float_positions] + [p.data for _, p in parameters])
    device = "cpu" if xp is numpy else "gpu"
    # our own copies of the float inputs: perturbed in place, the caller's arrays stay untouched
    args = tuple(value.copy() if i in float_positions else value for i, value in enumerate(inputs))
    function = _Function(layer, args, labels, loss)
    saved_grads = [parameter.grad.copy() for _, parameter in parameters]
    rng = host_generator(seed)

    with _HeldMasks(layer, loss):
        try:
            # analytic gradients
            for _, parameter in parameters:
                parameter.grad.fill(0)
            problems = []
            originals = {position: args[position].copy() for position in float_positions}
            output = function.output()
            for position, original in originals.items():
                if not bool(xp.array_equal(args[position], original)):
                    problems.append(f"forward modified its input {position} in place")
                    args[position][...] = original
            upstream = _draw_upstream(output, rng, xp)
            upstream_given = upstream if isinstance(upstream, float) else upstream.copy()
            input_grads = [to_host(g).copy() for g in
                           _input_gradients(function.backward(upstream_given), float_positions, args)]
            if not isinstance(upstream, float) and not bool(xp.array_equal(upstream_given, upstream)):
                problems.append("backward modified its grad_out argument in place")
            param_grads = [to_host(parameter.grad).copy() for _, parameter in parameters]
            # determinism (the same L twice) and accumulation (a second backward doubles .grad)
            again = function.output()
            first, second = _value(upstream, output), _value(upstream, again)
            if not abs(first - second) <= 1e-10 * (1.0 + abs(first)):
                raise RuntimeError(f"{_layer_name(layer)}.forward is not deterministic: two evaluations at the same "
                                   f"point gave L = {first!r} and {second!r}; fix its random state (Dropout: "
                                   f"fix_mask()) before checking gradients")
            function.backward(upstream if isinstance(upstream, float) else upstream.copy())
            accumulates = []
            for (_, parameter), once in zip(parameters, param_grads):
                twice = to_host(parameter.grad)
                accumulates.append(bool(numpy.allclose(twice, 2.0 * once, rtol=ACCUMULATION_RTOL,
                                                       atol=ACCUMULATION_RTOL * max(1.0, float(numpy.abs(once).max(initial=0.0))))))

            checks = []
            if check_inputs:
                for k, position in enumerate(float_positions):
                    name = "input" if len(float_positions) == 1 else f"input{position}"
                    numeric = _numeric_gradient(args[position], function, upstream, eps)
                    checks.append(TensorCheck(name, numeric, input_grads[k], atol=atol, rtol=rtol))
            if check_parameters:
                for (name, parameter), analytic, adds in zip(parameters, param_grads, accumulates):
                    numeric = _numeric_gradient(parameter.data, function, upstream, eps)
                    checks.append(TensorCheck(name, numeric, analytic, atol=atol, rtol=rtol, accumulates=adds))
        finally:
            for (_, parameter), saved in zip(parameters, saved_grads):
                parameter.grad[...] = saved
    return GradCheckReport(title or _layer_name(layer), checks, eps=eps, atol=atol, rtol=rtol, device=device,
                           problems=problems)


def check_directional(model, images, labels=None, *, loss=None, eps=DEFAULT_EPS, atol=DIRECTIONAL_ATOL,
                      rtol=DIRECTIONAL_RTOL, seed=0, include_input=True, title=None):
    """Check a whole model's gradient along one random direction: two forward passes, one backward.

    L is `loss(model(images), labels)` (loss defaults to SoftmaxCrossEntropy() when labels are given)
    times a random number, or sum(G * model(images)) with a random G when labels and loss are None.
    d is a standard normal draw (seeded by `seed`) over every parameter, and over the images if
    include_input, scaled to unit length. Compares (L(theta + eps d) - L(theta - eps d)) / (2 eps)
    with sum(grad * d). Parameters and images are restored exactly. Returns a DirectionalReport.
    """
    if loss is None and labels is not None:
        from .layers import SoftmaxCrossEntropy
        loss = SoftmaxCrossEntropy()
    if not _is_float_array(images):
        raise ValueError(f"images must be a float64 array, got {getattr(images, 'dtype', type(images).__name__)}")
    _require_float64("the input", images)
    parameters = _named_parameters(model) + (_named_parameters(loss, "loss.") if loss is not None else [])
    for name, parameter in parameters:
        _require_float64(f"parameter {name!r}", parameter.data)
    xp = _array_module([images] + [p.data for _, p in parameters])
    device = "cpu" if xp is numpy else "gpu"
    images = images.copy()
    function = _Function(model, (images,), labels, loss)
    tensors = [(name, parameter.data) for name, parameter in parameters]
    if include_input:
        tensors.append(("input", images))
    rng = host_generator(seed)
    directions = [rng.standard_normal(array.shape) for _, array in tensors]
    norm = math.sqrt(sum(float((d * d).sum()) for d in directions)) or 1.0
    directions = [xp.asarray(d / norm) for d in directions]
    saved_grads = [parameter.grad.copy() for _, parameter in parameters]
    originals = [array.copy() for _, array in tensors]

    with _HeldMasks(model, loss):
        try:
            for _, parameter in parameters:
                parameter.grad.fill(0)
            output = function.output()
            upstream = _draw_upstream(output, rng, xp)
            input_grad = function.backward(upstream)
            grads = [parameter.grad for _, parameter in parameters]
            if include_input:
                if not _is_array(input_grad) or tuple(input_grad.shape) != tuple(images.shape):
                    raise ValueError(f"backward returned {getattr(input_grad, 'shape', input_grad)!r} for images "
                                     f"of shape {images.shape}")
                grads.append(input_grad)
            analytic = sum(float(xp.sum(g * d)) for g, d in zip(grads, directions))

            steps = []
            for sign in (1.0, -1.0):
                for (_, array), original, d in zip(tensors, originals, directions):
                    array[...] = original + (sign * eps) * d
                steps.append(function.output())
                for (_, array), original in zip(tensors, originals):
                    array[...] = original
            numeric = _pair(upstream, steps[0], steps[1]) / (2 * eps)
        finally:
            for (_, array), original in zip(tensors, originals):
                array[...] = original
            for (_, parameter), saved in zip(parameters, saved_grads):
                parameter.grad[...] = saved
    return DirectionalReport(title or f"{_layer_name(model)} (directional)", numeric, analytic, eps=eps, atol=atol,
                             rtol=rtol, device=device, num_elements=sum(int(d.size) for d in directions),
                             tensors=[name for name, _ in tensors])


def randomize_parameters(layer, *, seed=0, std=0.5):
    """Set every parameter of `layer` to std * a standard normal draw (seeded, drawn on the host, kept
    on the parameter's device and dtype): LayerNorm's gamma = 1, beta = 0 initialisation hides bugs."""
    rng = host_generator(seed)
    for _, parameter in _named_parameters(layer):
        xp = get_array_module(parameter.data)
        values = std * rng.standard_normal(parameter.shape)
        parameter.data[...] = xp.asarray(values, dtype=parameter.data.dtype)
    return layer


# ---------------------------------------------------------------------------------------------------
# Every layer at once: the command line

def check_all(device="cpu", *, seed=0):
    """Check every layer, the loss and a tiny ViT on small random float64 data; a list of reports."""
    from .layers import (GELU, Dropout, LayerNorm, Linear, MultiHeadSelfAttention, Patchify,
                         SoftmaxCrossEntropy)
    from .vit import ViT

    backend = get_backend(device)
    rng = host_generator(seed)

    def array(*shape, scale=1.0):
        return backend.asarray(scale * rng.standard_normal(shape), "float64")

    def on_device(layer, param_seed=None):
        for parameter in layer.parameters():
            parameter.data = backend.asarray(parameter.data, "float64")
        if param_seed is not None:
            randomize_parameters(layer, seed=param_seed)
        return layer

    dropout = Dropout(0.3, seed=seed)
    dropout.fix_mask()
    reports = [
        check_layer(Patchify(2), array(2, 2, 4, 6), seed=seed),
        check_layer(on_device(Linear(5, 4, dtype="float64"), seed + 1), array(2, 3, 5), seed=seed),
        check_layer(on_device(LayerNorm(6, dtype="float64"), seed + 2), array(2, 3, 6), seed=seed),
        check_layer(GELU(), array(2, 3, 4, scale=2.0), seed=seed),
        check_layer(dropout, array(2, 3, 4), seed=seed, title="Dropout (train, fixed mask)"),
        check_layer(on_device(MultiHeadSelfAttention(6, 2, dtype="float64"), seed + 3), array(2, 4, 6), seed=seed),
        check_layer(SoftmaxCrossEntropy(label_smoothing=0.1), array(3, 5, scale=2.0),
                    labels=backend.asarray(rng.integers(0, 5, 3)), seed=seed,
                    title="SoftmaxCrossEntropy (smoothing 0.1)"),
    ]
    tiny = ViT(image_size=4, patch_size=2, num_classes=3, dim=4, depth=1, heads=2, mlp_dim=6, channels=2,
               dropout=0.2, emb_dropout=0.1, dtype="float64", seed=seed).to(backend)
    randomize_parameters(tiny, seed=seed + 4)
    tiny.fix_dropout_masks()
    reports.append(check_layer(tiny, array(2, 2, 4, 4), loss=SoftmaxCrossEntropy(),
                               labels=backend.asarray(rng.integers(0, 3, 2)), seed=seed,
                               title="ViT tiny (dropout, cross-entropy)"))
    small = ViT(image_size=8, patch_size=2, num_classes=4, dim=8, depth=2, heads=2, mlp_dim=16, channels=1,
                dtype="float64", seed=seed).to(backend)
    randomize_parameters(small, seed=seed + 5)
    reports.append(check_directional(small, array(3, 1, 8, 8), backend.asarray(rng.integers(0, 4, 3)), seed=seed,
                                     title="ViT small (directional)"))
    return reports


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scratchvit.gradcheck",
                                     description="Check every layer's backward pass against central finite "
                                                 "differences in float64.")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        reports = check_all(args.device, seed=args.seed)
    except BackendUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = [row for report in reports for row in report.rows()]
    print(f"gradient checks on {args.device} (float64, central differences, eps={DEFAULT_EPS:g}; an element passes "
          f"if |numeric - analytic| <= {DEFAULT_ATOL:g} + {DEFAULT_RTOL:g}*|numeric|, the directional check if "
          f"<= {DIRECTIONAL_ATOL:g} + {DIRECTIONAL_RTOL:g}*|numeric|; err/tol <= 1 passes; 'adds': a second "
          f"backward doubles .grad)")
    print(format_table(TABLE_HEADER, rows))
    failed = [report.title for report in reports if not report.passed]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print(f"all {len(reports)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
