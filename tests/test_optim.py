"""AdamW against a per-parameter reference of the formula in its docstring, its flat buffer,
gradient clipping, argument checks, state dicts, and the warmup-cosine schedule."""
import math

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchvit.backend import get_array_module, to_host
from scratchvit.layers import Linear, Parameter
from scratchvit.optim import AdamW, warmup_cosine

with_backend = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SHAPES = [(3, 4), (5,), (2, 2, 3)]


def make_parameters(backend, seed=0, dtype="float64", shapes=SHAPES):
    rng = numpy.random.default_rng(seed)
    return [Parameter(backend.asarray(rng.standard_normal(shape), dtype=dtype)) for shape in shapes]


def flat_host(arrays):
    return numpy.concatenate([to_host(array).ravel() for array in arrays])


class ReferenceAdamW:
    """The docstring's formula, one parameter at a time, in float64 on the host."""

    def __init__(self, values, lr, betas, eps, weight_decays):
        self.values = [numpy.array(value, dtype=numpy.float64) for value in values]
        self.m = [numpy.zeros_like(value) for value in self.values]
        self.v = [numpy.zeros_like(value) for value in self.values]
        self.lr, self.betas, self.eps, self.weight_decays = lr, betas, eps, weight_decays
        self.t = 0

    def step(self, grads):
        self.t += 1
        beta1, beta2 = self.betas
        for i, g in enumerate(grads):
            self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            m_hat = self.m[i] / (1 - beta1 ** self.t)
            v_hat = self.v[i] / (1 - beta2 ** self.t)
            theta = self.values[i]
            theta = theta - self.lr * self.weight_decays[i] * theta
            self.values[i] = theta - self.lr * m_hat / (numpy.sqrt(v_hat) + self.eps)


def set_gradients(parameters, grads, backend):
    for parameter, grad in zip(parameters, grads):
        parameter.grad[...] = backend.asarray(grad)


GROUPINGS = {
    "no decay": (lambda ps: ps, dict(weight_decay=0.0), [0.0, 0.0, 0.0]),
    "uniform decay": (lambda ps: ps, dict(weight_decay=0.1), [0.1, 0.1, 0.1]),
    "two groups": (lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}],
                   dict(), [0.1, 0.1, 0.0]),
    "three groups, one default": (lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]]},
                                              {"params": [ps[2]], "weight_decay": 0.0}],
                                  dict(weight_decay=0.05), [0.1, 0.05, 0.0]),
}


@with_backend
@given(grouping=st.sampled_from(sorted(GROUPINGS)), lr=st.floats(1e-4, 0.5),
       beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999), eps=st.sampled_from([1e-8, 1e-3]),
       seed=st.integers(0, 2**32 - 1))
def test_adamw_matches_reference(backend, grouping, lr, beta1, beta2, eps, seed):
    make_groups, kwargs, decays = GROUPINGS[grouping]
    parameters = make_parameters(backend, seed)
    reference = ReferenceAdamW([to_host(p.data) for p in parameters], lr, (beta1, beta2), eps, decays)
    optimizer = AdamW(make_groups(parameters), lr=lr, betas=(beta1, beta2), eps=eps, **kwargs)
    rng = numpy.random.default_rng(seed + 1)
    for step in range(5):
        if step == 3:   # a scheduler changes the learning rate between steps
            optimizer.lr = reference.lr = lr / 2
        grads = [rng.standard_normal(p.shape) * 10.0 ** rng.integers(-3, 2) for p in parameters]
        optimizer.zero_grad()
        set_gradients(parameters, grads, backend)
        optimizer.step()
        reference.step(grads)
        for parameter, expected in zip(parameters, reference.values):
            assert get_array_module(parameter.data) is backend.xp
            numpy.testing.assert_allclose(to_host(parameter.data), expected, rtol=1e-11, atol=1e-13)


