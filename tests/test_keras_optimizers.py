"""The Keras engine's optimizers and several steps (SPEC section 7), held against references that
do not come from Keras: the NumPy engine where Keras computes as the SPEC does, and where it does
not, the NumPy engine replayed with the update as Keras writes it (manualprop.reference.variants); the
hints that name those differences, on their canaries; and no optimizer state carried from one
case to the next through the engine's cache of compiled models."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from manualprop import engines, harness, load_case, parse_case
from manualprop.engines import StepResult
from manualprop.reference import variants
from manualprop.reference.engine import NumpyEngine
from manualprop.verdict import hints, results
from manualprop.verdict.compare import compare
from manualprop.verdict.computation import Step
from manualprop.verdict.outcomes import Status
from manualprop.verdict.results import EngineRun

ROOT = Path(__file__).resolve().parent.parent
CANARIES = ROOT / "cases" / "canaries"


@pytest.fixture(scope="module")
def keras():
    engine = engines.get("keras")
    reason = engine.unavailable()
    if reason:
        pytest.skip(reason)
    return engine


def case_text(optimizer: str, dtype: str = "float64", steps: int = 3) -> str:
    """Two layers with biases, three samples: every parameter gets a gradient of its own size."""
    return f"""
dtype: {dtype}
loss: mse
lr: 0.05
optimizer: {optimizer}
steps: {steps}
inputs: [[0.5, -1.0], [1.0, 2.0], [-0.3, 0.7]]
targets: [[1.0, 0.0], [0.5, -0.5], [0.2, 0.1]]
layers:
  - {{units: 3, activation: tanh, kernel: [[0.3, -0.2, 0.1], [0.2, 0.4, -0.5]], bias: [0.5, -0.1, 0.2]}}
  - {{units: 2, activation: linear, kernel: [[0.3, -0.2], [0.2, 0.4], [-0.6, 0.25]], bias: [0.1, -0.1]}}
