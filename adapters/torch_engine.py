"""The PyTorch engine: real ``torch.nn`` modules (``nn.Linear``, ``nn.Conv2d``, the pools,
``nn.Flatten``, ``nn.BatchNorm1d``/``nn.BatchNorm2d``, ``nn.LayerNorm``, the activations), a real
loss module and the real ``torch.optim`` optimizer, stepped ``case.steps`` times on the same batch
the way a PyTorch user would.

Conventions pinned here:

* ``nn.Linear`` keeps its weight as (out, in) and ``nn.Conv2d`` as (out, in, kh, kw); the case
  and the report use (in, out) and (kh, kw, in, out). :func:`manualprop.casefile.case.as_weight`
  and :func:`~manualprop.casefile.case.as_kernel` convert, here only when a tensor is loaded or read.
* The model is channels first (NCHW), as PyTorch's modules want: the case's NHWC images are
  permuted once, before the first layer. Every trace array is given back in the NHWC layout of
  the NumPy reference, so traces compare element by element.
* ``flatten`` permutes NCHW -> NHWC before ``nn.Flatten``, so the features come in (h, w, c)
  order, as Keras's and the next dense kernel's meaning needs. On features it is ``nn.Flatten`` alone.
* TensorFlow's "same" padding is an ``nn.ZeroPad2d`` before a ``padding=0`` convolution: the
  odd row or column of padding goes at the bottom or right. (``nn.Conv2d(padding="same")``
  refuses strides above 1.)
* Pools are ``nn.MaxPool2d`` / ``nn.AvgPool2d`` with the case's window and strides and no padding.
* ``batch_norm`` is ``nn.BatchNorm1d`` on features and ``nn.BatchNorm2d`` on images, in training
  mode, with ``momentum = 1 - the case's momentum`` (PyTorch's running average weighs the new
  statistic by its momentum, Keras's the old one) and ``eps`` the case's epsilon. PyTorch
  normalizes with the biased batch variance but updates ``running_var`` with the UNBIASED one
  (times n / (n - 1), n the values per feature): that is reported as PyTorch computes it, never
  corrected (a known difference, pinned by a canary). In training mode PyTorch refuses a batch
  norm over a single value per feature (batch 1 on features).
* ``layer_norm`` is ``nn.LayerNorm(last axis size, eps=epsilon)``; on images it is wrapped in
  permutes to NHWC and back, since ``nn.LayerNorm`` normalizes the trailing axes.
* The loss modules take what PyTorch users give them: ``nn.CrossEntropyLoss`` expects logits, not
  probabilities, so for the categorical cross-entropies the model ends at the last ``nn.Linear``
  and the loss receives its pre-softmax output (the softmax is inside the loss); with
  probability targets it averages over samples, as the SPEC says; the sparse one gets int64
  class indices. ``nn.BCEWithLogitsLoss`` likewise takes the pre-sigmoid output.
  ``nn.HuberLoss`` gets the case's ``delta`` explicitly.
* ``nn.MSELoss``, ``nn.L1Loss``, ``nn.BCEWithLogitsLoss`` and ``nn.HuberLoss`` reduce over every
  element, which is the SPEC's mean and sum.
* ``nn.LeakyReLU`` gets the case's slope explicitly (PyTorch's default is 0.01).
* Every hyperparameter is passed explicitly from the case (none of PyTorch's defaults is relied
  on): RMSprop's ``alpha`` is the SPEC's ``rho``, Adagrad's ``initial_accumulator_value`` its
  ``initial_accumulator``. PyTorch puts epsilon where the SPEC does (its formulas are PyTorch's).
  ``nesterov`` is passed only with a momentum: PyTorch refuses it without one, and with momentum
  0 the SPEC's Nesterov update is the plain one.
* The optimizer is built for every case, over the trainable parameters only (a batch norm's
  running statistics are buffers, changed by the forward pass), never cached with the modules:
  its state (momentum buffers, moments, Adagrad's accumulator, which PyTorch fills when it is
  built) belongs to one run of one case.
* The trace holds what PyTorch gives: module outputs and their gradients (``retain_grad``),
  parameters' ``.grad``; a norm layer's mean, biased variance and normalized x are PyTorch's,
  computed from the input the module received (a forward pre-hook). ``dxhat``, which no module
  exposes, is left None.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from manualprop import Case
from manualprop.casefile.case import Layer, as_kernel, as_weight
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
# (nn, reduction, case.loss_params) -> the loss module.
LOSS = {
    "mse": lambda nn, reduction, params: nn.MSELoss(reduction=reduction),
    "mae": lambda nn, reduction, params: nn.L1Loss(reduction=reduction),
    "categorical_crossentropy": lambda nn, reduction, params: nn.CrossEntropyLoss(reduction=reduction),
    "binary_crossentropy": lambda nn, reduction, params: nn.BCEWithLogitsLoss(reduction=reduction),
    "sparse_categorical_crossentropy": lambda nn, reduction, params: nn.CrossEntropyLoss(reduction=reduction),
    "huber": lambda nn, reduction, params: nn.HuberLoss(reduction=reduction, delta=params["delta"]),
}
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


@dataclass
class _Block:
    """One layer of the case as PyTorch modules: ``modules`` in order, ``main`` the one that does
    the layer's work (its output is Z for dense and conv2d), ``activation`` after it (dense and
    conv2d), and ``tensors`` the parameters and buffers by the SPEC's short name."""

    modules: list
    main: Any
    activation: Any = None
    tensors: dict = field(default_factory=dict)

    @property
    def output(self):
        """The module whose output is the layer's A (in the model's layout)."""
        return self.modules[-1]


