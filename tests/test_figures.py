"""The loss-curve helpers of figures.py: the y axis covers every finite value on the scale its rule picks
(the VAE's loss goes below 0, where a log axis draws nothing), and the EMA stays inside the raw series."""
import numpy as np
import pytest

import figures


def covers(limits, values):
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return np.isfinite(limits).all() and limits[0] < v.min() and v.max() < limits[1]


def test_axis_for_a_positive_series_within_two_decades_is_linear_and_covers_it():
    values = np.linspace(5.0, 0.08, 40) + 0.01 * np.sin(np.arange(40))  # max/min ~ 60
    scale, limits = figures.loss_axis(values)
    assert scale == "linear" and covers(limits, values)


def test_axis_for_a_positive_series_over_two_decades_is_log_and_covers_it():
    values = 1e3 * np.exp(-np.linspace(0, 10, 50))  # 1000 -> 0.045: more than 4 decades
    scale, limits = figures.loss_axis(values)
    assert scale == "log" and limits[0] > 0 and covers(limits, values)


def test_axis_for_a_sign_changing_series_is_symlog_and_covers_it():
    values = 700 * np.exp(-np.linspace(0, 5, 30)) - 250  # a VAE loss falling through 0: +450 -> -245
    scale, limits = figures.loss_axis(values)
    assert scale == "symlog" and covers(limits, values)


@pytest.mark.parametrize("c", [3.5, -2.0, 0.0])
def test_axis_for_a_constant_series_is_a_band_around_it(c):
    scale, limits = figures.loss_axis([c] * 10)
    assert scale == "linear" and covers(limits, [c])


def test_axis_ignores_non_finite_values():
    scale, limits = figures.loss_axis([2.0, np.nan, 1.0, np.inf, -np.inf, 1.5])
    assert scale == "linear" and covers(limits, [1.0, 2.0]) and limits[1] < 3
    assert figures.loss_axis([np.nan]) == ("linear", (0.0, 1.0))


@pytest.mark.parametrize("decay", [None, 0.0, 0.5, 0.99])
def test_smoothed_series_has_the_same_length_and_lies_within_the_raw_range(decay):
    raw = np.random.default_rng(0).standard_normal(200).cumsum()
    s = figures.smooth(raw, decay)
    assert s.shape == raw.shape and np.isfinite(s).all()
    assert raw.min() <= s.min() and s.max() <= raw.max()
    assert s[0] == pytest.approx(raw[0], rel=1e-12)  # bias correction: the first value is the first raw value


def test_smoothing_keeps_a_constant_and_decay_zero_is_the_identity():
    assert np.allclose(figures.smooth([4.0] * 50, 0.9), 4.0, rtol=1e-12)
    raw = np.arange(10.0)
    assert np.array_equal(figures.smooth(raw, 0.0), raw)
    assert np.array_equal(figures.smooth(raw), raw)  # fewer than 20 points: the default does not smooth
    with pytest.raises(ValueError, match="decay"):
        figures.smooth(raw, 1.0)


@pytest.mark.parametrize("losses, scale", [(700 * np.exp(-np.linspace(0, 5, 30)) - 250, "symlog"),
                                           (1e3 * np.exp(-np.linspace(0, 10, 30)), "log"),
                                           (np.linspace(0.5, 0.1, 30), "linear")])
def test_plot_loss_writes_a_png(tmp_path, losses, scale):
    history = [(50 * (i + 1), float(v)) for i, v in enumerate(losses)]
    history[3] = (200, float("nan"))
    history[7] = (400, float("inf"))
    path = tmp_path / "sub" / "vae_loss.png"
    got = figures.plot_loss(history, str(path), "vae loss")
    assert got["scale"] == scale and got["dropped"] == 2
    finite = [v for _, v in history if np.isfinite(v)]
    assert covers(got["limits"], finite)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_loss_of_an_empty_history_writes_a_png(tmp_path):
    path = tmp_path / "empty.png"
    assert figures.plot_loss([], str(path), "no steps yet")["dropped"] == 0
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_parse_args_dry_parses():
    a = figures.parse_args(["--only", "steps", "--no_clip"])
    assert a.only == ["steps"] and a.no_clip and a.ckpt == "runs/fashion/ddpm.pt"
    with pytest.raises(SystemExit):
        figures.parse_args(["--only", "nothing"])


def test_guidance_points_average_seeds_per_weight_and_skip_other_rows():
    rows = [dict(extra="--guidance 1", fid=10.0, agree=0.9), dict(extra="--guidance 1", fid=12.0, agree=0.8),
            dict(extra="--guidance 0.5", fid=20.0, agree=0.7), dict(extra="", fid=5.0, agree=0.5),
            dict(extra="--guidance 2", fid=1.0)]  # no agreement: not a refiner row
    assert figures.guidance_points(rows) == [(0.5, 20.0, 0.7), (1.0, 11.0, pytest.approx(0.85))]
    with pytest.raises(SystemExit):
        figures.parse_args(["--only", "guidance"])