"""


def case(optimizer: str, dtype: str = "float64", steps: int = 3):
    return parse_case(case_text(optimizer, dtype, steps), "optimizer.yaml")


AGREEING = [  # Keras computes these as the SPEC does (with the adapter's settings)
    "sgd",
    "{name: sgd, momentum: 0.9}",
    "{name: sgd, momentum: 0.9, nesterov: true}",
    "{name: sgd, weight_decay: 0.1}",
    "{name: sgd, momentum: 0.9, weight_decay: 0.1}",
    "{name: sgd, momentum: 0.5, nesterov: true, weight_decay: 0.01}",
]
DIFFERING = [  # Keras computes these as manualprop.reference.variants writes them
    "{name: adam, epsilon: 1.0e-8}",
    "{name: adam, epsilon: 1.0e-3, beta1: 0.8, beta2: 0.99, amsgrad: true}",
    "{name: adamw, epsilon: 1.0e-8, weight_decay: 0.05}",
    "{name: adamw, epsilon: 1.0e-8, weight_decay: 0.05, amsgrad: true}",
    "{name: rmsprop, rho: 0.9, epsilon: 1.0e-7}",
    "{name: rmsprop, rho: 0.8, epsilon: 1.0e-3, momentum: 0.9, centered: true}",
    "{name: rmsprop, rho: 0.9, epsilon: 1.0e-7, centered: true}",
    "{name: adagrad, initial_accumulator: 0.1, epsilon: 1.0e-7}",
    "{name: adagrad, initial_accumulator: 0.0, epsilon: 1.0e-3}",
]


def expected_for(c) -> StepResult:
    """What Keras should compute: the SPEC, or Keras's own formula where no setting gives the SPEC's
    (Keras 2's Adam keeps adaptive_epsilon at its default, False: Keras 3's step)."""
    found = [v for v in variants.of(c) if v.optimizer != "sgd"]  # SGD's decay is given as an L2 penalty
    if not found:
        return NumpyEngine().step(c)
    return found[0].replay(c)


def assert_close(c, mine: StepResult, reference: StepResult) -> None:
    """Deltas after the last step, each step's deltas, losses and optimizer state, under the case's tolerance."""
    params = c.parameters()
    problems = [
        x.message
        for n, p in params.items()
        if not (x := compare(n, "keras", mine.deltas[n], "reference", reference.deltas[n], c.rtol, c.atol, reference=p)).ok
    ]
    assert len(mine.history) == len(reference.history) == c.steps
    for t, (a, b) in enumerate(zip(mine.history, reference.history, strict=True), 1):
        problems += [
            f"step {t}: {x.message}"
            for n, p in params.items()
            if not (x := compare(n, "keras", a.deltas[n], "reference", b.deltas[n], c.rtol, c.atol, reference=p)).ok
        ]
        problems += [
            f"step {t} loss: {x.message}"
            for x in [compare("loss", "keras", np.array(a.loss), "reference", np.array(b.loss), c.rtol, c.atol)]
            if not x.ok
        ]
        for n, state in a.state.items():
            problems += [
                f"step {t} {n} {k}: {x.message}"
                for k, v in state.items()
                if not (x := compare(f"{n}.{k}", "keras", v, "reference", b.state[n][k], c.rtol, c.atol)).ok
            ]
    assert not problems, problems


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", AGREEING)
def test_keras_agrees_with_the_numpy_engine_where_the_spec_and_keras_agree(keras, optimizer, dtype):
    c = case(optimizer, dtype)
    result = keras.step(c)
    assert_close(c, result, NumpyEngine().step(c))
    if c.hyper["momentum"]:  # the velocity is shown in the SPEC's terms (Keras keeps -lr b)
        assert set(result.history[-1].state["layers.0.kernel"]) == {"b"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", DIFFERING)
def test_keras_steps_as_its_own_formula_where_it_differs_from_the_spec(keras, optimizer, dtype):
    c = case(optimizer, dtype)
    result = keras.step(c)
    assert_close(c, result, expected_for(c))
    kept = set(result.history[0].state["layers.1.bias"])
    declared = {"adam": {"m", "v"}, "adamw": {"m", "v"}, "rmsprop": {"s"}, "adagrad": {"acc"}}[c.optimizer]
    assert declared <= kept
    assert ("vmax" in kept) == bool(c.hyper.get("amsgrad")) and ("a" in kept) == bool(c.hyper.get("centered"))


def test_the_differences_are_real_in_float64(keras):
    """The formulas the previous test holds Keras to are not the SPEC's: each moves float64 deltas."""
    for optimizer in DIFFERING:
        c = case(optimizer)
        spec, mine = NumpyEngine().step(c), keras.step(c)
        assert any(
            not compare(n, "keras", mine.deltas[n], "numpy", spec.deltas[n], c.rtol, c.atol, reference=p).ok
            for n, p in c.parameters().items()
        ), optimizer


STATEFUL = [
    "{name: sgd, momentum: 0.9, nesterov: true, weight_decay: 0.1}",
    "{name: adam, epsilon: 1.0e-8, amsgrad: true}",
    "{name: adamw, epsilon: 1.0e-8, weight_decay: 0.05}",
    "{name: rmsprop, rho: 0.9, epsilon: 1.0e-7, momentum: 0.5, centered: true}",
    "{name: adagrad, initial_accumulator: 0.1, epsilon: 1.0e-7}",
]


def other_weights(c):
    """The same architecture and optimizer (so the same compiled model), other weights."""
    return c.with_parameters(
        {n: p * np.asarray(-1.5, dtype=p.dtype) + np.asarray(0.25, dtype=p.dtype) for n, p in c.parameters().items()}
    )


def assert_identical(a: StepResult, b: StepResult) -> None:
    assert a.losses == b.losses
    for n in a.deltas:
        np.testing.assert_array_equal(a.deltas[n], b.deltas[n])
    for x, y in zip(a.history, b.history, strict=True):
        for n in x.state:
            assert x.state[n].keys() == y.state[n].keys()
            for k in x.state[n]:
                np.testing.assert_array_equal(x.state[n][k], y.state[n][k])


@pytest.mark.parametrize("optimizer", STATEFUL)
def test_no_optimizer_state_leaks_from_one_case_to_the_next(keras, optimizer):
    c = case(optimizer)
    first = keras.step(c)
    built = len(keras.models)
    keras.step(other_weights(c))
    assert len(keras.models) == built  # the same compiled model served both: its optimizer was reused
    assert_identical(first, keras.step(c))


