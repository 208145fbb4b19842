import pytest
import torch
import torch.nn.functional as F

from engines.model import KDModel, NetConfig, bilinear_matrix, cosine_distance, resize_bilinear


@pytest.mark.parametrize(("n_out", "n_in"), [(256, 64), (64, 32), (64, 16), (64, 64), (7, 3), (5, 9)])
def test_bilinear_matrices_reproduce_interpolate(n_out, n_in):
    """The map's resizes run as two matrix products; they must equal torch's bilinear resize."""
    torch.manual_seed(0)
    m = torch.randn(2, 1, n_in, n_in + 2)
    expected = F.interpolate(m, size=(n_out, n_out + 1), mode="bilinear", align_corners=False)
    got = resize_bilinear(m, bilinear_matrix(n_out, n_in), bilinear_matrix(n_out + 1, n_in + 2))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert torch.allclose(bilinear_matrix(n_out, n_in).sum(dim=1), torch.ones(n_out))  # rows are convex weights


def test_cosine_distance_matches_the_normalised_form():
    torch.manual_seed(0)
    t, s = torch.randn(2, 24, 8, 8), torch.randn(2, 24, 8, 8)
    reference = 1.0 - (F.normalize(t, dim=1) * F.normalize(s, dim=1)).sum(dim=1)
    torch.testing.assert_close(cosine_distance(t, s), reference, rtol=1e-5, atol=1e-6)
    assert torch.allclose(cosine_distance(t, 3 * t), torch.zeros(2, 8, 8), atol=1e-6)
    assert torch.allclose(cosine_distance(t, -t), torch.full((2, 8, 8), 2.0), atol=1e-6)


def test_student_expand_narrows_only_the_student():
    """``student_expand`` shrinks the student's inverted bottlenecks; the teacher and the tapped
    feature shapes stay as they are, so the map is computed the same way."""
    from engines.model import KDModel, NetConfig
    from engines.teacher import EfficientNetLite0, Teacher

    teacher = Teacher(EfficientNetLite0(num_blocks=11, with_head=False)).eval()
    narrow = KDModel(teacher, NetConfig(image_size=64, student_expand=4, student="forward")).eval()
    assert narrow.student.blocks[0]._depthwise_conv.out_channels == 32  # block 0 has no expansion
    assert narrow.student.blocks[1]._expand_conv.out_channels == 16 * 4
    assert narrow.student.blocks[10]._expand_conv.out_channels == 112 * 4
    assert teacher.backbone._blocks[10]._expand_conv.out_channels == 112 * 6
    x = torch.rand(2, 3, 64, 64) * 255
    t_feats, s_feats, _ = narrow.features(x)
    assert [f.shape for f in s_feats] == [f.shape for f in t_feats]
    amap, score = narrow(x)
    assert amap.shape == (2, 64, 64) and score.shape == (2,)
    full = KDModel(teacher, NetConfig(image_size=64, student_expand=6, student="forward")).eval()
    n_narrow = sum(p.numel() for p in narrow.student.parameters())
    n_full = sum(p.numel() for p in full.student.parameters())
    assert n_narrow < 0.75 * n_full


def test_student_expand_is_the_teacher_shape_for_older_bundles():
    from engines.model import NetConfig

    d = NetConfig(student_expand=3).to_json()
    assert d["student_expand"] == 3
    del d["student_expand"]  # a model.json written before the setting existed
    assert NetConfig.from_json(d).student_expand == 6
    for bad in (0, 7):
        with pytest.raises(ValueError, match="student_expand"):
            NetConfig(student_expand=bad).validate()


def test_l2_distance_and_hard_mining_by_hand():
    from engines.model import hard_mean, l2_distance

    t = torch.zeros(1, 2, 1, 3)
    s = torch.tensor([[[[1.0, 0.0, 2.0]], [[1.0, 0.0, 0.0]]]])
    torch.testing.assert_close(l2_distance(t, s), torch.tensor([[[1.0, 0.0, 2.0]]]))  # mean over 2 channels
    d = torch.arange(1000, dtype=torch.float32)
    assert float(hard_mean(d, None)) == pytest.approx(499.5)
    assert float(hard_mean(d, 0.99)) == pytest.approx(994.5)  # the 10 largest of 1000
    assert float(hard_mean(d, 0.999)) == 999.0


def test_l2_map_sees_a_change_of_magnitude_that_cosine_cannot():
    """A feature vector scaled by 3 has the same direction: cosine distance 0, standardised L2 > 0."""
    from engines.teacher import build_teacher

    teacher, _ = build_teacher(None, (2, 4, 10))
    cfg = NetConfig(image_size=64, distance="l2")
    model = KDModel(teacher, cfg).eval()
    t = [torch.randn(1, c, 4, 4) for c in (24, 40, 112)]
    model.set_feature_stats([[0.0] * 24, [0.0] * 40, [0.0] * 112], [[2.0] * 24, [2.0] * 40, [2.0] * 112])
    std = model.standardise(t)
    torch.testing.assert_close(std[1], t[1] / 2)
    scaled = [3 * x for x in std]
    for a, b in zip(std, scaled, strict=True):
        assert float(cosine_distance(a, b).abs().max()) < 1e-5
        assert float(model.distance(a, b).min()) > 0
    with pytest.raises(ValueError, match="tap 0 have 3 channels, expected 24"):
        model.set_feature_stats([[0.0] * 3, [0.0] * 40, [0.0] * 112], [[1.0] * 3, [1.0] * 40, [1.0] * 112])
    with pytest.raises(ValueError, match="distance must be 'cosine' or 'l2'"):
        NetConfig(distance="l1").validate()
