"""Bad case files for the layer types and losses of SPEC sections 8 and 9: each problem is reported
before any engine runs, once, with the file, the line, the field path and what was expected against
what was found (SPEC section 1).

The helpers come from test_case_errors: ``reject`` parses a text shown as bad.yaml and returns the
CaseError, ``only_problem`` asserts the single problem's rendered ``bad.yaml:LINE: FIELD:`` and the
key words of its message.
"""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from manualprop import parse_case
from manualprop.casefile.schema import json_schema

from test_case_errors import assert_problem, edit, only_problem, reject

# conv 5x5x3 -> 3x3x2, batch norm, pool 2 -> 1x1x2, flatten -> 2, layer norm, dense 2.
# The line numbers below are relied upon.
IMAGES = """\
lr: 0.1
loss: mse
inputs: {random: normal, shape: [2, 5, 5, 3]}
targets: {random: normal, shape: [2, 2]}
layers:
  - type: conv2d
    filters: 2
    kernel_size: 3
    activation: relu
  - type: batch_norm
    epsilon: 0.001
    momentum: 0.99
  - type: max_pool2d
    pool_size: 2
  - type: flatten
  - type: layer_norm
    epsilon: 0.00001
  - units: 2
"""
LINE = {
    "inputs": 3,
    "layers[0]": 6,
    "layers[0].kernel_size": 8,
    "layers[0].activation": 9,
    "layers[1]": 10,
    "layers[1].momentum": 12,
    "layers[2]": 13,
    "layers[2].pool_size": 14,
    "layers[4]": 16,
    "layers[4].epsilon": 17,
    "layers[5]": 18,
}

# Two samples of two features into a softmax of three classes.
SPARSE = """\
lr: 0.1
loss: scce
inputs: [[1.0, 2.0], [3.0, 4.0]]
targets: [0, 2]
layers:
  - units: 3
    activation: softmax
"""

# The same features into two linear outputs, for the losses on values.
VALUES = """\
lr: 0.1
loss: {name: huber, delta: 1.0}
inputs: [[1.0, 2.0], [3.0, 4.0]]
targets: [[0.5, 1.0], [0.0, 0.25]]
layers:
  - units: 2
"""


def change(old: str, new: str, text: str = IMAGES) -> str:
    """``text`` with the single occurrence of ``old`` replaced."""
    return edit(old, new, text)


def after(line: int, text: str, base: str = IMAGES) -> str:
    """``base`` with ``text`` (whole lines) inserted after its line ``line``."""
    lines = base.splitlines(keepends=True)
    return "".join(lines[:line]) + text + "".join(lines[line:])


def test_the_base_cases_are_valid():
    case = parse_case(IMAGES, "good.yaml")
    assert [layer.kind for layer in case.layers] == [
        "conv2d",
        "batch_norm",
        "max_pool2d",
        "flatten",
        "layer_norm",
        "dense",
    ]
    assert [layer.out_shape for layer in case.layers] == [(3, 3, 2), (3, 3, 2), (1, 1, 2), (2,), (2,), (2,)]
    assert parse_case(SPARSE, "good.yaml").targets.tolist() == [0, 2]
    assert parse_case(VALUES, "good.yaml").loss_params == {"delta": 1.0}
    lines = IMAGES.splitlines()
    for key, line in LINE.items():
        written = lines[line - 1].strip(" -").split(":")[0]
        assert key.endswith(f".{written}") or key == written or (key.endswith("]") and written in ("type", "units")), key


# -- a layer that does not fit what comes in ---------------------------------------------------


def test_a_pool_larger_than_its_input():
    err = reject(change("    pool_size: 2", "    pool_size: 4"))
    only_problem(
        err,
        LINE["layers[2].pool_size"],
        "layers[2].pool_size",
        "expected pool_size at most (3, 3)",
        "layer 1 (batch_norm) gives images (3, 3, 2)",
        "found (4, 4)",
    )


