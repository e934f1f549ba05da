"""Progress display on stderr (rich). Disabled with ``quiet`` or when stderr is not a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class Reporter:
    """Stage messages and progress bars for long steps."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            console.print(message, highlight=False)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None, unit: str = "") -> Iterator[callable]:
        """Yield ``advance(n=1, **fields)``; shows a bar (known total) or a spinner."""
        if self.quiet:
            yield lambda n=1, **kw: None
            return
        columns = [SpinnerColumn(), TextColumn("[bold]{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn(), TextColumn(unit)]
        columns += [TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
        if total is not None:
            columns += [TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=False) as bar:
            task_id = bar.add_task(description, total=total, status="")

            def advance(n: int = 1, status: str | None = None, total: int | None = None) -> None:
                bar.update(task_id, advance=n, **({"status": status} if status is not None else {}),
                           **({"total": total} if total is not None else {}))

            yield advance
            if total is None:
                bar.update(task_id, total=1, completed=1)