@functools.cache
def _permute_class(nn):
    module: Any = nn.Module  # torch is imported on first use, so its classes are values here

    class Permute(module):
        """``x.permute(*dims)`` as a module (as torchvision's ``ops.Permute``), so the model shows it."""

        def __init__(self, *dims: int):
            super().__init__()
            self.dims = dims

        def forward(self, x):
            return x.permute(*self.dims)

        def extra_repr(self) -> str:
            return f"dims={self.dims}"

    return Permute


def _to_channels_last(nn):
    return _permute_class(nn)(0, 2, 3, 1)


def _to_channels_first(nn):
    return _permute_class(nn)(0, 3, 1, 2)


def same_padding(size: int, window: int, stride: int, out: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one axis, (before, after): the total that gives ``out``
    positions, the odd one after."""
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def _dense(nn, layer: Layer, dtype, last_on_logits: bool) -> _Block:
    linear = nn.Linear(layer.in_shape[0], layer.units, bias=layer.bias is not None, dtype=dtype)
    return _weighted(nn, layer, [linear], linear, last_on_logits)


def _conv(nn, layer: Layer, dtype, last_on_logits: bool) -> _Block:
    conv = nn.Conv2d(
        layer.in_shape[2], layer.units, layer.window, stride=layer.strides, padding=0, bias=layer.bias is not None, dtype=dtype
    )
    modules = [conv]
    if layer.padding == "same":
        (height, width), (out_h, out_w) = layer.in_shape[:2], layer.out_shape[:2]
        top, bottom = same_padding(height, layer.window[0], layer.strides[0], out_h)
        left, right = same_padding(width, layer.window[1], layer.strides[1], out_w)
        if top or bottom or left or right:
            modules.insert(0, nn.ZeroPad2d((left, right, top, bottom)))
    return _weighted(nn, layer, modules, conv, last_on_logits)


def _weighted(nn, layer: Layer, modules: list, main, last_on_logits: bool) -> _Block:
    """A layer with a kernel, then its activation, except where the loss takes the logits."""
    tensors = {"kernel": main.weight, **({"bias": main.bias} if main.bias is not None else {})}
    if last_on_logits:  # CrossEntropyLoss and BCEWithLogitsLoss take the logits
        return _Block(modules, main, None, tensors)
    activation = ACTIVATION[layer.activation](nn, layer.alpha)
    return _Block([*modules, activation], main, activation, tensors)


def _batch_norm(nn, layer: Layer, dtype, last_on_logits: bool) -> _Block:
    kind = nn.BatchNorm2d if len(layer.in_shape) == 3 else nn.BatchNorm1d
    norm = kind(layer.units, eps=layer.epsilon, momentum=1.0 - layer.momentum, dtype=dtype)
    tensors = {"gamma": norm.weight, "beta": norm.bias, "moving_mean": norm.running_mean, "moving_variance": norm.running_var}
    return _Block([norm], norm, tensors=tensors)


def _layer_norm(nn, layer: Layer, dtype, last_on_logits: bool) -> _Block:
    norm = nn.LayerNorm(layer.units, eps=layer.epsilon, dtype=dtype)
    modules = [_to_channels_last(nn), norm, _to_channels_first(nn)] if len(layer.in_shape) == 3 else [norm]
    return _Block(modules, norm, tensors={"gamma": norm.weight, "beta": norm.bias})


def _flatten(nn, layer: Layer, dtype, last_on_logits: bool) -> _Block:
    flatten = nn.Flatten()
    return _Block([_to_channels_last(nn), flatten] if len(layer.in_shape) == 3 else [flatten], flatten)


def _alone(make):
    def block(nn, layer: Layer, dtype, last_on_logits: bool) -> _Block:
        module = make(nn, layer)
        return _Block([module], module)

    return block


# The modules of every declared layer kind (manualprop.concepts.LAYER_TYPES), by name:
# (nn, layer, dtype, whether the loss takes this layer's logits) -> _Block.
LAYER = {
    "dense": _dense,
    "conv2d": _conv,
    "max_pool2d": _alone(lambda nn, layer: nn.MaxPool2d(layer.window, stride=layer.strides)),
    "avg_pool2d": _alone(lambda nn, layer: nn.AvgPool2d(layer.window, stride=layer.strides)),
    "flatten": _flatten,
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
}


def _work(case: Case) -> int:
    """Multiply-adds of the forward pass, roughly."""
    total = 0
    for layer in case.layers:
        if layer.kernel is None:
            total += math.prod(layer.in_shape)
        else:  # a conv kernel is applied at every output position
            total += layer.kernel.size * math.prod(layer.out_shape[:-1])
    return case.inputs.shape[0] * total


class TorchEngine:
    name = "torch"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return f"torch is not installed (install it with: {INSTALL})"
        return None

    def refuses(self, case: Case) -> str | None:
        """PyTorch's batch norm raises on one value per feature in training mode (the SPEC's variance is 0 there)."""
        for i, layer in enumerate(case.layers):
            if layer.kind == "batch_norm" and case.inputs.shape[0] * math.prod(layer.in_shape[:-1]) == 1:
                return (
                    f"PyTorch's batch norm refuses one value per feature in training mode (layers[{i}]: "
                    "'Expected more than 1 value per channel when training')"
                )
        return None

    def __init__(self, cache_size: int = 256):
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
        named = _load(torch, case, built.blocks)  # name -> (tensor, is a kernel)
        # Built here, for this case only, with its hyperparameters: no state survives from another case.
        trained = {name: entry for name, entry in named.items() if case.trainable(name)}
        optimizer = OPTIMIZER[case.optimizer](torch.optim, [p for p, _ in trained.values()], case.lr, case.hyper)
        inputs, targets = torch.from_numpy(case.inputs), torch.from_numpy(case.targets)
        if case.images:  # NHWC, as the case gives images, to PyTorch's NCHW, once
            inputs = inputs.permute(0, 3, 1, 2).contiguous()
        # Layers before the first one with parameters get their dA only from an input that requires grad.
        inputs.requires_grad_(not case.layers[0].declared.params)

        initial = case.parameters()
        before = initial
        history = []
        built.model.train()
        for _ in range(case.steps):
            built.kept.clear()
            optimizer.zero_grad(set_to_none=True)
            loss = case.scale * built.criterion(built.model(inputs), targets)
            loss.backward()
            trace = _trace(torch, case, built.blocks, built.kept)
            optimizer.step()
            after = {name: _array(p, kernel) for name, (p, kernel) in named.items()}
            history.append(
                StepRecord(
                    float(loss.item()), {name: after[name] - before[name] for name in after}, _state(optimizer, trained), trace
                )
            )
            before = after
        deltas = {name: before[name] - initial[name] for name in initial}
        return StepResult(loss=history[0].loss, deltas=deltas, trace=history[0].trace, history=history)

    def built(self, torch, case: Case) -> _Built:
        """The modules and loss for the case's architecture: built once, then reused (the weights
        and running statistics are loaded for every case; the optimizer, which has state, is built
        for every case). The key holds every field that changes a module."""
        key = (
            case.dtype.name,
            case.inputs.shape[1:],
            tuple(layer.architecture for layer in case.layers),
            case.loss,
            case.reduction,
            tuple(sorted(case.loss_params.items())),
        )
        return self.models.get(key, lambda: _build(torch, case))


@dataclass
class _Built:
    model: Any  # a torch.nn.Sequential; the framework's objects are used dynamically here
    blocks: list[_Block]  # one per case layer
    criterion: Any  # the loss module
    kept: dict  # (id(module), "in" or "out") -> its input or output in the last step, outputs with their gradient retained


def _build(torch, case: Case) -> _Built:
    from torch import nn

    dtype = {"float32": torch.float32, "float64": torch.float64}[case.dtype.name]
    on_logits = LOSSES[case.loss].on_logits  # the last activation is inside the loss module
    last = len(case.layers) - 1
    blocks = [LAYER[layer.kind](nn, layer, dtype, on_logits and i == last) for i, layer in enumerate(case.layers)]
    model = nn.Sequential(*(module for block in blocks for module in block.modules))
    kept: dict[tuple[int, str], object] = {}

    # Hooks keep each layer's Z and A with their gradients, and a norm's input, for the per-layer
    # trace; they change nothing in the step.
    def keep(module, inputs, output):
        if output.requires_grad:
            output.retain_grad()
        kept[id(module), "out"] = output

    def keep_input(module, inputs):
        kept[id(module), "in"] = inputs[0]

    for block in blocks:
        for module in {id(m): m for m in (block.main, block.activation, block.output) if m is not None}.values():
            module.register_forward_hook(keep)
        if isinstance(block.main, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            block.main.register_forward_pre_hook(keep_input)
    criterion = LOSS[case.loss](nn, case.reduction, case.loss_params)
    return _Built(model, blocks, criterion, kept)


def _load(torch, case: Case, blocks: list[_Block]) -> dict[str, tuple[Any, bool]]:
    """Copy the case's parameters and state into the modules; every one by the SPEC's name, with
    its tensor and whether it is a kernel (kept (out, in, ...) by torch)."""
    named = {}
    with torch.no_grad():
        for i, (layer, block) in enumerate(zip(case.layers, blocks, strict=True)):
            for name, value in layer.arrays().items():
                tensor = block.tensors[name]
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(as_weight(value) if name == "kernel" else value)))
                named[f"layers.{i}.{name}"] = (tensor, name == "kernel")
            if getattr(block.main, "num_batches_tracked", None) is not None:
                block.main.num_batches_tracked.zero_()  # unused with a momentum; reset so no run leaves a trace
    return named


def _array(tensor, kernel: bool) -> np.ndarray:
    """A copy of a parameter-shaped tensor, kernels in the (in, out) / (kh, kw, in, out) layout;
    always a copy: a view of a (1, n) weight would otherwise change with the parameter at the next step."""
    values = tensor.detach().numpy()
    return np.array(as_kernel(values) if kernel else values, order="C", copy=True)


def _state(optimizer, named: dict[str, tuple[Any, bool]]) -> dict[str, dict[str, np.ndarray]]:
    """The optimizer's state of every parameter, in the SPEC's names (b, m, v, vmax, s, a, acc),
    kernels' state in the report's layout; what PyTorch does not keep (no momentum) is absent."""
    return {
        name: {
            STATE[key]: _array(value, kernel) for key, value in optimizer.state[p].items() if key in STATE and value is not None
        }
        for name, (p, kernel) in named.items()
    }


def _nhwc(tensor, channels_first: bool = True):
    """A copy in the reference's layout: images NCHW -> NHWC (unless already channels last);
    features as they are."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    return np.array((tensor.movedim(1, -1) if tensor.ndim == 4 and channels_first else tensor).numpy(), order="C", copy=True)


