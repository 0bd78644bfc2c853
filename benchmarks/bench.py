"""manualprop's benchmark: prints every figure in one table; asserts nothing.

    python benchmarks/bench.py            # the full run
    python benchmarks/bench.py --quick    # fewer repetitions (CI runs this)

Figures: the bundled suite's wall time with and without imports; each engine's marginal cost
per case next to the bare framework step on the same case (the harness's overhead as a ratio);
the NumPy engine against PyTorch on a large MLP (784-1024-1024-10, batch 256); fuzz throughput;
the start-up time of `manualprop run --engines numpy` on one case; and `--watch`'s re-run of a
saved case, from the write to the result printed.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONE_CASE = ROOT / "cases" / "seeds" / "cs4820_a7_tanh_softmax.yaml"


def timed(fn, repeat: int) -> float:
    """The median seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_command(args: list[str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def suite_figures(rows: list, quick: bool) -> None:
    from manualprop import engines, harness
    from manualprop.casefile.case import load_case

    with tempfile.TemporaryDirectory() as where:
        cold = run_command([sys.executable, "-m", "manualprop.cli", "run", "-q"], cwd=Path(where))
    rows.append(("suite: the bundled cases, every engine, imports included", f"{cold:.2f} s", "manualprop run, a fresh process"))
    paths = harness.find_cases([harness.bundled_cases()])
    cases = [load_case(p, engines.names()) for p in paths]
    names = [n for n in engines.default_names() if engines.get(n).unavailable() is None]
    for case in cases:  # imports, first model builds
        harness.run_case(case, names)
    warm = timed(lambda: [harness.run_case(c, names) for c in cases], 1 if quick else 3)
    rows.append(("suite: the bundled cases, every engine, imports excluded", f"{warm:.2f} s", f"{len(cases)} cases, warm"))


def bare_torch(case):
    """The same step written directly in PyTorch, the model built beforehand: the floor."""
    import torch
    from torch import nn

    from manualprop.adapters.torch_engine import ACTIVATION, LOSS
    from manualprop.concepts import LOSSES

    dtype = getattr(torch, case.dtype.name)
    modules = []
    for i, layer in enumerate(case.layers):
        modules.append(nn.Linear(layer.in_shape[0], layer.units, bias=layer.bias is not None, dtype=dtype))
        last = i == len(case.layers) - 1
        if not (last and LOSSES[case.loss].on_logits):
            modules.append(ACTIVATION[layer.activation](nn, layer.alpha))
    model = nn.Sequential(*modules)
    criterion = LOSS[case.loss](nn, case.reduction, case.loss_params)
    optimizer = torch.optim.SGD(model.parameters(), lr=case.lr)
    x, t = torch.from_numpy(case.inputs), torch.from_numpy(case.targets)

    def step():
        optimizer.zero_grad(set_to_none=True)
        (case.scale * criterion(model(x), t)).backward()
        optimizer.step()

    return step


def bare_keras(case):
    """train_on_batch on a model compiled beforehand: the floor of the Keras engine."""
    from manualprop import engines

    engine = engines.get("keras")
    from manualprop.adapters.keras_engine import _import_keras

    keras = _import_keras()
    floatx = keras.config.floatx() if hasattr(keras, "config") else keras.backend.floatx()
    compiled = engine.compiled(keras, case)
    del floatx
    return lambda: compiled.model.train_on_batch(case.inputs, case.targets)


def engine_figures(rows: list, quick: bool) -> None:
    from manualprop import engines, harness
    from manualprop.casefile.case import load_case

    cases = [load_case(p, engines.names()) for p in harness.find_cases([harness.bundled_cases()])]
    # the bare floors below are written for dense layers: the dense cases only
    cases = [c for c in cases if not c.known_differences and all(layer.kind == "dense" for layer in c.layers)]
    repeat = 3 if quick else 20
    bare = {"torch": bare_torch, "keras": bare_keras}
    for name in ("numpy", "torch", "keras"):
        engine = engines.get(name)
        if engine.unavailable():
            rows.append((f"{name}: marginal cost per case", "skipped", engine.unavailable()))
            continue
        for case in cases:
            engine.step(case)  # warm-up: imports, first builds
        per_case = statistics.mean(timed(functools.partial(engine.step, c), repeat) for c in cases) * 1000
        if name in bare:
            floors = []
            for case in cases:
                step = bare[name](case)
                step()
                floors.append(timed(step, repeat))
            floor = statistics.mean(floors) * 1000
            rows.append(
                (
                    f"{name}: marginal cost per case (warm)",
                    f"{per_case:.2f} ms",
                    f"bare {name} step {floor:.2f} ms: overhead x{per_case / floor:.2f}",
                )
            )
        else:
            rows.append((f"{name}: marginal cost per case (warm)", f"{per_case:.3f} ms", f"mean over {len(cases)} bundled cases"))


MLP = """
dtype: {dtype}
seed: 0
loss: categorical_crossentropy
lr: 0.01
inputs: {{random: uniform, shape: [256, 784], low: 0, high: 1}}
targets: {{random: one_hot}}
layers:
  - {{units: 1024, activation: relu, init: he_normal}}
  - {{units: 1024, activation: relu, init: he_normal}}
  - {{units: 10, activation: softmax, init: glorot_uniform}}
"""


def mlp_figures(rows: list, quick: bool) -> None:
    from manualprop import engines, parse_case

    if not installed("torch"):
        rows.append(("numpy / torch on 784-1024-1024-10", "skipped", "torch is not installed"))
        return
    for dtype in ("float32", "float64"):
        case = parse_case(MLP.format(dtype=dtype), "mlp.yaml")
        times = {}
        for name in ("numpy", "torch"):
            engine = engines.get(name)
            engine.step(case)
            times[name] = timed(functools.partial(engine.step, case), 3 if quick else 10)
        rows.append(
            (
                f"numpy / torch, 784-1024-1024-10, batch 256, {dtype}",
                f"x{times['numpy'] / times['torch']:.2f}",
                f"numpy {times['numpy'] * 1000:.1f} ms, torch {times['torch'] * 1000:.1f} ms a step",
            )
        )


def fuzz_figures(rows: list, quick: bool) -> None:
    from manualprop import engines
    from manualprop.fuzz import fuzz

    names = [n for n in engines.default_names() if engines.get(n).unavailable() is None]
    n = 20 if quick else 100
    with tempfile.TemporaryDirectory() as out:
        fuzz(5, 99, Path(out), names)  # warm-up
        summary = fuzz(n, 1, Path(out), names)
        rows.append(
            (
                f"fuzz throughput, {', '.join(names)}",
                f"{summary.rate:.1f} cases/s",
                f"{n} random cases, every one a new architecture",
            )
        )
        if "keras" in names:
            pooled = fuzz(n, 1, Path(out), names, architectures=8)
            rows.append(
                (
                    "fuzz throughput, --architectures 8",
                    f"{pooled.rate:.1f} cases/s",
                    "cases drawn over 8 architectures, models reused",
                )
            )
        fast = [x for x in names if x != "keras"]
        summary = fuzz(n, 1, Path(out), fast)
        rows.append((f"fuzz throughput, {', '.join(fast)}", f"{summary.rate:.1f} cases/s", f"{n} random cases"))


def oracle_figures(rows: list, quick: bool) -> None:
    """The oracle (128-bit central differences) on the bundled cases: its step, then its trace."""
    from manualprop import engines, load_case
    from manualprop.harness import bundled_cases

    oracle = engines.get(engines.ORACLE)
    names = (
        ["seeds/cs4820_a7_tanh_softmax.yaml"]
        if quick
        else [
            "seeds/cs4820_a7_tanh_softmax.yaml",
            "activations/relu_he_normal_batch32.yaml",
            "shapes/deep_five_layers_float32.yaml",
            "layers/lenet_scce_float32.yaml",
            "layers/batch_norm_adam_three_steps_float32.yaml",
        ]
    )
    for name in names:
        case = load_case(bundled_cases() / name)
        start = time.perf_counter()
        result = oracle.step(case)
        stepped = time.perf_counter() - start
        result.trace  # noqa: B018 (the intermediates' differences, taken on first read)
        traced = time.perf_counter() - start - stepped
        size = sum(p.size for p in case.parameters().values())
        rows.append((f"oracle on {name}", f"{stepped:.2f} s", f"{size} parameters; its trace (dZ, dA) {traced:.2f} s more"))


def startup_figures(rows: list, quick: bool) -> None:
    """`manualprop run --engines numpy CASE`, start-up to exit, each run a fresh process: the console
    script a person types (python -m manualprop.cli where none is installed), output to a pipe (at a
    terminal the progress bar adds a few ms). The median of several runs, after one not counted."""
    script = Path(sys.executable).parent / ("manualprop.exe" if os.name == "nt" else "manualprop")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "manualprop.cli"]
    command += ["run", "--engines", "numpy", str(ONE_CASE)]
    repeat = 5 if quick else 15

    def median_of(env: dict[str, str]) -> float:
        subprocess.run(command, env=env, check=True, capture_output=True)  # not counted: it may write bytecode
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    seconds = median_of(dict(os.environ))
    note = f"{'the console script' if script.exists() else 'python -m manualprop.cli'}, median of {repeat}{load}"
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):  # then every run compiles manualprop's modules again
        with tempfile.TemporaryDirectory() as cache:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            cached = median_of({**env, "PYTHONPYCACHEPREFIX": cache})
        note += f"; PYTHONDONTWRITEBYTECODE is set: {cached:.2f} s with bytecode cached"
    rows.append(("start-up: manualprop run --engines numpy CASE", f"{seconds:.2f} s", note))


