"""Progress on the terminal for the commands that read hundreds of images (`evaluate`, `accept`):
they printed nothing for 25 s on 624 images. rich (typer's own dependency) draws the bar on
stderr, so `--json` output on stdout stays clean; nothing is drawn where stderr is not a terminal
(logs, CI, pipes), and FORCE_COLOR / TTY_COMPATIBLE force it as rich documents."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")


def _progress() -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def track(items: Sequence[T], description: str) -> Iterator[T]:
    """`items` one by one, advancing a bar labelled `description`."""
    with _progress() as progress:
        yield from progress.track(items, total=len(items), description=description)


def chunks(items: Sequence[T], size: int, description: str) -> Iterator[Sequence[T]]:
    """`items` in slices of `size` (a batch for the model, a group for the decoder threads),
    advancing the bar by each slice's length."""
    with _progress() as progress:
        task = progress.add_task(description, total=len(items))
        for start in range(0, len(items), size):
            part = items[start:start + size]
            yield part
            progress.advance(task, len(part))
