"""The classic slips of porting conv and norm layers between frameworks are blamed where they
start, and named by a hint.

Each faulty engine (tests/faulty_engines.py) is the NumPy engine with one slip made its own way;
the finite-difference oracle arbitrates between it and the NumPy engine, and the hint is found by
recomputing the quantity with the variants of manualprop.reference.variants, which share no code
with the faulty engines' slips.
"""

import importlib.util

import numpy as np
import pytest

from manualprop import engines, harness, parse_case
from manualprop.engines import StepResult
from manualprop.reference.engine import NumpyEngine

import faulty_engines

CONV = """
name: conv-same-stride-2
dtype: float64
seed: 5
loss: mse
lr: 0.1
inputs: {random: normal, shape: [3, 6, 6, 2]}
targets: {random: normal, shape: [3, 2]}
layers:
  - {type: conv2d, filters: 3, kernel_size: 3, strides: 2, padding: same, activation: tanh, bias: {random: normal, std: 0.1}}
  - {type: flatten}
  - {units: 2}
"""

POOLED = """
name: conv-pool-flatten
dtype: float64
seed: 6
loss: mse
lr: 0.1
inputs: {random: normal, shape: [2, 5, 5, 2]}
targets: {random: normal, shape: [2, 2]}
layers:
  - {type: conv2d, filters: 3, kernel_size: 2, activation: relu, bias: {random: uniform, low: 0.1, high: 0.2}}
  - {type: max_pool2d, pool_size: 2}
  - {type: flatten}
  - {units: 2}
"""

NORMS = """
name: batch-and-layer-norm
dtype: float64
seed: 7
loss: mse
lr: 0.1
inputs: {random: normal, shape: [5, 3]}
targets: {random: normal, shape: [5, 2]}
layers:
  - {units: 4, activation: tanh}
  - {type: batch_norm, epsilon: 1.0e-3, momentum: 0.9, moving_mean: [0.1, -0.2, 0.0, 0.3], moving_variance: [1.5, 0.5, 1.0, 2.0]}
  - {type: layer_norm, epsilon: 1.0e-3, gamma: {random: uniform, low: 0.5, high: 1.5}}
  - {units: 2}
"""

# engine -> (case, quantity, layer, the trace field or parameter it starts at, words of the hint)
EXPECTED = {
    "reshaped-conv-kernel": (CONV, "Z", 0, "Z", "an (out, in, kh, kw) array reshaped to (kh, kw, in, out)"),
    "swapped-kernel-hw": (CONV, "Z", 0, "Z", "the kernel with its height and width swapped"),
    "padding-top-left": (CONV, "Z", 0, "Z", "with the extra row or column at the top or left, where TensorFlow"),
    "flatten-chw": (POOLED, "A", 2, "A", "flatten in (c, h, w) order"),
    "momentum-swapped": (NORMS, "delta", 1, "layers.1.moving_mean", "the momentum the other way round"),
    "unbiased-running-var": (NORMS, "delta", 1, "layers.1.moving_variance", "PyTorch's running_var"),
    "torch-epsilon": (NORMS, "xhat", 1, "xhat", "epsilon 1e-05, PyTorch's default eps, where the case says 0.001"),
}


def run(case_text, engine_class, *others):
    engines.register(engine_class.name, engine_class)
    try:
        return harness.run_case(parse_case(case_text, "slip.yaml"), ["numpy", *others, engine_class.name])
    finally:
        engines.unregister(engine_class.name)


@pytest.mark.parametrize("cls", faulty_engines.LAYER_SLIPS, ids=lambda c: c.name)
def test_the_slip_is_blamed_where_it_starts_and_named(cls):
    text, quantity, layer, field, words = EXPECTED[cls.name]
    assert harness.run_case(parse_case(text, "right.yaml"), ["numpy", "numeric"]).verdict == "pass"
    result = run(text, cls)
    d = result.diagnosis
    assert result.verdict == "fail" and d is not None
    assert (d.engine, d.quantity, d.layer, d.step.field) == (cls.name, quantity, layer, field), d.sentence
    assert d.oracle_distance["numpy"] <= 1 < d.oracle_distance[cls.name]
    assert d.line == parse_case(text, "slip.yaml").line_of(("layers", layer)) and f"line {d.line}" in d.sentence
    assert any(words in h for h in d.hints), d.hints
    assert len(d.hints) == 1, d.hints  # the slip alone: no second guess beside it


def test_the_hint_names_the_padding_of_the_case():
    d = run(CONV, faulty_engines.PaddingTopLeft).diagnosis
    assert "(top, bottom) (1, 0), (left, right) (1, 0) for (0, 1), (0, 1)" in d.hints[0]


def test_unbiased_running_variance_on_images_counts_every_position():
    images = CONV.replace("  - {type: flatten}", "  - {type: batch_norm, epsilon: 1.0e-3, momentum: 0.8}\n  - {type: flatten}")
    d = run(images, faulty_engines.UnbiasedRunningVariance).diagnosis
    assert (d.quantity, d.layer, d.step.field) == ("delta", 1, "layers.1.moving_variance"), d.sentence
    assert any("n / (n - 1) var (n = 27)" in h for h in d.hints), d.hints  # 3 samples x 3 x 3 positions
    assert "layers.1.moving_variance (layer 1, batch_norm, line" in d.sentence
    assert "every intermediate agrees; the delta differs first" in d.sentence