def _grad(tensor):
    return None if tensor is None else _nhwc(tensor.grad)


def _trace(torch, case: Case, blocks: list[_Block], kept: dict) -> list[LayerTrace]:
    """Per layer, what PyTorch gives, in the NHWC layout: Z, A and their gradients from the hooks;
    dW, db, dgamma, dbeta from the parameters' .grad; a norm's statistics from its input."""
    trace = []
    for layer, block in zip(case.layers, blocks, strict=True):
        out = kept[id(block.output), "out"]
        entry = LayerTrace(A=_nhwc(out), dA=_grad(out))
        if layer.kind in ("dense", "conv2d"):
            z = kept[id(block.main), "out"]
            entry.Z, entry.dZ = _nhwc(z), _grad(z)
            entry.dW = _array(block.main.weight.grad, kernel=True)
            entry.db = _array(block.main.bias.grad, kernel=False) if block.main.bias is not None else None
            if block.activation is None:  # the loss took the logits: A is the activation of Z, dA is not computed
                with torch.no_grad():
                    entry.A = _nhwc(ACTIVATION[layer.activation](torch.nn, layer.alpha)(z))
                entry.dA = None
        elif layer.kind in ("batch_norm", "layer_norm"):
            entry.mean, entry.var, entry.xhat = _norm_statistics(torch, block.main, kept[id(block.main), "in"])
            entry.dgamma = _array(block.main.weight.grad, kernel=False)
            entry.dbeta = _array(block.main.bias.grad, kernel=False)
        trace.append(entry)
    return trace


def _norm_statistics(torch, norm, x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A norm's batch mean, biased variance and normalized input, as PyTorch computes them from
    the input ``x`` the module received (batch norm's channels first, layer norm's channels last)."""
    functional = torch.nn.functional
    with torch.no_grad():
        x = x.detach()
        if isinstance(norm, torch.nn.LayerNorm):  # over the last axis; on images x is NHWC already
            var, mean = torch.var_mean(x, dim=-1, correction=0)
            xhat = functional.layer_norm(x, norm.normalized_shape, eps=norm.eps)
            return _nhwc(mean, False), _nhwc(var, False), _nhwc(xhat, False)
        # per channel (axis 1), over every other axis
        var, mean = torch.var_mean(x, dim=[d for d in range(x.ndim) if d != 1], correction=0)
        xhat = functional.batch_norm(x, None, None, training=True, eps=norm.eps)
    return _nhwc(mean), _nhwc(var), _nhwc(xhat)
