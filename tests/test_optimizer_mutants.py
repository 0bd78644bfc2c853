"""The optimizers' state, as the mutation run of manualprop/reference/optimizers.py found it unchecked (docs/mutation.md).

The state each optimizer keeps is what ``explain`` shows after every step, but the cases check only
the deltas, so a state kept where the configuration needs none (Adam's vmax without amsgrad, a
momentum buffer at momentum 0) went unseen. The reference is ``torch.optim``: after each step its
``state`` holds exactly the buffers the configuration needs (PyTorch's documented algorithms, the
ones SPEC section 7 writes), under its own names, computed by its own code.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from manualprop import concepts, harness, parse_case
from manualprop.reference import optimizers
from manualprop.reference.engine import NumpyEngine
from manualprop.verdict.outcomes import Status

torch = pytest.importorskip("torch")

# the formula's name of each state (manualprop.concepts) -> torch.optim's name for it
TORCH_NAME = {
    "b": "momentum_buffer",
    "m": "exp_avg",
    "v": "exp_avg_sq",
    "vmax": "max_exp_avg_sq",
    "s": "square_avg",
    "a": "grad_avg",
    "acc": "sum",
}

# (optimizer as a case writes it, torch.optim's class and its arguments for the same update)
SETTINGS = {
    "sgd": ({"name": "sgd"}, "SGD", {}),
    "sgd-weight-decay": ({"name": "sgd", "weight_decay": 0.1}, "SGD", {"weight_decay": 0.1}),
    "sgd-momentum": ({"name": "sgd", "momentum": 0.9}, "SGD", {"momentum": 0.9}),
    "sgd-nesterov": ({"name": "sgd", "momentum": 0.8, "nesterov": True}, "SGD", {"momentum": 0.8, "nesterov": True}),
    "adam": ({"name": "adam", "epsilon": 1e-8}, "Adam", {"eps": 1e-8}),
    "adam-amsgrad": (
        {"name": "adam", "beta2": 0.5, "epsilon": 1e-8, "amsgrad": True},
        "Adam",
        {"betas": (0.9, 0.5), "eps": 1e-8, "amsgrad": True},
    ),
    "adamw": ({"name": "adamw", "epsilon": 1e-8, "weight_decay": 0.1}, "AdamW", {"eps": 1e-8, "weight_decay": 0.1}),
    "adamw-amsgrad": (
        {"name": "adamw", "beta2": 0.5, "epsilon": 1e-8, "weight_decay": 0.1, "amsgrad": True},
        "AdamW",
        {"betas": (0.9, 0.5), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": True},
    ),
    "rmsprop": ({"name": "rmsprop", "rho": 0.9, "epsilon": 1e-7}, "RMSprop", {"alpha": 0.9, "eps": 1e-7}),
    "rmsprop-centered": (
        {"name": "rmsprop", "rho": 0.9, "epsilon": 1e-7, "centered": True},
        "RMSprop",
        {"alpha": 0.9, "eps": 1e-7, "centered": True},
    ),
    "rmsprop-momentum": (
        {"name": "rmsprop", "rho": 0.9, "epsilon": 1e-7, "momentum": 0.5},
        "RMSprop",
        {"alpha": 0.9, "eps": 1e-7, "momentum": 0.5},
    ),
    "rmsprop-centered-momentum": (
        {"name": "rmsprop", "rho": 0.8, "epsilon": 1e-7, "centered": True, "momentum": 0.5},
        "RMSprop",
        {"alpha": 0.8, "eps": 1e-7, "centered": True, "momentum": 0.5},
    ),
    "adagrad": (
        {"name": "adagrad", "initial_accumulator": 0.1, "epsilon": 1e-7},
        "Adagrad",
        {"initial_accumulator_value": 0.1, "eps": 1e-7},
    ),
}

P0 = np.array([[0.5, -1.25, 2.0], [0.75, -0.3, 1.1]])
GRADIENTS = [np.array([[0.4, -1.5, 0.2], [-0.7, 0.05, 1.3]]), np.array([[-0.3, -0.9, 0.6], [0.25, -0.45, 0.8]])]


def torch_steps(cls: str, kwargs: dict, lr: float) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The parameter and torch.optim's state (every tensor but the step count) after each step."""
    p = torch.nn.Parameter(torch.tensor(P0, dtype=torch.float64))
    opt = getattr(torch.optim, cls)([p], lr=lr, **kwargs)
    after = []
    for g in GRADIENTS:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        state = {k: v.detach().numpy().copy() for k, v in opt.state[p].items() if k != "step" and v is not None}
        after.append((p.detach().numpy().copy(), state))
    return after


