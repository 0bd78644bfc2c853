"""Hints: patterns in how a blamed engine differs, each with the slip it usually means.

Every hint is tied to where the divergence starts (a :class:`~manualprop.verdict.diagnose.Step`): a
loss-reduction factor only when the loss or its gradient is the first quantity to differ, an
update factor only when every intermediate agrees, a slope at the activation, a framework's own
optimizer formula (:mod:`manualprop.reference.variants`) at the delta when the case replayed with it gives
the blamed engine's deltas (that hint then stands alone: a factor between the deltas is the
formula's). The layers' classic slips are found the same way, where they start: a conv, flatten or
norm layer's forward quantity (Z, A, mean, var, x^) recomputed from the input the engines agree on
with each variant of :func:`manualprop.reference.variants.layer_variants` (a kernel in the other layout,
the padding on the other side, flatten in (c, h, w) order, a norm's epsilon at the other framework's
default, ...), and batch_norm's moving statistics updated from the agreed batch statistics in
PyTorch's conventions (:data:`~manualprop.reference.variants.MOVING_VARIANTS`: the momentum the other
way round, the unbiased running variance); a variant that gives the blamed engine's value, and
not the others', is named, alone. A constant factor
is named only when it differs from 1 by far more than the tolerance (100 times rtol), with the
parameters or the quantity it holds on; it is estimated from the elements whose value is large
against the dtype's rounding, so that float32 rounding of small deltas does not hide it.
Numbers that differ are printed with the digits that tell them apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..casefile.case import Case, as_kernel, as_weight
from ..concepts import LOSSES
from ..engines import filled
from ..reference import variants
from .compare import DEFAULT_TOLERANCE, compare
from .diagnose import Step, value

if TYPE_CHECKING:
    from .results import EngineRun


def distinct(x: float, y: float) -> tuple[str, str]:
    """``x`` and ``y`` printed so that they differ: 4 significant digits where that tells them apart,
    else every digit (``0.10000000149011612``, not ``0.1``)."""
    a, b = f"{x:.4g}", f"{y:.4g}"
    return (a, b) if a != b else (repr(float(x)), repr(float(y)))


def constant_ratio(a: np.ndarray, b: np.ndarray, noise: np.ndarray | float) -> float | None:
    """a / b when it is one number wherever b stands well above ``noise`` (its rounding), else None."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    a, b, noise = a.ravel(), b.ravel(), np.broadcast_to(np.asarray(noise, dtype=np.float64), b.shape).ravel()
    clear = np.abs(b) > 1e4 * noise
    if not np.any(clear):
        return None
    ratios = a[clear] / b[clear]
    middle = float(np.median(ratios))
    return middle if np.all(np.abs(ratios - middle) <= 1e-3 * abs(middle)) else None


def _noise(case: Case, step: Step, reference: np.ndarray) -> np.ndarray | float:
    """The rounding a value of ``step`` carries in the case's dtype: eps (1 + |p|) for a delta."""
    eps = float(np.finfo(case.dtype).eps)
    if step.label == "delta":
        return eps * (1.0 + np.abs(case.parameters()[step.field].astype(np.float64)))
    return eps * float(np.max(np.abs(reference), initial=0.0))


