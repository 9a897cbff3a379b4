"""tools/figures.py, and the loss-curve helpers of data.py it leaves train.py to: the y axis covers
every finite value on the scale its rule picks (the VAE's loss goes below 0, where a log axis draws
nothing), and the EMA stays inside the raw series."""

import os
import re

import numpy as np
import pytest

from data import loss_axis, save_loss_curve, smooth
from tools import figures


def covers(limits, values):
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return np.isfinite(limits).all() and limits[0] < v.min() and v.max() < limits[1]


def test_axis_for_a_positive_series_within_two_decades_is_linear_and_covers_it():
    values = np.linspace(5.0, 0.08, 40) + 0.01 * np.sin(np.arange(40))  # max/min ~ 60
    scale, limits = loss_axis(values)
    assert scale == "linear" and covers(limits, values)


def test_axis_for_a_positive_series_over_two_decades_is_log_and_covers_it():
    values = 1e3 * np.exp(-np.linspace(0, 10, 50))  # 1000 -> 0.045: more than 4 decades
    scale, limits = loss_axis(values)
    assert scale == "log" and limits[0] > 0 and covers(limits, values)


def test_axis_for_a_sign_changing_series_is_symlog_and_covers_it():
    values = (
        700 * np.exp(-np.linspace(0, 5, 30)) - 250
    )  # a VAE loss falling through 0: +450 -> -245
    scale, limits = loss_axis(values)
    assert scale == "symlog" and covers(limits, values)


@pytest.mark.parametrize("c", [3.5, -2.0, 0.0])
def test_axis_for_a_constant_series_is_a_band_around_it(c):
    scale, limits = loss_axis([c] * 10)
    assert scale == "linear" and covers(limits, [c])


def test_axis_ignores_non_finite_values():
    scale, limits = loss_axis([2.0, np.nan, 1.0, np.inf, -np.inf, 1.5])
    assert scale == "linear" and covers(limits, [1.0, 2.0]) and limits[1] < 3
    assert loss_axis([np.nan]) == ("linear", (0.0, 1.0))


@pytest.mark.parametrize("decay", [None, 0.0, 0.5, 0.99])
def test_smoothed_series_has_the_same_length_and_lies_within_the_raw_range(decay):
    raw = np.random.default_rng(0).standard_normal(200).cumsum()
    s = smooth(raw, decay)
    assert s.shape == raw.shape and np.isfinite(s).all()
    assert raw.min() <= s.min() and s.max() <= raw.max()
    assert s[0] == pytest.approx(
        raw[0], rel=1e-12
    )  # bias correction: the first value is the first raw value


def test_smoothing_keeps_a_constant_and_decay_zero_is_the_identity():
    assert np.allclose(smooth([4.0] * 50, 0.9), 4.0, rtol=1e-12)
    raw = np.arange(10.0)
    assert np.array_equal(smooth(raw, 0.0), raw)
    assert np.array_equal(smooth(raw), raw)  # fewer than 20 points: the default does not smooth
    with pytest.raises(ValueError, match="decay"):
        smooth(raw, 1.0)


@pytest.mark.parametrize(
    "losses, scale",
    [
        (700 * np.exp(-np.linspace(0, 5, 30)) - 250, "symlog"),
        (1e3 * np.exp(-np.linspace(0, 10, 30)), "log"),
        (np.linspace(0.5, 0.1, 30), "linear"),
    ],
)
def test_save_loss_curve_writes_a_png(tmp_path, losses, scale):
    history = [(50 * (i + 1), float(v)) for i, v in enumerate(losses)]
    history[3] = (200, float("nan"))
    history[7] = (400, float("inf"))
    path = tmp_path / "sub" / "vae_loss.png"
    got = save_loss_curve(history, str(path), "vae loss")
    assert got["scale"] == scale and got["dropped"] == 2
    finite = [v for _, v in history if np.isfinite(v)]
    assert covers(got["limits"], finite)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_loss_curve_of_an_empty_history_writes_a_png(tmp_path):
    path = tmp_path / "empty.png"
    assert save_loss_curve([], str(path), "no steps yet")["dropped"] == 0
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_parse_args_dry_parses():
    a = figures.parse_args(["--only", "steps", "--no_clip"])
    assert a.only == ["steps"] and a.no_clip and a.ckpt == "runs/fashion/ddpm.pt"
    with pytest.raises(SystemExit):
        figures.parse_args(["--only", "nothing"])


def test_guidance_points_average_seeds_per_weight_and_skip_other_rows():
    rows = [
        dict(extra="--guidance 1", fid=10.0, agree=0.9),
        dict(extra="--guidance 1", fid=12.0, agree=0.8),
        dict(extra="--guidance 0.5", fid=20.0, agree=0.7),
        dict(extra="", fid=5.0, agree=0.5),
        dict(extra="--guidance 2", fid=1.0),
    ]  # no agreement: not a refiner row
    assert figures.guidance_points(rows) == [(0.5, 20.0, 0.7), (1.0, 11.0, pytest.approx(0.85))]
    with pytest.raises(SystemExit):
        figures.parse_args(["--only", "guidance"])