@pytest.mark.parametrize("setting", SETTINGS)
def test_each_optimizer_keeps_the_state_torch_optim_keeps_and_no_other(setting):
    given, cls, kwargs = SETTINGS[setting]
    hyper = concepts.OPTIMIZERS[given["name"]].settings(given)
    lr = 0.05
    optimizer = optimizers.OPTIMIZERS[given["name"]]
    p, state = P0.copy(), optimizer.init(P0, hyper)
    assert all(v.shape == P0.shape and v.dtype == P0.dtype for v in state.values()), state
    for t, (g, (theirs_p, theirs)) in enumerate(zip(GRADIENTS, torch_steps(cls, kwargs, lr), strict=True), start=1):
        p = optimizer.update(p, g, state, t, lr, hyper)
        assert {TORCH_NAME[k] for k in state} == set(theirs), f"{setting}, step {t}: {sorted(state)} against {sorted(theirs)}"
        for k, v in state.items():
            np.testing.assert_allclose(v, theirs[TORCH_NAME[k]], rtol=1e-12, atol=0, err_msg=f"{setting}, step {t}: {k}")
        np.testing.assert_allclose(p, theirs_p, rtol=1e-12, atol=0, err_msg=f"{setting}, step {t}: the parameter")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zeros_keeps_a_conditional_state_only_when_its_hyperparameter_is_set(dtype):
    """``_zeros`` builds the states of the registry at import, where the mutation run cannot see
    which test reaches it (docs/mutation.md): called here at run time, on the contract its docstring
    states, with the names and conditions of the test above (Adam's and RMSprop's, from torch.optim)."""
    p = P0.astype(dtype)
    adam = optimizers._zeros("m", "v", "vmax", when={"vmax": "amsgrad"})
    rmsprop = optimizers._zeros("s", "a", "b", when={"a": "centered", "b": "momentum"})
    for init, hyper, kept in [
        (adam, {"amsgrad": False}, {"m", "v"}),
        (adam, {"amsgrad": True}, {"m", "v", "vmax"}),
        (rmsprop, {"centered": False, "momentum": 0.0}, {"s"}),
        (rmsprop, {"centered": True, "momentum": 0.0}, {"s", "a"}),
        (rmsprop, {"centered": False, "momentum": 0.5}, {"s", "b"}),
        (optimizers._zeros("acc"), {}, {"acc"}),
    ]:
        state = init(p, hyper)
        assert set(state) == kept, (hyper, sorted(state))
        for v in state.values():
            assert v.shape == p.shape and v.dtype == p.dtype and not v.any()
            assert v is not p


# A float32 step whose gradient is nonzero but whose square underflows to 0 (g = 2e-24, g^2 = 4e-48,
# below float32's smallest number, 1.4e-45), with an epsilon that is 0 in float32 (1e-50): each
# normalized update divides g by sqrt(0) + 0.
UNDERFLOW = """
dtype: float32
loss: mse
lr: 0.1
optimizer: OPTIMIZER
inputs: [[1.0e-12]]
targets: [[0.0]]
layers:
  - {units: 1, kernel: [[1.0]], bias: false}
"""


@pytest.mark.parametrize(
    "optimizer",
    [
        "{name: adam, epsilon: 1.0e-50}",
        "{name: rmsprop, rho: 0.9, epsilon: 1.0e-50}",
        "{name: adagrad, initial_accumulator: 0.0, epsilon: 1.0e-50}",
    ],
)
def test_a_division_by_zero_in_an_update_gives_inf_without_a_runtime_warning(optimizer):
    """Kills engine.xǁNumpyEngineǁstep__mutmut_3 and __mutmut_6 (np.errstate without divide="ignore"),
    equivalent while the step was one plain SGD step (nothing divided by zero), reachable since the
    optimizers. The value is torch.optim's (-inf, as ``harness.run_engine(case, "torch")`` gives);
    the harness reports it as NON-FINITE, and the engine must not also print NumPy's warning."""
    case = parse_case(UNDERFLOW.replace("OPTIMIZER", optimizer), "underflow.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = NumpyEngine().step(case)
    assert result.deltas["layers.0.kernel"].tolist() == [[-np.inf]]
    theirs = harness.run_engine(case, "torch")
    if theirs.status == Status.RAN:
        assert theirs.result.deltas["layers.0.kernel"].tolist() == [[-np.inf]]
