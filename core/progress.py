"""Progress reports and cancellation, shared by the sampling loop and inversion training.

A module of its own so that `generate` (which runs inversion) and `inversion` (which reports
progress and honours cancel) need not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class CancelFlag(Protocol):
    """Anything with ``is_set()``: a `threading.Event` is the usual one."""

    def is_set(self) -> bool: ...


class GenerationCancelled(Exception):
    """Raised from inside `generate` when the cancel flag was set; nothing is returned."""


@dataclass
class Progress:
    """One progress report. `preview()` renders a small RGB guess of the current image on demand."""

    phase: str  # "encoding", "sampling", "decoding", FILL_PHASE
    step: int
    total: int
    variants: tuple[int, int] = (0, 1)  # (variants finished before this batch, variants asked for)
    preview: Callable[[], np.ndarray] | None = None


#: The phase of a layer stack's background fill (core.layer_stack): sampling, named apart.
FILL_PHASE = "filling background"

ProgressCallback = Callable[[Progress], None]


def check_cancel(cancel: CancelFlag | None) -> None:
    """Raises `GenerationCancelled` when the flag is set; called at every step."""
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("generation cancelled")
