"""benchmarks/map_ceiling.py's outline band (the pixels its "outline found perfectly" oracle marks),
on hand-checked masks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from map_ceiling import outline_band


def test_the_band_is_the_pixels_within_d_of_the_regions_outline():
    mask = np.zeros((20, 20), np.uint8)
    mask[6:14, 6:14] = 255  # an 8 x 8 square well inside the image
    band = outline_band(mask, 2)
    # within 2 px (chessboard) of the square's edge, inside or out: rows / cols 4..15, less the core 8..11
    want = np.zeros((20, 20), bool)
    want[4:16, 4:16] = True
    want[8:12, 8:12] = False
    np.testing.assert_array_equal(band, want)


def test_a_region_reaching_the_border_has_no_outline_there():
    mask = np.zeros((16, 16), np.uint8)
    mask[:5, :] = 255  # a band across the top, as magnetic_tile's uneven regions lie
    band = outline_band(mask, 2)
    # only its lower edge (rows 3..6), and nothing within 2 px of any image border
    want = np.zeros((16, 16), bool)
    want[3:7, 2:14] = True
    np.testing.assert_array_equal(band, want)
    assert not outline_band(np.zeros((16, 16), np.uint8), 2).any()  # no region, no band
