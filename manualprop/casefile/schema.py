"""The case file's schema: what may be written, as pydantic models (``manualprop schema``).

These models check types, names and unknown keys; shapes and the links between fields are
checked in :mod:`manualprop.casefile.case`, which turns a validated file into arrays.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema, create_model

from ..concepts import ACTIVATIONS, LAYER_TYPES, LOSS_ALIASES, LOSSES, OPTIMIZERS

# The names come from the declarations (manualprop.concepts), never listed here. Types built at
# import (these Literals, the models from create_model) are no static types to mypy: where one is
# used as a type, the ignore[valid-type] says so, and the models' fields are read as Any.
ActivationName = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]
LossName = Literal[(*LOSSES, *LOSS_ALIASES)]  # type: ignore[valid-type]
InitName = Literal["glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal", "zeros"]
LayerTypeName = Literal[tuple(LAYER_TYPES)]  # type: ignore[valid-type]
Shape = Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1, max_length=4)]
PositiveInt = Annotated[int, Field(gt=0)]
Pair = Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]


class _Strict(BaseModel):
    # defer_build: a validator is built on first use, not at import; CaseSpec's holds every model,
    # so a run builds one validator instead of nine (manualprop's start-up).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, defer_build=True)


class Uniform(_Strict):
    """Numbers drawn uniformly from [low, high)."""

    random: Literal["uniform"]
    shape: Shape | None = None
    low: float = 0.0
    high: float = 1.0


class Normal(_Strict):
    """Numbers drawn from a normal distribution."""

    random: Literal["normal"]
    shape: Shape | None = None
    mean: float = 0.0
    std: Annotated[float, Field(gt=0)] = 1.0


class OneHot(_Strict):
    """Rows with a single 1 in a uniformly drawn column (classification targets)."""

    random: Literal["one_hot"]
    shape: Shape | None = None


class Classes(_Strict):
    """Class indices drawn uniformly from 0 .. outputs - 1, one per sample (sparse categorical targets)."""

    random: Literal["classes"]
    shape: Shape | None = None


GENERATORS = (Uniform, Normal, OneHot, Classes)
Generated = Annotated[Uniform | Normal | OneHot | Classes, Field(discriminator="random")]


def _nested(depth: int) -> dict:
    """A list of numbers, or of such lists, down to ``depth`` levels (images and conv kernels: 4)."""
    inner: dict = {"type": "number"}
    for _ in range(depth):
        inner = {"type": "array", "items": inner if inner["type"] == "number" else {"anyOf": [{"type": "number"}, inner]}}
    return inner


_NUMBERS = _nested(4)
LiteralArray = Annotated[list, WithJsonSchema(_NUMBERS)]


def _array_kind(value: Any) -> str:
    return "generated" if isinstance(value, dict) else "literal"


def _bias_kind(value: Any) -> str:
    return "flag" if isinstance(value, bool) else _array_kind(value)


ArrayValue = Annotated[
    Annotated[Generated, Tag("generated")] | Annotated[LiteralArray, Tag("literal")],
    Discriminator(_array_kind),
]
BiasValue = Annotated[
    Annotated[Generated, Tag("generated")] | Annotated[LiteralArray, Tag("literal")] | Annotated[bool, Tag("flag")],
    Discriminator(_bias_kind),
]


# Fields of the models below, each (type, FieldInfo), as pydantic's create_model takes them.
_ACTIVATION_FIELDS: dict[str, Any] = {
    p.name: (float | None, Field(None, description=p.meaning)) for a in ACTIVATIONS.values() for p in a.params
}

# An activation with its parameters: ``{name: leaky_relu, alpha: 0.1}``. Every declared parameter
# of any activation may be written here; which belongs to which, and which is required, is
# checked in manualprop.casefile.case against the declaration.
ActivationSpec: type[Any] = create_model(
    "ActivationSpec",
    __base__=_Strict,
    __doc__="An activation with its parameters: ``{name: leaky_relu, alpha: 0.1}``.",
    name=(ActivationName, ...),
    **_ACTIVATION_FIELDS,
)


def _spec_kind(value: Any) -> str:
    return "by-spec" if isinstance(value, dict) else "by-name"


ActivationValue = Annotated[
    Annotated[ActivationName, Tag("by-name")] | Annotated[ActivationSpec, Tag("by-spec")],  # type: ignore[valid-type]
    Discriminator(_spec_kind),
]


_LOSS_FIELDS: dict[str, Any] = {
    p.name: (float | None, Field(None, description=p.meaning)) for x in LOSSES.values() for p in x.params
}

# A loss with its reduction, a constant factor on the reduced value and its own parameters
# (huber's delta); which loss owns which parameter is checked in manualprop.casefile.case.
LossSpec: type[Any] = create_model(
    "LossSpec",
    __base__=_Strict,
    __doc__="A loss with its reduction and a constant factor on the reduced value.",
    name=(LossName, ...),
    reduction=(Literal["mean", "sum"], "mean"),
    scale=(float, 1.0),
    **_LOSS_FIELDS,
)


LossValue = Annotated[
    Annotated[LossName, Tag("by-name")] | Annotated[LossSpec, Tag("by-spec")],  # type: ignore[valid-type]
    Discriminator(_spec_kind),
]

OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]
_OPTIMIZER_PARAMS = {p.name: p for o in OPTIMIZERS.values() for p in o.params}
_OPTIMIZER_FIELDS: dict[str, Any] = {
    p.name: (p.kind | None, Field(None, description=p.meaning)) for p in _OPTIMIZER_PARAMS.values()
}

# An optimizer with its hyperparameters: ``{name: adam, epsilon: 1.0e-8}``. Every declared
# hyperparameter of any optimizer may be written here; which belongs to which, and which is
# required, is checked in manualprop.casefile.case against the declaration.
OptimizerSpec: type[Any] = create_model(
    "OptimizerSpec",
    __base__=_Strict,
    __doc__="An optimizer with its hyperparameters (SPEC section 7).",
    name=(OptimizerName, ...),
    **_OPTIMIZER_FIELDS,
)

OptimizerValue = Annotated[
    Annotated[OptimizerName, Tag("by-name")] | Annotated[OptimizerSpec, Tag("by-spec")],  # type: ignore[valid-type]
    Discriminator(_spec_kind),
]


def _loss_kind(value: Any) -> str:
    return "per-step" if isinstance(value, list) else "number"


GoldenLoss = Annotated[
    Annotated[float, Tag("number")] | Annotated[Annotated[list[float], Field(min_length=1)], Tag("per-step")],
    Discriminator(_loss_kind),
]


class Tolerance(_Strict):
    """|a - b| <= atol * (1 + |p|) + rtol * max(|a|, |b|), p the parameter before the step."""

    rtol: Annotated[float, Field(ge=0)] | None = None
    atol: Annotated[float, Field(ge=0)] | None = None


def _size_kind(value: Any) -> str:
    return "pair" if isinstance(value, list) else "int"


Size = Annotated[
    Annotated[PositiveInt, Tag("int")] | Annotated[Pair, Tag("pair")],
    Discriminator(_size_kind),
]


class LayerSpec(_Strict):
    """One layer (SPEC section 8); which fields belong to which type, and which it must write,
    is checked in manualprop.casefile.case against manualprop.concepts.LAYER_TYPES."""

    type: LayerTypeName = "dense"  # type: ignore[valid-type]
    units: PositiveInt | None = None
    filters: PositiveInt | None = None
    kernel_size: Size | None = Field(None, description="an int or [height, width]")
    strides: Size | None = Field(None, description="an int or [height, width]; pools: default pool_size")
    padding: Literal["valid", "same"] | None = Field(None, description="valid (default) or same, TensorFlow's rule")
    pool_size: Size | None = Field(None, description="an int or [height, width]")
    activation: ActivationValue | None = None
    kernel: ArrayValue | None = Field(None, description="dense (in, out), conv2d (kh, kw, in, out): the Keras layout")
    weight: ArrayValue | None = Field(None, description="dense (out, in), conv2d (out, in, kh, kw): the PyTorch layout")
    bias: BiasValue | None = Field(None, description="default zeros; false for no bias")
    init: InitName | None = Field(None, description="how to draw the kernel when none is given")
    epsilon: Annotated[float, Field(gt=0)] | None = Field(None, description="added to the variance, > 0")
    momentum: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None,
        description="in [0, 1), Keras's convention: moving <- momentum moving + (1 - momentum) batch statistic, "
        "so PyTorch's momentum 0.1 is 0.9 here",
    )
    gamma: ArrayValue | None = Field(None, description="default ones")
    beta: ArrayValue | None = Field(None, description="default zeros")
    moving_mean: ArrayValue | None = Field(None, description="default zeros")
    moving_variance: ArrayValue | None = Field(None, description="default ones")

    @property
    def activation_name(self) -> str:
        if self.activation is None:
            return "linear"
        return self.activation if isinstance(self.activation, str) else self.activation.name


class KnownDifference(_Strict):
    """A documented difference confined to some parameters: the engine is compared as usual on the rest."""

    reason: Annotated[str, Field(min_length=1)]
    params: Annotated[list[str], Field(min_length=1)]


KnownValue = Annotated[
    Annotated[Annotated[str, Field(min_length=1)], Tag("by-name")] | Annotated[KnownDifference, Tag("by-spec")],
    Discriminator(_spec_kind),
]


class ExpectedSpec(_Strict):
    """Golden values from a trusted source, checked against every engine that ran."""

    loss: GoldenLoss | None = Field(None, description="the loss before the step, or a list: before each step")
    updated: dict[str, LiteralArray] = Field(default_factory=dict)
    deltas: dict[str, LiteralArray] = Field(default_factory=dict)
    tolerance: Tolerance | None = None


class CaseSpec(_Strict):
    """A manualprop case: a dense network, its data, a loss, an optimizer and the steps it takes."""

    model_config = ConfigDict(title="manualprop case")

    name: str | None = None
    description: str | None = None
    dtype: Literal["float32", "float64"] = "float32"
    seed: Annotated[int, Field(ge=0)] = 0
    loss: LossValue
    lr: Annotated[float, Field(gt=0)]
    optimizer: OptimizerValue = "sgd"
    steps: Annotated[int, Field(ge=1, le=1000)] = 1
    inputs: ArrayValue
    targets: ArrayValue
    layers: Annotated[list[LayerSpec], Field(min_length=1)]
    engines: Annotated[list[str], Field(min_length=1)] | None = None
    tolerance: Tolerance | None = None
    expected: ExpectedSpec | None = None
    known_differences: dict[str, KnownValue] | None = Field(
        None,
        description="engine -> the documented reason it diverges on this case (strict: it must diverge), "
        "or {reason: ..., params: [...]}: it diverges on those parameters only",
    )


# A layer's fields that hold arrays, literal or generated.
ARRAY_FIELDS = ("kernel", "weight", "bias", "gamma", "beta", "moving_mean", "moving_variance")

# Names pydantic puts in an error's location for a union branch, not a field of the file.
UNION_TAGS = frozenset(
    {
        "generated",
        "literal",
        "flag",
        "by-name",
        "by-spec",
        "uniform",
        "normal",
        "one_hot",
        "classes",
        "number",
        "per-step",
        "int",
        "pair",
    }
)

FIELD_NAMES = sorted(
    {
        name
        for model in (
            Uniform,
            Normal,
            OneHot,
            Classes,
            ActivationSpec,
            LossSpec,
            OptimizerSpec,
            Tolerance,
            KnownDifference,
            LayerSpec,
            ExpectedSpec,
            CaseSpec,
        )
        for name in model.model_fields
    }
)

# The keys allowed in a mapping, by the key it sits under (None: the top level, int: a layer).
_GENERATED_KEYS = sorted({name for model in GENERATORS for name in model.model_fields})
KEYS_UNDER: dict[object, list[str]] = {
    None: list(CaseSpec.model_fields),
    int: list(LayerSpec.model_fields),
    "activation": list(ActivationSpec.model_fields),
    "loss": list(LossSpec.model_fields),
    "optimizer": list(OptimizerSpec.model_fields),
    "tolerance": list(Tolerance.model_fields),
    "expected": list(ExpectedSpec.model_fields),
    **dict.fromkeys(("inputs", "targets", *ARRAY_FIELDS), _GENERATED_KEYS),
}

# What users of other tools write for a field, too far from its name for a spelling match.
KEY_ALIASES = {
    "learning_rate": "lr",
    "x": "inputs",
    "y": "targets",
    "labels": "targets",
    "outputs": "targets",
    "use_bias": "bias",
    "b": "bias",
    "out_features": "units",
    "out_channels": "filters",
    "pool": "pool_size",
    "stride": "strides",
    "eps": "epsilon",
    "kernel_initializer": "init",
    # PyTorch's and Keras's names for the optimizers' hyperparameters (torch.optim, keras.optimizers)
    "alpha": "rho",  # RMSprop's alpha in PyTorch; under an activation, alpha is a field and never an alias
    "betas": "beta1",
    "beta_1": "beta1",
    "beta_2": "beta2",
    "initial_accumulator_value": "initial_accumulator",
}


# What users of PyTorch and Keras write for a name, by the field it is written in, too far from
# ours for a spelling match (a spelling suggestion lowercases the word first).
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "type": {
        "linear": "dense",  # torch.nn.Linear
        "maxpooling2d": "max_pool2d",  # keras.layers.MaxPooling2D
        "averagepooling2d": "avg_pool2d",
        "batchnormalization": "batch_norm",
        "batchnorm1d": "batch_norm",  # torch.nn.BatchNorm1d
        "batchnorm2d": "batch_norm",
        "layernormalization": "layer_norm",
    },
}


def json_schema() -> dict:
    """The JSON Schema of a case file, for editors."""
    schema = CaseSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