def watch_figures(rows: list, quick: bool) -> None:
    """`manualprop run CASE --watch` in a process of its own: from the file written to the re-run's
    last line read from its output, watchfiles' detection included; the median over several saves."""
    import queue
    import signal
    import threading

    from manualprop import engines

    names = [n for n in ("numpy", "torch", "keras") if engines.get(n).unavailable() is None]
    text = ONE_CASE.read_text(encoding="utf-8")
    lr = next(line for line in text.splitlines() if line.startswith("lr:"))
    saves = {
        "it still passes": lambda i: f"{text}# save {i}\n",
        "lr changed: golden values fail, diagnosed": lambda i: text.replace(lr, f"lr: {0.2 + i / 100}"),
    }
    with tempfile.TemporaryDirectory() as where:
        case = Path(where) / ONE_CASE.name
        case.write_text(text, encoding="utf-8")
        command = [sys.executable, "-m", "manualprop.cli", "run", str(case), "--watch", "--engines", ",".join(names)]
        child = subprocess.Popen(command, cwd=where, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put((time.perf_counter(), line)) for line in child.stdout], daemon=True).start()

        def wait_for(start: str, timeout: float) -> tuple[float, str]:
            deadline = time.perf_counter() + timeout
            while time.perf_counter() < deadline and (child.poll() is None or not lines.empty()):
                try:
                    when, line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line.startswith(start):
                    return when, line
            raise RuntimeError(f"manualprop run --watch printed no line starting {start!r} (exit status {child.poll()})")

        try:
            wait_for("watching", 300)  # the first run: imports, first builds
            for label, save in saves.items():
                seconds, inside = [], []
                for i in range(3 if quick else 9):
                    time.sleep(0.3)  # saves apart, as a person makes them
                    written = time.perf_counter()
                    if i % 2:  # half the saves as editors make them: a temporary file renamed over the case
                        temporary = case.with_name(f".{case.name}.tmp")
                        temporary.write_text(save(i), encoding="utf-8")
                        os.replace(temporary, case)
                    else:
                        case.write_text(save(i), encoding="utf-8")
                    done, line = wait_for("re-ran in", 30)
                    seconds.append(done - written)
                    inside.append(float(line.split()[2]))
                rows.append(
                    (
                        f"--watch: a saved case re-run ({label})",
                        f"{statistics.median(seconds) * 1000:.0f} ms",
                        (
                            f"{', '.join(names)}; write to result printed, median of {len(seconds)} saves; "
                            f"the re-run itself {statistics.median(inside):.0f} ms"
                        ),
                    )
                )
        finally:
            child.send_signal(signal.SIGINT)
            status = child.wait(30)
        if status != 0:
            rows.append(("--watch: Ctrl-C", f"exit {status}", "expected 0"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run, for CI")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    for part in (startup_figures, suite_figures, engine_figures, mlp_figures, fuzz_figures, oracle_figures, watch_figures):
        part(rows, args.quick)

    from rich.console import Console
    from rich.table import Table

    from manualprop.reports.fingerprint import environment

    env = environment()
    table = Table(
        title=f"manualprop benchmark{' (quick)' if args.quick else ''}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {env['python']}, NumPy {env['numpy']}, torch {env['torch']}, "
        f"TensorFlow {env['tensorflow']}, Keras {env['keras']}",
        title_justify="left",
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
