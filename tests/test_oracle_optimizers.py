"""The oracle's optimizers and steps, against the NumPy reference, and the honesty of its uncertainty.

The oracle (``numeric``) writes SPEC section 7's updates on its own, in MPFR with interval
bounds, and takes every gradient by central differences: it shares no line with
``manualprop.reference.optimizers`` or ``manualprop.reference.engine``, so agreeing with the NumPy reference on every
optimizer and option checks both. Its stated uncertainty is then held against what it claims
to cover: the same run with every gradient moved to the edge of its stated uncertainty (which
an honest bound must contain, through Adam's quotient near epsilon and a gradient of unknown
sign), a one-sided convention at a relu kink, and, for its bounded arithmetic, exact values
sampled within the bounds of each operation and of each update.
"""

import json

import gmpy2
import numpy as np
import pytest

from manualprop import parse_case
from manualprop.oracle import NumericEngine, differences
from manualprop.reference.engine import NumpyEngine
from manualprop.verdict.compare import compare, tolerated

NETWORK = """
dtype: float64
seed: 7
loss: mse
lr: 0.2
inputs: {random: uniform, shape: [4, 3], low: -1, high: 1}
targets: {random: normal}
layers:
  - {units: 4, activation: tanh, init: glorot_normal, bias: {random: normal, std: 0.1}}
  - {units: 2, activation: sigmoid, init: glorot_normal, bias: {random: normal, std: 0.1}}
"""

# Every optimizer and option of SPEC section 7, two or three steps each. amsgrad with beta2 0.6,
# so that v falls below its running maximum within the steps and the max is exercised.
SETTINGS = {
    "sgd": ("sgd", 3),
    "sgd-momentum": ("{name: sgd, momentum: 0.9}", 3),
    "sgd-nesterov-weight-decay": ("{name: sgd, momentum: 0.8, nesterov: true, weight_decay: 0.05}", 3),
    "adam": ("{name: adam, epsilon: 1.0e-8}", 3),
    "adam-amsgrad": ("{name: adam, beta1: 0.8, beta2: 0.6, epsilon: 1.0e-8, amsgrad: true}", 3),
    "adamw": ("{name: adamw, epsilon: 1.0e-8, weight_decay: 0.1}", 2),
    "rmsprop": ("{name: rmsprop, rho: 0.9, epsilon: 1.0e-7}", 3),
    "rmsprop-centered-momentum": ("{name: rmsprop, rho: 0.8, epsilon: 1.0e-7, centered: true, momentum: 0.5}", 3),
    "adagrad": ("{name: adagrad, initial_accumulator: 0.1, epsilon: 1.0e-7}", 2),
}


def _case(setting: str):
    optimizer, steps = SETTINGS[setting]
    return parse_case(NETWORK + f"optimizer: {optimizer}\nsteps: {steps}\n", f"{setting}.yaml")


