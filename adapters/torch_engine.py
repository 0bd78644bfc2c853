"""The PyTorch engine: real ``nn.Linear`` layers and activation modules, a real loss module and
the real ``torch.optim`` optimizer, stepped ``case.steps`` times on the same batch the way a
PyTorch user would.

Conventions pinned here:

* ``nn.Linear`` keeps its weight as (out, in); the case and the report use (in, out).
  :func:`swap_layout` is the one place that converts, in both directions.
* ``nn.CrossEntropyLoss`` expects logits, not probabilities: for categorical cross-entropy the
  model ends at the last ``nn.Linear`` and the loss receives its pre-softmax output (the softmax
  is inside the loss). With probability targets it averages over samples, as the SPEC says.
* ``nn.MSELoss`` and ``nn.L1Loss`` reduce over every element, which is the SPEC's mean and sum.
* ``nn.LeakyReLU`` gets the case's slope explicitly (PyTorch's default is 0.01).
* Every hyperparameter is passed explicitly from the case (none of PyTorch's defaults is relied
  on): RMSprop's ``alpha`` is the SPEC's ``rho``, Adagrad's ``initial_accumulator_value`` its
  ``initial_accumulator``. PyTorch puts epsilon where the SPEC does (its formulas are PyTorch's).
  ``nesterov`` is passed only with a momentum: PyTorch refuses it without one, and with momentum
  0 the SPEC's Nesterov update is the plain one.
* The optimizer is built for every case, never cached with the modules: its state (momentum
  buffers, moments, Adagrad's accumulator, which PyTorch fills when it is built) belongs to one
  run of one case.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np

from manualprop import Case
from manualprop.concepts import LOSSES
from manualprop.engines import BuildCache, LayerTrace, StepRecord, StepResult

# The extra, and the CPU build first: a bare `pip install torch` on a machine without a GPU
# downloads a CUDA build of several GB.
INSTALL = (
    'pip install "manualprop[torch]"; without a GPU, first the CPU build: '
    "pip install torch --index-url https://download.pytorch.org/whl/cpu"
)
SMALL_STEP = 2**20  # multiply-adds of the forward pass under which a step uses one thread


# The module of every declared activation and loss (manualprop.concepts), by name: (nn, alpha) -> module.
ACTIVATION = {
    "linear": lambda nn, alpha: nn.Identity(),
    "sigmoid": lambda nn, alpha: nn.Sigmoid(),
    "tanh": lambda nn, alpha: nn.Tanh(),
    "relu": lambda nn, alpha: nn.ReLU(),
    "leaky_relu": lambda nn, alpha: nn.LeakyReLU(negative_slope=alpha),
    "softmax": lambda nn, alpha: nn.Softmax(dim=1),
}
LOSS = {"mse": lambda nn: nn.MSELoss, "mae": lambda nn: nn.L1Loss, "categorical_crossentropy": lambda nn: nn.CrossEntropyLoss}
# The optimizer of every declared optimizer, by name: (torch.optim, parameters, lr, case.hyper) -> optimizer.
OPTIMIZER = {
    "sgd": lambda optim, params, lr, hp: optim.SGD(
        params, lr=lr, momentum=hp["momentum"], nesterov=bool(hp["nesterov"] and hp["momentum"]), weight_decay=hp["weight_decay"]
    ),
    "adam": lambda optim, params, lr, hp: optim.Adam(
        params, lr=lr, betas=(hp["beta1"], hp["beta2"]), eps=hp["epsilon"], weight_decay=0.0, amsgrad=hp["amsgrad"]
    ),
    "adamw": lambda optim, params, lr, hp: optim.AdamW(
        params, lr=lr, betas=(hp["beta1"], hp["beta2"]), eps=hp["epsilon"], weight_decay=hp["weight_decay"], amsgrad=hp["amsgrad"]
    ),
    "rmsprop": lambda optim, params, lr, hp: optim.RMSprop(
        params, lr=lr, alpha=hp["rho"], eps=hp["epsilon"], weight_decay=0.0, momentum=hp["momentum"], centered=hp["centered"]
    ),
    "adagrad": lambda optim, params, lr, hp: optim.Adagrad(
        params, lr=lr, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=hp["initial_accumulator"], eps=hp["epsilon"]
    ),
}
# PyTorch's name of each piece of optimizer state -> the SPEC's (manualprop.concepts); "step" is not state of the formulas.
STATE = {
    "momentum_buffer": "b",
    "exp_avg": "m",
    "exp_avg_sq": "v",
    "max_exp_avg_sq": "vmax",
    "square_avg": "s",
    "grad_avg": "a",
    "sum": "acc",
}


def _work(case: Case) -> int:
    return case.inputs.shape[0] * sum(layer.kernel.size for layer in case.layers)


def swap_layout(array: np.ndarray) -> np.ndarray:
    """Kernel (in, out) <-> ``nn.Linear.weight`` (out, in), always a copy: a view of a (1, n)
    weight would otherwise change with the parameter at the next step."""
    return np.array(np.asarray(array).T, order="C", copy=True)


class TorchEngine:
    name = "torch"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return f"torch is not installed (install it with: {INSTALL})"
        return None

    def __init__(self, cache_size: int = 64):
        self.models = BuildCache(cache_size)

    def step(self, case: Case) -> StepResult:
        import torch

        # A small step runs on one intra-op thread: for tensors this size the thread pool's
        # hand-offs cost far more than the arithmetic (measured here: 2 ms against 60 ms when the
        # other core is busy). Large steps keep torch's own setting; the setting is restored.
        threads = torch.get_num_threads()
        if _work(case) < SMALL_STEP:
            torch.set_num_threads(1)
        try:
            return self._step(torch, case)
        finally:
            torch.set_num_threads(threads)

    def _step(self, torch, case: Case) -> StepResult:
        built = self.built(torch, case)
        with torch.no_grad():
            for layer, linear in zip(case.layers, built.linears, strict=True):
                linear.weight.copy_(torch.from_numpy(swap_layout(layer.kernel)))
                if layer.bias is not None:
                    linear.bias.copy_(torch.from_numpy(layer.bias))
        named = _parameters(built.linears)  # name -> (tensor, is a kernel)
        # Built here, for this case only, with its hyperparameters: no state survives from another case.
        optimizer = OPTIMIZER[case.optimizer](torch.optim, [p for p, _ in named.values()], case.lr, case.hyper)
        inputs, targets = torch.from_numpy(case.inputs), torch.from_numpy(case.targets)

        initial = case.parameters()
        before = initial
        history = []
        for _ in range(case.steps):
            built.outputs.clear()
            optimizer.zero_grad(set_to_none=True)
            loss = case.scale * built.criterion(built.model(inputs), targets)
            loss.backward()
            trace = _trace(torch, case, built.modules, built.linears, built.outputs)
            optimizer.step()
            after = {name: _array(p, kernel) for name, (p, kernel) in named.items()}
            history.append(
                StepRecord(
                    float(loss.item()), {name: after[name] - before[name] for name in after}, _state(optimizer, named), trace
                )
            )
            before = after
        deltas = {name: before[name] - initial[name] for name in initial}
        return StepResult(loss=history[0].loss, deltas=deltas, trace=history[0].trace, history=history)

    def built(self, torch, case: Case) -> _Built:
        """The modules and loss for the case's architecture: built once, then reused (the weights
        are loaded for every case; the optimizer, which has state, is built for every case)."""
        key = (
            case.dtype.name,
            case.inputs.shape[1],
            tuple((layer.units, layer.activation, layer.alpha, layer.bias is not None) for layer in case.layers),
            case.loss,
            case.reduction,
        )
        return self.models.get(key, lambda: _build(torch, case))


@dataclass
class _Built:
    model: Any  # a torch.nn.Sequential; the framework's objects are used dynamically here
    linears: list
    modules: list
    criterion: Any  # the loss module
    outputs: dict  # id(module) -> its output in the last step, with its gradient retained


def _build(torch, case: Case) -> _Built:
    from torch import nn

    dtype = {"float32": torch.float32, "float64": torch.float64}[case.dtype.name]
    on_logits = LOSSES[case.loss].on_logits  # the last activation is inside the loss module
    linears, modules = [], []
    for i, layer in enumerate(case.layers):
        linear = nn.Linear(layer.kernel.shape[0], layer.units, bias=layer.bias is not None, dtype=dtype)
        linears.append(linear)
        modules.append(linear)
        last = i == len(case.layers) - 1
        if not (last and on_logits):  # CrossEntropyLoss takes logits
            modules.append(ACTIVATION[layer.activation](nn, layer.alpha))
    model = nn.Sequential(*modules)
    outputs: dict[int, object] = {}

    # Hooks keep each layer's Z (nn.Linear's output) and A (the activation module's output) with
    # their gradients, for the per-layer trace; they change nothing in the step.
    def keep(module, inputs, output):
        output.retain_grad()
        outputs[id(module)] = output

    for m in modules:
        m.register_forward_hook(keep)
    return _Built(model, linears, modules, LOSS[case.loss](nn)(reduction=case.reduction), outputs)


def _parameters(linears: list) -> dict[str, tuple[object, bool]]:
    """Every parameter by the SPEC's name, with whether it is a kernel (kept (out, in) by torch)."""
    named = {}
    for i, linear in enumerate(linears):
        named[f"layers.{i}.kernel"] = (linear.weight, True)
        if linear.bias is not None:
            named[f"layers.{i}.bias"] = (linear.bias, False)
    return named


