"""WeightAverage's GPU twin: the update of weight_average.py in one elementwise launch, no temporary.

Step (weight_average.py's docstring):  average = average + (1 - d_t) (theta - average),
computed as the plain version does: step = theta - average;  step *= rate;  average += step.
"""
from .compile import define_kernels, elementwise_kernel, float_dtype
from ..twins import register_gpu_twin
from ..weight_average import WeightAverage

define_kernels(elementwise={
    # weight_average.py WeightAverage.update: step = theta - average;  step *= rate;  average += step
    "scratchvit_weight_average_update": (
        "T weights, T rate",
        "T average",
        "average = average + (weights - average) * rate;\n",
    ),
})


def weight_average_update(weights, average, rate):
    """average += (weights - average) * rate in place, in one launch and without a temporary:
    `WeightAverage.update`'s three array operations (subtract into a new array, scale, add)."""
    float_dtype(weights, average)
    if weights.shape != average.shape:
        raise ValueError(f"weights {weights.shape} and average {average.shape} must have the same shape")
    elementwise_kernel("scratchvit_weight_average_update")(weights, float(rate), average)


@register_gpu_twin(WeightAverage.move_towards_weights)
def move_towards_weights_on_gpu(average, rate):
    weight_average_update(average.weights, average.average, rate)