def test_adamw_float32_stays_float32_and_close_to_reference(backend):
    parameters = make_parameters(backend, dtype="float32")
    reference = ReferenceAdamW([to_host(p.data) for p in parameters], 1e-2, (0.9, 0.999), 1e-8, [0.1] * 3)
    optimizer = AdamW(parameters, lr=1e-2, weight_decay=0.1)
    rng = numpy.random.default_rng(3)
    for _ in range(3):
        grads = [rng.standard_normal(p.shape) for p in parameters]
        set_gradients(parameters, grads, backend)
        optimizer.step()
        reference.step([g.astype(numpy.float32).astype(numpy.float64) for g in grads])
    for parameter, expected in zip(parameters, reference.values):
        assert parameter.data.dtype == numpy.float32 and parameter.grad.dtype == numpy.float32
        numpy.testing.assert_allclose(to_host(parameter.data), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The flat buffer
# ---------------------------------------------------------------------------------------------

def test_parameters_become_views_into_the_flat_buffer(backend):
    parameters = make_parameters(backend)
    for parameter in parameters:
        parameter.grad += 0.25          # existing gradients are carried over too
    original = flat_host([p.data for p in parameters])
    optimizer = AdamW(parameters, lr=1e-3)
    total = sum(p.size for p in parameters)
    assert optimizer.data.shape == (total,) and optimizer.grad.shape == (total,)
    numpy.testing.assert_array_equal(to_host(optimizer.data), original)
    numpy.testing.assert_array_equal(to_host(optimizer.grad), numpy.full(total, 0.25))
    assert [p.shape for p in parameters] == SHAPES
    # writing the flat arrays shows in every parameter, in order
    optimizer.data[...] = backend.asarray(numpy.arange(total, dtype=numpy.float64))
    optimizer.grad[...] = backend.asarray(-numpy.arange(total, dtype=numpy.float64))
    numpy.testing.assert_array_equal(flat_host([p.data for p in parameters]), numpy.arange(total))
    numpy.testing.assert_array_equal(flat_host([p.grad for p in parameters]), -numpy.arange(total))
    # and writing a parameter shows in the flat arrays
    parameters[1].data[...] = 7.0
    parameters[2].grad[...] = 9.0
    numpy.testing.assert_array_equal(to_host(optimizer.data)[12:17], numpy.full(5, 7.0))
    numpy.testing.assert_array_equal(to_host(optimizer.grad)[17:], numpy.full(12, 9.0))


def test_layer_gradients_land_in_the_flat_buffer_and_zero_grad_clears_them(backend):
    layer = Linear(4, 3, dtype="float64", rng=numpy.random.default_rng(0))
    for parameter in layer.parameters():
        parameter.data = backend.asarray(parameter.data)
    optimizer = AdamW(layer.parameters(), lr=1e-3)
    rng = numpy.random.default_rng(1)
    layer.forward(backend.asarray(rng.standard_normal((5, 4))))
    layer.backward(backend.asarray(rng.standard_normal((5, 3))))
    flat = to_host(optimizer.grad)
    assert numpy.count_nonzero(flat) == flat.size
    numpy.testing.assert_array_equal(flat, flat_host([layer.weight.grad, layer.bias.grad]))
    optimizer.zero_grad()
    assert not numpy.any(to_host(optimizer.grad))
    for parameter in layer.parameters():
        assert not numpy.any(to_host(parameter.grad))
    # the layer's own zero_grad clears the same memory
    layer.forward(backend.asarray(rng.standard_normal((5, 4))))
    layer.backward(backend.asarray(rng.standard_normal((5, 3))))
    assert numpy.any(to_host(optimizer.grad))
    layer.zero_grad()
    assert not numpy.any(to_host(optimizer.grad))


def test_replaced_parameter_data_is_picked_up_by_the_next_step(backend):
    parameters = make_parameters(backend)
    optimizer = AdamW(parameters, lr=0.1, weight_decay=0.01)
    replacement = numpy.random.default_rng(5).standard_normal(SHAPES[1])
    parameters[1].data = backend.asarray(replacement)   # same shape: a new array, no longer a view
    values = [to_host(p.data).copy() for p in parameters]
    reference = ReferenceAdamW(values, 0.1, (0.9, 0.999), 1e-8, [0.01] * 3)
    grads = [numpy.full(shape, 0.5) for shape in SHAPES]
    set_gradients(parameters, grads, backend)
    optimizer.step()
    reference.step(grads)
    for parameter, expected in zip(parameters, reference.values):
        numpy.testing.assert_allclose(to_host(parameter.data), expected, rtol=1e-12)
    # the replaced parameter is a view into the flat buffer again
    optimizer.data[12:17] = 3.0
    numpy.testing.assert_array_equal(to_host(parameters[1].data), numpy.full(5, 3.0))
    grads = [numpy.full(shape, -0.25) for shape in SHAPES]
    optimizer.zero_grad()
    set_gradients(parameters, grads, backend)
    numpy.testing.assert_array_equal(to_host(optimizer.grad)[12:17], numpy.full(5, -0.25))


def test_replaced_parameter_data_of_another_shape_raises(backend):
    parameters = make_parameters(backend)
    optimizer = AdamW(parameters, lr=0.1)
    parameters[0].data = backend.xp.ones((4,))            # was (3, 4): broadcastable, but not the same parameter
    with pytest.raises(ValueError):
        optimizer.step()


def test_clip_grad_norm_scales_down_large_gradients(backend):
    parameters = make_parameters(backend)
    optimizer = AdamW(parameters, lr=1e-3)
    grads = [numpy.random.default_rng(i).standard_normal(shape) * 10 for i, shape in enumerate(SHAPES)]
    set_gradients(parameters, grads, backend)
    norm_before = math.sqrt(sum(float(numpy.sum(g * g)) for g in grads))
    assert float(to_host(optimizer.grad_norm())) == pytest.approx(norm_before, rel=1e-12)
    returned = optimizer.clip_grad_norm(1.5)
    assert float(to_host(returned)) == pytest.approx(norm_before, rel=1e-12)
    clipped = flat_host([p.grad for p in parameters])
    assert numpy.linalg.norm(clipped) == pytest.approx(1.5, rel=1e-6)
    numpy.testing.assert_allclose(clipped, numpy.concatenate([g.ravel() for g in grads]) * (1.5 / norm_before),
                                  rtol=1e-6)


def test_clip_grad_norm_leaves_small_gradients_unchanged(backend):
    parameters = make_parameters(backend)
    optimizer = AdamW(parameters, lr=1e-3)
    grads = [numpy.full(shape, 0.05) for shape in SHAPES]   # norm 0.05 * sqrt(29), about 0.27
    set_gradients(parameters, grads, backend)
    returned = optimizer.clip_grad_norm(1.0)
    assert float(to_host(returned)) == pytest.approx(0.05 * math.sqrt(29), rel=1e-12)
    numpy.testing.assert_array_equal(flat_host([p.grad for p in parameters]), numpy.full(29, 0.05))


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, word", [
    (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(betas=(1.0, 0.999)), "betas"), (dict(betas=(-0.1, 0.999)), "betas"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(0.9, 1.5)), "betas"),
    (dict(eps=0.0), "eps"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.01), "weight_decay"),
])
def test_bad_arguments_raise(backend, kwargs, word):
    arguments = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=word):
        AdamW(make_parameters(backend), **arguments)


