"""golden_hints: the slips in a person's golden values are named, with their numbers.

The numbers are written out here (a 3 x 3 kernel before the step, the engines' delta, lr 0.1,
a batch of 4 and 3 outputs), and each slip is made by hand from them, not by golden.py.
"""

import re

import numpy as np
import pytest

from manualprop import parse_case
from manualprop.reference.engine import NumpyEngine
from manualprop.verdict.golden import golden_hints

BEFORE = np.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.7], [0.6, -0.1, 0.2]])
DELTA = np.array(
    [
        [-0.012345678, 0.045612345, 0.007123456],
        [0.034298765, -0.021876543, 0.018934567],
        [-0.005712345, 0.026456789, -0.031198765],
    ]
)
AFTER = BEFORE + DELTA
LR, RTOL, ATOL = 0.1, 1e-6, 1e-7
LOSS = np.array(0.41368261)


def hints(kind, given, lr=LR, batch=4, outputs=3, **options):
    """The hints for ``given`` against DELTA and BEFORE, as layers.1.kernel."""
    return golden_hints(
        kind,
        "layers.1.kernel",
        np.asarray(given, dtype=float),
        DELTA,
        BEFORE,
        lr,
        RTOL,
        ATOL,
        batch=batch,
        outputs=outputs,
        **options,
    )


def loss_hints(given, batch=4, outputs=2, **options):
    return golden_hints("loss", "loss", np.array(given), LOSS, None, LR, RTOL, ATOL, batch=batch, outputs=outputs, **options)


def only(found):
    assert len(found) == 1, found
    return found[0]


def numbers(text):
    return re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)


# -- layout -----------------------------------------------------------------------------------


def test_a_transposed_kernel_is_said_to_be_in_the_weight_layout():
    hint = only(hints("updated", AFTER.T))
    assert hint.startswith("transposed")
    assert "(out, in) layout, where `kernel:` takes (in, out)" in hint
    assert "`layers.1.weight:`" in hint


def test_a_transposed_weight_is_said_to_be_in_the_kernel_layout():
    hint = only(hints("deltas", DELTA.T, layout="weight"))
    assert "(in, out) layout, where `weight:` takes (out, in)" in hint
    assert "`layers.1.kernel:`" in hint


# -- sections and missing updates -----------------------------------------------------------


def test_deltas_written_under_updated():
    hint = only(hints("updated", DELTA))
    assert "the deltas written under `updated:`" in hint and "move it under `deltas:`" in hint
    assert "0.04561" in hint and "-0.1544" in hint  # element [0, 1]: the delta and the value after the step


def test_updated_values_written_under_deltas():
    hint = only(hints("deltas", AFTER))
    assert "the values after the step written under `deltas:`" in hint and "move it under `updated:`" in hint


def test_the_values_before_the_step_under_updated():
    assert only(hints("updated", BEFORE)).startswith("no update applied")


# -- learning rate and sign -----------------------------------------------------------------


def test_updated_without_the_learning_rate():
    hint = only(hints("updated", BEFORE - (-DELTA / LR)))  # p - g
    assert "the learning rate 0.1 is left out" in hint
    assert "p - g instead of p - lr*g" in hint and "10 times" in hint


def test_deltas_without_the_learning_rate():
    hint = only(hints("deltas", -(-DELTA / LR)))  # -g
    assert "the learning rate 0.1 is left out" in hint and "-g instead of -lr*g" in hint


def test_updated_with_the_gradient_added():
    hint = only(hints("updated", BEFORE + LR * (-DELTA / LR)))  # p + lr*g
    assert hint.startswith("the sign is flipped")
    assert "p + lr*g instead of p - lr*g" in hint
    assert "times" not in hint


def test_deltas_with_the_wrong_sign():
    hint = only(hints("deltas", -DELTA))
    assert hint.startswith("the sign is flipped") and "+lr*g instead of -lr*g" in hint


def test_deltas_written_as_the_gradient_itself_name_both_the_sign_and_the_learning_rate():
    hint = only(hints("deltas", -DELTA / LR))  # +g
    assert "the sign is flipped" in hint and "the learning rate 0.1 is left out" in hint
    assert "+g instead of -lr*g" in hint and "-10 times" in hint


# -- constant factors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "factor, says",
    [
        (4.0, ["the 1/N of the mean is missing (N = 4", "4 times"]),
        (0.25, ["divided by the batch size N = 4", "1/4 times"]),
        (2.0, ["a factor 2 too many", "2(y - t)"]),
        (0.5, ["the 2 of d/dy (y - t)^2 = 2(y - t) is missing", "1/2 times"]),
        (3.0, ["the 1/3 for the 3 outputs is missing"]),
        (12.0, ["the mean over all N x 3 = 12 values is missing"]),
        (LR, ["the learning rate 0.1 is applied twice", "-lr^2*g instead of -lr*g"]),
    ],
)
def test_a_usual_factor_on_the_deltas_is_named(factor, says):
    hint = only(hints("deltas", factor * DELTA))
    for text in says:
        assert text in hint


