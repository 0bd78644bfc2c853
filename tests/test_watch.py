"""``--watch``: a save re-runs the file saved, a broken save is reported and the watch goes on.

The loop is fed scripted batches of changes (each written to disk just before it is yielded),
so no test but one depends on the file system's timing; that one saves through a real rename.
"""

import math
import os
import re
import subprocess
import sys
import threading

import pytest

from manualprop import cli, watch

CASE = """
name: tiny
dtype: float64
loss: mse
lr: 0.1
inputs: [[1.0, 2.0]]
targets: [[{target}]]
layers:
  - {{units: 2, activation: tanh, kernel: [[{w}, -0.2], [0.3, 0.4]], bias: [0.0, 0.1]}}
  - {{units: 1, kernel: [[0.5], [-0.6]]}}
"""


def tiny(target: float = 0.5, w: float = 0.1) -> str:
    return CASE.format(target=target, w=w)


def tiny_loss(target: float) -> float:
    """The worked example: z = [1, 2] @ W0 + b0 = [0.7, 0.7], a = tanh(z), y = a @ [0.5, -0.6], (y - t)^2."""
    a = math.tanh(0.7)
    return (0.5 * a - 0.6 * a - target) ** 2


def saves(*steps):
    """Scripted changes: each step is (path, text or None to delete); written, then yielded as a batch."""

    def changes(targets, stop_event=None):
        for path, text in steps:
            if text is None:
                path.unlink()
            else:
                path.write_text(text)
            yield {(object(), str(path.resolve()))}

    return changes


def losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"loss: numpy ([-\d.e+]+)", text)]


def after_first_save(text: str) -> str:
    return text.split(" saved ", 1)[1]


def test_a_save_reruns_the_case_with_its_new_numbers(tmp_path, monkeypatch, capsys):
    case = tmp_path / "tiny.yaml"
    case.write_text(tiny(0.5))
    monkeypatch.setattr(watch, "changes", saves((case, tiny(1.5))))
    status = cli.main(["run", str(case), "--watch", "--engines", "numpy"])
    out = capsys.readouterr().out
    assert status == 0  # the watch ended (here: the script did; at a terminal: Ctrl-C)
    assert losses(out) == [pytest.approx(tiny_loss(0.5), rel=1e-8), pytest.approx(tiny_loss(1.5), rel=1e-8)]
    assert re.search(r"\d\d:\d\d:\d\d saved .*tiny\.yaml", out), out
    assert "watching" in out