def test_the_leak_test_can_fail(keras, monkeypatch):
    """Without the reset, the state of the case before carries over and the deltas change."""
    from manualprop.adapters import keras_engine

    c = case(STATEFUL[1])
    first = keras.step(c)
    monkeypatch.setattr(keras_engine, "_reset", lambda compiled: None)
    keras.step(other_weights(c))
    again = keras.step(c)
    assert any(not np.array_equal(first.deltas[n], again.deltas[n]) for n in first.deltas)


def test_hyperparameters_keras_bakes_into_its_step_are_part_of_the_cache_key(keras):
    """Keras traces its step with the hyperparameters as constants: a case that differs only in
    them must not reuse the compiled model of another."""
    for optimizer in ["{name: adam, epsilon: 1.0e-8}", "{name: adam, epsilon: 0.5}", "{name: adam, epsilon: 0.5, beta1: 0.5}"]:
        c = case(optimizer)
        assert_close(c, keras.step(c), expected_for(c))


def test_each_step_has_its_own_trace(keras):
    c = case("{name: sgd, momentum: 0.9}")
    mine, spec = keras.step(c), NumpyEngine().step(c)
    assert mine.trace is mine.history[0].trace
    for t, (a, b) in enumerate(zip(mine.history, spec.history, strict=True), 1):
        for i, (x, y) in enumerate(zip(a.trace, b.trace, strict=True)):
            for field in ("Z", "A", "dW", "db"):
                assert compare(field, "keras", getattr(x, field), "numpy", getattr(y, field), c.rtol, c.atol).ok, (t, i, field)
    assert not np.allclose(mine.history[0].trace[0].Z, mine.history[2].trace[0].Z)  # each from its own parameters


# The hints, on the canaries: one per variant that no setting removes.
CANARY_OF = {v.optimizer: v for v in variants.VARIANTS if "canaries/" in v.pinned}


def canary_path(variant) -> Path:
    return ROOT / variant.pinned.split("pinned by ")[1].split(")")[0]


def runs(c, *names):
    return [harness.run_engine(c, n) for n in names]


@pytest.mark.parametrize("optimizer", sorted(CANARY_OF))
def test_each_canary_holds_and_states_its_difference(keras, optimizer):
    variant = CANARY_OF[optimizer]
    c = load_case(canary_path(variant))
    assert c.optimizer == optimizer and "epsilon" in c.known_differences["keras"]
    result = harness.run_case(c, ["numpy", "keras"])
    assert result.ok and not result.vanished, result.notes
    assert any(results.is_known(x) for x in result.comparisons)
    assert len(c.layers) == 1 and c.layers[0].kernel.size == 1  # the smallest network that shows it


@pytest.mark.parametrize("optimizer", sorted(CANARY_OF))
def test_each_hint_fires_on_its_canary_and_not_the_other_way_round(keras, optimizer):
    variant = CANARY_OF[optimizer]
    c = load_case(canary_path(variant))
    numpy_run, keras_run = runs(c, "numpy", "keras")
    step = Step("delta", None, "layers.0.kernel")
    found = hints.hints(c, step, keras_run, numpy_run)
    assert len(found) == 1, found
    assert found[0].startswith(f"keras's deltas follow {variant.who}") and variant.formula in found[0]
    assert "times the case's tolerance" in found[0] and canary_path(variant).name in found[0]
    assert (", within float32's default tolerance" in found[0]) == (c.dtype == np.float64)  # these canaries: yes in float64
    assert not [h for h in hints.hints(c, step, numpy_run, keras_run) if "follow" in h]  # NumPy follows the SPEC, not Keras


@pytest.mark.parametrize("optimizer", sorted(CANARY_OF))
def test_a_diagnosis_of_the_canary_without_its_known_difference_blames_keras_and_names_it(keras, optimizer):
    variant = CANARY_OF[optimizer]
    c = dataclasses.replace(load_case(canary_path(variant)), known_differences={})
    result = harness.run_case(c, ["numpy", "keras"])
    assert not result.ok and result.diagnosis is not None and result.diagnosis.engine == "keras", result.diagnosis
    assert result.diagnosis.quantity == "delta"
    assert [h for h in result.diagnosis.hints if h.startswith(f"keras's deltas follow {variant.who}")], result.diagnosis.hints


