"""manualprop explain on conv, pooling, flatten and norm layers: every quantity, images grid by grid.

The numbers of a small convolution are worked out by hand below (the way a course computes one
layer's backward pass on paper); the rest checks that what is printed is each engine's own array,
laid out as the headings say.
"""

import importlib.util
import io
import re
from contextlib import redirect_stdout

import numpy as np
import pytest

from manualprop import cli, engines, harness, parse_case
from manualprop.verdict import explain

import faulty_engines

# One 3x3 image of one channel, a 2x2 kernel, valid padding: Z[y, x] = sum_ij X[y + i, x + j] K[i, j] + b.
#   X = [[1, 2, 0], [0, 1, 3], [2, 1, 1]]   K = [[1, 0], [-1, 2]]   b = 0.5
#   Z = [[1 - 0 + 2 + 0.5, 2 - 1 + 6 + 0.5], [0 - 2 + 2 + 0.5, 1 - 1 + 2 + 0.5]] = [[3.5, 7.5], [0.5, 2.5]]
# Flattened (3.5, 7.5, 0.5, 2.5), y = 0.5 * 3.5 - 0.5 * 2.5 = 0.5 against the target 0: L = 0.25,
# dL/dy = 2 y = 1, so dZ = [[0.5, 0], [0, -0.5]] and dK[i, j] = 0.5 X[i, j] - 0.5 X[i + 1, j + 1]:
#   dK = [[0.5 - 0.5, 1 - 1.5], [0 - 0.5, 0.5 - 0.5]] = [[0, -0.5], [-0.5, 0]], db = 0.5 - 0.5 = 0.
BY_HAND = """
name: conv-by-hand
dtype: float64
loss: mse
lr: 0.1
inputs: [[[[1], [2], [0]], [[0], [1], [3]], [[2], [1], [1]]]]
targets: [[0.0]]
layers:
  - {type: conv2d, filters: 1, kernel_size: 2, kernel: [[[[1]], [[0]]], [[[-1]], [[2]]]], bias: [0.5]}
  - {type: flatten}
  - {units: 1, kernel: [[0.5], [0], [0], [-0.5]], bias: false}
"""
Z = [[3.5, 7.5], [0.5, 2.5]]
DZ = [[0.5, 0.0], [0.0, -0.5]]
DK = [[0.0, -0.5], [-0.5, 0.0]]

NETWORK = """
name: every-kind
dtype: float64
seed: 11
loss: {name: huber, delta: 0.5}
lr: 0.1
inputs: {random: normal, shape: [2, 8, 8, 2]}
targets: {random: normal, shape: [2, 2]}
layers:
  - {type: conv2d, filters: 3, kernel_size: [2, 3], padding: same, activation: relu, bias: {random: normal, std: 0.1}}
  - {type: batch_norm, epsilon: 1.0e-3, momentum: 0.99}
  - {type: avg_pool2d, pool_size: 2}
  - {type: layer_norm, epsilon: 1.0e-5}
  - {type: max_pool2d, pool_size: 2}
  - {type: flatten}
  - {units: 2, activation: tanh}
"""