# ----------------------------------------------------------------------------- samples_vs_steps


def tiny_refiner_checkpoint(path, t_start, prior):
    """A stage-2 checkpoint with random weights as train.py lays it out: a 16x16 UNet refiner
    trained on the code timesteps 0..t_start, and a VAE whose ex-post prior is `prior`."""
    import torch

    from runtime import save_atomic
    from unet import UNet
    from vae import VAE

    torch.manual_seed(0)
    net = UNet(
        img_ch=1,
        cond_ch=1,
        ch=8,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        image_size=16,
        norm_groups=8,
    )
    vae = VAE(img_ch=1, image_size=16, ch=8, z_dim=4)
    cfg = dict(
        form=2,
        cond="vae",
        target="residual",
        cond_drop=0.0,
        t_start=t_start,
        schedule="linear",
        T=1000,
        image_size=16,
        dataset="fashion_mnist",
    )
    save_atomic(
        dict(
            stage="ddpm",
            model_args=net.config,
            config=cfg,
            model=net.state_dict(),
            ema=net.state_dict(),
            vae=dict(model_args=vae.config, ema=vae.state_dict(), prior=prior),
        ),
        path,
    )
    return path


def test_steps_draws_z_from_the_ex_post_prior_and_only_the_step_counts_the_start_allows(
    tmp_path, monkeypatch
):
    import torch

    import sample
    from diffusevae import DiffuseVAE
    from vae import sample_prior

    # a one-component mixture far from N(0, I): mean 50 in every coordinate, spread 0.1
    prior = dict(
        weights=torch.ones(1), means=torch.full((1, 4), 50.0), covs=0.01 * torch.eye(4)[None]
    )
    # a refiner trained on t in 0..20 starts there: a DDIM run visits at most the 21 timesteps 0..20
    ckpt = tiny_refiner_checkpoint(str(tmp_path / "ddpm.pt"), t_start=20, prior=prior)
    allowed = [n for n in figures.STEP_COUNTS if n <= 21]
    assert (
        0 < len(allowed) < len(figures.STEP_COUNTS)
    )  # the figure's list holds counts this start cannot take
    drawn, calls, refine = [], [], DiffuseVAE.refine
    monkeypatch.setattr(
        figures, "sample_prior", lambda *a, **k: drawn.append(sample_prior(*a, **k)) or drawn[-1]
    )
    monkeypatch.setattr(
        DiffuseVAE,
        "refine",
        lambda model, x_hat0, *a, **k: (
            calls.append((k["steps"], x_hat0, k["noise"])) or refine(model, x_hat0, *a, **k)
        ),
    )
    monkeypatch.setattr(figures, "OUT", str(tmp_path / "figures"))
    figures.steps(ckpt)
    assert [n for n, _, _ in calls] == allowed
    assert len(drawn) == 1
    z = drawn[0]
    assert (
        z.shape == (8, 4) and (z - 50).abs().max() < 1
    )  # near the mixture's mean; N(0, I) draws are near 0
    # the figure's generator, seeded 0, draws z first: vae.sample_prior's draw from the checkpoint's
    # prior
    assert torch.equal(z, sample_prior(8, 4, prior, generator=torch.Generator().manual_seed(0)))
    model = sample.load_model(
        ckpt, torch.device("cpu")
    )  # in the layout the figure (and sample.py) use
    with torch.no_grad():
        assert torch.equal(calls[0][1], model.vae.decode(z))  # x_hat_0 = dec(z)
    # the same z (so the same x_hat_0) and the same starting noise in every row
    assert all(
        torch.equal(x, calls[0][1]) and torch.equal(noise, calls[0][2]) for _, x, noise in calls
    )
    assert (tmp_path / "figures" / "samples_vs_steps.png").read_bytes()[:4] == b"\x89PNG"