def _factors(case: Case, step: Step) -> list[tuple[float, str]]:
    """The factors a slip at ``step`` usually produces, each with the slip."""
    batch, outputs = case.inputs.shape[0], case.targets.shape[1] if case.targets.ndim == 2 else 1
    if step.label == "delta":
        return [
            (-1.0, "a sign flip: the update adds lr * g instead of subtracting it"),
            (case.lr, f"the learning rate applied twice (lr = {case.lr:g}): p - lr * (lr * g)"),
            (1.0 / case.lr, f"the learning rate left out (lr = {case.lr:g}): p - g"),
            (2.0, "a factor 2 in the update"),
            (0.5, "a factor 1/2 in the update"),
        ]
    if step.label not in ("loss", "loss gradient"):
        return [(-1.0, "a sign flip")]
    named = [
        (2.0, "a factor 2: the derivative of (y - t)^2 is 2 (y - t), or a 1/2 in the loss"),
        (0.5, "a factor 1/2: the derivative of (y - t)^2 is 2 (y - t), or a 1/2 in the loss"),
        (-1.0, "a sign flip"),
    ]
    if case.scale != 1:
        named += [
            (case.scale, f"the scale {case.scale:g} applied twice"),
            (1.0 / case.scale, f"the scale {case.scale:g} left out"),
        ]
    if batch > 1:
        named += [
            (float(batch), f"a factor of the batch size N = {batch}: a sum where the mean belongs, or a dropped 1/N"),
            (1.0 / batch, f"a factor 1/N (N = {batch}, the batch size): a mean where the sum belongs"),
        ]
    if outputs > 1:
        named += [
            (
                float(outputs),
                f"a factor of the number of outputs ({outputs}): a mean over each sample's outputs where the mean over every element belongs",
            ),
            (
                1.0 / outputs,
                f"a factor 1/{outputs} (the number of outputs): a mean over every element where a per-sample sum belongs",
            ),
        ]
    if batch > 1 and outputs > 1:
        named.append(
            (float(batch * outputs), f"a factor N x outputs = {batch * outputs}: a sum where the mean over every element belongs")
        )
    return named


def factor_hint(case: Case, step: Step, engine: str, c: float, holds_on: str) -> list[str]:
    """A hint for a constant factor ``c``, when it is far from 1 against the tolerance."""
    if abs(c - 1.0) <= 100 * case.rtol:
        return []
    if c == 0:
        flow = ": a gradient that does not flow (a saturated unit, a clipped probability, a detached tensor)"
        return [
            f"{engine}'s {holds_on} are zero where the others' are not" + (flow if step.label not in ("Z", "A", "loss") else "")
        ]
    digits = max(4, int(np.ceil(-np.log10(abs(c - 1.0)))) + 2) if abs(c - 1.0) < 1 else 4
    shown = f"{c:.{digits}g}"
    for factor, text in _factors(case, step):
        if abs(c - factor) <= 1e-3 * abs(factor):
            return [f"{engine}'s {holds_on} are {shown} times the others': {text}"]
    return [
        f"{engine}'s {holds_on} are {shown} times the others': a constant factor"
        + (" (a learning rate or a loss scale?)" if step.label in ("delta", "loss", "loss gradient") else "")
    ]


def _ratio_hints(case: Case, step: Step, culprit: EngineRun, reference: EngineRun) -> list[str]:
    if step.label != "delta":
        mine, theirs = value(culprit, step), value(reference, step)
        if mine is None or theirs is None:
            return []
        c = constant_ratio(mine, theirs, _noise(case, step, theirs))
        holds_on = "loss" if step.label == "loss" else f"{step.label} values at layer {step.layer}"
        return [] if c is None else factor_hint(case, step, culprit.engine, c, holds_on if step.label != "loss" else "losses")
    own, others = culprit.output.deltas, reference.output.deltas
    failing = [
        n
        for n, p in case.parameters().items()
        if n in own and n in others and not compare(n, "a", own[n], "b", others[n], case.rtol, case.atol, reference=p).ok
    ]
    found = [constant_ratio(own[n], others[n], _noise(case, Step("delta", None, n), others[n])) for n in failing]
    ratios = [r for r in found if r is not None]
    if not failing or len(ratios) < len(found):
        return []
    first = ratios[0]
    if not all(abs(r - first) <= 1e-3 * abs(first) for r in ratios):
        return []
    return factor_hint(case, step, culprit.engine, first, "deltas of " + ", ".join(case.shown_as(n) for n in failing))