def test_a_pool_taller_than_its_input():
    err = reject(change("    pool_size: 2", "    pool_size: [4, 1]"))
    only_problem(err, LINE["layers[2].pool_size"], "layers[2].pool_size", "at most (3, 3)", "found (4, 1)")


def test_a_conv_kernel_larger_than_its_input_with_valid_padding():
    err = reject(change("    kernel_size: 3", "    kernel_size: [3, 6]"))
    only_problem(
        err,
        LINE["layers[0].kernel_size"],
        "layers[0].kernel_size",
        "expected kernel_size at most (5, 5)",
        "the inputs give images (5, 5, 3)",
        "found (3, 6)",
        "padding valid",
    )


def test_the_same_kernel_with_same_padding_fits():
    text = change("    kernel_size: 3", "    kernel_size: [3, 6]\n    padding: same")
    text = change("    pool_size: 2", "    pool_size: 5", text)  # same keeps 5x5
    assert parse_case(text, "good.yaml").layers[0].out_shape == (5, 5, 2)


def test_a_dense_layer_after_a_conv_without_a_flatten():
    err = reject(change("  - type: flatten\n", ""))
    only_problem(
        err,
        17,  # the dense layer, now layers[4]
        "layers[4].type",
        "a dense layer takes (batch, features)",
        "layer 3 (layer_norm) gives images (1, 1, 2)",
        "put {type: flatten} before it",
    )


def test_a_dense_first_layer_on_images_blames_the_layer_not_the_inputs():
    text = IMAGES.split("layers:")[0] + "layers:\n  - units: 2\n"
    err = reject(text)
    only_problem(err, 6, "layers[0].type", "takes (batch, features)", "the inputs give images (5, 5, 3)", "flatten")


def test_a_conv_after_a_dense_layer():
    err = reject(
        change(
            "  - units: 2\n", "  - units: 4\n  - {type: conv2d, filters: 1, kernel_size: 1}\n  - type: flatten\n  - units: 2\n"
        )
    )
    only_problem(
        err,
        19,
        "layers[6].type",
        "conv2d takes images (batch, height, width, channels)",
        "layer 5 (dense) gives 4 features",
    )


def test_a_pool_on_features():
    text = change("loss: {name: huber, delta: 1.0}", "loss: mse", VALUES)
    err = reject(change("  - units: 2\n", "  - {type: max_pool2d, pool_size: 2}\n  - units: 2\n", text))
    only_problem(err, 6, "layers[0].type", "max_pool2d takes images", "the inputs give 2 features")


def test_a_network_that_ends_with_images():
    text = IMAGES.split("  - type: flatten")[0]
    err = reject(text)
    only_problem(
        err,
        LINE["layers[2]"],
        "layers[2]",
        "the network ends with images (1, 1, 2) = (height, width, channels) per sample",
        "end with {type: flatten} and a dense layer",
    )


@pytest.mark.parametrize("kept", [[3], [2, 3]])  # flatten alone; a pool and a flatten
def test_a_network_with_nothing_to_train(kept):
    layers = IMAGES.split("layers:\n")[1].replace("  - type: flatten\n", "  - {type: flatten}\n")
    blocks = ["  - " + block for block in layers.split("  - ")[1:]]
    text = IMAGES.split("layers:")[0].replace("shape: [2, 2]", "shape: [2, 75]") + "layers:\n"
    text += "".join(blocks[i] for i in kept).replace("pool_size: 2", "pool_size: 1")
    err = reject(text)
    words = "flatten" if kept == [3] else "flatten and max_pool2d"
    only_problem(
        err,
        5,
        "layers",
        "expected a layer with parameters to train (dense, conv2d, batch_norm or layer_norm)",
        f"found only {words}",
    )


# -- a conv kernel against the channels coming in ----------------------------------------------