def test_a_factor_on_the_change_of_updated_values_is_named():
    hint = only(hints("updated", BEFORE + 4 * DELTA))
    assert "N = 4" in hint and "the change from before the step is 4 times" in hint


def test_the_loss_scale_is_named_with_the_other_slips_of_the_same_factor():
    hint = only(hints("deltas", 2 * DELTA, scale=0.5))
    assert "the loss scale 0.5 is left out" in hint and "a factor 2 too many" in hint


def test_an_unusual_constant_factor_is_printed():
    hint = only(hints("deltas", 1.7 * DELTA))
    assert "is 1.7 times the engines'" in hint and "none of the usual slips" in hint


def test_a_factor_within_the_tolerance_of_one_is_no_factor():
    assert hints("deltas", DELTA * (1 + 3e-7)) == []  # within the golden tolerance: nothing to explain
    nearly = DELTA * (1 + 3e-7)
    nearly[2, 0] = -0.0058  # one element really off; the rest is a factor within tolerance of 1
    hint = only(hints("deltas", nearly))
    assert hint.startswith("one element is wrong") and "times" not in hint


def test_factors_equal_to_one_are_not_offered_as_reasons():
    hint = only(hints("deltas", -DELTA, lr=1.0, batch=1, outputs=1))
    assert hint.startswith("the sign is flipped")
    assert "learning rate" not in hint and "N = 1" not in hint and "1 times" not in hint


# -- one element, one row ---------------------------------------------------------------------


def test_one_wrong_element_is_named_with_both_numbers():
    given = DELTA.copy()
    given[1, 2] = 0.0201
    hint = only(hints("deltas", given))
    assert hint == ("one element is wrong: layers.1.kernel[1, 2] is 0.0201, the engines' 0.01893; every other element holds.")


def test_one_wrong_element_is_indexed_in_the_weight_layout():
    given = AFTER.copy()
    given[1, 2] = 0.0201  # kernel [1, 2] is weight [2, 1]
    hint = only(hints("updated", given, layout="weight"))
    assert "layers.1.weight[2, 1] is 0.0201" in hint and "from -0.7 before the step" in hint


def test_a_wrong_element_close_to_the_right_one_is_printed_with_enough_digits():
    given = DELTA.copy()
    given[0, 0] = -0.012349678  # differs from -0.012345678 in the 5th significant digit
    hint = only(hints("deltas", given))
    shown = numbers(hint)
    assert len(shown) == 2 and shown[0] != shown[1], hint
    assert "is -0.01235, the engines' -0.012346" in hint  # the fewest digits that tell them apart


def test_one_wrong_row_in_the_weight_layout():
    weight = AFTER.T.copy()  # as the person wrote it: (out, in)
    weight[1] = [-0.17, 0.39, -0.08]
    hint = only(hints("updated", weight.T, layout="weight"))
    assert hint.startswith("one row is wrong: row 1 of layers.1.weight (the weights into unit 1)")
    assert "[-0.17, 0.39, -0.08]" in hint


def test_one_wrong_row_in_the_kernel_layout():
    given = DELTA.copy()
    given[2] = [0.01, 0.02, 0.03]
    hint = only(hints("deltas", given))
    assert hint.startswith("one row is wrong: row 2 of layers.1.kernel (the weights from input 2)")


# -- digits -----------------------------------------------------------------------------------


def test_values_rounded_to_four_digits():
    rounded = np.array([[float(f"{v:.4g}") for v in row] for row in AFTER])
    hint = only(hints("updated", rounded))
    assert "the values hold to 4 significant digits" in hint
    assert "the tolerance (rtol 1e-6, atol 1e-7) asks for about 7: print more digits" in hint


def test_values_rounded_along_the_way():
    hint = only(loss_hints(0.41371))  # 5 digits written, the 5th wrong: rounded intermediates
    assert "agrees with the engines to 4 significant digits only, though written with 5" in hint


# -- nothing recognisable ---------------------------------------------------------------------


def test_an_unrecognisable_error_gets_no_hint():
    noise = np.array([[0.31, -0.22, 0.17], [-0.41, 0.26, 0.12], [0.35, -0.13, 0.23]])
    assert hints("deltas", DELTA * (1 + noise)) == []
    assert hints("updated", AFTER + 0.03 * noise) == []