def test_the_oracle_imports_nothing_of_the_numpy_reference():
    """Not its engine, optimizers, activations or losses: the oracle's maths is its own."""
    import ast
    from pathlib import Path

    import manualprop.oracle

    reference = {"engine", "optimizers", "activations", "losses"}
    for path in Path(manualprop.oracle.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                words = (node.module or "").split(".") + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                words = [w for a in node.names for w in a.name.split(".")]
            else:
                continue
            assert not reference & set(words), f"{path.name} imports {words}"


@pytest.fixture(scope="module")
def runs():
    """Each setting run once by the oracle and by the NumPy reference."""
    return {s: (case, NumericEngine().step(case), NumpyEngine().step(case)) for s in SETTINGS for case in [_case(s)]}


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_oracle_agrees_with_the_numpy_reference(runs, setting):
    case, oracle, reference = runs[setting]
    initial = case.parameters()
    assert len(oracle.history) == len(reference.history) == case.steps
    for name, before in initial.items():
        c = compare(name, "numeric", oracle.deltas[name], "numpy", reference.deltas[name], case.rtol, case.atol, reference=before)
        assert c.ok, c.message
    for t, (mine, theirs) in enumerate(zip(oracle.history, reference.history, strict=True), start=1):
        c = compare("loss", "numeric", np.array(mine.loss), "numpy", np.array(theirs.loss), case.rtol, case.atol)
        assert c.ok, f"step {t}: {c.message}"
        for name, before in initial.items():
            c = compare(name, "numeric", mine.deltas[name], "numpy", theirs.deltas[name], case.rtol, case.atol, reference=before)
            assert c.ok, f"step {t}: {c.message}"
            for key, value in mine.state[name].items():
                c = compare(f"{name} {key}", "numeric", value, "numpy", theirs.state[name][key], case.rtol, case.atol)
                assert c.ok, f"step {t}: {c.message}"


def test_amsgrad_is_exercised(runs):
    """The amsgrad setting is one where the running maximum differs from v: its max is checked."""
    _, oracle, _ = runs["adam-amsgrad"]
    last = oracle.history[-1].state
    assert any(np.any(s["vmax"] > s["v"]) for s in last.values())


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_stated_uncertainty_is_far_below_the_float64_tolerance(runs, setting):
    case, oracle, _ = runs[setting]
    for name, before in case.parameters().items():
        allowed = tolerated(case.rtol, case.atol, oracle.deltas[name], before)
        assert np.all(oracle.uncertainty[name] > 0)
        assert np.all(oracle.uncertainty[name] <= 0.01 * allowed), name


def test_one_plain_sgd_step_states_lr_times_the_gradients_uncertainty():
    case = parse_case(NETWORK, "plain.yaml")
    result = NumericEngine().step(case)
    assert len(result.history) == 1 and result.history[0].state == {name: {} for name in case.parameters()}
    for i, layer in enumerate(result.trace):
        for field, name in (("dW", f"layers.{i}.kernel"), ("db", f"layers.{i}.bias")):
            assert np.array_equal(result.uncertainty[name], case.lr * layer.uncertainty[field])
            np.testing.assert_allclose(result.deltas[name], -case.lr * getattr(layer, field), rtol=1e-15)


# --- the uncertainty covers the gradients' worst admissible errors ---------------------------

INPUTS = [[0.5, -1.0], [1.5, 0.25]]
KERNEL = [[0.5, -0.25], [0.25, 0.75]]
BIAS = [0.125, -0.5]


def _two_units(activation: str, targets: np.ndarray, optimizer: str, steps: int):
    return parse_case(
        f"""
dtype: float64
loss: mse
lr: 0.01
inputs: {json.dumps(INPUTS)}
targets: {json.dumps(targets.tolist())}
layers:
  - {{units: 2, activation: {activation}, kernel: {json.dumps(KERNEL)}, bias: {json.dumps(BIAS)}}}
optimizer: {optimizer}
steps: {steps}
""",
        f"{activation}.yaml",
    )


def _near_epsilon(epsilon: float):
    """Adam where unit 1 nearly fits its targets: its gradients are about epsilon."""
    z = np.array(INPUTS) @ np.array(KERNEL) + np.array(BIAS)
    targets = np.tanh(z)
    targets[:, 0] = [0.9, -0.7]
    targets[:, 1] += 2 * epsilon
    return _two_units("tanh", targets, f"{{name: adam, epsilon: {epsilon!r}}}", 3)


def _exact_fit():
    """Adam where unit 1 fits its targets exactly (dyadic numbers, linear): its gradient is 0,
    which the oracle can tell only within its uncertainty, so the sign of g is unknown to it;
    epsilon far below that uncertainty makes the step +-lr or 0 depending on that sign."""
    z = np.array(INPUTS) @ np.array(KERNEL) + np.array(BIAS)
    targets = z.copy()
    targets[:, 0] = [0.9, -0.7]
    return _two_units("linear", targets, "{name: adam, epsilon: 1.0e-30}", 2)


def _edge_of_uncertainty(monkeypatch, case, sign):
    """The oracle's run with every gradient moved by ``sign()`` times its own stated uncertainty."""
    central_bound = differences.central_bound

    def moved(loss, x, base):
        slope, error = central_bound(loss, x, base)
        return slope + sign() * error, error

    with monkeypatch.context() as m:
        m.setattr(differences, "central_bound", moved)
        return NumericEngine().step(case)


SIGNS = {"+": lambda rng: 1, "-": lambda rng: -1, "random": lambda rng: rng.choice([-1, 1])}


@pytest.mark.parametrize("signs", SIGNS)
@pytest.mark.parametrize("build", [lambda: _near_epsilon(1e-8), _exact_fit], ids=["g-near-epsilon", "g-of-unknown-sign"])
def test_the_uncertainty_covers_gradients_at_the_edge_of_theirs(monkeypatch, build, signs):
    case = build()
    result = NumericEngine().step(case)
    rng = np.random.default_rng(1)
    edge = _edge_of_uncertainty(monkeypatch, case, lambda: SIGNS[signs](rng))
    moved_most = 0.0
    for name, delta in result.deltas.items():
        shift = np.abs(edge.deltas[name] - delta)
        assert np.all(shift <= result.uncertainty[name]), (name, shift, result.uncertainty[name])
        moved_most = max(moved_most, float(np.max(shift / (case.lr * 1e-16))))
    # Nothing trivial: lr * 1e-16 is about lr times the largest gradient uncertainty here,
    # what a bound that forgot the update's sensitivity would state.
    assert moved_most > 1e3


def test_the_near_epsilon_case_is_near_epsilon():
    reference = NumpyEngine().step(_near_epsilon(1e-8))
    db = reference.trace[0].db
    assert 1e-9 < abs(db[1]) < 1e-7 and abs(db[0]) > 1e-2


def test_a_gradient_of_unknown_sign_costs_a_step_of_lr_and_covers_the_reference():
    case = _exact_fit()
    result, reference = NumericEngine().step(case), NumpyEngine().step(case)
    assert np.all(reference.deltas["layers.0.bias"][1] == 0) and np.all(reference.deltas["layers.0.kernel"][:, 1] == 0)
    assert case.lr <= result.uncertainty["layers.0.bias"][1] <= 2 * case.steps * case.lr * 1.01
    for name, before in case.parameters().items():
        c = compare(
            name,
            "numeric",
            result.deltas[name],
            "numpy",
            reference.deltas[name],
            case.rtol,
            case.atol,
            reference=before,
            allowance=result.uncertainty[name],
        )
        assert c.ok, c.message
    # The well-determined unit keeps a small uncertainty.
    assert result.uncertainty["layers.0.bias"][0] < 1e-3 * tolerated(
        case.rtol, case.atol, result.deltas["layers.0.bias"][0], 0.125
    )


def test_a_relu_kink_covers_the_one_sided_convention_through_adam():
    """relu at exactly 0: the central difference averages the two slopes, NumPy takes relu'(0) = 0;
    through two Adam steps the oracle's uncertainty still covers NumPy's deltas."""
    case = parse_case(
        """
dtype: float64
loss: mse
lr: 0.25
inputs: [[1, 2], [2, -1]]
targets: [[1, -1], [0, 2]]
layers:
  - {units: 3, activation: relu, kernel: [[1, -2, 0.5], [-0.5, 1, 0.25]], bias: false}
  - {units: 2, activation: linear, kernel: [[1, -1], [0.5, 2], [-1, 0.25]], bias: [0.5, -0.5]}
optimizer: {name: adam, epsilon: 1.0e-8}
steps: 2
""",
        "kink.yaml",
    )
    result, reference = NumericEngine().step(case), NumpyEngine().step(case)
    far = False
    for name, before in case.parameters().items():
        plain = compare(
            name, "numeric", result.deltas[name], "numpy", reference.deltas[name], case.rtol, case.atol, reference=before
        )
        far = far or not plain.ok
        c = compare(
            name,
            "numeric",
            result.deltas[name],
            "numpy",
            reference.deltas[name],
            case.rtol,
            case.atol,
            reference=before,
            allowance=result.uncertainty[name],
        )
        assert c.ok, c.message
    assert far  # the conventions really differ here: only the stated uncertainty reconciles them


# --- the bounded arithmetic of the updates contains every value it claims to ----------------

GRADIENTS = (  # per element: the gradient at steps 1 and 2, and the radius each is known within
    [[0.5, -2.0, 1e-9, -3e-8, 0.0, 0.3, 4e-8], [0.45, 1.0, 2e-9, -1e-8, 0.0, -0.2, 5e-9]],
    [[0.25, 1e-3, 2e-9, 1e-8, 1e-18, 0.4, 1e-12], [0.1, 1.5, 5e-9, 2e-8, 1e-18, 0.3, 1e-12]],
)


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_update_bounds_hold_every_gradient_within_them(setting):
    """Two steps of the oracle's update on bounded gradients (some straddling 0, some near epsilon,
    some wide), against the same update run on exact gradients sampled in those bounds: every
    sampled outcome lies within the bounds stated for it."""
    from manualprop.oracle.maths import PRECISION, to_float64
    from manualprop.oracle.updates import UPDATES, Bounded

    case = _case(setting)
    update, hp = UPDATES[case.optimizer], case.hyper
    values, radii = (np.array(a, dtype=np.float64) for a in GRADIENTS)
    with gmpy2.context(precision=PRECISION):
        lr = gmpy2.mpfr(case.lr)
        p0 = Bounded(np.array([gmpy2.mpfr(x) for x in np.linspace(-1, 1, values.shape[1])], dtype=object))

        def run(gradients: list) -> Bounded:
            state, p, total = {}, p0, None
            for t, g in enumerate(gradients, start=1):
                d = update(p, g, state, t, hp)
                total = d if total is None else total + d
                p = p0 - lr * total
            return total

        def mp(a):
            return np.array([gmpy2.mpfr(float(x)) for x in a], dtype=object)

        bounded = run([Bounded.uncertain(mp(values[t]), mp(radii[t]), t + 1) for t in range(2)])
        lower, upper = to_float64(bounded.lower), to_float64(bounded.upper)
        assert np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))
        rng = np.random.default_rng(3)
        corners = [(a, b) for a in (-1, -0.5, 0, 0.5, 1) for b in (-1, 0, 1)]
        for signs in corners + [tuple(rng.uniform(-1, 1, size=2)) for _ in range(20)]:
            exact = run([Bounded(mp(values[t]) + gmpy2.mpfr(signs[t]) * mp(radii[t])) for t in range(2)])
            inside = (exact.x >= bounded.lower) & (exact.x <= bounded.upper)
            assert np.all(inside), (signs, to_float64(exact.x), lower, upper)