def _layout_hints(case: Case, step: Step, culprit: EngineRun, reference: EngineRun) -> list[str]:
    """A kernel used transposed (Z = A_prev @ W.T + b), or a delta reported transposed."""
    if step.label == "Z" and step.layer is not None and case.layers[step.layer].kind == "dense":
        layer, kernel = case.layers[step.layer], filled(case.layers[step.layer].kernel)
        a_prev = case.inputs if step.layer == 0 else value(reference, Step("A", step.layer - 1, "A"))
        mine = value(culprit, step)
        if a_prev is None or mine is None or kernel.shape[0] != kernel.shape[1]:
            return []
        transposed = a_prev.astype(np.float64) @ kernel.T.astype(np.float64) + (0 if layer.bias is None else layer.bias)
        if compare("Z", "a", mine, "b", transposed, case.rtol, case.atol).ok:
            return [
                f"layer {step.layer}: {culprit.engine} computes Z with the kernel transposed: the weights loaded in the "
                "(out, in) layout where (in, out) belongs, or the reverse"
            ]
        return []
    if step.label != "delta":
        return []
    a, b = np.asarray(culprit.output.deltas.get(step.field)), np.asarray(reference.output.deltas.get(step.field))
    close = lambda x, y: x.shape == y.shape and np.allclose(x, y, rtol=case.rtol * 10, atol=case.atol * 10)  # noqa: E731
    if a.ndim == 2 and close(a.T, b):
        return [
            f"{case.shown_as(step.field)}: {culprit.engine}'s delta matches after transposing: a layout slip, "
            "(out, in) where (in, out) belongs, or the reverse"
        ]
    if a.ndim == 4 and b.ndim == 4 and (close(as_kernel(a), b) or close(a, as_weight(b).reshape(b.shape))):
        how = "transposing it" if close(as_kernel(a), b) else "reading it as an (out, in, kh, kw) array reshaped"
        return [
            f"{case.shown_as(step.field)}: {culprit.engine}'s delta matches after {how}: a layout slip, the conv "
            "kernel's (out, in, kh, kw) where (kh, kw, in, out) belongs"
        ]
    return []


def _leaky_hint(case: Case, step: Step, culprit: EngineRun, reference: EngineRun) -> list[str]:
    if step.label != "A" or step.layer is None or case.layers[step.layer].activation != "leaky_relu":
        return []
    z = value(reference, Step("Z", step.layer, "Z"))
    a_mine, a_ref = value(culprit, step), value(reference, step)
    if z is None or a_mine is None or a_ref is None or not np.any(z < 0):
        return []
    c = constant_ratio(a_mine[z < 0], a_ref[z < 0], _noise(case, step, a_ref))
    if c is None:
        return []
    alpha = case.layers[step.layer].alpha
    slope = alpha * c
    known = [float(np.float32(alpha)), 0.01, 0.2, 0.3]  # float32 rounding, the frameworks' defaults
    slope = next((k for k in known if abs(slope - k) <= 1e-12 * abs(k)), slope)
    shown, given = distinct(slope, alpha)
    return [
        f"layer {step.layer}: {culprit.engine}'s leaky_relu slope is {shown}, not the case's {given}"
        " (PyTorch's default is 0.01, Keras's 0.2, Keras 2's 0.3; TensorFlow rounds a float64 slope to float32)"
    ]


def _saturation_hint(case: Case, step: Step, culprit: EngineRun, reference: EngineRun) -> list[str]:
    """tanh or sigmoid outputs within float32 rounding of their limits: 1 - a^2 or a (1 - a) is then
    mostly rounding, and TensorFlow's float32 tanh reaches exactly 1 from |z| >= 8."""
    if (
        step.label != "dZ"
        or step.layer is None
        or case.layers[step.layer].activation not in ("tanh", "sigmoid")
        or case.dtype != np.float32
    ):
        return []
    a = value(reference, Step("A", step.layer, "A"))
    if a is None or not np.any(np.abs(a) > 1 - 1e-5):
        return []
    return [
        f"layer {step.layer}: some {case.layers[step.layer].activation} outputs are within 1e-5 of their limit, where the "
        "float32 derivative is mostly rounding; TensorFlow's float32 tanh is exactly 1 from |z| >= 8 "
        "(see cases/canaries/keras_float32_tanh_saturation.yaml)"
    ]