def test_the_accepted_boundaries_of_the_arguments(backend):
    """lr 0 (where a schedule ends), betas (0, 0) and weight_decay 0 are accepted, and a step with lr 0
    leaves the weights exactly as they were; a schedule may hold a rate of 0."""
    parameters = make_parameters(backend)
    before = flat_host([p.data for p in parameters])
    optimizer = AdamW(parameters, lr=0.0, betas=(0.0, 0.0), eps=1e-300, weight_decay=0.0)
    set_gradients(parameters, [numpy.ones(shape) for shape in SHAPES], backend)
    optimizer.step()
    numpy.testing.assert_array_equal(flat_host([p.data for p in parameters]), before)
    optimizer.set_schedule([0.1, 0.0])
    optimizer.step()
    optimizer.step()
    assert optimizer.lr == 0.0


@pytest.mark.parametrize("params", [[], [{"params": []}], [{"params": []}, {"params": []}]])
def test_empty_params_raise(params):
    with pytest.raises(ValueError):
        AdamW(params, lr=1e-3)


def test_duplicate_parameter_raises(backend):
    parameters = make_parameters(backend)
    with pytest.raises(ValueError, match="twice"):
        AdamW(parameters + [parameters[0]], lr=1e-3)
    with pytest.raises(ValueError, match="twice"):
        AdamW([{"params": parameters[:2]}, {"params": parameters[1:]}], lr=1e-3)


