"""tools/degrade.py: each degradation checked against the statement in its docstring. Exact
statements to float precision; Monte Carlo ones to 4 standard errors (SE) of their estimator, the SE
derived in the test."""

import math
import os

import numpy as np
import pytest
import torch
from test_pipeline import data_dir, trained  # noqa: F401 (fixtures: a tiny trained run)

from tools import degrade, evaluate
from tools.degrade import (
    DEGRADATIONS,
    LABELS,
    down_up,
    gaussian_blur,
    gaussian_kernel1d,
    gaussian_noise,
    parse_degradation,
    psnr,
)

Z = 4  # Monte Carlo tolerance in standard errors: a two-sided 4-SE miss has probability 6e-5


def rand_image(shape, seed=0, dtype=torch.float32):
    """Uniform in [-1, 1], with the two extremes present so range checks meet them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    x[..., 0, 0], x[..., 0, 1] = 1.0, -1.0
    return x


# ----------------------------------------------------------------------------- gaussian_noise


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2])
def test_noise_level_measured_back(sigma):
    # on x = 0 the clamp at +-1 sits >= 5 sigma away (mass 6e-7: far below the SE), so out - x ~
    # N(0, sigma^2)
    x = torch.zeros(1, 1, 256, 256, dtype=torch.float64)
    e = (gaussian_noise(x, sigma, torch.Generator().manual_seed(1)) - x).flatten()
    n = e.numel()
    assert abs(e.mean().item()) < Z * sigma / math.sqrt(n)  # SE of a sample mean
    assert abs(e.std().item() - sigma) < Z * sigma / math.sqrt(2 * n)  # SE of a Gaussian sample std


def test_noise_clamps_to_model_range_and_the_clamp_is_active():
    x = torch.ones(1, 1, 128, 128)
    x[..., 64:, :] = -1  # half at +1, half at -1
    y = gaussian_noise(x, 0.3, torch.Generator().manual_seed(2))
    assert y.min() >= -1 and y.max() <= 1
    # a pixel at +-1 stays on the bound iff its noise points outward: P = 1/2, binomial SE sqrt(1/4
    # / n)
    at_bound = (y.abs() == 1).double().mean().item()
    assert abs(at_bound - 0.5) < Z * math.sqrt(0.25 / y.numel())


def test_noise_refuses_negative_sigma_naming_the_units():
    with pytest.raises(ValueError, match=r">= 0 \(in \[-1, 1\] model units\)"):
        gaussian_noise(torch.zeros(1, 1, 4, 4), -0.1)
    assert torch.equal(gaussian_noise(rand_image((1, 1, 4, 4)), 0.0), rand_image((1, 1, 4, 4)))


def test_noise_is_reproducible_with_a_generator():
    x = rand_image((2, 3, 8, 8))
    a = gaussian_noise(x, 0.1, torch.Generator().manual_seed(3))
    b = gaussian_noise(x, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gaussian_blur


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 2.7])
def test_blur_kernel_is_the_normalised_gaussian_of_radius_ceil_3_sigma(sigma):
    k = gaussian_kernel1d(sigma)
    r = math.ceil(3 * sigma)
    assert k.shape == (2 * r + 1,) and k.dtype == torch.float64
    assert abs(k.sum().item() - 1) < 1e-12
    assert torch.equal(k, k.flip(0))
    # k_i / k_0 = exp(-i^2 / (2 sigma^2)): the shape is Gaussian with this sigma, not sigma^2 or 2
    # sigma
    i = torch.arange(-r, r + 1, dtype=torch.float64)
    torch.testing.assert_close(k / k[r], torch.exp(-(i**2) / (2 * sigma**2)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_leaves_a_constant_image_constant(sigma):
    x = torch.full((2, 3, 32, 32), 0.37)
    assert (gaussian_blur(x, sigma) - x).abs().max() < 1e-6  # float32 sum of <= 13 taps


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_mean_shift_matches_the_reflect_boundary_formula(sigma):
    # Reflect padding, 1-D, symmetric kernel: sum_j y_j = sum_j x_j + sum_{i=1}^{r} k_i d_i with d_i
    # = (x_i - x_0) + (x_{N-1-i} - x_{N-1}). On an image constant along W the W pass is the
    # identity, so the mean shift is this H-pass formula / H. (Zero or replicate padding would give
    # other terms.)
    H, W = 32, 16
    f = torch.rand(H, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    x = f.view(1, 1, H, 1).expand(2, 3, H, W).contiguous()
    k, r = gaussian_kernel1d(sigma), math.ceil(3 * sigma)
    predicted = sum(k[r + i] * (f[i] - f[0] + f[H - 1 - i] - f[H - 1]) for i in range(1, r + 1)) / H
    shift = gaussian_blur(x, sigma).mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))  # (B,)
    assert abs(predicted.item()) > 1e-3  # the formula is not trivially 0
    torch.testing.assert_close(shift, predicted.expand(2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_preserves_the_mean_of_an_image_constant_near_its_border(sigma):
    # every d_i above is 0 when the outer r + 1 pixels equal one value b, in both passes: exact mean
    r = math.ceil(3 * sigma)
    x = torch.full((2, 3, 32, 32), 0.3, dtype=torch.float64)
    x[..., r + 1 : -(r + 1), r + 1 : -(r + 1)] = rand_image(
        (2, 3, 32 - 2 * (r + 1), 32 - 2 * (r + 1)), seed=5, dtype=torch.float64
    )
    torch.testing.assert_close(
        gaussian_blur(x, sigma).mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_changes_the_mean_of_a_random_image_by_at_most_the_boundary_bound(sigma):
    # |d_i| <= 2 (max - min) = 4 in [-1, 1], so each pass shifts the mean by <= 4 sum_{i>=1} k_i /
    # N; the H pass keeps values in [-1, 1], so the W pass obeys the same bound: total <= 4 s (1/H +
    # 1/W)
    x = rand_image((4, 3, 32, 32), seed=6)
    k, r = gaussian_kernel1d(sigma), math.ceil(3 * sigma)
    bound = 4 * k[r + 1 :].sum().item() * (1 / 32 + 1 / 32)
    shift = (
        gaussian_blur(x, sigma).double().mean(dim=(1, 2, 3)) - x.double().mean(dim=(1, 2, 3))
    ).abs()
    assert (shift <= bound).all()


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_lowers_white_noise_variance_by_sum_k_squared_squared(sigma):
    # y = sum_ij k_i k_j x_{.-i,.-j}, x iid N(0, s^2): Var y = s^2 (sum_i k_i^2)^2 away from the
    # border. Estimator v = mean(y^2) over n interior pixels (known mean 0). The y are correlated,
    # with covariance C(d1, d2) = s^2 a(d1) a(d2), a = k autocorrelated with itself, so (Isserlis:
    # Cov(y_p^2, y_q^2) = 2 C^2) Var v ~= (2/n) sum_{d1,d2} C(d1, d2)^2 = (2/n) s^4 (sum_d
    # a(d)^2)^2.
    s = 0.2
    k, r = gaussian_kernel1d(sigma), math.ceil(3 * sigma)
    x = s * torch.randn(
        8, 1, 256, 256, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    y = gaussian_blur(x, sigma)[..., r:-r, r:-r]  # drop the reflected border
    v = y.pow(2).mean().item()
    expected = s**2 * (k.pow(2).sum().item()) ** 2
    a = torch.nn.functional.conv1d(k.view(1, 1, -1), k.view(1, 1, -1), padding=2 * r).flatten()
    se = math.sqrt(2 / y.numel()) * s**2 * a.pow(2).sum().item()
    assert abs(v - expected) < Z * se
    assert abs(v - expected) < 0.05 * expected  # i.e. the test has resolution


def test_blur_refuses_bad_sigma_and_too_small_images():
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma must be > 0"):
            gaussian_blur(torch.zeros(1, 1, 8, 8), sigma)
    with pytest.raises(ValueError, match="needs H and W > 6"):
        gaussian_blur(torch.zeros(1, 1, 6, 32), 2.0)


# ----------------------------------------------------------------------------- down_up


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_down_up_is_idempotent_exactly_and_keeps_the_shape(factor):
    x = rand_image((2, 3, 48, 48), seed=8)
    y = down_up(x, factor)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(down_up(y, factor), y)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_down_up_replaces_each_block_by_its_mean_and_keeps_the_image_mean(factor):
    x = rand_image((2, 3, 48, 48), seed=9)
    y = down_up(x, factor)
    block = x[1, 2, factor : 2 * factor, 3 * factor : 4 * factor].double().mean()
    assert (
        y[1, 2, factor : 2 * factor, 3 * factor : 4 * factor].double() - block
    ).abs().max() < 1e-7
    # each output is a float32 rounding (rel. error 2^-24) of a block mean, so the image mean moves
    # < 1e-7
    torch.testing.assert_close(
        y.double().mean(dim=(1, 2, 3)), x.double().mean(dim=(1, 2, 3)), rtol=0, atol=1e-7
    )


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_down_up_is_the_identity_on_a_block_constant_image(factor):
    small = rand_image((2, 3, 48 // factor, 48 // factor), seed=10)
    x = small.repeat_interleave(factor, -2).repeat_interleave(factor, -1)  # (B, C, 48, 48)
    assert torch.equal(down_up(x, factor), x)


def test_down_up_refuses_bad_factors_naming_the_valid_ones():
    x = torch.zeros(1, 1, 48, 32)
    for bad in (0, 1, 3, 5, 64, 2.0, True, "2"):
        with pytest.raises(ValueError, match=r"one of \[2, 4, 8, 16\]"):
            down_up(x, bad)


# ----------------------------------------------------------------------------- psnr


def test_psnr_is_10_log10_of_4_over_mse():
    x, ref = rand_image((3, 3, 16, 16), seed=11), rand_image((3, 3, 16, 16), seed=12)
    for b in range(3):
        mse = (
            sum((float(p) - float(q)) ** 2 for p, q in zip(x[b].flatten(), ref[b].flatten()))
            / x[b].numel()
        )
        assert psnr(x, ref)[b].item() == pytest.approx(10 * math.log10(4 / mse), rel=1e-12)
    assert psnr(x, ref).shape == (3,)


def test_psnr_of_identical_images_is_inf():
    x = rand_image((2, 3, 8, 8))
    assert torch.isinf(psnr(x, x.clone())).all() and (psnr(x, x.clone()) > 0).all()


def test_psnr_of_noise_of_std_s_is_10_log10_4_over_s_squared():
    # MSE = mean of n values s^2 z^2: relative SE sqrt(2/n), so PSNR has SE (10 / ln 10) sqrt(2/n)
    # dB
    s = 0.05
    x = rand_image((4, 3, 64, 64), seed=13) * 0.5  # clamp at +-1 sits >= 10 s away
    y = gaussian_noise(x, s, torch.Generator().manual_seed(14))
    se = 10 / math.log(10) * math.sqrt(2 / x[0].numel())
    assert (psnr(y, x) - 10 * math.log10(4 / s**2)).abs().max() < Z * se


def test_psnr_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))


# ----------------------------------------------------------------------------- the table


def test_table_rows_are_the_six_degradations_in_order_each_with_a_label():
    assert list(DEGRADATIONS) == [
        "noise0.1",
        "noise0.3",
        "blur1.0",
        "blur2.0",
        "downup2",
        "downup4",
    ]
    assert list(LABELS) == list(DEGRADATIONS)


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_every_degradation_maps_model_range_to_model_range(name):
    x = rand_image((2, 3, 32, 32), seed=15)
    y = parse_degradation(name)(x, torch.Generator().manual_seed(16))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1 and y.max() <= 1
    assert not torch.equal(y, x)  # it does degrade


def test_parse_degradation_rejects_an_unknown_name_listing_the_valid_ones():
    assert parse_degradation("blur2.0") is DEGRADATIONS["blur2.0"]
    with pytest.raises(ValueError, match="noise0.1, noise0.3, blur1.0, blur2.0, downup2, downup4"):
        parse_degradation("jpeg")


def test_the_degrade_table_reports_every_degradation(trained, data_dir, tmp_path, capsys):
    classifier = str(tmp_path / "classifier.pt")
    evaluate.save_classifier(
        evaluate.FeatureNet(width=8, feature_dim=16), 0.5, classifier
    )  # tiny, untrained
    out = str(tmp_path / "degrade")
    with pytest.raises(SystemExit, match="no classifier"):
        degrade.main(
            [
                "--ckpt",
                os.path.join(trained, "ddpm.pt"),
                "--n",
                "4",
                "--steps",
                "2",
                "--data_dir",
                data_dir,
                "--out",
                out,
                "--classifier",
                str(tmp_path / "missing.pt"),
            ]
        )
    degrade.main(
        [
            "--ckpt",
            os.path.join(trained, "ddpm.pt"),
            "--n",
            "4",
            "--steps",
            "2",
            "--data_dir",
            data_dir,
            "--out",
            out,
            "--classifier",
            classifier,
        ]
    )
    printed, arrays = capsys.readouterr().out, np.load(out + ".npz")
    # every degradation and the VAE reconstruction get a table row and their arrays
    assert all(LABELS[k] in printed for k in DEGRADATIONS) and "vae recon" in printed
    assert arrays["noise0.3_in"].shape == arrays["noise0.3_refined"].shape == (4, 1, 32, 32)