def test_a_conv_kernel_whose_in_does_not_match_the_channels():
    err = reject(after(9, "    kernel: {random: normal, shape: [3, 3, 2, 2]}\n"))
    only_problem(
        err,
        10,
        "layers[0].kernel.shape",
        "expected shape (3, 3, 3, 2) = (kernel height, kernel width, input channels, filters), the Keras layout",
        "found (3, 3, 2, 2)",
        "it takes 2 input channels, but the inputs give images (5, 5, 3)",
    )


def test_a_conv_weight_whose_in_does_not_match_the_channels():
    err = reject(after(9, "    weight: {random: normal, shape: [2, 2, 3, 3]}\n"))
    only_problem(
        err,
        10,
        "layers[0].weight.shape",
        "expected shape (2, 3, 3, 3) = (filters, input channels, kernel height, kernel width), the PyTorch layout",
        "found (2, 2, 3, 3)",
        "it takes 2 input channels",
    )


def test_a_second_conv_takes_the_first_ones_filters_as_channels():
    literal = "[[[[1.0], [0.5], [0.25]]]]"  # (1, 1, 3, 1): three input channels where the first conv gives two
    err = reject(after(9, f"  - {{type: conv2d, filters: 1, kernel_size: 1, kernel: {literal}}}\n"))
    only_problem(
        err,
        10,
        "layers[1].kernel",
        "expected shape (1, 1, 2, 1)",
        "found (1, 1, 3, 1)",
        "it takes 3 input channels, but layer 0 (conv2d) gives images (3, 3, 2)",
    )


def test_a_literal_conv_weight_with_the_wrong_channels():
    literal = "[[[[1.0]], [[0.5]]]]"  # (1, 2, 1, 1) in (out, in, kh, kw): two input channels, three come in
    err = reject(after(5, f"  - {{type: conv2d, filters: 1, kernel_size: 1, weight: {literal}}}\n"))
    only_problem(err, 6, "layers[0].weight", "expected shape (1, 3, 1, 1)", "found (1, 2, 1, 1)", "2 input channels")


@pytest.mark.parametrize(
    "key, shape, meant",
    [
        ("kernel", "[2, 3, 3, 3]", "weight"),  # (out, in, kh, kw) written as kernel
        ("weight", "[3, 3, 3, 2]", "kernel"),  # (kh, kw, in, out) written as weight
    ],
)
def test_a_conv_kernel_in_the_other_layout_says_so(key, shape, meant):
    err = reject(after(9, f"    {key}: {{random: normal, shape: {shape}}}\n"))
    only_problem(err, 10, f"layers[0].{key}.shape", f"found ({shape[1:-1]})", "that is", f"write it as `{meant}:`")


# -- fields of another type, required fields ---------------------------------------------------


@pytest.mark.parametrize(
    "line, text, field, words",
    [
        (18, "    filters: 3\n", "layers[5].filters", ("filters is a field of conv2d, not of dense", "dense takes units")),
        (7, "    units: 4\n", "layers[0].units", ("units is a field of dense, not of conv2d", "conv2d takes filters")),
        (
            14,
            "    activation: relu\n",
            "layers[2].activation",
            ("activation is a field of dense and conv2d, not of max_pool2d", "max_pool2d takes pool_size, strides"),
        ),
        (
            17,
            "    momentum: 0.9\n",
            "layers[4].momentum",
            ("momentum is a field of batch_norm, not of layer_norm", "layer_norm takes epsilon, gamma, beta"),
        ),
        (
            15,
            "    padding: same\n",
            "layers[3].padding",
            ("padding is a field of conv2d, not of flatten", "no field besides type"),
        ),
    ],
)
def test_a_field_of_another_type(line, text, field, words):
    err = reject(after(line, text))
    only_problem(err, line + 1, field, *words)


@pytest.mark.parametrize("field", ["filters", "kernel_size"])
def test_a_conv_without_a_required_field(field):
    err = reject(IMAGES.replace(f"    {field}: {2 if field == 'filters' else 3}\n", ""))
    only_problem(err, 6, f"layers[0].{field}", f"missing required field {field!r} of conv2d")


