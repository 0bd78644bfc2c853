"""The PyTorch adapter's optimizers and steps (SPEC section 7): the real ``torch.optim`` classes,
configured from the case, their state reported in the SPEC's names, nothing kept between cases.

These check the adapter against the NumPy reference engine (engine against engine); the formulas
themselves are checked against an independent implementation of the SPEC elsewhere."""

import numpy as np
import pytest

from manualprop import parse_case
from manualprop.reference.engine import NumpyEngine

pytest.importorskip("torch")

# 4 -> 5 -> 1: non-square kernels (a transposed state would not even have the right shape), and a
# (1, 5) weight, whose transpose is contiguous (a view of it would change with the parameter).
NETWORK = """
name: {name}
dtype: {dtype}
seed: 7
loss: mse
lr: {lr}
inputs: {{random: uniform, shape: [3, 4], low: -1, high: 1}}
targets: {{random: normal}}
optimizer: {optimizer}
steps: 3
layers:
  - {{units: 5, activation: tanh, kernel: {{random: normal, std: {std}}}, bias: {{random: normal, std: 0.1}}}}
  - {{units: 1, activation: linear, kernel: {{random: normal, std: 0.5}}, bias: [0.2]}}
"""

# Every optimizer and option the SPEC names, with settings away from PyTorch's defaults (a
# hyperparameter left at PyTorch's default instead of the case's would show), and the state
# PyTorch keeps for it, in the SPEC's names.
OPTIONS = {
    "sgd": ("sgd", set()),
    "sgd-momentum": ("{name: sgd, momentum: 0.9}", {"b"}),
    "sgd-nesterov-decay": ("{name: sgd, momentum: 0.8, nesterov: true, weight_decay: 0.05}", {"b"}),
    "adam": ("{name: adam, beta1: 0.8, beta2: 0.99, epsilon: 1.0e-3}", {"m", "v"}),
    "adam-amsgrad": ("{name: adam, beta1: 0.8, beta2: 0.99, epsilon: 1.0e-3, amsgrad: true}", {"m", "v", "vmax"}),
    "adamw": ("{name: adamw, beta1: 0.8, beta2: 0.99, epsilon: 1.0e-3, weight_decay: 0.1}", {"m", "v"}),
    "rmsprop": ("{name: rmsprop, rho: 0.9, epsilon: 1.0e-3}", {"s"}),
    "rmsprop-centered-momentum": ("{name: rmsprop, rho: 0.9, epsilon: 1.0e-3, momentum: 0.5, centered: true}", {"s", "a", "b"}),
    "adagrad": ("{name: adagrad, initial_accumulator: 0.1, epsilon: 1.0e-3}", {"acc"}),
}
# Another case of the same architecture for each: the same optimizer with other settings, weights
# and learning rate, then a different optimizer.
OTHER_SETTINGS = {
    "sgd": "{name: sgd, momentum: 0.5}",
    "sgd-momentum": "{name: sgd, momentum: 0.3, nesterov: true}",
    "sgd-nesterov-decay": "{name: sgd, momentum: 0.99, weight_decay: 0.5}",
    "adam": "{name: adam, beta1: 0.5, beta2: 0.9, epsilon: 0.1, amsgrad: true}",
    "adam-amsgrad": "{name: adam, beta1: 0.5, beta2: 0.9, epsilon: 0.1}",
    "adamw": "{name: adamw, epsilon: 0.1, weight_decay: 0.9, amsgrad: true}",
    "rmsprop": "{name: rmsprop, rho: 0.5, epsilon: 0.1, momentum: 0.9, centered: true}",
    "rmsprop-centered-momentum": "{name: rmsprop, rho: 0.5, epsilon: 0.1}",
    "adagrad": "{name: adagrad, initial_accumulator: 2.0, epsilon: 0.1}",
}


def case(option: str, dtype: str = "float64", optimizer: str | None = None, lr: float = 0.1, std: float = 0.5):
    text = NETWORK.format(name=option, dtype=dtype, lr=lr, std=std, optimizer=optimizer or OPTIONS[option][0])
    return parse_case(text, f"{option}.yaml")