def _array(tensor, kernel: bool) -> np.ndarray:
    """A copy of a parameter-shaped tensor, kernels in the (in, out) layout."""
    values = tensor.detach().numpy()
    return swap_layout(values) if kernel else values.copy()


def _state(optimizer, named: dict[str, tuple[object, bool]]) -> dict[str, dict[str, np.ndarray]]:
    """The optimizer's state of every parameter, in the SPEC's names (b, m, v, vmax, s, a, acc),
    kernels' state in the (in, out) layout; what PyTorch does not keep (no momentum) is absent."""
    return {
        name: {
            STATE[key]: _array(value, kernel) for key, value in optimizer.state[p].items() if key in STATE and value is not None
        }
        for name, (p, kernel) in named.items()
    }


def _trace(torch, case: Case, modules: list, linears: list, outputs: dict) -> list[LayerTrace]:
    """Per layer Z, A and their gradients from the hooks; dW and db from the parameters' .grad."""

    def array(tensor):
        return None if tensor is None else tensor.detach().numpy().copy()

    trace = []
    for linear in linears:
        z = outputs[id(linear)]
        position = modules.index(linear)
        activation = modules[position + 1] if position + 1 < len(modules) else None
        a = outputs[id(activation)] if activation is not None else torch.softmax(z, dim=1)  # CE's softmax is in the loss
        trace.append(
            LayerTrace(
                Z=array(z),
                A=array(a),
                dA=array(a.grad) if activation is not None else None,
                dZ=array(z.grad),
                dW=swap_layout(linear.weight.grad.numpy()),
                db=array(linear.bias.grad) if linear.bias is not None else None,
            )
        )
    return trace
