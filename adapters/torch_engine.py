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

import numpy as np

from manualprop.case import Case
from manualprop.engines import LayerTrace, StepResult

INSTALL = "pip install torch"


def swap_layout(array: np.ndarray) -> np.ndarray:
    """Kernel (in, out) <-> ``nn.Linear.weight`` (out, in)."""
    return np.ascontiguousarray(np.asarray(array).T)


class TorchEngine:
    name = "torch"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return f"torch is not installed (install it with: {INSTALL})"
        return None

    def step(self, case: Case) -> StepResult:
        import torch
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
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(swap_layout(layer.kernel)))
                if layer.bias is not None:
                    linear.bias.copy_(torch.from_numpy(layer.bias))
            linears.append(linear)
            modules.append(linear)
            last = i == len(case.layers) - 1
            if not (last and case.loss == "categorical_crossentropy"):  # CrossEntropyLoss takes logits
                modules.append(activation[layer.activation](layer.alpha))
        model = nn.Sequential(*modules)
        criterion = loss_module[case.loss](reduction=case.reduction)
        optimizer = torch.optim.SGD(model.parameters(), lr=case.lr)

        # Hooks keep each layer's Z (nn.Linear's output) and A (the activation module's output)
        # with their gradients, for the per-layer trace; they change nothing in the step.
        outputs: dict[int, torch.Tensor] = {}

        def keep(module, inputs, output):
            output.retain_grad()
            outputs[id(module)] = output

        hooks = [m.register_forward_hook(keep) for m in modules]
        optimizer.zero_grad()
        loss = case.scale * criterion(model(torch.from_numpy(case.inputs)), torch.from_numpy(case.targets))
        loss.backward()
        optimizer.step()
        for hook in hooks:
            hook.remove()

        deltas = {}
        for i, (layer, linear) in enumerate(zip(case.layers, linears)):
            deltas[f"layers.{i}.kernel"] = swap_layout(linear.weight.detach().numpy()) - layer.kernel
            if layer.bias is not None:
                deltas[f"layers.{i}.bias"] = linear.bias.detach().numpy() - layer.bias
        trace = _trace(torch, case, modules, linears, outputs)
        return StepResult(loss=float(loss.item()), deltas=deltas, trace=trace)


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
