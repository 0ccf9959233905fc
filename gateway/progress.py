"""Progress bars for long operator commands (imports, replays), on stderr and only on a terminal.

Why only on a terminal: a bar redrawn into a log file or a pipe is noise, and scripts parse the
summary; rich's ``disable`` keeps the same code path either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["bar"]


@contextmanager
def bar(label: str, total: int, *, enabled: bool | None = None) -> Iterator[Callable[[], None]]:
    """A bar of ``total`` steps; the yielded function advances it by one."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    show = sys.stderr.isatty() if enabled is None else enabled
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)