def test_a_wrong_batch_variance_is_met_at_var_before_the_moving_variance():
    """A variance divided by n - 1 in the forward pass is the layer's maths, not the moving average's."""

    class UnbiasedBatchVariance(NumpyEngine):
        name = "unbiased-batch-var"

        def step(self, case):
            def forward(layer, a_prev, trace, acts):
                original.forward(layer, a_prev, trace, acts)
                n = a_prev.shape[0]
                trace.var = trace.var * n / (n - 1)
                trace.xhat = (a_prev - trace.mean) / np.sqrt(trace.var + layer.epsilon)
                trace.A = layer.gamma * trace.xhat + layer.beta
                return trace.A

            from manualprop.reference import layers

            original = layers.KINDS["batch_norm"]
            layers.KINDS["batch_norm"] = layers.Kind(forward, original.backward)
            try:
                return super().step(case)
            finally:
                layers.KINDS["batch_norm"] = original

    d = run(NORMS, UnbiasedBatchVariance).diagnosis
    assert (d.engine, d.quantity, d.layer) == ("unbiased-batch-var", "var", 1), d.sentence
    assert "the mean agrees; the variance differs first" in d.sentence
    assert any("variance follows the unbiased variance (divided by n - 1 = 4" in h for h in d.hints), d.hints


def _without(fields, cls):
    """``cls`` reporting a trace without ``fields`` (None), as a framework may."""

    class Partial(cls):
        name = f"{cls.name}-partial"

        def step(self, case):
            result = super().step(case)
            for trace in [*result.trace, *(t for r in result.history for t in r.trace or [])]:
                for f in fields:
                    setattr(trace, f, None)
            return result

    return Partial


def test_a_trace_without_the_statistics_is_judged_on_what_it_gives():
    cls = _without(("mean", "var", "xhat", "dxhat"), faulty_engines.TorchEpsilon)
    d = run(NORMS, cls).diagnosis
    assert (d.engine, d.quantity, d.layer) == (cls.name, "A", 1), d.sentence
    assert "x^ agrees; A differs first" in d.sentence
    assert any("epsilon 1e-05, PyTorch's default eps" in h for h in d.hints), d.hints


def test_moving_statistics_without_a_trace_are_still_named():
    class NoTrace(faulty_engines.UnbiasedRunningVariance):
        name = "unbiased-no-trace"

        def step(self, case):
            result = super().step(case)
            return StepResult(result.loss, result.deltas, [])

    d = run(NORMS, NoTrace).diagnosis
    assert (d.engine, d.quantity, d.step.field) == ("unbiased-no-trace", "delta", "layers.1.moving_variance"), d.sentence
    assert any("PyTorch's running_var" in h for h in d.hints), d.hints


def test_the_momentum_slip_is_met_at_the_first_step_of_several():
    text = NORMS.replace("lr: 0.1", "lr: 0.01\nsteps: 3\noptimizer: {name: adam, epsilon: 1.0e-8}")
    d = run(text, faulty_engines.MomentumSwapped).diagnosis
    assert (d.quantity, d.step.step, d.step.field) == ("delta", 0, "layers.1.moving_mean"), d.sentence
    assert any("the momentum the other way round, moving <- 0.1 moving + 0.9 stat" in h for h in d.hints), d.hints


@pytest.mark.parametrize("cls", [faulty_engines.PaddingTopLeft, faulty_engines.FlattenChannelsFirst])
def test_a_slip_in_float32_is_named_too(cls):
    text = (CONV if cls is faulty_engines.PaddingTopLeft else POOLED).replace("dtype: float64", "dtype: float32")
    d = run(text, cls).diagnosis
    assert d.engine == cls.name and any(EXPECTED[cls.name][-1] in h for h in d.hints), (d.sentence, d.hints)


HAS_TORCH = importlib.util.find_spec("torch") is not None
FRAMEWORKS = [n for n, m in (("torch", "torch"), ("keras", "keras")) if importlib.util.find_spec(m)]


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_is_blamed_on_the_moving_variance_with_its_unbiased_running_var(tmp_path, capsys):
    """The real nn.BatchNorm1d, on the canary's case without its known_differences."""
    from pathlib import Path

    from manualprop import cli

    canary = Path(__file__).resolve().parent.parent / "cases" / "canaries" / "torch_batch_norm_unbiased_running_variance.yaml"
    path = tmp_path / "unbiased.yaml"
    path.write_text(canary.read_text().split("known_differences:")[0])
    assert cli.main(["run", str(path), "--engines", ",".join(["numpy", *FRAMEWORKS])]) == 1
    out = capsys.readouterr().out
    assert "diagnosis: layers.1.moving_variance (layer 1, batch_norm, line " in out
    assert "the delta differs first in torch" in out
    assert "hint: layer 1: torch's moving statistics follow PyTorch's running_var" in out
    assert "n / (n - 1) var (n = 4)" in out


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_on_a_norm_network_is_named_by_the_same_hint():
    d = harness.run_case(parse_case(NORMS, "norms.yaml"), ["numpy", "torch"]).diagnosis
    assert (d.engine, d.quantity, d.layer, d.step.field) == ("torch", "delta", 1, "layers.1.moving_variance"), d.sentence
    assert [h for h in d.hints if "PyTorch's running_var" in h and "(n = 5)" in h], d.hints


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("cls", [faulty_engines.PaddingTopLeft, faulty_engines.FlattenChannelsFirst], ids=lambda c: c.name)
def test_with_torch_beside_numpy_the_majority_blames_the_slip(cls):
    text = CONV if cls is faulty_engines.PaddingTopLeft else POOLED
    d = run(text, cls, "torch").diagnosis
    assert d.engine == cls.name and set(d.agreeing) == {"numpy", "torch"}, d.sentence
    assert any(EXPECTED[cls.name][-1] in h for h in d.hints), d.hints
