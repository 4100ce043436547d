"""The layout metric is the standard SSIM (Wang et al. 2004: Gaussian window 11×11, σ = 1.5, C1 = 0.01², C2 = 0.03²
on [0,1] images), checked against values from scikit-image 0.26
(`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)`)."""
import pytest
import torch

from erasure_core.toy.evaluation import ssim


def _pair():
    i = torch.arange(24, dtype=torch.float64).view(1, 24, 1)
    j = torch.arange(24, dtype=torch.float64).view(1, 1, 24)
    c = torch.arange(3, dtype=torch.float64).view(3, 1, 1)
    x = 0.5 + 0.4 * torch.sin(0.3 * i + 0.2 * j + c)
    y = 0.5 + 0.32 * torch.sin(0.3 * i + 0.2 * j + c + 0.5) + 0.05 * torch.cos(0.7 * i)
    return x.float()[None], y.float()[None]


def test_ssim_of_an_image_with_itself_is_one():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2))


def test_ssim_matches_scikit_image_values():
    x, y = _pair()
    assert ssim(x, y).item() == pytest.approx(0.723562036425489, abs=1e-6)
    assert ssim(x, 0.5 * x + 0.3).item() == pytest.approx(0.7601996582652223, abs=1e-6)  # contrast and brightness
    assert ssim(y, x).item() == pytest.approx(ssim(x, y).item(), abs=1e-7)  # symmetric
    both = ssim(torch.cat([x, x]), torch.cat([y, x]))
    assert both.shape == (2,) and both[1].item() == pytest.approx(1.0, abs=1e-6)


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
