"""The PyTorch engine: real ``nn.Linear`` layers and activation modules, a real loss module and
``torch.optim.SGD``, stepped the way a PyTorch user would.

Conventions pinned here:

* ``nn.Linear`` keeps its weight as (out, in); the case and the report use (in, out).
  :func:`swap_layout` is the one place that converts, in both directions.
* ``nn.CrossEntropyLoss`` expects logits, not probabilities: for categorical cross-entropy the
  model ends at the last ``nn.Linear`` and the loss receives its pre-softmax output (the softmax
  is inside the loss). With probability targets it averages over samples, as the SPEC says.
* ``nn.MSELoss`` and ``nn.L1Loss`` reduce over every element, which is the SPEC's mean and sum.
* ``nn.LeakyReLU`` gets the case's slope explicitly (PyTorch's default is 0.01).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from manualprop.case import Case
from manualprop.engines import BuildCache, LayerTrace, StepResult

# The extra, and the CPU build first: a bare `pip install torch` on a machine without a GPU
# downloads a CUDA build of several GB.
INSTALL = ('pip install "manualprop[torch]"; without a GPU, first the CPU build: '
           "pip install torch --index-url https://download.pytorch.org/whl/cpu")
SMALL_STEP = 2**20  # multiply-adds of the forward pass under which a step uses one thread


def _work(case: Case) -> int:
    return case.inputs.shape[0] * sum(layer.kernel.size for layer in case.layers)


def swap_layout(array: np.ndarray) -> np.ndarray:
    """Kernel (in, out) <-> ``nn.Linear.weight`` (out, in)."""
    return np.ascontiguousarray(np.asarray(array).T)


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
            for layer, linear in zip(case.layers, built.linears):
                linear.weight.copy_(torch.from_numpy(swap_layout(layer.kernel)))
                if layer.bias is not None:
                    linear.bias.copy_(torch.from_numpy(layer.bias))
        for group in built.optimizer.param_groups:
            group["lr"] = case.lr
        built.outputs.clear()

        built.optimizer.zero_grad(set_to_none=True)
        loss = case.scale * built.criterion(built.model(torch.from_numpy(case.inputs)), torch.from_numpy(case.targets))
        loss.backward()
        built.optimizer.step()

        deltas = {}
        for i, (layer, linear) in enumerate(zip(case.layers, built.linears)):
            deltas[f"layers.{i}.kernel"] = swap_layout(linear.weight.detach().numpy()) - layer.kernel
            if layer.bias is not None:
                deltas[f"layers.{i}.bias"] = linear.bias.detach().numpy() - layer.bias
        trace = _trace(torch, case, built.modules, built.linears, built.outputs)
        return StepResult(loss=float(loss.item()), deltas=deltas, trace=trace)

    def built(self, torch, case: Case) -> "_Built":
        """The modules, loss and optimizer for the case's architecture: built once, then reused
        (weights and learning rate are loaded for every step; plain SGD keeps no other state)."""
        key = (case.dtype.name, case.inputs.shape[1], tuple((l.units, l.activation, l.alpha, l.bias is not None) for l in case.layers),
               case.loss, case.reduction)
        return self.models.get(key, lambda: _build(torch, case))


@dataclass
class _Built:
    model: object
    linears: list
    modules: list
    criterion: object
    optimizer: object
    outputs: dict  # id(module) -> its output in the last step, with its gradient retained


def _build(torch, case: Case) -> _Built:
    from torch import nn

    dtype = {"float32": torch.float32, "float64": torch.float64}[case.dtype.name]
    activation = {
        "linear": lambda alpha: nn.Identity(),
        "sigmoid": lambda alpha: nn.Sigmoid(),
        "tanh": lambda alpha: nn.Tanh(),
        "relu": lambda alpha: nn.ReLU(),
        "leaky_relu": lambda alpha: nn.LeakyReLU(negative_slope=alpha),
        "softmax": lambda alpha: nn.Softmax(dim=1),
    }
    loss_module = {"mse": nn.MSELoss, "mae": nn.L1Loss, "categorical_crossentropy": nn.CrossEntropyLoss}

    linears, modules = [], []
    for i, layer in enumerate(case.layers):
        linear = nn.Linear(layer.kernel.shape[0], layer.units, bias=layer.bias is not None, dtype=dtype)
        linears.append(linear)
        modules.append(linear)
        last = i == len(case.layers) - 1
        if not (last and case.loss == "categorical_crossentropy"):  # CrossEntropyLoss takes logits
            modules.append(activation[layer.activation](layer.alpha))
    model = nn.Sequential(*modules)
    outputs: dict[int, object] = {}

    # Hooks keep each layer's Z (nn.Linear's output) and A (the activation module's output) with
    # their gradients, for the per-layer trace; they change nothing in the step.
    def keep(module, inputs, output):
        output.retain_grad()
        outputs[id(module)] = output

    for m in modules:
        m.register_forward_hook(keep)
    optimizer = torch.optim.SGD(model.parameters(), lr=case.lr)
    return _Built(model, linears, modules, loss_module[case.loss](reduction=case.reduction), optimizer, outputs)


def _trace(torch, case: Case, modules: list, linears: list, outputs: dict) -> list[LayerTrace]:
    """Per layer Z, A and their gradients from the hooks; dW and db from the parameters' .grad."""
    def array(tensor):
        return None if tensor is None else tensor.detach().numpy().copy()

    trace = []
    for i, (layer, linear) in enumerate(zip(case.layers, linears)):
        z = outputs[id(linear)]
        position = modules.index(linear)
        activation = modules[position + 1] if position + 1 < len(modules) else None
        a = outputs[id(activation)] if activation is not None else torch.softmax(z, dim=1)  # CE's softmax is in the loss
        trace.append(LayerTrace(
            Z=array(z), A=array(a), dA=array(a.grad) if activation is not None else None, dZ=array(z.grad),
            dW=swap_layout(linear.weight.grad.numpy()), db=array(linear.bias.grad) if linear.bias is not None else None,
        ))
    return trace
