"""benchmarks/seg_fusion.py's ways of joining the head's logits to the fused map, on hand-checked values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

import seg_fusion

FUSED = torch.tensor([[[[1.0, -0.5, 2.0]]]])
LOGITS = torch.tensor([[[[-8.0, -6.0, -9.0]]]])  # centred on -8: 0, +2, -1


def test_add_is_the_products_fusion():
    """Centred logits times scale and weight added everywhere, a good pixel below the mean lowered too."""
    out = seg_fusion.joined("add", FUSED, LOGITS, mean=-8.0, scale=0.5, weight=2.0)
    assert out.flatten().tolist() == pytest.approx([1.0, 1.5, 1.0])


def test_floor_leaves_pixels_below_it_alone():
    """Below the floor the map is the fused map exactly; above it the excess is added."""
    out = seg_fusion.joined("floor", FUSED, LOGITS, mean=-8.0, scale=0.5, weight=2.0, floor=-7.0)
    assert out.flatten().tolist() == pytest.approx([1.0, 0.5, 2.0])


def test_max_takes_the_larger_per_pixel():
    out = seg_fusion.joined("max", FUSED, LOGITS, mean=-8.0, scale=0.5, weight=2.0)
    assert out.flatten().tolist() == pytest.approx([1.0, 2.0, 2.0])


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="unknown form 'mul'"):
        seg_fusion.joined("mul", FUSED, LOGITS, mean=0.0, scale=1.0, weight=1.0)


def test_forms_parse():
    assert seg_fusion.parse_form("max:0.5") == ("max", 0.5, None)
    assert seg_fusion.parse_form("floor:0.5:0.99") == ("floor", 0.5, 0.99)
    with pytest.raises(Exception, match="give add:W"):
        seg_fusion.parse_form("floor:0.5")