def test_only_the_file_saved_is_run_again(tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(tiny(0.5))
    second.write_text(tiny(2.0))
    monkeypatch.setattr(watch, "changes", saves((second, tiny(3.0))))
    cli.main(["run", str(first), str(second), "--watch", "--engines", "numpy"])
    rerun = after_first_save(capsys.readouterr().out)
    assert "second.yaml" in rerun and "first.yaml" not in rerun
    assert losses(rerun) == [pytest.approx(tiny_loss(3.0), rel=1e-8)]


def test_a_half_written_save_prints_its_error_and_the_watch_goes_on(tmp_path, monkeypatch, capsys):
    case = tmp_path / "tiny.yaml"
    case.write_text(tiny(0.5))
    whole = tiny(1.5)
    half = whole[: whole.index("kernel: [[0.5]")]  # cut in the middle of the last layer's flow mapping
    monkeypatch.setattr(watch, "changes", saves((case, half), (case, "lr: [\n"), (case, whole)))
    status = cli.main(["run", str(case), "--watch", "--engines", "numpy"])
    out = capsys.readouterr().out
    assert status == 0
    rerun = after_first_save(out)
    assert rerun.count("INVALID") == 2
    assert re.search(r"tiny\.yaml:\d+: ", rerun), rerun  # file:line, as run prints an invalid case
    assert losses(rerun) == [pytest.approx(tiny_loss(1.5), rel=1e-8)]  # the fixed file, picked up


def test_a_folder_picks_up_new_case_files_and_ignores_the_rest(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "old.yaml").write_text(tiny(0.5))
    new, notes, gone = folder / "sub" / "new.yaml", folder / "notes.txt", folder / "gone.yaml"
    new.parent.mkdir()
    gone.write_text(tiny(9.0))
    monkeypatch.setattr(watch, "changes", saves((notes, "not a case"), (gone, None), (new, tiny(2.5))))
    cli.main(["run", str(folder), "--watch", "--engines", "numpy"])
    out = capsys.readouterr().out
    assert out.count(" saved ") == 1  # notes.txt and the deleted file started no run
    rerun = after_first_save(out)
    assert "new.yaml" in rerun.splitlines()[0]
    assert losses(rerun) == [pytest.approx(tiny_loss(2.5), rel=1e-8)]


def test_explain_watch_shows_the_step_again_with_the_saved_numbers(tmp_path, monkeypatch, capsys):
    case = tmp_path / "tiny.yaml"
    case.write_text(tiny(w=0.1))
    monkeypatch.setattr(watch, "changes", saves((case, tiny(w=0.25))))
    status = cli.main(["explain", str(case), "--watch", "--engines", "numpy"])
    out = capsys.readouterr().out
    assert status == 0
    before, rerun = out.split(" saved ", 1)
    # Z of layer 0 = [1, 2] @ W0 + b0: its first element is w + 0.6
    assert "[[0.70000000" in before
    assert "[[0.85000000" in rerun and "[[0.70000000" not in rerun
    assert "layer 0 (tanh) forward: Z" in rerun


def test_ctrl_c_during_a_rerun_ends_the_watch_with_status_0(tmp_path, capsys):
    case = tmp_path / "tiny.yaml"
    case.write_text(tiny())

    def interrupted(saved):
        raise KeyboardInterrupt

    targets = watch.Targets.of([case])
    status = watch.loop(targets, [{(None, str(case.resolve()))}], interrupted, cli.Console())
    assert status == 0


def test_watch_refuses_a_json_report(tmp_path, capsys):
    case = tmp_path / "tiny.yaml"
    case.write_text(tiny())
    assert cli.main(["run", str(case), "--watch", "--json", str(tmp_path / "r.json")]) == cli.EXIT_INVALID
    assert "--watch" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_missing_path_is_not_watched(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(watch, "changes", lambda targets, stop_event=None: pytest.fail("watched a missing path"))
    status = cli.main(["run", str(tmp_path / "nowhere.yaml"), "--watch", "--engines", "numpy"])
    assert status == cli.EXIT_INVALID
    assert "not watching" in capsys.readouterr().out


def test_run_without_watch_imports_no_watcher(tmp_path):
    """Start-up time matters: watch.py and watchfiles are imported only with --watch."""
    case = tmp_path / "tiny.yaml"
    case.write_text(tiny())
    code = (
        f"import sys; from manualprop.cli import main; main(['run', {str(case)!r}, '--engines', 'numpy']); "
        "print([m for m in ('watchfiles', 'manualprop.watch') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "[]", done.stdout + done.stderr


def test_the_frameworks_models_stay_built_across_saves(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from manualprop.adapters import torch_engine

    builds = []
    real = torch_engine._build
    monkeypatch.setattr(torch_engine, "_build", lambda *a: builds.append(1) or real(*a))
    case = tmp_path / "tiny.yaml"
    case.write_text(tiny(0.5).replace("lr: 0.1", "lr: 0.125"))
    monkeypatch.setattr(watch, "changes", saves((case, tiny(1.5)), (case, tiny(2.5))))
    cli.main(["run", str(case), "--watch", "--engines", "numpy,torch"])
    assert len(builds) <= 1  # at most the first run built the model; the saves reused it
    assert len(re.findall(r"loss: numpy [-\d.e+]+, torch", capsys.readouterr().out)) == 3


def test_a_real_save_through_a_rename_is_seen(tmp_path):
    """The one test on the file system: an editor's saves (a temporary file renamed over the case)
    must each be seen, though each replaces the file; saved every 0.1 s until two are seen, so
    there is no race with the watcher's start-up."""
    case = tmp_path / "tiny.yaml"
    case.write_text(tiny())
    targets = watch.Targets.of([case])
    stop, seen = threading.Event(), []

    def editor():
        while not stop.wait(0.1):
            temporary = tmp_path / ".tiny.yaml.swp"
            temporary.write_text(tiny(1.5))
            os.replace(temporary, case)

    threading.Thread(target=editor, daemon=True).start()
    limit = threading.Timer(20, stop.set)  # a generous limit, never reached when it works
    limit.start()
    try:
        for batch in watch.changes(targets, stop_event=stop):
            seen += targets.saved(batch)
            if len(seen) >= 2:
                break
    finally:
        stop.set()
        limit.cancel()
    assert seen == [case.resolve()] * 2


def test_a_bundled_case_named_is_watched_through_its_file():
    from manualprop.harness import bundled_cases

    targets = watch.Targets.of(["cs4820_a7_tanh_softmax"])
    assert targets.files == {(bundled_cases() / "seeds" / "cs4820_a7_tanh_softmax.yaml").resolve()}