def test_a_row_without_clipping_asks_the_refiner_for_unclipped_x0_hat_and_clamps_its_output(
    tmp_path, monkeypatch
):
    # --no_clip: the same refine call (start noise, generator, steps, DDIM eta 0) but for
    # clip_x0=False, and each row's output clamped to [-1, 1] either way
    import torch

    from diffusevae import DiffuseVAE

    prior = dict(weights=torch.ones(1), means=torch.zeros(1, 4), covs=torch.eye(4)[None])
    model = DiffuseVAE.from_checkpoint(
        tiny_refiner_checkpoint(str(tmp_path / "ddpm.pt"), t_start=20, prior=prior)
    )
    calls, refine = [], DiffuseVAE.refine
    monkeypatch.setattr(  # an output far out of range: the row must clamp it
        DiffuseVAE, "refine", lambda m, x_hat0, **k: calls.append(k) or 100 * refine(m, x_hat0, **k)
    )
    with torch.no_grad():
        x_hat0 = model.vae.decode(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))
        noise = torch.randn(x_hat0.shape, generator=torch.Generator().manual_seed(2))
        for clip in (True, False):
            g = torch.Generator().manual_seed(3)
            out = figures.refine_row(model, x_hat0, noise, g, 2, clip)
            assert out.abs().max() <= 1 and (out.abs() == 1).any()
    clipped, unclipped = calls
    assert clipped.get("clip_x0", True) is True and unclipped.pop("clip_x0") is False
    assert clipped.keys() == unclipped.keys() == {"noise", "generator", "steps", "sampler", "eta"}
    assert clipped["noise"] is unclipped["noise"] is noise
    assert [(k["steps"], k["sampler"], k["eta"]) for k in calls] == [(2, "ddim", 0.0)] * 2


def test_a_refiner_of_the_full_chain_takes_every_step_count():
    # the whole chain is the start t_start = T - 1
    assert figures.step_counts(dict(cond="vae", t_start=999, T=1000)) == figures.STEP_COUNTS
    # a refiner trained on the timesteps 0..4 starts at 4 by default, and 0..4 are 5 timesteps
    assert figures.step_counts(dict(cond="vae", t_start=4, T=1000)) == [1, 2, 5]


def test_the_readme_picture_is_what_sample_py_draws_each_pixel_a_4x4_block(tmp_path, monkeypatch):
    """figures.samples against sample.py run as a user runs it (--steps 10, seed 0): the same 16
    pairs, in the same places, every pixel of sample.py's npz repeated as one 4x4 block."""
    import numpy as np
    import torch
    from PIL import Image

    import sample

    prior = dict(
        weights=torch.ones(1), means=torch.zeros(1, 4), covs=torch.eye(4)[None]
    )  # every refiner's VAE has one
    ckpt = tiny_refiner_checkpoint(str(tmp_path / "ddpm.pt"), t_start=20, prior=prior)
    sample.main(["--ckpt", ckpt, "--steps", "10", "--n", "16", "--out", str(tmp_path / "s")])
    drawn = np.load(tmp_path / "s.npz")
    monkeypatch.chdir(tmp_path)
    figures.samples(ckpt)
    picture = np.asarray(Image.open(tmp_path / "figures" / "samples.png"), dtype=np.float64) / 255
    side, pad = 16 * 4, 8
    assert picture.shape == (4 * (side + pad) + pad, 8 * (side + pad) + pad)
    for row in range(4):  # rows: VAE samples 0-7, their refinements, VAE samples 8-15, theirs
        key, first = ("vae", "x0")[row % 2], 8 * (row // 2)
        for col in range(8):
            top, left = pad + row * (side + pad), pad + col * (side + pad)
            tile = picture[top : top + side, left : left + side]
            expected = np.kron(drawn[key][first + col, 0], np.ones((4, 4)))
            assert np.abs(tile - expected).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding of the PNG


def shown_images(text):
    """The paths of every Markdown image ![alt](path) in a text."""
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", ["LESSONS.md", "README.md"])
def test_every_image_the_docs_show_is_a_png_in_the_repository(doc):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = shown_images(open(os.path.join(root, doc), encoding="utf-8").read())
    assert paths, f"{doc} shows no image"
    for path in paths:
        full = os.path.normpath(os.path.join(root, path))
        assert full.startswith(root + os.sep), f"{doc} shows {path}, outside the repository"
        assert os.path.isfile(full), f"{doc} shows {path}: missing (python -m tools.figures)"
        assert open(full, "rb").read(4) == b"\x89PNG", f"{doc} shows {path}: not a PNG"


def test_the_data_only_figures_are_made_without_a_checkpoint(tmp_path, monkeypatch):
    import torch
    from test_pipeline import make_fashion

    import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("a data-only figure loaded a file with torch.load")

    # no runs/ beside it, and any checkpoint load fails the test
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(runtime, "load_checkpoint", refuse)
    data = make_fashion(str(tmp_path / "fashion"), n=32)
    out = tmp_path / "assets"
    figures.main(["--only", *figures.DATA_ONLY, "--out_dir", str(out), "--data_dir", data])
    made = sorted(os.listdir(out))
    assert made == sorted(figures.DATA_ONLY.values()), made
    # every data-only picture LESSONS.md shows is one of these
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lessons = open(os.path.join(root, "LESSONS.md"), encoding="utf-8").read()
    shown = {os.path.basename(p) for p in shown_images(lessons)}
    assert set(figures.DATA_ONLY.values()) <= shown