def _cross_entropy_hints(case: Case, step: Step, culprit: EngineRun, reference: EngineRun) -> list[str]:
    declared = LOSSES[case.loss]
    if not declared.on_logits or step.label not in ("loss gradient", "dW", "db", "delta"):
        return []
    found = []
    one_hot = declared.last_activation == "softmax" and not declared.class_indices
    if one_hot and not np.allclose(case.targets.sum(axis=1), 1.0):
        found.append(
            "the targets do not sum to 1 per sample: the gradient of -sum(t log softmax(z)) is p * sum(t) - t; "
            "TensorFlow's softmax cross-entropy uses p - t whatever the sum"
        )
    p = value(reference, Step("A", len(case.layers) - 1, "A"))
    last = value(culprit, Step("loss gradient", len(case.layers) - 1, "dZ"))
    clipped = None if p is None else (p <= 1e-7) | (p >= 1 - 1e-7)
    if clipped is not None and last is not None and np.any(clipped) and np.all(last[np.any(clipped, axis=1)] == 0):
        found.append(
            "zero gradient exactly where a probability is within 1e-7 of 0 or 1: cross-entropy clipped at 1e-7 "
            "(Keras clips probabilities when it cannot reach the logits)"
        )
    return found


def _optimizer_hints(case: Case, step: Step, culprit: EngineRun, reference: EngineRun) -> list[str]:
    """Deltas that follow a framework's optimizer where it computes otherwise than the SPEC
    (:mod:`manualprop.reference.variants`): the case replayed through the NumPy engine with that update gives
    the culprit's deltas on every parameter, and lies outside the tolerance of the reference's."""
    if step.label != "delta" or culprit.result is None or reference.result is None:
        return []
    params, mine, spec = case.parameters(), culprit.result.deltas, reference.result.deltas
    found = []
    for variant in variants.of(case):
        replayed = variant.replay(case).deltas
        if not all(
            n in mine and compare(n, "a", mine[n], "b", replayed[n], case.rtol, case.atol, reference=p).ok
            for n, p in params.items()
        ):
            continue
        apart = [
            compare(n, "variant", replayed[n], "spec", spec[n], case.rtol, case.atol, reference=p)
            for n, p in params.items()
            if n in spec
        ]
        worst = max(apart, key=lambda c: c.worst_ratio, default=None)
        if worst is None or worst.ok:
            continue  # the variant gives the SPEC's deltas here: it explains nothing
        size = (
            f"they differ from the SPEC's by up to {worst.max_rel_diff:.2g} relative ({case.shown_as(worst.param)}), "
            f"{worst.worst_ratio:.3g} times the case's tolerance"
        )
        if case.dtype != np.float32:
            rtol, atol = DEFAULT_TOLERANCE["float32"]
            if all(
                compare(n, "variant", replayed[n], "spec", spec[n], rtol, atol, reference=p).ok
                for n, p in params.items()
                if n in spec
            ):
                size += f", within float32's default tolerance (rtol {rtol:g})"
        detail = variant.detail(case.hyper)
        found.append(
            f"{culprit.engine}'s deltas follow {variant.who}: {variant.formula}"
            + (f" ({detail})" if detail else "")
            + f"; {size}; {variant.pinned}"
        )
    return found


def _before(case: Case, run: EngineRun, k: int | None) -> dict[str, np.ndarray]:
    """The parameters and moving statistics as ``run`` had them before step ``k`` (the first: the case's)."""
    params = {n: p.astype(np.float64) for n, p in case.parameters().items()}
    for record in run.output.history[: k or 0]:
        params = {n: p + record.deltas[n] if n in record.deltas else p for n, p in params.items()}
    return params


def _layer_input(case: Case, i: int, k: int | None, runs: list[EngineRun]) -> np.ndarray | None:
    """What layer ``i`` took in at step ``k``: the inputs, or the layer below's A as the first of ``runs`` gives it."""
    if i == 0:
        return case.inputs
    return next((a for run in runs if (a := value(run, Step("A", i - 1, "A", step=k))) is not None), None)


SHOWN = {"xhat": "x^", "var": "variance", "mean": "batch mean"}


