"""One progress bar for every long operation: rate, elapsed, ETA and a line of info; nothing when quiet."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    def __init__(self, description: str, total: float, done: float = 0, quiet: bool = False,
                 console: Console | None = None):
        self.progress = None if quiet else Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
        if self.progress:
            self.task = self.progress.add_task(description, total=total, completed=done, info="")
            self.progress.start()

    def update(self, done: float, info: str = "") -> None:
        if self.progress:
            self.progress.update(self.task, completed=done, info=info)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
