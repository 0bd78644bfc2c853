"""How long the oracle would take on a case, estimated before it starts, and the limit it keeps.

The oracle's time is its loss evaluations: two per parameter element and step (and from the second
step on two probes that cost as much again each), each a forward pass from the layer the element
belongs to up to the loss, in MPFR object arrays. The estimate counts MPFR operations (a multiply
and an add of a product count one) per layer, as the forward pass of :mod:`.layers` performs
them, plus a fixed overhead per layer and evaluation for the Python calls and array copies::

    step   = (1 + 3 (steps - 1)) sum_i 2 P_i (column_i + upper_i + overhead)
    trace  = sum_i sum_(its Z and A) 2 size (upper_i / batch, or upper_i where a batch_norm above couples the samples)

P_i the parameter elements of layer i, column_i what moving one of them recomputes of layer i
(one output column), upper_i the forward pass above it and the loss. Seconds = operations *
``SECONDS_PER_OPERATION``, measured on one core (an object-array product of 128-bit numbers
takes about 1e-7 s per multiply-add). Against the oracle's measured time on dense, conv and
batch_norm cases the estimate was 1.5 to 4 times the time on an idle core (the most for the
smallest cases, all overhead), 0.65 to 1 times it on a core shared with other work. A case
whose step is estimated above ``LIMIT_SECONDS`` is refused with the reason (the harness reports an engine error and goes on): at about 30 s the oracle, which
runs on every disagreement, would hold up the run more than it helps; its trace (only read by a
diagnosis) has the same limit of its own.
"""

from __future__ import annotations

import math

from ..casefile.case import Case, Layer

SECONDS_PER_OPERATION = 2.0e-7
OVERHEAD = 400  # operations' worth of Python calls and array copies per layer and evaluation
LIMIT_SECONDS = 30.0
_TRANSCENDENTAL = 15  # tanh, sigmoid, softmax's exp, a loss's log: about 15 products' time each


class TooLarge(ValueError):
    """The case would take the oracle longer than its limit."""


def _activation(layer: Layer, count: int) -> float:
    return {"linear": 0, "relu": 2, "leaky_relu": 2}.get(layer.activation, _TRANSCENDENTAL) * count


def _forward(layer: Layer, batch: int) -> float:
    """Operations of one layer's forward pass over the whole batch."""
    out = batch * math.prod(layer.out_shape)
    if layer.kind == "dense":
        return out * layer.in_shape[-1] + _activation(layer, out)
    if layer.kind == "conv2d":
        return out * (layer.window[0] * layer.window[1] * layer.in_shape[-1] + 1) + _activation(layer, out)
    if layer.kind in ("max_pool2d", "avg_pool2d"):
        return 2 * out * layer.window[0] * layer.window[1]
    if layer.kind == "flatten":
        return 0.1 * out
    return 10 * out  # a norm: the mean, the centred squares, their sum, xhat and gamma xhat + beta


def _column(layer: Layer, batch: int) -> float:
    """Operations of recomputing one output column of a layer (one unit, filter or feature)."""
    return _forward(layer, batch) / max(layer.out_shape[-1], 1) + 0.1 * batch * math.prod(layer.out_shape)


def _uppers(case: Case) -> list[float]:
    """Per layer, the operations of the forward pass above it and of the loss."""
    batch = case.inputs.shape[0]
    forward = [_forward(layer, batch) + OVERHEAD for layer in case.layers]
    loss = _TRANSCENDENTAL * batch * math.prod(case.layers[-1].out_shape) + OVERHEAD
    return [sum(forward[i + 1 :]) + loss for i in range(len(case.layers))]


def step_seconds(case: Case) -> float:
    """The estimated time of the oracle's steps (without its trace)."""
    batch, total = case.inputs.shape[0], 0.0
    for layer, upper in zip(case.layers, _uppers(case), strict=True):
        elements = sum(value.size for name, value in layer.arrays().items() if name in layer.declared.params)
        total += 2 * elements * (_column(layer, batch) + upper + OVERHEAD)
    return (1 + 3 * (case.steps - 1)) * total * SECONDS_PER_OPERATION


def trace_seconds(case: Case) -> float:
    """The estimated time of the first step's trace: dZ and dA by differences."""
    batch, total = case.inputs.shape[0], 0.0
    for i, (layer, upper) in enumerate(zip(case.layers, _uppers(case), strict=True)):
        coupled = any(above.kind == "batch_norm" for above in case.layers[i + 1 :])
        fields = 2 if layer.kind in ("dense", "conv2d") else 1
        total += fields * 2 * batch * math.prod(layer.out_shape) * (upper if coupled else upper / batch + OVERHEAD)
    return total * SECONDS_PER_OPERATION


def check(seconds: float, what: str) -> None:
    """Raise :class:`TooLarge` when ``seconds`` passes the limit."""
    if seconds > LIMIT_SECONDS:
        raise TooLarge(
            f"the case is too large for the oracle: its {what} would take about {seconds:.0f} s "
            f"(two 128-bit loss evaluations per element, estimated), over its limit of {LIMIT_SECONDS:.0f} s; "
            "fewer samples, units, filters or steps bring it within reach"
        )