def test_mixed_dtypes_raise(backend):
    parameters = make_parameters(backend)[:2] + make_parameters(backend, dtype="float32")[2:]
    with pytest.raises(ValueError, match="dtype"):
        AdamW(parameters, lr=1e-3)


def test_negative_group_weight_decay_raises(backend):
    parameters = make_parameters(backend)
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW([{"params": parameters[:2], "weight_decay": -0.1}, {"params": parameters[2:]}], lr=1e-3)


@pytest.mark.parametrize("key", ["lr", "weight_dacay"])
def test_unsupported_group_option_raises(backend, key):
    parameters = make_parameters(backend)
    with pytest.raises((ValueError, TypeError), match=key):
        AdamW([{"params": parameters[:2], key: 0.5}, {"params": parameters[2:]}], lr=1e-3)


# ---------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# ---------------------------------------------------------------------------------------------

def test_state_dict_round_trip_continues_identically(backend):
    rng = numpy.random.default_rng(8)
    grads = [[rng.standard_normal(shape) for shape in SHAPES] for _ in range(6)]
    first_parameters = make_parameters(backend)
    first = AdamW(first_parameters, lr=1e-2, weight_decay=0.05)
    for step in range(3):
        set_gradients(first_parameters, grads[step], backend)
        first.step()
    state = first.state_dict()
    assert state["step_count"] == 3
    assert all(type(state[key]) is numpy.ndarray for key in ("exp_avg", "exp_avg_sq"))
    # a second optimiser over copies of the current weights, restored from the first one's state
    second_parameters = [Parameter(backend.asarray(to_host(p.data).copy())) for p in first_parameters]
    second = AdamW(second_parameters, lr=0.5, weight_decay=0.05)   # lr comes from the state
    second.load_state_dict(state)
    assert second.lr == first.lr and second.step_count == 3
    for step in range(3, 6):
        set_gradients(first_parameters, grads[step], backend)
        set_gradients(second_parameters, grads[step], backend)
        first.step()
        second.step()
        for a, b in zip(first_parameters, second_parameters):
            numpy.testing.assert_array_equal(to_host(a.data), to_host(b.data))
    # and the saved state was a copy, untouched by the later steps
    assert state["step_count"] == 3
    assert not numpy.array_equal(state["exp_avg"], to_host(first.exp_avg))


@pytest.mark.parametrize("grouping", ["uniform decay", "two groups"])
def test_schedule_gives_step_t_the_learning_rate_at_t_minus_1(backend, grouping):
    """set_schedule: step t uses learning_rates[t - 1], the last entry past the end, and `lr` follows;
    the same as setting lr by hand before each step."""
    schedule = [0.02, 0.05, 0.01, 0.003]
    rng = numpy.random.default_rng(9)
    grads = [[rng.standard_normal(shape) for shape in SHAPES] for _ in range(6)]
    make_groups, kwargs, _ = GROUPINGS[grouping]
    by_hand_parameters, scheduled_parameters = make_parameters(backend), make_parameters(backend)
    by_hand = AdamW(make_groups(by_hand_parameters), lr=1.0, **kwargs)
    scheduled = AdamW(make_groups(scheduled_parameters), lr=1.0, **kwargs)
    scheduled.set_schedule(schedule)
    for step in range(6):
        by_hand.lr = schedule[min(step, len(schedule) - 1)]
        set_gradients(by_hand_parameters, grads[step], backend)
        set_gradients(scheduled_parameters, grads[step], backend)
        by_hand.step()
        scheduled.step()
        assert scheduled.lr == by_hand.lr and scheduled.step_count == step + 1
        numpy.testing.assert_allclose(to_host(scheduled.data), to_host(by_hand.data), rtol=1e-13, atol=1e-15)