def test_the_optimizer_hint_is_silent_where_keras_agrees_and_leaves_other_slips_to_their_hints(keras):
    c = case("{name: adam, epsilon: 1.0e-8}")
    numpy_run = harness.run_engine(c, "numpy")
    flipped = EngineRun(
        "flipped", numpy_run.status, StepResult(numpy_run.result.loss, {n: -d for n, d in numpy_run.result.deltas.items()})
    )
    found = hints.hints(c, Step("delta", None, "layers.0.kernel"), flipped, numpy_run)
    assert not [h for h in found if "follow" in h] and any("sign flip" in h for h in found), found
    agreeing = case("{name: sgd, momentum: 0.9, weight_decay: 0.1}")
    numpy_run, keras_run = runs(agreeing, "numpy", "keras")
    assert hints.hints(agreeing, Step("delta", None, "layers.0.kernel"), keras_run, numpy_run) == []


def test_kerass_own_sgd_weight_decay_is_decoupled_and_the_hint_names_it(keras, monkeypatch):
    """Keras's SGD(weight_decay=...) with momentum is the decoupled variant, not the SPEC's L2: the
    reason the adapter gives the decay as a penalty. Measured with Keras itself, then named."""
    from manualprop.adapters import keras_engine

    def decoupled(k, hp, number):
        return k.optimizers.SGD(
            momentum=number(hp["momentum"]), nesterov=bool(hp["nesterov"]), weight_decay=number(hp["weight_decay"])
        )

    c = case("{name: sgd, momentum: 0.9, weight_decay: 0.1}")
    monkeypatch.setattr(keras_engine, "_penalty", lambda k, c: None)
    monkeypatch.setitem(keras_engine.OPTIMIZER, "sgd", decoupled)
    own = keras_engine.KerasEngine().step(c)  # a fresh cache: the model built with Keras's weight_decay
    (variant,) = variants.of(c)
    assert_close(c, own, variant.replay(c))
    spec = NumpyEngine().step(c)
    assert any(
        not compare(n, "a", own.deltas[n], "b", spec.deltas[n], c.rtol, c.atol, reference=p).ok for n, p in c.parameters().items()
    )
    found = hints.hints(
        c, Step("delta", None, "layers.0.kernel"), EngineRun("keras", Status.RAN, own), EngineRun("numpy", Status.RAN, spec)
    )
    assert len(found) == 1 and "decoupled weight decay" in found[0], found


KERAS2 = """
import json, sys
from manualprop import engines, parse_case
from manualprop.reference import variants
from manualprop.verdict.compare import compare
from manualprop.reference.engine import NumpyEngine
text = sys.stdin.read()
out = {}
for optimizer in ["{name: sgd, momentum: 0.9, weight_decay: 0.1}", "{name: adam, epsilon: 1.0e-8, amsgrad: true}",
                  "{name: adamw, epsilon: 1.0e-8, weight_decay: 0.05}", "{name: rmsprop, rho: 0.9, epsilon: 1.0e-7, momentum: 0.5, centered: true}",
                  "{name: adagrad, initial_accumulator: 0.1, epsilon: 1.0e-7}"]:
    c = parse_case(text.replace("OPTIMIZER", optimizer), "keras2.yaml")
    mine = engines.get("keras").step(c)
    against = {"spec": NumpyEngine().step(c), **{"keras formula": v.replay(c) for v in variants.of(c) if v.optimizer != "sgd"}}
    out[c.optimizer] = [k for k, r in against.items() if all(compare(n, "a", mine.deltas[n], "b", r.deltas[n], c.rtol, c.atol, reference=p).ok
                                                            for n, p in c.parameters().items())]
print(json.dumps(out))
"""


def test_keras2_runs_every_optimizer_and_takes_keras_3s_steps(keras):
    """Under TF_USE_LEGACY_KERAS=1 (tf_keras), in a process of its own: Keras 2's Adam keeps
    adaptive_epsilon at its default, so it follows Keras's formula as Keras 3's does."""
    import importlib.util

    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip('tf_keras is not installed (pip install "manualprop[keras2]")')
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", KERAS2],
        input=case_text("OPTIMIZER"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    follows = json.loads(done.stdout.strip().splitlines()[-1])
    assert follows == {
        "sgd": ["spec"],
        "adam": ["keras formula"],
        "adamw": ["keras formula"],
        "rmsprop": ["keras formula"],
        "adagrad": ["keras formula"],
    }