def test_a_value_that_holds_gets_no_hint():
    assert hints("updated", AFTER) == []
    assert loss_hints(LOSS) == []


# -- the loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factor, says",
    [
        (2.0, "a factor 2 too many"),
        (4.0, "the sum over the N = 4 samples where the case takes the mean"),
        (0.25, "the mean over the N = 4 samples where the case takes the sum"),
        (8.0, "the sum of all N x 2 = 8 values"),
        (-1.0, "the sign is flipped"),
    ],
)
def test_a_factor_on_the_loss_is_named(factor, says):
    hint = only(loss_hints(factor * LOSS))
    assert says in hint and "0.4137" in hint


def test_the_loss_scale_left_out():
    assert "the loss scale 0.5 left out" in only(loss_hints(2 * LOSS, outputs=1, scale=0.5))


def test_a_rounded_loss():
    hint = only(loss_hints(0.4137))
    assert "the value holds to 4 significant digits" in hint and "about 7" in hint


def test_a_wrong_loss_gets_no_hint():
    assert loss_hints(0.5) == []


# -- end to end: a case, the NumPy engine's step, golden values as the loader reads them ------------

CASE = """
dtype: float64
loss: mse
lr: 0.1
inputs: [[0.5, -1.0], [1.5, 0.25]]
targets: [[1.0, 0.0], [0.0, 1.0]]
layers:
  - {units: 2, activation: tanh, kernel: [[0.3, -0.2], [0.1, 0.4]], bias: [0.0, 0.1]}
  - {units: 2, activation: linear, kernel: [[0.5, 0.2], [-0.3, 0.6]]}
"""


def yaml_rows(array):
    return "[" + ", ".join(yaml_rows(row) if np.ndim(row) else np.format_float_positional(row) for row in array) + "]"


def step(text=CASE):
    case = parse_case(text, "file.yaml")
    return case, case.parameters(), NumpyEngine().step(case).deltas


def end_to_end(case, params, deltas, section, name):
    exp = case.expected
    layout = "weight" if exp.given_as[(section, name)].endswith(".weight") else "kernel"
    return golden_hints(
        section,
        name,
        getattr(exp, section)[name],
        deltas[name],
        params[name],
        case.lr,
        exp.rtol,
        exp.atol,
        batch=case.inputs.shape[0],
        outputs=case.targets.shape[1],
        scale=case.scale,
        layout=layout,
    )


def test_end_to_end_transposed_and_gradient_as_delta():
    case, params, deltas = step()
    updated = params["layers.1.kernel"] + deltas["layers.1.kernel"]
    transposed = golden_hints(
        "updated",
        "layers.1.kernel",
        updated.T,
        deltas["layers.1.kernel"],
        params["layers.1.kernel"],
        case.lr,
        RTOL,
        ATOL,
        batch=2,
        outputs=2,
    )
    assert "(out, in) layout" in only(transposed) and "`layers.1.weight:`" in only(transposed)
    gradient = -deltas["layers.0.bias"] / case.lr
    plus_g = golden_hints(
        "deltas",
        "layers.0.bias",
        gradient,
        deltas["layers.0.bias"],
        params["layers.0.bias"],
        case.lr,
        RTOL,
        ATOL,
        batch=2,
        outputs=2,
    )
    assert "the learning rate 0.1 is left out" in only(plus_g) and "the sign is flipped" in only(plus_g)


def test_end_to_end_through_the_expected_section_of_a_case_file():
    _, params, deltas = step()
    updated = params["layers.1.kernel"] + deltas["layers.1.kernel"]
    expected = (
        f"expected:\n"
        f"  updated: {{layers.1.kernel: {yaml_rows(updated.T)}}}\n"  # (out, in) values under kernel:
        f"  deltas: {{layers.0.bias: {yaml_rows(-deltas['layers.0.bias'] / 0.1)}, "
        f"layers.1.weight: {yaml_rows(deltas['layers.1.kernel'])}}}\n"
    )  # (in, out) values under weight:
    case, params, deltas = step(CASE + expected)
    assert "`layers.1.weight:`" in only(end_to_end(case, params, deltas, "updated", "layers.1.kernel"))
    swapped = only(end_to_end(case, params, deltas, "deltas", "layers.1.kernel"))
    assert "(in, out) layout, where `weight:` takes (out, in)" in swapped and "`layers.1.kernel:`" in swapped
    plus_g = only(end_to_end(case, params, deltas, "deltas", "layers.0.bias"))
    assert "the sign is flipped" in plus_g and "the learning rate 0.1 is left out" in plus_g