OPERATIONS = {
    "x * y": lambda x, y: x * y,
    "x * x": lambda x, y: x * x,
    "x^2": lambda x, y: x.square(),
    "sqrt(x^2 + y^2)": lambda x, y: (x.square() + y.square()).sqrt(),
    "sqrt(|x|)": lambda x, y: x.square().sqrt().sqrt(),
    "x / (y^2 + 1)": lambda x, y: x / (y.square() + 1),
    "x / sqrt(x^2 + 1e-4)": lambda x, y: x / ((x.square() + 1e-4).sqrt()),
    "(x + y) / (x - y + 5)": lambda x, y: (x + y) / (x - y + 5),
    "max(x, y)": lambda x, y: x.maximum(y),
    "max(x^2, 0.3)": lambda x, y: x.square().maximum(y * 0 + 0.3),
}


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("shared", [True, False], ids=["one-error", "two-errors"])
def test_every_bounded_operation_contains_its_exact_values(operation, shared):
    """Wide bounds (up to the size of the value, straddling 0), the two operands sharing one error
    or each with its own: the operation's bounds hold its value at every sampled exact operand."""
    from manualprop.oracle.maths import PRECISION
    from manualprop.oracle.updates import Bounded

    f = OPERATIONS[operation]
    xs, rx = [0.8, -0.3, 0.05, 2.0, 0.0], [0.5, 0.4, 0.1, 1e-3, 0.2]
    ys, ry = [0.2, 0.6, -1.0, 1.5, 0.1], [0.3, 0.1, 0.5, 0.25, 0.05]
    with gmpy2.context(precision=PRECISION):

        def mp(a):
            return np.array([gmpy2.mpfr(v) for v in a], dtype=object)

        x = Bounded.uncertain(mp(xs), mp(rx), 1)
        y = Bounded.uncertain(mp(ys), mp(ry), 1 if shared else 2)
        bounded = f(x, y)
        assert np.all(bounded.radius < gmpy2.inf())
        rng = np.random.default_rng(5)
        samples = [(a, b) for a in (-1, -0.5, 0, 0.5, 1) for b in (-1, 0, 1)] + [tuple(rng.uniform(-1, 1, 2)) for _ in range(30)]
        for a, b in samples:
            b = a if shared else b
            exact = f(Bounded(mp(xs) + gmpy2.mpfr(a) * mp(rx)), Bounded(mp(ys) + gmpy2.mpfr(b) * mp(ry)))
            assert np.all((exact.x >= bounded.lower) & (exact.x <= bounded.upper)), (a, b)
