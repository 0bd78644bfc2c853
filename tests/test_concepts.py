"""Every declared activation, loss and optimizer, in every built-in engine: each runs it (and agrees with the
finite-difference oracle) or skips it with a reason. An engine that forgets a declaration fails
here, as does a declaration that an engine's table lacks."""

import importlib.util

import pytest

from manualprop import concepts, harness, parse_case
from manualprop.oracle import maths
from manualprop.reference import activations, losses
from manualprop.verdict import results

FRAMEWORKS = {"torch": "torch", "keras": "keras"}
ENGINES = ["numpy", "numeric", *FRAMEWORKS]


def case_text(activation: str, loss: str) -> str:
    declared, declared_loss = concepts.ACTIVATIONS[activation], concepts.LOSSES[loss]
    params = {p.name: 0.25 for p in declared.params}  # exact in float32: no canary met here
    written = f"{{name: {activation}, " + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}" if params else activation
    last = declared_loss.last_activation or ("linear" if declared.last_layer_only else "tanh")
    hidden, top = (written, last) if not declared.last_layer_only else ("tanh", written)
    if declared_loss.last_activation:
        top = declared_loss.last_activation
    targets = f"{{random: {declared_loss.targets}}}"
    return f"""
name: {activation}-{loss}
dtype: float64
loss: {loss}
lr: 0.1
inputs: {{random: uniform, shape: [3, 4], low: -1, high: 1}}
targets: {targets}
layers:
  - {{units: 5, activation: {hidden}, kernel: {{random: normal, std: 0.5}}, bias: {{random: normal, std: 0.1}}}}
  - {{units: 3, activation: {top}, kernel: {{random: normal, std: 0.5}}}}
"""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("activation", list(concepts.ACTIVATIONS))
def test_every_activation_runs_in_every_engine(engine, activation):
    check(engine, parse_case(case_text(activation, "mse"), f"{activation}.yaml"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loss", list(concepts.LOSSES))
def test_every_loss_runs_in_every_engine(engine, loss):
    check(engine, parse_case(case_text("tanh", loss), f"{loss}.yaml"))


def check(engine: str, case) -> None:
    if engine in FRAMEWORKS and importlib.util.find_spec(FRAMEWORKS[engine]) is None:
        run = harness.run_engine(case, engine)
        assert run.status == "skipped" and run.reason, run  # a missing framework: a skip with its reason
        pytest.skip(run.reason)
    result = harness.run_case(case, [engine, "numeric"] if engine != "numeric" else ["numeric", "numpy"])
    run = result.runs[engine]
    assert run.status == "ran", run.reason
    assert not [c.message for c in result.comparisons if results.failed(c)]


def test_every_declaration_has_its_maths_and_its_builders():
    from manualprop.adapters import keras_engine, torch_engine

    for table in (activations.ACTIVATIONS, maths.ACTIVATION, torch_engine.ACTIVATION, keras_engine.ACTIVATION):
        assert set(table) == set(concepts.ACTIVATIONS)
    for table in (losses.LOSSES, maths.SAMPLE_TERMS, torch_engine.LOSS, keras_engine.LOSS):
        assert set(table) == set(concepts.LOSSES)


def test_the_schema_accepts_exactly_the_declared_names():
    from manualprop.casefile import schema

    assert set(schema.ActivationName.__args__) == set(concepts.ACTIVATIONS)
    assert set(schema.LossName.__args__) == {*concepts.LOSSES, *concepts.LOSS_ALIASES}
    params = {p.name for a in concepts.ACTIVATIONS.values() for p in a.params}
    assert set(schema.ActivationSpec.model_fields) == {"name", *params}


OPTIMIZER_SETTINGS = {  # every hyperparameter written, away from the defaults where the frameworks agree
    "sgd": "{name: sgd, momentum: 0.5, nesterov: true, weight_decay: 0.01}",
    "adam": "{name: adam, epsilon: 1.0e-3, amsgrad: true}",
    "adamw": "{name: adamw, epsilon: 1.0e-3, weight_decay: 0.01}",
    "rmsprop": "{name: rmsprop, rho: 0.9, epsilon: 1.0e-3, momentum: 0.5, centered: true}",
    "adagrad": "{name: adagrad, initial_accumulator: 0.1, epsilon: 1.0e-3}",
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("optimizer", list(concepts.OPTIMIZERS))
def test_every_optimizer_runs_in_every_engine(engine, optimizer):
    """Two steps of every declared optimizer: each engine runs them and agrees with the oracle, or
    (Keras) differs exactly where manualprop.reference.variants declares its own update."""
    from manualprop.reference import variants

    text = case_text("tanh", "mse") + f"optimizer: {OPTIMIZER_SETTINGS[optimizer]}\nsteps: 2\n"
    case = parse_case(text, f"{optimizer}.yaml")
    if engine == "keras" and [v for v in variants.of(case) if "cases/canaries/" in v.pinned]:
        if importlib.util.find_spec("keras") is None:
            pytest.skip("keras is not installed")
        run = harness.run_engine(case, "keras")
        assert run.status == "ran" and len(run.result.history) == 2, run.reason
        return
    check(engine, case)


def test_every_optimizer_has_its_update_in_every_engine():
    from manualprop.adapters import keras_engine, torch_engine
    from manualprop.oracle import updates
    from manualprop.reference import optimizers

    assert set(OPTIMIZER_SETTINGS) == set(concepts.OPTIMIZERS)
    for table in (optimizers.OPTIMIZERS, updates.UPDATES, torch_engine.OPTIMIZER, keras_engine.OPTIMIZER):
        assert set(table) == set(concepts.OPTIMIZERS)


# One small network per declared layer type (SPEC section 8), the type between layers that feed and read it.
LAYER_CASES = {
    "dense": ("[3, 4]", "{units: 3, activation: tanh}"),
    "conv2d": ("[2, 5, 4, 2]", "{type: conv2d, filters: 2, kernel_size: [3, 2], strides: 2, padding: same, activation: tanh}"),
    "max_pool2d": ("[2, 4, 5, 2]", "{type: max_pool2d, pool_size: [2, 3], strides: 1}"),
    "avg_pool2d": ("[2, 4, 5, 2]", "{type: avg_pool2d, pool_size: 2}"),
    "flatten": ("[2, 3, 2, 2]", "{type: flatten}"),
    "batch_norm": ("[4, 3]", "{type: batch_norm, epsilon: 1.0e-3, momentum: 0.9, gamma: {random: normal, mean: 1}}"),
    "layer_norm": ("[3, 4]", "{type: layer_norm, epsilon: 1.0e-3, beta: {random: normal, std: 0.1}}"),
}


def layer_case(kind: str) -> str:
    shape, layer = LAYER_CASES[kind]
    images = concepts.LAYER_TYPES[kind].takes == "images"
    flatten = "  - {type: flatten}\n" if images else ""
    return f"""
name: {kind}
dtype: float64
loss: mse
lr: 0.1
inputs: {{random: normal, shape: {shape}}}
targets: {{random: normal}}
layers:
  - {layer}
{flatten}  - {{units: 2, activation: linear}}
"""


def test_every_layer_type_has_a_case_here():
    assert set(LAYER_CASES) == set(concepts.LAYER_TYPES)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(concepts.LAYER_TYPES))
def test_every_layer_type_runs_in_every_engine(engine, kind):
    """Each engine runs every layer type and agrees with the finite-difference oracle, except
    PyTorch's running variance (unbiased: the one known difference, asserted to show exactly there)."""
    case = parse_case(layer_case(kind), f"{kind}.yaml")
    if engine == "torch" and kind == "batch_norm":
        if importlib.util.find_spec("torch") is None:
            pytest.skip("torch is not installed")
        result = harness.run_case(case, ["torch", "numeric"])
        assert result.runs["torch"].status == "ran", result.runs["torch"].reason
        assert {c.param for c in result.comparisons if results.failed(c)} == {"layers.0.moving_variance"}
        return
    check(engine, case)
