"""manualprop fuzz: a fault injected into the NumPy engine is found, shrunk and written; random
cases raise no false alarm.

Finding and shrinking a fault runs hundreds of cases through torch (1 to 7 minutes a test since
the fuzzer draws conv, pooling and norm layers), and the 1,000-case false-alarm run about 9: they
are marked slow (`pytest -m slow tests/test_fuzz.py`, which .ci/run runs after the suite); the
suite keeps 100 random cases and the drawing tests."""

import importlib.util

import pytest
import yaml

from manualprop import cli
from manualprop.fuzz import fuzz
from manualprop.reference import activations

FRAMEWORK = next((n for n, m in (("torch", "torch"), ("keras", "keras")) if importlib.util.find_spec(m)), None)
needs_framework = pytest.mark.skipif(FRAMEWORK is None, reason="needs torch or keras as the reference")


@pytest.fixture
def wrong_tanh_derivative(monkeypatch):
    """The NumPy engine's tanh derivative written as 1 - a instead of 1 - a^2."""
    tanh = activations.ACTIVATIONS["tanh"]
    monkeypatch.setitem(activations.ACTIVATIONS, "tanh", activations.elementwise(tanh.forward, lambda z, a, alpha: 1 - a))


@pytest.mark.slow
@needs_framework
def test_fuzz_finds_an_injected_fault_and_writes_a_minimal_case_that_fails(wrong_tanh_derivative, tmp_path, capsys):
    out = tmp_path / "found"
    # One plain SGD step (--plain-sgd): the fault is in the tanh, and shrinking over optimizers and
    # steps would take minutes to reach the same one-layer case.
    args = ["fuzz", "--n", "60", "--seed", "1", "--out", str(out), "--engines", f"numpy,{FRAMEWORK}", "--plain-sgd"]
    assert cli.main(args) == 1
    (path,) = sorted(out.glob("*.yaml"))
    text = path.read_text()
    assert text.startswith("# Found by: manualprop fuzz --n 60 --seed 1")
    assert f"disagreement written to {path}" in capsys.readouterr().out
    data = yaml.safe_load(text)
    assert len(data["layers"]) == 1 and data["layers"][0]["activation"] == "tanh"  # shrunk: one layer, the faulty one
    assert data["layers"][0]["units"] == 1 and len(data["inputs"]) == 1 and len(data["inputs"][0]) == 1
    assert cli.main(["run", str(path), "--engines", f"numpy,{FRAMEWORK}"]) == 1  # the written case fails ...


@pytest.mark.slow
@needs_framework
def test_the_minimal_case_passes_once_the_fault_is_gone(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        tanh = activations.ACTIVATIONS["tanh"]
        patch.setitem(activations.ACTIVATIONS, "tanh", activations.elementwise(tanh.forward, lambda z, a, alpha: 1 - a))
        summary = fuzz(40, 2, tmp_path, ["numpy", FRAMEWORK], optimizers=False)
    assert summary.findings
    assert cli.main(["run", str(summary.findings[0].path), "--engines", f"numpy,{FRAMEWORK}"]) == 0  # ... because of the fault


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_random_cases_raise_no_false_alarm(seed, tmp_path, capsys):
    """100 random cases a seed, 1,000 in all, both dtypes, every installed engine, every optimizer
    and 1 to 5 steps, default tolerances (about 9 minutes of two cores: `pytest -m slow`)."""
    summary = fuzz(100, 1000 + seed, tmp_path)
    assert summary.cases == 100
    assert not summary.findings, [f"{f.path}: {f.sentence}\n{f.path.read_text()}" for f in summary.findings]
    with capsys.disabled():
        print(f"\n  seed {1000 + seed}: closest call {summary.closest:.1%} of the tolerance ({summary.closest_case})")


@pytest.mark.slow
@needs_framework
def test_a_pool_of_architectures_finds_the_fault_too(wrong_tanh_derivative, tmp_path):
    summary = fuzz(60, 3, tmp_path, ["numpy", FRAMEWORK], architectures=6, optimizers=False)
    assert summary.findings
    text = summary.findings[0].path.read_text()
    assert "--architectures 6" in text.splitlines()[0] and "tanh" in text
    assert cli.main(["run", str(summary.findings[0].path), "--engines", f"numpy,{FRAMEWORK}"]) == 1


def test_the_pool_is_the_same_for_the_same_seed_and_simplest_first():
    from manualprop.fuzz import pool

    first, again = pool(8, 42), pool(8, 42)
    assert first == again and len(first) == 8
    sizes = [(len(a["layers"]), sum(layer.get("units", layer.get("filters", 0)) for layer in a["layers"])) for a in first]
    assert sizes == sorted(sizes)


def test_the_fuzzer_draws_every_layer_type_and_loss_in_valid_cases():
    """Every declared layer type and loss is drawn, and every drawn case loads (valid architectures only)."""
    from hypothesis import HealthCheck, given, settings

    from manualprop import concepts
    from manualprop.casefile.case import case_from_data
    from manualprop.fuzz import case_data

    kinds, losses = set(), set()

    @settings(max_examples=300, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case_data(None, True))
    def draw(data):
        case = case_from_data(data, "fuzz.yaml")  # raises CaseError on an invalid architecture
        kinds.update(layer.kind for layer in case.layers)
        losses.add(case.loss)

    draw()
    assert kinds == set(concepts.LAYER_TYPES)
    assert losses == set(concepts.LOSSES)


@pytest.fixture
def flatten_channels_first(monkeypatch):
    """The NumPy engine's flatten in (c, h, w) order, the PyTorch porting slip."""
    from manualprop.reference import layers

    def forward(layer, a_prev, trace, acts):
        trace.A = a_prev.transpose(0, 3, 1, 2).reshape(a_prev.shape[0], -1)
        return trace.A

    def backward(layer, a_prev, trace, acts):
        n, h, w, c = a_prev.shape
        return trace.dA.reshape(n, c, h, w).transpose(0, 2, 3, 1)

    monkeypatch.setitem(layers.KINDS, "flatten", layers.Kind(forward, backward))


@pytest.mark.slow
@needs_framework
def test_fuzz_finds_a_flatten_in_the_other_order(flatten_channels_first, tmp_path):
    summary = fuzz(60, 5, tmp_path, ["numpy", FRAMEWORK], optimizers=False)
    assert summary.findings
    data = yaml.safe_load(summary.findings[0].path.read_text())
    assert any(layer.get("type") == "flatten" for layer in data["layers"])


def test_a_hundred_random_cases_raise_no_false_alarm(tmp_path):
    """The quick share of the false-alarm run above, in every run of the suite."""
    summary = fuzz(100, 999, tmp_path)
    assert summary.cases == 100
    assert not summary.findings, [f"{f.path}: {f.sentence}\n{f.path.read_text()}" for f in summary.findings]
