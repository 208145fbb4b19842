import pytest
import torch
import torch.nn.functional as F

from engines.model import bilinear_matrix, cosine_distance, resize_bilinear


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
