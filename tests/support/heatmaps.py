"""The localisation check both explanation suites use: a 2x2 canvas, one photo in one cell."""

from __future__ import annotations

import numpy as np


def assert_peak_in_cell(heat: np.ndarray, cell: int, name: str) -> None:
    """The map's maximum lies in ``cell`` (0-3, row-major) and that cell holds over half its mass."""
    h, w = heat.shape
    r, c = divmod(cell, 2)
    py, px = np.unravel_index(int(heat.argmax()), heat.shape)
    assert (py * 2 // h, px * 2 // w) == (r, c), f"{name}: peak outside cell {cell}"
    mass = heat[r * h // 2:(r + 1) * h // 2, c * w // 2:(c + 1) * w // 2].sum() / heat.sum()
    assert mass > 0.5, f"{name} in cell {cell}: only {mass:.2f} of the map's mass"
