"""The ways of joining the head's logits to the fused map, on hand-checked values: the product's
(engines.model.seg_term and join_seg, which benchmarks/seg_fusion.py builds add and max through)
and the benchmark's floor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

import seg_fusion

from engines.model import join_seg, seg_term

FUSED = torch.tensor([[[[1.0, -0.5, 2.0]]]])
LOGITS = torch.tensor([[[[-8.0, -6.0, -9.0]]]])  # centred on -8: 0, +2, -1


def _term() -> torch.Tensor:
    """The product's head term of LOGITS at mean -8, scale 0.5, weight 2: 0, +2, -1."""
    term = seg_term(LOGITS, mean=-8.0, scale=0.5, weight=2.0)
    assert term.flatten().tolist() == pytest.approx([0.0, 2.0, -1.0])
    return term


def test_add_moves_every_pixel_with_the_head():
    """Centred logits times scale and weight added everywhere, a good pixel below the mean lowered too."""
    assert join_seg(FUSED, _term(), "add").flatten().tolist() == pytest.approx([1.0, 1.5, 1.0])


def test_max_takes_the_larger_per_pixel():
    """The product's default: the fused map where the head's term is lower, the term where it is higher."""
    assert join_seg(FUSED, _term(), "max").flatten().tolist() == pytest.approx([1.0, 2.0, 2.0])


def test_floor_leaves_pixels_below_it_alone():
    """Below the floor the map is the fused map exactly; above it the excess is added."""
    out = seg_fusion.floored(FUSED, LOGITS, floor=-7.0, scale=0.5, weight=2.0)
    assert out.flatten().tolist() == pytest.approx([1.0, 0.5, 2.0])


def test_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match="seg_fusion must be one of add, max, got 'mul'"):
        join_seg(FUSED, _term(), "mul")


def test_forms_parse():
    assert seg_fusion.parse_form("max:0.5") == ("max", 0.5, None)
    assert seg_fusion.parse_form("floor:0.5:0.99") == ("floor", 0.5, 0.99)
    with pytest.raises(Exception, match="give add:W"):
        seg_fusion.parse_form("floor:0.5")
