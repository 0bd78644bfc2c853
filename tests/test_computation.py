"""The computation is described once (manualprop.verdict.computation.walk): diagnose searches it, explain prints it."""

from pathlib import Path

import pytest

from manualprop import engines, harness, load_case, parse_case
from manualprop.verdict import computation, diagnose, explain
from manualprop.verdict.computation import Quantity, Step

import faulty_engines
from test_diagnose import CASE

BUNDLED = sorted((Path(__file__).resolve().parent.parent / "cases").rglob("*.yaml"))


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_quantity_diagnose_compares_is_shown_by_explain_in_the_same_order(path):
    case = load_case(path)
    compared = diagnose.order(case)
    shown = [s.step for s in explain.sections(harness.run_case(case, ["numpy"]))]
    assert len(set(shown)) == len(shown), "a quantity shown twice"
    assert [s for s in shown if s in set(compared)] == compared
    several = case.steps > 1 or not computation.plain_sgd(case)
    assert {s.step for s in shown if s.label != "updated" and (s.label != "delta" or s.step is not None)} == (
        set(range(case.steps)) if several else {None}
    )  # each optimization step's quantities carry its index
    for q in computation.comparable(case):  # what a diagnosis says of it, wherever it is blamed
        assert q.meaning and q.at.label in diagnose.BEFORE and q.phase in ("forward", "loss", "backward", "update"), q.at


def test_the_walk_follows_the_computation():
    case = parse_case(CASE, "three.yaml")
    labels = [(s.label, s.layer) for s in diagnose.order(case)]
    assert labels[:7] == [("Z", 0), ("A", 0), ("Z", 1), ("A", 1), ("Z", 2), ("A", 2), ("loss", None)]
    assert labels[7:13] == [("loss gradient", 2), ("dZ", 2), ("dW", 2), ("db", 2), ("dA", 1), ("dZ", 1)]
    assert labels[-6:] == [("delta", None)] * 6
    assert "updated" not in {s.label for s in diagnose.order(case)}  # derived from the delta, never searched
    shown = [s.step.label for s in explain.sections(harness.run_case(case, ["numpy"]))]
    assert shown[-2:] == ["updated", "delta"]


@pytest.mark.parametrize("cls", faulty_engines.ALL, ids=lambda c: c.name)
def test_explain_marks_the_quantity_diagnose_blames(cls):
    engines.register(cls.name, cls)
    try:
        result = harness.run_case(parse_case(CASE, "three.yaml"), ["numpy", cls.name])
    finally:
        engines.unregister(cls.name)
    marked = [s for s in explain.sections(result) if s.divergence]
    assert [s.step for s in marked] == [result.diagnosis.step]
    assert marked[0].divergence == f"first divergence: in {cls.name}"


def test_a_layer_kind_contributes_its_quantities_to_both(monkeypatch):
    class Noted(computation.Dense):
        def forward(self, case, i):
            extra = Quantity(Step("A again", i, "A"), f"layer {i}: A again", "A", "forward", "the activation again")
            return [*super().forward(case, i), extra]

    monkeypatch.setitem(computation.LAYER_KINDS, "dense", Noted())
    case = parse_case(CASE, "three.yaml")
    order = diagnose.order(case)
    assert [s for s in order if s.label == "A again"] == [Step("A again", i, "A") for i in range(3)]
    assert order.index(Step("A again", 1, "A")) == order.index(Step("A", 1, "A")) + 1
    headings = [s.heading for s in explain.sections(harness.run_case(case, ["numpy"]))]
    assert headings.index("layer 1: A again") == headings.index("layer 1 (tanh) forward: A") + 1