def printed(case_text, *args):
    """What ``manualprop explain`` prints for the case."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "case.yaml"
        path.write_text(case_text)
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            cli.main(["explain", str(path), "--engines", "numpy", *args])
    return buffer.getvalue()


def block(out, heading):
    """The lines printed under the section whose heading starts with ``heading``."""
    lines = out.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(heading))
    end = next((k for k in range(start + 1, len(lines)) if lines[k] == ""), len(lines))
    return lines[start + 1 : end]


def grids(lines):
    """{(outer label, across label): 2-D array} from the grids printed side by side."""
    found, outer, heads = {}, "", []
    for line in lines:
        text = line[9:] if line.startswith("  ") else line  # after the engine's column
        words = text.strip()
        if re.fullmatch(r"[a-z]+ \d+(, [a-z]+ \d+)*:", words):
            outer = words[:-1]
        elif re.fullmatch(r"([a-z]+ \d+\s*)+", words):
            heads = re.findall(r"[a-z]+ \d+", words)
        elif heads and "[" in words:
            numbers = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", words)]
            per = len(numbers) // len(heads)
            for k, head in enumerate(heads):
                found.setdefault((outer, head), []).append(numbers[k * per : (k + 1) * per])
    return {key: np.array(rows) for key, rows in found.items()}


def test_a_convolution_worked_out_by_hand():
    out = printed(BY_HAND)
    z = grids(block(out, "layer 0 (conv2d 2x2, linear) forward: Z"))
    np.testing.assert_allclose(z[("sample 0", "channel 0")], Z, atol=1e-8)
    dz = grids(block(out, "layer 0 backward: dZ"))
    np.testing.assert_allclose(dz[("sample 0", "channel 0")], DZ, atol=1e-8)
    dk = grids(block(out, "layer 0 backward: dW"))
    np.testing.assert_allclose(dk[("in 0", "out 0")], DK, atol=1e-8)
    assert "layer 0 backward: db   db = dZ summed over the batch, height and width" in out
    delta = grids(block(out, "layers.0.kernel: delta"))
    np.testing.assert_allclose(delta[("in 0", "out 0")], -0.1 * np.array(DK), atol=1e-8)
    assert "shape (1, 2, 2, 1) = (sample, h, w, channel)" in out and "shape (2, 2, 1, 1) = (kh, kw, in, out)" in out


def test_images_are_shown_per_sample_with_the_channels_side_by_side():
    case = parse_case(NETWORK, "every.yaml")
    result = harness.run_case(case, ["numpy"])
    trace = result.runs["numpy"].output.trace
    out = printed(NETWORK)
    shown = grids(block(out, "layer 0 (conv2d 2x3, relu, same) forward: Z"))
    assert len(shown) == 2 * 3
    for (sample, channel), grid in shown.items():
        s, c = int(sample.split()[1]), int(channel.split()[1])
        np.testing.assert_allclose(grid, trace[0].Z[s, :, :, c], atol=5e-9)
    xhat = grids(block(out, "layer 1 (batch_norm, epsilon 0.001, momentum 0.99) forward: x^"))
    np.testing.assert_allclose(xhat[("sample 1", "channel 2")], trace[1].xhat[1, :, :, 2], atol=5e-9)
    mean = grids(block(out, "layer 3 (layer_norm, epsilon 1e-05) forward: mean"))  # one per sample and position
    assert set(mean) == {("", "sample 0"), ("", "sample 1")}
    np.testing.assert_allclose(mean[("", "sample 1")], trace[3].mean[1], atol=5e-9)
    kernel = grids(block(out, "layer 0 backward: dW"))
    np.testing.assert_allclose(kernel[("in 1", "out 2")], trace[0].dW[:, :, 1, 2], atol=5e-9)


def test_every_quantity_of_every_kind_is_shown():
    out = printed(NETWORK)
    headings = [line.split("   ")[0] for line in out.splitlines() if line and not line.startswith(" ")]
    for expected in [
        "layer 0 (conv2d 2x3, relu, same) forward: Z",
        "layer 0 (conv2d 2x3, relu, same) forward: A",
        "layer 1 (batch_norm, epsilon 0.001, momentum 0.99) forward: mean",
        "layer 1 (batch_norm, epsilon 0.001, momentum 0.99) forward: var",
        "layer 1 (batch_norm, epsilon 0.001, momentum 0.99) forward: x^, the normalized input",
        "layer 1 (batch_norm, epsilon 0.001, momentum 0.99) forward: A",
        "layer 2 (avg_pool2d 2x2) forward: A",
        "layer 3 (layer_norm, epsilon 1e-05) forward: x^, the normalized input",
        "layer 4 (max_pool2d 2x2) forward: A",
        "layer 5 (flatten) forward: A",
        "layer 6 backward: dA",  # huber's gradient reaches the last layer as dA
        "layer 4 backward: dA",
        "layer 3 backward: dx^",
        "layer 3 backward: dgamma",
        "layer 3 backward: dbeta",
        "layer 1 backward: dx^",
        "layer 0 backward: dA",
        "layer 0 backward: dW",
        "layers.1.moving_mean: delta",
        "layers.1.moving_variance: delta",
        "layers.1.moving_variance: updated",
    ]:
        assert expected in headings, expected
    assert "moving <- momentum moving + (1 - momentum) var, momentum 0.99: 0.99 moving + 0.01 var" in out
    assert "huber (mean, scale 1, delta 0.5)" in out


def test_a_kernel_given_as_weight_is_shown_out_in_kh_kw():
    text = NETWORK.replace("padding: same, activation: relu", "padding: same, activation: relu, weight: {random: normal}")
    result = harness.run_case(parse_case(text, "weight.yaml"), ["numpy"])
    trace = result.runs["numpy"].output.trace
    out = printed(text)
    assert "layer 0 backward: dW, (out, in, kh, kw) as the case gives weight" in out
    shown = grids(block(out, "layer 0 backward: dW, (out, in, kh, kw)"))
    assert set(shown) == {(f"out {o}", f"in {c}") for o in range(3) for c in range(2)}
    np.testing.assert_allclose(shown[("out 2", "in 1")], trace[0].dW[:, :, 1, 2], atol=5e-9)
    assert "layers.0.weight (out, in, kh, kw): delta" in out


def test_markdown_shows_the_same_grids():
    out = printed(BY_HAND, "--markdown")
    assert "## layer 0 (conv2d 2x2, linear) forward: Z" in out
    z = grids(out.split("## layer 0 (conv2d 2x2, linear) forward: Z")[1].split("##")[0].splitlines())
    np.testing.assert_allclose(z[("sample 0", "channel 0")], Z, atol=1e-8)


def test_explain_marks_a_layer_slip_where_diagnose_blames_it():
    cls = faulty_engines.FlattenChannelsFirst
    engines.register(cls.name, cls)
    try:
        result = harness.run_case(parse_case(NETWORK, "every.yaml"), ["numpy", cls.name])
    finally:
        engines.unregister(cls.name)
    marked = [s for s in explain.sections(result) if s.divergence]
    assert [s.heading for s in marked] == ["layer 5 (flatten) forward: A"]
    assert marked[0].divergence == f"first divergence: in {cls.name}"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_is_shown_beside_numpy_on_images():
    buffer = io.StringIO()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder, redirect_stdout(buffer):
        path = Path(folder) / "hand.yaml"
        path.write_text(BY_HAND)
        assert cli.main(["explain", str(path), "--engines", "numpy,torch"]) == 0
    lines = block(buffer.getvalue(), "layer 0 (conv2d 2x2, linear) forward: Z")
    torch_at = next(k for k, line in enumerate(lines) if line.startswith("  torch"))
    np.testing.assert_allclose(grids(lines[:torch_at])[("sample 0", "channel 0")], Z, atol=1e-8)
    np.testing.assert_allclose(grids(lines[torch_at:])[("sample 0", "channel 0")], Z, atol=1e-8)