def _layer_hints(case: Case, step: Step, culprit: EngineRun, reference: EngineRun) -> list[str]:
    """A forward quantity of a conv, flatten or norm layer that follows one of the classic slips
    (:func:`manualprop.reference.variants.layer_variants`): the layer recomputed with the slip from
    the input the engines agree on gives the culprit's value, and lies outside the tolerance of the
    reference's."""
    if step.layer is None or step.label not in ("Z", "A", "mean", "var", "xhat"):
        return []
    i, k = step.layer, step.step
    mine, theirs = value(culprit, step), value(reference, step)
    a_prev = _layer_input(case, i, k, [reference, culprit])
    if mine is None or a_prev is None:
        return []
    layer = case.with_parameters({n: p.astype(case.dtype) for n, p in _before(case, reference, k).items()}).layers[i]
    found = []
    for slip, trace in variants.layer_variants(layer, np.asarray(a_prev).astype(case.dtype)):
        recomputed = getattr(trace, step.field)
        if recomputed is None or not compare(step.field, "a", mine, "b", recomputed, case.rtol, case.atol).ok:
            continue
        if theirs is not None and compare(step.field, "a", recomputed, "b", theirs, case.rtol, case.atol).ok:
            continue  # the slip gives the SPEC's value here: it explains nothing
        found.append(f"layer {i}: {culprit.engine}'s {SHOWN.get(step.label, step.label)} follows {slip}")
    return found


def _moving_hints(case: Case, step: Step, culprit: EngineRun, reference: EngineRun) -> list[str]:
    """batch_norm's moving statistics updated in another convention
    (:data:`manualprop.reference.variants.MOVING_VARIANTS`): from the batch statistics the engines agree
    on, the variant's change gives the culprit's on every moving statistic it reports."""
    if step.label != "delta" or case.trainable(step.field) or not step.field.startswith("layers."):
        return []
    if step.step is None and case.steps > 1:
        return []  # the change over every step: the first step that differs says more
    i, k = int(step.field.split(".")[1]), step.step
    layer = case.layers[i]
    stats = {}
    for name in ("mean", "var"):
        given = [value(run, Step(name, i, name, step=k)) for run in (reference, culprit)]
        stats[name] = next((s for s in given if s is not None), None)
    a_prev = _layer_input(case, i, k, [reference, culprit])
    if a_prev is not None and (stats["mean"] is None or stats["var"] is None):
        axes = tuple(range(np.ndim(a_prev) - 1))
        stats = {"mean": np.mean(a_prev, axis=axes), "var": np.var(a_prev, axis=axes)}
    if stats["mean"] is None or stats["var"] is None:
        return []
    n = int(case.inputs.shape[0] * np.prod(layer.in_shape[:-1]))
    before = _before(case, culprit, k)
    names = {stat: f"layers.{i}.{stat}" for stat in ("moving_mean", "moving_variance")}
    mine = {stat: value(culprit, Step("delta", None, name, step=k)) for stat, name in names.items()}
    theirs = value(reference, step)
    found = []
    for variant in variants.MOVING_VARIANTS:
        after = variant.update(
            layer.momentum,
            before[names["moving_mean"]],
            before[names["moving_variance"]],
            np.asarray(stats["mean"], dtype=np.float64),
            np.asarray(stats["var"], dtype=np.float64),
            n,
        )
        change = {stat: after[stat] - before[name] for stat, name in names.items()}
        follows = [
            compare(name, "a", reported, "b", change[stat], case.rtol, case.atol, reference=before[name]).ok
            for stat, name in names.items()
            if (reported := mine[stat]) is not None
        ]
        own = change[step.field.rsplit(".", 1)[1]]
        if not follows or not all(follows):
            continue
        if (
            theirs is not None
            and compare(step.field, "a", own, "b", theirs, case.rtol, case.atol, reference=before[step.field]).ok
        ):
            continue  # the variant gives the SPEC's change here: it explains nothing
        found.append(f"layer {i}: {culprit.engine}'s moving statistics follow {variant.slip(layer.momentum, n)}")
    return found


RULES = [
    _optimizer_hints,
    _layer_hints,
    _moving_hints,
    _ratio_hints,
    _layout_hints,
    _leaky_hint,
    _saturation_hint,
    _cross_entropy_hints,
]
# Rules whose hint reproduces the difference itself: when one fits, the patterns the others look
# for (a factor between two deltas, say) are that formula's and are left out.
EXPLAINING = (_optimizer_hints, _layer_hints, _moving_hints)


def hints(case: Case, step: Step, culprit: EngineRun, reference: EngineRun) -> list[str]:
    """Every hint that fits how ``culprit`` differs from ``reference`` where the divergence starts."""
    for rule in EXPLAINING:
        if explained := rule(case, step, culprit, reference):
            return explained
    return [h for rule in RULES if rule not in EXPLAINING for h in rule(case, step, culprit, reference)]
