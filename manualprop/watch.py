"""``manualprop run --watch`` and ``explain --watch``: run once, then again on every save.

The re-runs happen in this process, so the frameworks are imported once and the engines keep
their built models: a re-run costs what the step costs, not the imports. Only the files saved
are re-run. A file that does not load (saved half-written, or invalid) prints its problems as
``run`` prints an invalid case, and the watch goes on.

Ctrl-C ends the watch with exit status 0: each run's verdict is on the screen, and ending a
watch is not a verdict (a script that wants one runs without ``--watch``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Iterator, Set
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .casefile.case import display_path
from .cli import EXIT_INVALID, EXIT_OK, Terminal
from .harness import CASE_SUFFIXES, bundled_case, bundled_cases

# watchfiles yields a batch once no event came for STEP_MS (its default debounce, 1600 ms, is
# only the longest it groups a stream of events). Measured here: a save is seen 25 to 30 ms
# after the write with 20 ms, 55 to 100 ms with watchfiles' default of 50 ms. An editor that
# writes in two bursts more than 20 ms apart gives a re-run of the half-written file (its error)
# and then one of the whole file.
STEP_MS = 20
DEBOUNCE_MS = 500

Changes = Iterable[Set[tuple[object, str]]]  # watchfiles' batches: {(Change, path), ...}
Rerun = Callable[[list[Path]], int]


@dataclass(frozen=True)
class Targets:
    """What a watch looks at: the case files named, and folders whose case files (new ones too) it takes."""

    files: frozenset[Path]
    folders: tuple[Path, ...]

    @classmethod
    def of(cls, paths: Iterable[str | Path]) -> Targets:
        """The targets of the paths given on the command line (a bundled case's name: its file);
        FileNotFoundError for one that is neither."""
        files: set[Path] = set()
        folders: list[Path] = []
        for raw in paths:
            path = Path(raw)
            if not path.exists():
                path = bundled_case(str(raw))
            (folders.append if path.is_dir() else files.add)(path.resolve())
        return cls(frozenset(files), tuple(folders))

    @property
    def roots(self) -> list[Path]:
        """The folders to watch. A file is watched through its folder: an editor that saves by
        writing a temporary file and renaming it over the case replaces the file watched."""
        parents = {f.parent for f in self.files if not any(f.is_relative_to(d) for d in self.folders)}
        return sorted({*self.folders, *parents})

    @property
    def recursive(self) -> bool:
        """Folders are watched with their sub-folders (as ``run`` searches them); files' folders alone
        need not be, unless a folder was given too (watchfiles has one setting for all)."""
        return bool(self.folders)

    def saved(self, changes: Set[tuple[object, str]]) -> list[Path]:
        """The case files of one batch of changes to re-run: a file named, or a case file below a
        folder named, that exists now (an editor may remove a file before it writes it again)."""
        found = set()
        for _, raw in changes:
            path = Path(raw)
            below = path.suffix in CASE_SUFFIXES and any(path.is_relative_to(d) for d in self.folders)
            if (path in self.files or below) and path.is_file():
                found.add(path)
        return sorted(found)


def changes(targets: Targets, stop_event=None) -> Iterator[Set[tuple[object, str]]]:
    """The file system's changes below the targets' roots, one batch per save (watchfiles).
    A Ctrl-C while waiting raises KeyboardInterrupt (watchfiles' other choice logs a warning)."""
    import watchfiles

    yield from watchfiles.watch(
        *targets.roots, watch_filter=None, debounce=DEBOUNCE_MS, step=STEP_MS, recursive=targets.recursive, stop_event=stop_event
    )


def loop(targets: Targets, batches: Changes, rerun: Rerun, out: Console) -> int:
    """For each batch that touches a target: a header (time, files), ``rerun(files)``, a footer.
    Ends when ``batches`` does or on Ctrl-C, with exit status 0 (see the module's docstring)."""
    try:
        for batch in batches:
            saved = targets.saved(batch)
            if not saved:
                continue
            names = ", ".join(display_path(p) for p in saved)
            out.print(f"\n[bold]{time.strftime('%H:%M:%S')} saved {escape(names)}[/bold]")
            start = time.perf_counter()
            rerun(saved)
            out.print(f"[dim]re-ran in {(time.perf_counter() - start) * 1000:.0f} ms; watching for saves (Ctrl-C to stop)[/dim]")
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def watch_run(args: argparse.Namespace, once: Callable[[argparse.Namespace], int]) -> int:
    """``manualprop run --watch``: ``once`` on every path (the bundled cases if none), then on the
    files of each save."""
    if args.json:
        Terminal(stderr=True, highlight=False, soft_wrap=True).print(
            "[red]manualprop run: --watch re-runs only the files saved, so it writes no --json report; "
            "run without --watch for one[/red]"
        )
        return EXIT_INVALID
    paths = args.paths or [str(bundled_cases())]
    return _watch(
        paths, lambda: once(_without_watch(args)), lambda saved: once(_without_watch(args, paths=[str(p) for p in saved]))
    )


def watch_explain(args: argparse.Namespace, once: Callable[[argparse.Namespace], int]) -> int:
    """``manualprop explain --watch``: ``once``, then again on each save of the case file."""
    return _watch([args.case], lambda: once(_without_watch(args)), lambda saved: once(_without_watch(args)))


def _watch(paths: list[str], first: Callable[[], int], rerun: Rerun) -> int:
    """``first()``, then the loop on the paths; a path that does not exist ends it with the first run's status."""
    out = Terminal(highlight=False, soft_wrap=True)
    try:
        status = first()
        try:
            targets = Targets.of(paths)
        except FileNotFoundError as err:
            out.print(f"[yellow]not watching: {escape(str(err))}[/yellow]")
            return status
        shown = ", ".join(display_path(Path(p)) for p in paths)
        out.print(f"[dim]watching {escape(shown)} for saves (Ctrl-C to stop)[/dim]")
        return loop(targets, changes(targets), rerun, out)
    except KeyboardInterrupt:  # during the first run
        return EXIT_OK


def _without_watch(args: argparse.Namespace, **changed) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "watch": False, **changed})
