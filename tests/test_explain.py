"""manualprop explain on the seed 002 case prints the seed's section 1.3, step by step."""

import re
from pathlib import Path

import numpy as np
import pytest

from manualprop import cli

SEED_002 = Path(__file__).resolve().parent.parent / "cases" / "seeds" / "cs4820_a7_tanh_softmax.yaml"

# The seed notebook's printed numbers (section 1.3), float64 hand computation.
ERROR_GRADIENT_OUTPUT = [0.14432633, -0.33878922, 0.05013656, 0.14432633]
AGGREGATED_LAYER_2 = [-0.44901899, 0.17211113, 0.22872531]
AGGREGATED_LAYER_1 = [0.55701915, -0.73832976, 0.32417294]
UPDATED = {
    "layers.2.kernel": [
        [-1.00817742, 1.11919554, -0.0028407, -1.00817742],
        [0.01083027, -1.0254228, 1.10376226, 0.01083027],
        [1.09451232, 0.01288169, -1.00190633, 1.09451232],
    ],
    "layers.2.bias": [0.08556737, 0.13387892, 0.09498634, 0.08556737],
    "layers.1.kernel": [
        [-0.98691951, -0.80501381, 1.29333694],
        [1.32074994, -1.00795355, -0.81056979],
        [-0.81308049, 1.30501381, -0.99333694],
    ],
    "layers.1.bias": [0.1449019, 0.08278889, 0.07712747],
    "layers.0.kernel": [
        [0.94986828, 0.06644968, -0.02917556],
        [-0.0668423, 1.08859957, -1.03890075],
        [-1.03899134, 0.05168308, -0.02269211],
        [-0.04456153, -0.94093362, 0.97406616],
    ],
    "layers.0.bias": [0.04429809, 0.17383298, 0.06758271],
}


def sections(text: str) -> dict[str, dict[str, np.ndarray]]:
    """Heading -> engine -> the numbers printed under it."""
    found: dict[str, dict[str, list]] = {}
    heading, engine = None, None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            heading = line.split("   ")[0].strip()
            found[heading] = {}
        elif heading and line.strip():
            label = line[2:9].strip()
            engine = label or engine
            found[heading].setdefault(engine, []).extend(float(x) for x in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", line))
    return {h: {e: np.array(v) for e, v in d.items()} for h, d in found.items()}


@pytest.fixture(scope="module")
def explained():
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        status = cli.main(["explain", str(SEED_002), "--engines", "numpy"])
    assert status == 0
    return sections(buffer.getvalue())


def test_the_error_gradient_at_the_output_layer(explained):
    values = explained["layer 2 backward: the error gradient at the output layer"]["numpy"]
    np.testing.assert_allclose(values, ERROR_GRADIENT_OUTPUT, atol=5e-9)


def test_the_aggregated_error_gradients(explained):
    np.testing.assert_allclose(
        explained["layer 1 backward: dZ, the aggregated error gradient"]["numpy"], AGGREGATED_LAYER_2, atol=5e-9
    )
    np.testing.assert_allclose(
        explained["layer 0 backward: dZ, the aggregated error gradient"]["numpy"], AGGREGATED_LAYER_1, atol=5e-9
    )


@pytest.mark.parametrize("param", sorted(UPDATED))
def test_the_updated_weights(explained, param):
    np.testing.assert_allclose(explained[f"{param}: updated"]["numpy"], np.ravel(UPDATED[param]), atol=5e-9)


def test_every_installed_engine_is_shown_side_by_side(capsys):
    assert cli.main(["explain", str(SEED_002)]) == 0
    shown = sections(capsys.readouterr().out)["layer 2 backward: the error gradient at the output layer"]
    assert "numpy" in shown and len(shown) >= 1
    for values in shown.values():
        np.testing.assert_allclose(values, ERROR_GRADIENT_OUTPUT, atol=5e-9)


def test_markdown_for_handing_out(capsys):
    assert cli.main(["explain", str(SEED_002), "--engines", "numpy", "--markdown"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# cs4820-a7-tanh-softmax")
    assert "## layer 2 backward: the error gradient at the output layer" in text
    assert "[[ 0.14432633 -0.33878922  0.05013656  0.14432633]]" in text


def test_a_bad_case_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0\n")
    assert cli.main(["explain", str(bad)]) == 2
    assert "bad.yaml:1: lr" in capsys.readouterr().out


def test_explain_of_several_steps_begins_with_the_optimizer_and_the_loss_before_each_step(capsys):
    from manualprop import cli

    path = Path(__file__).resolve().parent.parent / "cases" / "optimizers" / "adam_float64.yaml"
    assert cli.main(["explain", str(path), "--engines", "numpy,numeric"]) == 0
    out = capsys.readouterr().out
    head = out.split("step 1 of 3")[0]
    assert "optimizer: adam, beta1 0.9, beta2 0.999, epsilon 1e-08, amsgrad false, 3 steps" in head
    losses = [line for line in head.splitlines() if line.startswith("loss before each step, ")]
    assert [line.split(",")[1].strip().rstrip(":").split(":")[0] for line in losses] == ["numpy", "numeric"]
    assert all(len(line.split(": ")[1].split(", ")) == 3 for line in losses)  # one loss per step