def test_a_conv_without_both_required_fields_gets_two_problems():
    err = reject(IMAGES.replace("    filters: 2\n    kernel_size: 3\n", ""))
    assert len(err.problems) == 2, str(err)
    assert_problem(err, 6, "layers[0].filters", "missing required field 'filters'")
    assert_problem(err, 6, "layers[0].kernel_size", "missing required field 'kernel_size'")


@pytest.mark.parametrize(
    "field, both",
    [
        ("epsilon", ("Keras's epsilon defaults to 1e-3", "PyTorch's eps to 1e-5")),
        ("momentum", ("momentum to 0.99", "PyTorch's", "momentum to 0.1")),
    ],
)
def test_batch_norm_without_a_field_whose_defaults_differ_names_both_frameworks(field, both):
    value = {"epsilon": "0.001", "momentum": "0.99"}[field]
    err = reject(change(f"    {field}: {value}\n", ""))
    only_problem(err, 10, f"layers[1].{field}", f"missing required field {field!r} of batch_norm", "no default here", *both)


def test_layer_norm_without_epsilon_names_both_frameworks():
    err = reject(change("    epsilon: 0.00001\n", ""))
    only_problem(err, 16, "layers[4].epsilon", "missing required field 'epsilon' of layer_norm", "1e-3", "1e-5")


# -- batch norm and layer norm values ----------------------------------------------------------


@pytest.mark.parametrize("momentum", ["1.0", "1", "1.5"])
def test_momentum_of_one_or_more(momentum):
    err = reject(change("    momentum: 0.99", f"    momentum: {momentum}"))
    only_problem(err, 12, "layers[1].momentum", "less than 1", f"found {momentum}", "[0, 1)", "Keras's convention")


def test_a_negative_momentum():
    err = reject(change("    momentum: 0.99", "    momentum: -0.1"))
    only_problem(err, 12, "layers[1].momentum", "greater than or equal to 0", "found -0.1")


def test_a_negative_moving_variance():
    err = reject(after(12, "    moving_variance: [1.0,\n      -0.5]\n"))
    only_problem(err, 14, "layers[1].moving_variance[1]", "expected a variance >= 0, found -0.5")


def test_a_generated_moving_variance_that_draws_a_negative_value():
    err = reject(after(12, "    moving_variance: {random: normal}\n"))
    only_problem(err, 13, "layers[1].moving_variance.random", "expected variances >= 0", "random: uniform")


@pytest.mark.parametrize(
    "line, text, field, expected, found",
    [
        (12, "    gamma: [1.0, 1.0, 1.0]\n", "layers[1].gamma", "(2,)", "(3,)"),  # batch norm on (3, 3, 2) images
        (12, "    moving_mean: [0.0]\n", "layers[1].moving_mean", "(2,)", "(1,)"),
        (17, "    beta: [0.0, 0.0, 0.0, 0.0]\n", "layers[4].beta", "(2,)", "(4,)"),  # layer norm on 2 features
    ],
)
def test_a_norm_array_of_the_wrong_length(line, text, field, expected, found):
    err = reject(after(line, text))
    only_problem(err, line + 1, field, f"expected shape {expected} = (features,)", "last axis", f"found {found}")


def test_epsilon_must_be_positive():
    err = reject(change("    epsilon: 0.001", "    epsilon: 0"))
    only_problem(err, 11, "layers[1].epsilon", "greater than 0", "found 0")


# -- targets of the new losses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, at, found",
    [("[1.5, 0]", 0, "found 1.5"), ("[0, -1]", 1, "found -1"), ("[3, 0]", 0, "found 3")],
)
def test_sparse_targets_that_are_not_class_indices(targets, at, found):
    err = reject(change("targets: [0, 2]", f"targets: {targets}", SPARSE))
    only_problem(err, 4, f"targets[{at}]", "expected a class index, an integer in 0 .. 2", "3 classes", found)
    assert f"{found}\n" in str(err) + "\n", "the number as the file writes it, not a NumPy repr"


