import numpy as np
import pytest

from engines.metrics import au_pro, auroc, f1_max, roc_curve


def test_auroc_hand_computed_with_ties():
    # positives: 0.8, 0.4 ; negatives: 0.4, 0.1, 0.3
    # pairs won: 0.8 beats all 3 (3); 0.4 beats 0.1 and 0.3 (2) and ties 0.4 (0.5) -> 5.5 / 6
    y = [1, 1, 0, 0, 0]
    s = [0.8, 0.4, 0.4, 0.1, 0.3]
    assert auroc(y, s) == pytest.approx(5.5 / 6)
    assert auroc([1, 0], [0.2, 0.9]) == 0.0
    assert auroc([1, 0, 1, 0], [1, 1, 1, 1]) == 0.5
    assert np.isnan(auroc([0, 0], [0.1, 0.2]))


def test_auroc_equals_area_under_roc_curve():
    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.3
    s = rng.normal(size=500) + y * 1.0
    s = np.round(s, 1)  # plenty of ties
    fpr, tpr, _ = roc_curve(y, s)
    assert auroc(y, s) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


def test_f1_max_hand_computed():
    # sorted scores: 0.9(+) 0.8(-) 0.7(+) 0.2(+) 0.1(-)
    # t=0.9: P=1 R=1/3 F1=0.5 ; t=0.8: P=.5 R=1/3 ; t=0.7: P=2/3 R=2/3 F1=2/3 ; t=0.2: P=3/4 R=1 F1=6/7
    f1, thr = f1_max([1, 0, 1, 1, 0], [0.9, 0.8, 0.7, 0.2, 0.1])
    assert f1 == pytest.approx(6 / 7)
    assert thr == pytest.approx(0.2)


def test_au_pro_perfect_random_and_hand_computed():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = True  # region A, 4 px
    masks[1, 4:8, 4:8] = True  # region B, 16 px
    perfect = masks.astype(np.float32) + 0.0
    assert au_pro(masks, perfect) == pytest.approx(1.0, abs=0.01)

    # Region A scores above every negative; region B scores below every negative:
    # PRO = 0.5 for every FPR < 1 -> normalised area 0.5
    maps = np.full((2, 8, 8), 0.5, np.float32) + np.linspace(0, 0.1, 128, dtype=np.float32).reshape(2, 8, 8)
    maps[0, 1:3, 1:3] = 1.0
    maps[1, 4:8, 4:8] = 0.0
    assert au_pro(masks, maps) == pytest.approx(0.5, abs=0.01)

    rng = np.random.default_rng(0)
    noise = rng.random((2, 8, 8)).astype(np.float32)
    # random maps: PRO ~ FPR, area up to 0.3 normalised ~ 0.15
    big = np.zeros((4, 64, 64), bool)
    big[:, 10:40, 10:40] = True
    assert au_pro(big, rng.random(big.shape).astype(np.float32)) == pytest.approx(0.15, abs=0.02)
    assert np.isnan(au_pro(np.zeros_like(masks), noise))


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="differ"):
        auroc([1, 0], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1, 0], [np.nan, 0.1])
