"""Figures for every stage, written as PNG files (atomically) so nothing depends on W&B.

Matplotlib runs headless (Agg); each function takes plain data and a path and returns the path.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402

from .atomic import save_figure  # noqa: E402

__all__ = ["plt", "save_figure"]

# Stage-specific plot functions follow (SFT curves, DPO curves, beta sweep, model comparison).
