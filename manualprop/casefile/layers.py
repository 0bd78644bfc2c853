"""The layer types of SPEC section 8 in a case file: which fields each may write, the shape of
one sample through the network, and the parameters of the layers without a kernel.

:class:`LayerChecks` is a part of the case builder (:mod:`manualprop.casefile.case`): it reads the
declarations of :data:`manualprop.concepts.LAYER_TYPES` and reports, with the file, line and
field, a field a type does not take, a required one missing, a layer that does not fit what comes
in (a pool or kernel larger than its input, a dense layer after images without a flatten, a
network that ends with images), and targets that are not class indices where a sparse loss needs
them, or not probabilities where binary cross-entropy needs them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import concepts
from . import schema

if TYPE_CHECKING:
    from .case import Layer

Shape = tuple[int, ...]  # one sample's: (features,) or (height, width, channels)


def takes_images(spec: schema.CaseSpec) -> bool:
    """Whether the inputs are images: their own depth says so when it is 2 or 4 (so a layer that does
    not fit them is blamed, not the inputs); else the first layer that cares."""
    depth = _depth(spec.inputs)
    if depth in (2, 4):
        return depth == 4
    for layer in spec.layers:
        takes = concepts.LAYER_TYPES[layer.type].takes
        if takes != "any":
            return takes == "images"
    return False


def _depth(value: Any) -> int | None:
    """How many axes an array is written with (its first element's, for a literal); None if unknown."""
    if isinstance(value, schema.GENERATORS):
        return len(value.shape) if value.shape is not None else None
    depth = 0
    while isinstance(value, list) and value:
        depth, value = depth + 1, value[0]
    return depth


def written_shape(value: Any) -> Shape | None:
    """The shape an array is written with (a generator's ``shape``, a literal's first element along
    each axis), without checking it: enough to tell one layout from another; None if unknown."""
    if isinstance(value, schema.GENERATORS):
        return None if value.shape is None else tuple(value.shape)
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape) if shape else None