def torch_engine():
    from manualprop.adapters.torch_engine import TorchEngine

    return TorchEngine()


@pytest.mark.parametrize("option", OPTIONS)
def test_a_case_run_after_another_gives_bit_identical_results_to_a_fresh_engine(option):
    """The build cache keeps the modules per architecture; no optimizer state or setting of a
    previous case may reach the next one."""
    for dtype in ("float32", "float64"):
        target = case(option, dtype)
        same_optimizer = case(option, dtype, OTHER_SETTINGS[option], lr=0.37, std=1.5)
        other_optimizer = case(
            option,
            dtype,
            "{name: adagrad, initial_accumulator: 5.0, epsilon: 0.5}"
            if not option.startswith("adagrad")
            else "{name: sgd, momentum: 0.9}",
            lr=0.05,
        )
        reused = torch_engine()
        after = [reused.step(same_optimizer), reused.step(target), reused.step(other_optimizer), reused.step(target)]
        fresh = torch_engine().step(target)
        assert len(reused.models) == 1  # one architecture: the modules were reused every time
        for again in (after[1], after[3]):
            assert again.losses == fresh.losses
            for name, delta in fresh.deltas.items():
                assert delta.dtype == np.dtype(dtype)
                assert again.deltas[name].tobytes() == delta.tobytes(), (dtype, name)
            for mine, theirs in zip(again.history, fresh.history, strict=True):
                assert mine.state.keys() == theirs.state.keys()
                for name, state in theirs.state.items():
                    assert {k: v.tobytes() for k, v in mine.state[name].items()} == {k: v.tobytes() for k, v in state.items()}
        # The other cases really were other steps: had they matched the target, this test proves nothing.
        assert all(
            other.deltas["layers.0.kernel"].tobytes() != fresh.deltas["layers.0.kernel"].tobytes()
            for other in (after[0], after[2])
        )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("option", OPTIONS)
def test_each_optimizer_agrees_with_the_reference_engine_step_by_step(option, dtype):
    target = case(option, dtype)
    reference, result = NumpyEngine().step(target), torch_engine().step(target)
    rtol, atol = target.rtol, target.atol

    assert len(result.history) == target.steps == 3
    np.testing.assert_allclose(result.losses, reference.losses, rtol=rtol, atol=atol)
    assert result.loss == result.losses[0]
    assert result.deltas.keys() == reference.deltas.keys()
    for name, delta in reference.deltas.items():
        assert result.deltas[name].shape == delta.shape and result.deltas[name].dtype == np.dtype(dtype)
        np.testing.assert_allclose(result.deltas[name], delta, rtol=rtol, atol=atol, err_msg=name)
        assert np.any(delta != 0)

    expected_state = OPTIONS[option][1]
    for t, (mine, theirs) in enumerate(zip(result.history, reference.history, strict=True), start=1):
        for name, delta in theirs.deltas.items():  # each step's own change
            np.testing.assert_allclose(mine.deltas[name], delta, rtol=rtol, atol=atol, err_msg=f"step {t} {name}")
        assert mine.state.keys() == theirs.state.keys()
        for name, state in mine.state.items():
            assert set(state) == expected_state, (t, name)
            for key, value in state.items():  # kernels' state in the (in, out) layout, as the reference's
                assert value.shape == theirs.state[name][key].shape, (t, name, key)
                np.testing.assert_allclose(value, theirs.state[name][key], rtol=rtol, atol=atol, err_msg=f"step {t} {name} {key}")
        # That step's trace, not the first step's: the gradient at the parameters of step t.
        assert mine.trace is not None and len(mine.trace) == len(target.layers)
        for layer, (mine_layer, theirs_layer) in enumerate(zip(mine.trace, theirs.trace, strict=True)):
            np.testing.assert_allclose(mine_layer.dW, theirs_layer.dW, rtol=rtol, atol=atol, err_msg=f"step {t} layer {layer} dW")
    assert result.trace is result.history[0].trace
    assert np.any(result.history[2].trace[0].dW != result.history[0].trace[0].dW)