def test_schedule_continues_from_a_loaded_state(backend):
    schedule = [0.01 * (step + 1) for step in range(8)]
    rng = numpy.random.default_rng(10)
    grads = [[rng.standard_normal(shape) for shape in SHAPES] for _ in range(6)]
    first_parameters = make_parameters(backend)
    first = AdamW(first_parameters, lr=1.0, weight_decay=0.05)
    first.set_schedule(schedule)
    for step in range(3):
        set_gradients(first_parameters, grads[step], backend)
        first.step()
    second_parameters = [Parameter(backend.asarray(to_host(p.data).copy())) for p in first_parameters]
    second = AdamW(second_parameters, lr=1.0, weight_decay=0.05)
    second.set_schedule(schedule)                 # before the state: loading it moves the step counter on
    second.load_state_dict(first.state_dict())
    for step in range(3, 6):
        set_gradients(first_parameters, grads[step], backend)
        set_gradients(second_parameters, grads[step], backend)
        first.step()
        second.step()
        assert second.lr == schedule[step]
        numpy.testing.assert_array_equal(to_host(second.data), to_host(first.data))


@pytest.mark.parametrize("schedule", [[], [0.1, -0.01]])
def test_bad_schedule_raises(backend, schedule):
    optimizer = AdamW(make_parameters(backend), lr=1e-3)
    with pytest.raises(ValueError, match="learning rates"):
        optimizer.set_schedule(schedule)


def test_load_state_dict_of_another_model_raises(backend):
    optimizer = AdamW(make_parameters(backend), lr=1e-3)
    other = AdamW(make_parameters(backend, shapes=[(2, 2)]), lr=1e-3)
    with pytest.raises(ValueError, match="exp_avg"):
        optimizer.load_state_dict(other.state_dict())


# ---------------------------------------------------------------------------------------------
# warmup_cosine
# ---------------------------------------------------------------------------------------------

@given(warmup=st.integers(0, 20), decay=st.integers(1, 100), peak=st.floats(1e-5, 1.0),
       final_fraction=st.floats(0.0, 1.0))
def test_warmup_cosine_shape(warmup, decay, peak, final_fraction):
    final = peak * final_fraction
    total = warmup + decay
    schedule = [warmup_cosine(step, total_steps=total, warmup_steps=warmup, peak_lr=peak, final_lr=final)
                for step in range(total + 5)]
    # linear warmup: peak * (step + 1) / warmup, strictly increasing, peak at the last warmup step
    for step in range(warmup):
        assert schedule[step] == pytest.approx(peak * (step + 1) / warmup, rel=1e-12)
    assert all(a < b for a, b in zip(schedule[:warmup], schedule[1:warmup]))
    if warmup:
        assert schedule[warmup - 1] == pytest.approx(peak, rel=1e-12)
    # cosine decay: starts at peak, monotone non-increasing, reaches final_lr at total_steps and stays
    assert schedule[warmup] == pytest.approx(peak, rel=1e-12)
    after = schedule[warmup:]
    assert all(b <= a + 1e-15 * peak for a, b in zip(after, after[1:]))
    assert all(final - 1e-15 <= value <= peak + 1e-15 for value in after)
    for step in range(total, total + 5):
        assert schedule[step] == pytest.approx(final, rel=1e-12, abs=1e-15)


def test_warmup_cosine_midpoint():
    value = warmup_cosine(15, total_steps=20, warmup_steps=10, peak_lr=1.0, final_lr=0.2)
    assert value == pytest.approx(0.2 + 0.5 * 0.8, rel=1e-12)   # half way through the decay: the average
