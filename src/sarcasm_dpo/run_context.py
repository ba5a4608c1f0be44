"""The one object a stage's `run()` passes around: what it was asked, where it writes, what it runs on.

A stage reads top to bottom (setup -> train -> save) over a `RunContext` instead of threading ten
arguments and a holder dict through its helpers. The context is plain data: building it checks
nothing and writes nothing, so a refused run still leaves the output folder as it was.

    python -c "from sarcasm_dpo.run_context import RunContext; print(RunContext.__doc__)"
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    """One stage run: its settings, output folder, tracker, device and resume point, and its timings."""

    settings: Any  # the stage's settings dataclass (settings.py), as validated
    out: Path  # the output folder (or, for a stage that writes one file, the folder it lives in)
    main: bool = True  # the process that writes files and talks to W&B (False on other ranks)
    model: str | None = None  # the base model the stage trains or reads (hub id, folder or .gguf), once known
    tracker: Any = None  # tracking.Tracker once opened; None before and for stages that log nothing
    device: Any = None  # torch.device once picked
    resume_from: Path | None = None  # the checkpoint this run continues from, if any
    # Checksums of the data files and adapter the run reads (rundir.input_identity), recorded beside its
    # checkpoints and in COMPLETE.json: a finished or stopped run of other data is never taken for this one.
    inputs: dict[str, str] | None = None
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds, recorded by `timed()`

    @property
    def config(self) -> dict:
        """The settings as a plain dict: what COMPLETE.json and the run record compare and store."""
        return dataclasses.asdict(self.settings)

    def timed(self, phase: str) -> "_Phase":
        """`with ctx.timed("train_s"): ...` records the phase's wall time in `timings`."""
        return _Phase(self.timings, phase)

    def total(self) -> float:
        """Seconds since the run started; also recorded as timings["total_s"]."""
        self.timings["total_s"] = time.perf_counter() - self.started
        return self.timings["total_s"]


class _Phase:
    def __init__(self, timings: dict, phase: str):
        self.timings, self.phase = timings, phase

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings[self.phase] = self.timings.get(self.phase, 0.0) + time.perf_counter() - self.t0
        return False
