"""One progress bar for every long operation: rate, elapsed, ETA and a line of info; nothing when quiet.

On a terminal it is Rich's live bar. Piped into a file or a log, where a live bar draws nothing until it ends,
it prints a plain line at every tenth of the way instead (elapsed, an ETA from the rate so far, the info).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    def __init__(self, description: str, total: float, done: float = 0, quiet: bool = False,
                 console: Console | None = None):
        self.console = console or Console(stderr=True)  # stdout stays for results (tables, JSON)
        self.description, self.total, self.first, self.start = description, total, done, time.perf_counter()
        self.last = done
        self.plain = not quiet and not self.console.is_terminal
        self.next_tenth = _tenth(done, total) + 1
        self.progress = None if quiet or self.plain else Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console)
        if self.progress:
            self.task = self.progress.add_task(description, total=total, completed=done, info="")
            self.progress.start()

    def update(self, done: float, info: str = "") -> None:
        if self.progress:
            self.progress.update(self.task, completed=done, info=info)
        elif self.plain and done < self.last:  # a new stage refills the bar (the autopilot's fit): start over
            self.first, self.start, self.next_tenth = done, time.perf_counter(), _tenth(done, self.total) + 1
        if self.plain:
            self.last = done
        if self.plain and self.total > 0 and _tenth(done, self.total) >= self.next_tenth:
            self.next_tenth = _tenth(done, self.total) + 1
            elapsed = time.perf_counter() - self.start
            left = elapsed * (self.total - done) / max(done - self.first, 1e-12)
            self.console.print(f"{self.description} {done / self.total:4.0%}  {_clock(elapsed)} elapsed, "
                               f"~{_clock(left)} left  {info}".rstrip(), highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tenth(done: float, total: float) -> int:
    return int(10 * done / total + 1e-9) if total > 0 else 0


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