def pair(value: int | list[int] | None, default: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """kernel_size, strides, pool_size: an int or [height, width]."""
    if value is None:
        return default
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _shown(shape: Shape) -> str:
    return f"({shape[0]},)" if len(shape) == 1 else f"({', '.join(map(str, shape))})"


def _described(shape: Shape) -> str:
    return f"images {_shown(shape)} = (height, width, channels)" if len(shape) == 3 else f"{shape[0]} features"


def _listed(names: list[str], conjunction: str = "and") -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return f" {conjunction} ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


def _number(value: Any) -> str:
    """A NumPy scalar as the file would write it: ``3``, ``1.5``, ``-1``."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


class LayerChecks:
    """The builder's layer checks (mixed into :class:`manualprop.casefile.case._Builder`)."""

    spec: schema.CaseSpec
    dtype: np.dtype
    lines: dict[tuple, int]
    classes: int | None = None  # how many classes generated class indices draw from

    def problem(self, path: tuple, message: str) -> None: ...  # the builder's

    def array(self, value: Any, path: tuple, shape: tuple[int | None, ...], what: str) -> np.ndarray | None: ...

    def shapes(self, sample: Shape | None) -> list[tuple[Shape, Shape] | None]:
        """Each layer's input and output shape for one sample (None where a problem leaves it unknown),
        after checking which fields each layer writes."""
        found: list[tuple[Shape, Shape] | None] = []
        shape = sample
        for i, layer in enumerate(self.spec.layers):
            fits = self.fields(i, layer)
            after = self.output_shape(i, layer, shape) if shape is not None and fits else None
            found.append(None if after is None or shape is None else (shape, after))
            shape = after
        kinds = [concepts.LAYER_TYPES[layer.type] for layer in self.spec.layers]
        if not any(kind.params for kind in kinds):
            trained = [kind.name for kind in concepts.LAYER_TYPES.values() if kind.params]
            self.problem(
                ("layers",),
                f"expected a layer with parameters to train ({_listed(trained, 'or')}), "
                f"found only {_listed(sorted({kind.name for kind in kinds}))}: a step would change nothing",
            )
        if shape is not None and len(shape) != 1:
            last = len(self.spec.layers) - 1
            self.problem(
                ("layers", last),
                f"the network ends with {_described(shape)} per sample, but the targets are one value per output: "
                "end with {type: flatten} and a dense layer",
            )
        return found

    def fields(self, i: int, layer: schema.LayerSpec) -> bool:
        """Report a field the layer's type does not take, and a required one it does not write."""
        declared = concepts.LAYER_TYPES[layer.type]
        ok = True
        for name in sorted(layer.model_fields_set - {"type"}, key=list(type(layer).model_fields).index):
            if getattr(layer, name) is not None and name not in declared.fields:
                owners = [k.name for k in concepts.LAYER_TYPES.values() if name in k.fields]
                takes = ", ".join(declared.fields) or "no field besides type"
                self.problem(
                    ("layers", i, name),
                    f"{name} is a field of {_listed(owners)}, not of {layer.type}; {layer.type} takes {takes}",
                )
                ok = False
        for name in declared.required:
            if getattr(layer, name) is None:
                # a default the frameworks disagree on is none here (SPEC section 7): the message names both
                differ = declared.frameworks if name in declared.frameworks else ""
                self.problem(
                    ("layers", i, name),
                    f"missing required field {name!r}"
                    + (f" of {layer.type}" if layer.type != "dense" else "")
                    + (f", which has no default here: {differ}" if differ else ""),
                )
                ok = False
        return ok

    def gives(self, i: int, shape: Shape) -> str:
        """What comes into layer ``i``, for a message: ``layer 0 (conv2d) gives images (3, 3, 2) ...``."""
        below = "the inputs give" if i == 0 else f"layer {i - 1} ({self.spec.layers[i - 1].type}) gives"
        return f"{below} {_described(shape)}"

    def output_shape(self, i: int, layer: schema.LayerSpec, shape: Shape) -> Shape | None:
        """One sample's shape after the layer, or None after reporting why it does not fit."""
        declared = concepts.LAYER_TYPES[layer.type]
        below = self.gives(i, shape)
        if declared.takes == "features" and len(shape) != 1:
            self.problem(
                ("layers", i, "type"),
                f"a {layer.type} layer takes (batch, features), but {below}: put {{type: flatten}} before it",
            )
            return None
        if declared.takes == "images" and len(shape) != 3:
            self.problem(
                ("layers", i, "type"),
                f"{layer.type} takes images (batch, height, width, channels), but {below}",
            )
            return None
        if layer.type == "dense":
            return (int(layer.units or 0),)  # required: fields() said it is there
        if layer.type == "flatten":
            return (math.prod(shape),)
        if layer.type in ("batch_norm", "layer_norm"):
            return shape
        conv = layer.type == "conv2d"
        window = pair(layer.kernel_size if conv else layer.pool_size)
        strides = pair(layer.strides, (1, 1) if conv else window)
        key = "kernel_size" if conv else "pool_size"
        if conv and layer.padding == "same":
            height, width = (math.ceil(n / s) for n, s in zip(shape[:2], strides, strict=True))
        elif window[0] > shape[0] or window[1] > shape[1]:
            self.problem(
                ("layers", i, key),
                f"expected {key} at most {_shown(shape[:2])}, the height and width of its input ({below}), "
                f"found {_shown(window)}"
                + ("; with padding valid the kernel must fit inside the image (padding: same pads it)" if conv else ""),
            )
            return None
        else:
            height, width = ((n - k) // s + 1 for n, k, s in zip(shape[:2], window, strides, strict=True))
        return (height, width, int(layer.filters or 0) if conv else shape[2])

    def shaped_layer(self, i: int, spec: schema.LayerSpec, in_shape: Shape, out_shape: Shape) -> Layer | None:
        """A conv2d layer (through the builder's kernel and bias), or one without a kernel."""
        from .case import Layer

        if spec.type == "conv2d":
            return self.weighted(i, spec, in_shape, out_shape, None)  # type: ignore[attr-defined]
        path = ("layers", i)
        features = out_shape[-1]
        arrays: dict[str, Any] = {}
        defaults = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}
        declared = concepts.LAYER_TYPES[spec.type]
        what = f"(features,): one value per feature of the last axis of {_described(in_shape)}"
        for name in declared.reported:
            given = getattr(spec, name)
            if given is None:
                arrays[name] = np.full(features, defaults[name], dtype=self.dtype)
            else:
                arrays[name] = self.array(given, (*path, name), (features,), what)
        variance = arrays.get("moving_variance")
        if variance is not None and (variance < 0).any():
            at = int(np.argmax(variance < 0))
            if isinstance(spec.moving_variance, schema.GENERATORS):
                self.problem(
                    (*path, "moving_variance", "random"),
                    f"expected variances >= 0, but this generator drew {_number(variance[at])}: "
                    "draw them with {random: uniform, low: 0.5, high: 2} or write them",
                )
            else:
                self.problem((*path, "moving_variance", at), f"expected a variance >= 0, found {_number(variance[at])}")
            return None
        if any(value is None for value in arrays.values()):
            return None
        window = pair(spec.pool_size)
        return Layer(
            features,
            "linear",
            0.0,
            None,
            None,
            self.lines.get(path),
            kind=spec.type,
            in_shape=in_shape,
            out_shape=out_shape,
            window=window,
            strides=pair(spec.strides, window),
            epsilon=float(spec.epsilon or 0.0),
            momentum=float(spec.momentum or 0.0),
            **arrays,
        )

    def class_indices(self, targets: np.ndarray | None, classes: int | None) -> np.ndarray | None:
        """Targets of a sparse loss as integers, each a class index below ``classes``."""
        if targets is None:
            return None
        bad = [j for j, t in enumerate(targets) if t != int(t) or not (0 <= t < (classes or math.inf))]
        for j in bad[:3]:
            upto = f" in 0 .. {classes - 1} ({classes} classes: the last layer's units)" if classes else " >= 0"
            self.problem(("targets", j), f"expected a class index, an integer{upto}, found {_number(targets[j])}")
        return None if bad else targets.astype(np.int64)

    def probabilities(self, targets: np.ndarray | None, loss: concepts.Loss) -> None:
        """Targets of a loss on a sigmoid output (binary cross-entropy) are probabilities in [0, 1]."""
        if targets is None or loss.last_activation != "sigmoid":
            return
        outside = np.argwhere((targets < 0) | (targets > 1))
        for at in outside[:3]:
            where = ("targets",) if isinstance(self.spec.targets, schema.GENERATORS) else ("targets", *map(int, at))
            self.problem(
                where,
                f"expected a probability in [0, 1] ({loss.name} compares it with a sigmoid), found {_number(targets[tuple(at)])}",
            )
            if len(where) == 1:
                break

    def check_loss_params(self, spec: Any, declared: concepts.Loss) -> None:
        """A loss parameter written for a loss that has none of that name, or out of its range."""
        own = {p.name: p for p in declared.params}
        for name in type(spec).model_fields:
            value = getattr(spec, name)
            if name in ("name", "reduction", "scale") or value is None:
                continue
            if name not in own:
                owners = [x.name for x in concepts.LOSSES.values() if any(p.name == name for p in x.params)]
                self.problem(("loss", name), f"{name} is a parameter of {', '.join(owners)}, not of {declared.name}")
            elif own[name].problem(value):
                self.problem(("loss", name), str(own[name].problem(value)))
