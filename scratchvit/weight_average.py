"""An exponential moving average of the weights (Polyak averaging), evaluated in place of the weights.

After every optimiser step t (counting from 1), for the flat vector theta of all weights:

    average = average + (1 - d_t) (theta - average),      d_t = min(decay, (1 + t) / (10 + t))

so the average follows the weights of roughly the last 1 / (1 - decay) steps and smooths the noise
of the last steps of SGD, which is why it often evaluates better than the weights themselves. The
warm-up of d_t (TensorFlow's ExponentialMovingAverage with num_updates) lets the average forget the
random initial weights quickly: d_1 = 0.18, d_100 = 0.93. It starts equal to the weights, so a model
whose weights never change averages to exactly itself.

It works on AdamW's flat weight buffer (optim.py), so an update is three array operations over all
weights at once (on the GPU one kernel, kernels/weight_average.py), and `in_place_of_weights()` swaps
the average into that buffer: every view of it (the model's parameters, TrainStep's replicas) then
computes with the average, for evaluation and for saving it, and the trained weights come back afterwards.
"""
import contextlib

from .backend import get_array_module
from .twins import dispatched


class WeightAverage:
    def __init__(self, weights, decay):
        """`weights`: the flat weight buffer that the optimiser updates in place (AdamW.data)."""
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.weights, self.decay = weights, float(decay)
        self.average = weights.copy()
        self.updates = 0

    def current_decay(self):
        """d_t of the next update (t = updates + 1)."""
        t = self.updates + 1
        return min(self.decay, (1 + t) / (10 + t))

    def update(self):
        """Move the average towards the weights; call after every optimiser step."""
        self.move_towards_weights(1.0 - self.current_decay())
        self.updates += 1

    @dispatched(lambda average, rate: average.weights)
    def move_towards_weights(self, rate):
        """average += rate * (theta - average), rate = 1 - d_t."""
        step = get_array_module(self.weights).subtract(self.weights, self.average)
        step *= rate
        self.average += step

    @contextlib.contextmanager
    def in_place_of_weights(self):
        """Within the block the weight buffer holds the average; on leaving, the trained weights again."""
        trained = self.weights.copy()
        self.weights[...] = self.average
        try:
            yield
        finally:
            self.weights[...] = trained

    def model_state(self, model):
        """{name: host array} of the average, as model.state_dict() names the weights (for checkpoints)."""
        with self.in_place_of_weights():
            return model.state_dict()

    def load_model_state(self, model, state, updates):
        """Set the average from `state` ({name: array}, as model_state gives it) and its update count."""
        with self.in_place_of_weights():
            model.load_state_dict(state)             # copies into the parameters: views of the weight buffer
            self.average[...] = self.weights
        self.updates = int(updates)