def test_every_bad_class_index_is_listed():
    err = reject(change("targets: [0, 2]", "targets: [-1, 3]", SPARSE))
    assert len(err.problems) == 2, str(err)
    assert_problem(err, 4, "targets[0]", "found -1")
    assert_problem(err, 4, "targets[1]", "found 3")


@pytest.mark.parametrize("targets", ["[[1, 0, 0], [0, 0, 1]]", "{random: one_hot, shape: [2, 3]}"])
def test_one_hot_rows_given_to_the_sparse_loss(targets):
    err = reject(change("targets: [0, 2]", f"targets: {targets}", SPARSE))
    only_problem(err, 4, "targets", "one class index per sample, (batch,)", "one-hot rows are categorical_crossentropy's")


def test_generated_class_indices_load():
    case = parse_case(change("targets: [0, 2]", "targets: {random: classes}", SPARSE), "good.yaml")
    assert case.targets.dtype.kind == "i" and set(case.targets.tolist()) <= {0, 1, 2}


def test_random_classes_used_for_inputs():
    err = reject(change("inputs: [[1.0, 2.0], [3.0, 4.0]]", "inputs: {random: classes, shape: [2, 2]}", SPARSE))
    only_problem(err, 3, "inputs.random", "random: classes draws class indices, the targets of a sparse loss only")


def test_random_classes_for_one_hot_targets():
    text = change("loss: scce", "loss: cce", SPARSE)
    err = reject(change("targets: [0, 2]", "targets: {random: classes, shape: [2, 3]}", text))
    only_problem(err, 4, "targets.random", "the targets of a sparse loss only")


@pytest.mark.parametrize("value", ["-0.5", "1.5"])
def test_binary_crossentropy_targets_are_probabilities(value):
    text = change("loss: {name: huber, delta: 1.0}", "loss: bce", VALUES)
    text = change("  - units: 2\n", "  - units: 2\n    activation: sigmoid\n", text)
    err = reject(change("[0.0, 0.25]", f"[0.0, {value}]", text))
    only_problem(err, 4, "targets[1][1]", "expected a probability in [0, 1]", f"found {value}")


# -- huber's delta ------------------------------------------------------------------------------


def test_huber_delta_on_another_loss():
    err = reject(change("loss: {name: huber, delta: 1.0}", "loss: {name: mse, delta: 1.0}", VALUES))
    only_problem(err, 2, "loss.delta", "delta is a parameter of huber, not of mse")


@pytest.mark.parametrize("delta, found", [("0", "0.0"), ("-1.0", "-1.0")])
def test_huber_delta_must_be_positive(delta, found):
    err = reject(change("delta: 1.0", f"delta: {delta}", VALUES))
    only_problem(err, 2, "loss.delta", f"delta must be > 0, found {found}")


# -- unknown layer types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "written, meant",
    [
        ("conv2D", "conv2d"),
        ("Conv2d", "conv2d"),
        ("maxpool2d", "max_pool2d"),
        ("batchnorm", "batch_norm"),
        ("BatchNormalization", "batch_norm"),  # Keras's name
        ("BatchNorm2d", "batch_norm"),  # PyTorch's
        ("Linear", "dense"),
        ("MaxPooling2D", "max_pool2d"),
    ],
)
def test_an_unknown_layer_type_suggests_the_nearest(written, meant):
    err = reject(change("  - type: conv2d", f"  - type: {written}"))
    only_problem(err, 6, "layers[0].type", "'conv2d'", "'layer_norm'", f"found {written!r}", f"did you mean {meant!r}?")


def test_an_unknown_layer_type_far_from_every_name_gets_no_suggestion():
    err = reject(change("  - type: conv2d", "  - type: lstm"))
    message = only_problem(err, 6, "layers[0].type", "found 'lstm'")
    assert "did you mean" not in message


def test_the_json_schema_builds_and_accepts_the_layer_fields():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(IMAGES), schema)
    assert "conv2d" in str(schema) and "Keras's convention" in str(schema)
