"""How far rounding can move each gradient of one step: a running error estimate, layer kind by
layer kind, through an engine's trace (used by :mod:`manualprop.verdict.conditioning`).

First order, as numerical analysis writes it: forward, the error of each layer's output from its
own rounding and from the error of what came in (the inputs are exact; a parameter carries the
spread of the steps before it); backward, the error of the loss gradient (taken at the output
moved by its error), of each activation's derivative (taken at Z and A moved by theirs, so that
``1 - a^2`` at a = 1 shows its rounding) and of every product. An error has two parts
(:class:`Flow`): one of each element's own roundings, independent of the other elements' (summed,
they add as a root sum of squares, or a deep network's would grow by sqrt(n) a layer and excuse
everything), and one that every sample may share (a parameter's held error, a batch_norm
statistic's; summed over the batch, they add up in magnitude). A sum of n terms rounds by
``u sqrt(n) (|sum| + sqrt(sum of squares))`` (:meth:`_Walk.rounding`), more where NumPy adds
alike terms one by one (:meth:`_Walk.sum_rounding`).

The modules: :mod:`.walk` (Flow, the walk the rules share, the loss, how errors add up),
:mod:`.products` (dense and conv2d), :mod:`.pooling` (the pools and flatten, and the windows of an
image), :mod:`.norms` (batch_norm and layer_norm, the moving statistics), :mod:`.exact` (what is
exact, the reference's trace in a wider type, the unit roundoff); here, the table of rules and
:func:`gradient_errors`, which walks it.

Each layer kind has its rule in :data:`RULES`, as :data:`manualprop.reference.layers.KINDS` has
its maths: dense and conv2d (the dense rule on the im2col windows) sum products; max_pool2d
selects, passing its input's error through, and may send the gradient to another element of a
window that is as large within the errors; avg_pool2d sums and divides; flatten is exact;
batch_norm and layer_norm divide the errors of x and of the mean by ``sqrt(var + eps)``, large
when a feature barely varies (the ill-conditioned case), and their backward cancels. The losses
on the logits round their probability before the targets are taken away. What the reference
computes exactly from exact values (the same in the wider type, and for a sum in whatever order
it is added) carries no error.

Measured against the NumPy engine in float32 and the same case in float64 (tests/
test_layer_conditioning.py): the actual error is at most 0.66 of the estimate, typically 0.005 to
0.05, for every kind and loss. The margin compounds with depth: in a LeNet-like network with
batch_norm and layer_norm, the first conv layer's estimate is about 1e5 times its actual float32
error (a batch_norm statistic's error, shared by every sample, is added in magnitude over the
batch and the positions of every convolution before it).
"""

from __future__ import annotations

import numpy as np

from ...casefile.case import Case
from ...engines import LayerTrace
from .exact import _f64, _gradients, reference_trace, unit, wider
from .norms import _norm_backward, _norm_forward
from .pooling import (
    _avg_pool_backward,
    _avg_pool_forward,
    _flatten_backward,
    _flatten_forward,
    _max_pool_backward,
    _max_pool_forward,
)
from .products import _conv_backward, _conv_forward, _dense_backward, _dense_forward
from .walk import OPERATION, Flow, Rule, StepErrors, _Walk

__all__ = ["OPERATION", "RULES", "Flow", "Rule", "StepErrors", "gradient_errors", "reference_trace", "unit", "wider"]


RULES: dict[str, Rule] = {
    "dense": Rule(_dense_forward, _dense_backward),
    "conv2d": Rule(_conv_forward, _conv_backward),
    "max_pool2d": Rule(_max_pool_forward, _max_pool_backward),
    "avg_pool2d": Rule(_avg_pool_forward, _avg_pool_backward),
    "flatten": Rule(_flatten_forward, _flatten_backward),
    "batch_norm": Rule(_norm_forward, _norm_backward),
    "layer_norm": Rule(_norm_forward, _norm_backward),
}


def gradient_errors(
    case: Case, trace: list[LayerTrace], params: dict[str, np.ndarray], held: dict[str, np.ndarray] | None = None
) -> StepErrors:
    """A running error estimate through the step's forward and backward pass, each layer by the
    rule of its kind. ``trace`` has every field the rules read (:func:`manualprop.verdict.conditioning.allowance` fills them); ``held`` is how far the
    parameters an engine holds may already differ from the reference's (None: not at all, the
    first step). What the reference computes exactly from exact values (the same in the wider
    type, and for a sum in whatever order it is added) carries no error: a case built on dyadic
    numbers, a ReLU's Z exactly at 0, MAE's sign(y - t) / N, stay on their value."""
    walk = _Walk(case, trace, reference_trace(case, params, wider(case)), params, held or {})
    inputs = np.asarray(case.inputs, dtype=np.float64)
    flows = [Flow(inputs, np.zeros(inputs.shape), np.zeros(inputs.shape))]
    for i, layer in enumerate(case.layers):
        error, shared = RULES[layer.kind].forward(walk, i, flows[i])
        flows.append(Flow(_f64(trace[i].A), error, shared))
    d = walk.loss(flows[-1])
    for i in reversed(range(len(case.layers))):
        error, shared = RULES[case.layers[i].kind].backward(walk, i, flows[i], d)
        if i > 0:
            d = Flow(_f64(trace[i - 1].dA), error, shared)
    wide_grads = _gradients(walk.wide) if walk.wide is not None else {}
    return StepErrors(walk.grads, walk.errors, walk.loss_error, wide_grads, walk.moved)
