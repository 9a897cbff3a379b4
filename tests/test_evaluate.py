"""FID and KID, checked: the Frechet distance against closed forms and an independent float64
reference, the finite-N estimators against their derived bias to a few standard errors (SE) over
seeds, KID's kernel by hand. Then the feature network, its checkpoint and the sample loader. No
dataset, no network access."""

import os

import numpy as np
import pytest
import torch
from test_pipeline import data_dir, trained  # noqa: F401 (fixtures: a tiny trained run)

from tools import evaluate as ev


def random_spd(rng, d):
    """A well-conditioned random SPD matrix: A A^T / d + 0.1 I (eigenvalues in about [0.1, 4.1])."""
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def random_rotation(rng, d):
    return np.linalg.qr(rng.standard_normal((d, d)))[0]


# ----------------------------------------------------------------------------- the Frechet distance


def test_frechet_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    for d in (1, 8, 64):
        mu, s = rng.standard_normal(d), random_spd(rng, d)
        assert abs(ev.frechet_distance(mu, s, mu, s)) <= 1e-10 * np.trace(s)


def test_frechet_isotropic_closed_form():
    # S1 = a^2 I, S2 = b^2 I: (S1^1/2 S2 S1^1/2)^1/2 = ab I, so d^2 = ||dmu||^2 + d (a^2 + b^2 -
    # 2ab)
    rng = np.random.default_rng(1)
    d, a, b = 16, 0.7, 1.9
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    exact = d * (a - b) ** 2 + ((mu1 - mu2) ** 2).sum()
    assert ev.frechet_distance(mu1, a**2 * np.eye(d), mu2, b**2 * np.eye(d)) == pytest.approx(
        exact, rel=1e-12
    )


def test_frechet_commuting_covariances_closed_form():
    # S1 = Q diag(s1) Q^T, S2 = Q diag(s2) Q^T commute: d^2 = ||dmu||^2 + sum_i (sqrt(s1_i) -
    # sqrt(s2_i))^2
    rng = np.random.default_rng(2)
    d = 12
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    for q in (
        np.eye(d),
        random_rotation(rng, d),
    ):  # diagonal, then the same pair in a rotated basis
        got = ev.frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
        assert got == pytest.approx(exact, rel=1e-10)


def frechet_reference(mu1, s1, mu2, s2):
    """Computed differently: S1 S2 = S1^1/2 (S1^1/2 S2 S1^1/2) S1^-1/2 is similar to a symmetric PSD
    matrix, so its (non-symmetric) eigenvalues are real, >= 0, and Tr (S1^1/2 S2 S1^1/2)^1/2 = sum
    sqrt(eig(S1 S2))."""
    lam = np.linalg.eigvals(s1 @ s2)
    assert np.abs(lam.imag).max() <= 1e-10 * np.abs(lam).max()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam.real).sum()


def test_frechet_matches_eigenvalues_of_product_reference():
    rng = np.random.default_rng(3)
    for d in (2, 10, 64):
        s1, s2 = random_spd(rng, d), random_spd(rng, d)  # do not commute
        assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            frechet_reference(mu1, s1, mu2, s2), rel=1e-8
        )


def test_frechet_is_symmetric():
    rng = np.random.default_rng(4)
    d = 32
    mu1, s1, mu2, s2 = (
        rng.standard_normal(d),
        random_spd(rng, d),
        rng.standard_normal(d),
        random_spd(rng, d),
    )
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        ev.frechet_distance(mu2, s2, mu1, s1), rel=1e-12
    )


def test_frechet_rank_deficient_covariances_is_finite_and_nonnegative():
    # fewer samples than dims: both covariances are singular, of rank n - 1 < d
    rng = np.random.default_rng(5)
    d, n = 64, 20
    x, y = rng.standard_normal((n, d)), 1.5 * rng.standard_normal((n, d))
    (mu1, s1), (mu2, s2) = ev.feature_stats(x), ev.feature_stats(y)
    assert np.linalg.matrix_rank(s1) == n - 1
    got = ev.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got > 0
    # reference from the data, with no matrix square root: S1 = A^T A, S2 = B^T B (A, B centred /
    # sqrt(n - 1)), and Tr (S1^1/2 S2 S1^1/2)^1/2 = ||S1^1/2 S2^1/2||_* = ||B A^T||_*, the nuclear
    # norm of an n x n matrix.
    a, b = (x - x.mean(0)) / np.sqrt(n - 1), (y - y.mean(0)) / np.sqrt(n - 1)
    ref = (
        ((mu1 - mu2) ** 2).sum()
        + (a * a).sum()
        + (b * b).sum()
        - 2 * np.linalg.svd(b @ a.T, compute_uv=False).sum()
    )
    # 1e-10: float64 rounding with room to spare. Without the cut of eigenvalues below eigh's
    # rounding level, each of the d - n + 1 zero eigenvalues comes out as ~eps ||S||, and sqrt makes
    # that ~1e-8 ||S||^1/2.
    assert got == pytest.approx(ref, rel=1e-10)
    assert abs(ev.frechet_distance(mu1, s1, mu1, s1)) <= 1e-12 * np.trace(s1)


# ----------------------------------------------------------------------------- FID as an estimator


def fid_bias(lam, n):
    """E[FID] between two independent n-sample sets from one Gaussian with covariance eigenvalues
    lam, to second order in 1/n. Mean term: mu1_hat - mu2_hat ~ N(0, 2 S / n), so E||.||^2 = 2 Tr S
    / n. Covariance term: the squared Bures distance near S = diag(lam) is 1/2 sum_ij H_ij^2 /
    (lam_i + lam_j), with H = S1_hat - S2_hat, E H_ij^2 = 2 Var S_hat_ij = 2 (lam_i lam_j + [i = j]
    lam_i^2) / (n - 1)."""
    pair = np.outer(lam, lam) / np.add.outer(lam, lam)
    return 2 * lam.sum() / n + (pair.sum() + lam.sum() / 2) / (n - 1)


def fid_over_seeds(lam, n, seeds, shift=None):
    """FID of two independent n-sample sets from N(0, Q diag(lam) Q^T) (the second shifted), one per
    seed."""
    d = len(lam)
    root = random_rotation(np.random.default_rng(0), d) * np.sqrt(
        lam
    )  # root @ root.T = Q diag(lam) Q^T
    shift = np.zeros(d) if shift is None else shift
    vals = []
    for s in range(seeds):
        rng = np.random.default_rng(100 + s)
        x, y = rng.standard_normal((n, d)) @ root.T, rng.standard_normal((n, d)) @ root.T + shift
        vals.append(ev.fid_from_features(x, y))
    return np.array(vals)


def test_fid_of_one_gaussian_matches_its_finite_n_bias():
    lam, n, seeds = np.linspace(0.5, 2.0, 8), 4000, 100
    vals = fid_over_seeds(lam, n, seeds)
    se = vals.std(ddof=1) / np.sqrt(seeds)
    assert abs(vals.mean() - fid_bias(lam, n)) < 4 * se
    assert (
        vals.mean() < 0.01 * lam.sum()
    )  # "close to zero": ~(d^2 / 2n) x the mean variance Tr S / d
    assert (
        fid_bias(lam, n) > 2 * lam.sum() / n + 4 * se
    )  # the covariance term matters: the mean term alone fails


def test_fid_of_a_mean_shift_is_its_squared_norm_plus_bias():
    lam, n, seeds = np.linspace(0.5, 2.0, 8), 4000, 100
    delta = np.full(8, 0.1)  # ||delta||^2 = 0.08
    vals = fid_over_seeds(lam, n, seeds, shift=delta)
    se = vals.std(ddof=1) / np.sqrt(seeds)
    assert abs(vals.mean() - (delta @ delta + fid_bias(lam, n))) < 4 * se


# ----------------------------------------------------------------------------- KID


def test_kid_kernel_and_mmd_by_hand():
    # k(x, y) = (x.y / 2 + 1)^3 in d = 2 dims
    x = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    y = np.array([[0.0, 0.0], [-2.0, 0.0]])
    # x.x' for the 3 distinct pairs: 0, 4, 4 -> k = 1, 27, 27; mean over the 6 ordered pairs = 110 /
    # 6 y.y' = 0 -> k = 1; mean = 1 x.y: 0, -4, 0, 0, 0, -4 -> k = 1, -1, 1, 1, 1, -1; mean = 2 / 6
    assert np.allclose(ev.polynomial_kernel(x, y), [[1, -1], [1, 1], [1, -1]])
    assert ev.mmd2_unbiased(x, y) == pytest.approx(110 / 6 + 1 - 2 * 2 / 6, rel=1e-14)  # = 56 / 3


def test_kid_is_unbiased_for_one_distribution():
    d, n, seeds = 16, 100, 200
    unbiased, v_statistic = [], []
    for s in range(seeds):
        rng = np.random.default_rng(s)
        x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        unbiased.append(ev.mmd2_unbiased(x, y))
        k = ev.polynomial_kernel
        v_statistic.append(
            k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
        )  # keeps the i = j terms
    unbiased, v_statistic = np.array(unbiased), np.array(v_statistic)
    se = unbiased.std(ddof=1) / np.sqrt(seeds)
    assert abs(unbiased.mean()) < 4 * se
    assert (unbiased < 0).any()  # unbiased for 0 means it must sometimes go below it
    assert v_statistic.mean() > 20 * se  # the test has the power to see the biased estimator's bias


def test_kid_is_positive_for_shifted_distributions_and_seeded():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16)) + 0.3
    mean, std = ev.kid(x, y, subsets=20, subset_size=200)
    assert mean - 3 * std > 0
    assert ev.kid(x, y, subsets=20, subset_size=200) == (mean, std)
    assert ev.kid(x, y, subsets=20, subset_size=200, seed=1) != (mean, std)


# ----------------------------------------------------------------------------- the feature network


def two_blob_images(n, gen):
    """Class 0: a bright square top-left; class 1: bottom-right; on a -1 background with noise. (n,
    1, 32, 32)."""
    y = torch.randint(0, 2, (n,), generator=gen)
    x = -torch.ones(n, 1, 32, 32) + 0.2 * torch.randn(n, 1, 32, 32, generator=gen)
    x[y == 0, :, 6:14, 6:14] += 1.5
    x[y == 1, :, 18:26, 18:26] += 1.5
    return x.clamp(-1, 1), y


def test_feature_net_shapes():
    model = ev.FeatureNet(width=8, feature_dim=128)
    x = torch.randn(5, 1, 32, 32)
    assert model.features(x).shape == (5, 128) and model.features(x).dtype == torch.float32
    assert model(x).shape == (5, 10)
    assert ev.extract_features(model, x, batch_size=2).shape == (5, 128)


def test_feature_net_training_decreases_loss():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ev.FeatureNet(width=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x_val, y_val = two_blob_images(32, gen)
    loss = lambda: torch.nn.functional.cross_entropy(
        model(x_val), y_val
    ).item()  # train-mode BN: batch stats
    with torch.no_grad():
        before = loss()
    for _ in range(10):
        x, y = two_blob_images(16, gen)
        ev.train_step(model, opt, ev.augment(x, gen), y)
    with torch.no_grad():
        after = loss()
    assert after < 0.5 * before


def test_augment_moves_pixels_and_keeps_the_image():
    gen = torch.Generator().manual_seed(0)
    x, _ = two_blob_images(16, gen)
    x[:, :, :2], x[:, :, -2:], x[:, :, :, :2], x[:, :, :, -2:] = (
        -1,
        -1,
        -1,
        -1,
    )  # a 2-px border, as data.py pads
    out = ev.augment(x, gen, max_shift=2)
    assert out.shape == x.shape
    # a flip and a shift within the border only move pixels: each image keeps its values, sorted
    assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert not torch.equal(out, x)


def test_blur_augment_blurs_a_fraction_p_each_with_one_of_its_sigmas():
    from tools.degrade import gaussian_blur

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 1, 12, 12, generator=g) * 2 - 1
    sigmas = (0.5, 1.5)
    y = ev.blur_augment(x, torch.Generator().manual_seed(1), p=0.3, sigmas=sigmas)
    candidates = torch.stack([x] + [gaussian_blur(x, s) for s in sigmas])  # (3, N, 1, 12, 12)
    err = (candidates - y).flatten(2).abs().amax(2)  # (3, N)
    assert (err.min(0).values < 1e-6).all()  # every output is one of them
    blurred = (err[0] > 1e-6).float().mean().item()
    se = (0.3 * 0.7 / len(x)) ** 0.5
    assert abs(blurred - 0.3) < 4 * se  # Bernoulli(p): a few SE
    assert torch.equal(ev.blur_augment(x, g, p=0.0), x)


def test_extract_features_uses_eval_mode_so_batching_does_not_matter():
    torch.manual_seed(0)
    model = ev.FeatureNet(width=8).train()
    x = torch.randn(10, 1, 32, 32)
    a, b = ev.extract_features(model, x, batch_size=3), ev.extract_features(model, x, batch_size=10)
    assert torch.allclose(a, b, atol=1e-5)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = ev.FeatureNet(width=8, feature_dim=32)
    model(
        torch.randn(4, 1, 32, 32)
    )  # train mode: moves the BatchNorm running statistics off their init
    path = str(tmp_path / "sub" / "classifier.pt")
    ev.save_classifier(model, 0.875, path)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [
        "classifier.pt"
    ]  # no temp file left behind
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"state_dict", "config", "test_accuracy", "blur"} and ckpt["blur"] == 0.0
    loaded, acc = ev.load_classifier(path)
    assert acc == 0.875 and loaded.config == model.config and not loaded.training
    x = torch.randn(6, 1, 32, 32)
    assert torch.equal(ev.extract_features(model, x), ev.extract_features(loaded, x))


# ----------------------------------------------------------------------------- the sample loader


def test_load_samples_converts_to_minus_one_one(tmp_path):
    path = tmp_path / "samples.npz"
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 32, 32)).astype(np.float32)
    np.savez(path, x0=x, vae=x)
    got = ev.load_samples(str(path), "vae", n=3)
    assert got.shape == (3, 1, 32, 32) and got.dtype == torch.float32
    assert torch.allclose(got, torch.from_numpy(x[:3]) * 2 - 1)
    assert ev.keys_to_score(str(path)) == ["x0", "vae"]


def test_load_samples_errors_name_the_problem(tmp_path):
    with pytest.raises(ev.SamplesError, match="no sample file"):
        ev.load_samples(str(tmp_path / "absent.npz"))
    path = str(tmp_path / "samples.npz")
    (tmp_path / "samples.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ev.SamplesError, match="not an .npz file"):
        ev.load_samples(path)
    good = np.zeros((4, 1, 32, 32), np.float32)
    np.savez(path, samples=good, other=good)
    with pytest.raises(ev.SamplesError, match="no array 'x0'; it holds: samples, other"):
        ev.load_samples(path, "x0")
    np.savez(path, x0=good + 1.5)
    with pytest.raises(ev.SamplesError, match=r"values must be in \[0, 1\]"):
        ev.load_samples(path, "x0")
    np.savez(path, x0=good * 2 - 1)
    with pytest.raises(ev.SamplesError, match=r"values must be in \[0, 1\], found \[-1"):
        ev.load_samples(path, "x0")
    np.savez(path, x0=np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(
        ev.SamplesError, match=r"shape \(N >= 2, 1, 32, 32\) .* got float32 \(4, 3, 32, 32\)"
    ):
        ev.load_samples(path, "x0")


def test_cli_stops_with_the_message_before_any_slow_step(tmp_path, monkeypatch):
    path = str(tmp_path / "samples.npz")
    np.savez(path, samples=np.zeros((4, 1, 32, 32), np.float32))
    classifier = str(tmp_path / "classifier.pt")  # absent: reaching it would start a training run
    monkeypatch.setattr("sys.argv", ["evaluate.py", "--samples", path, "--classifier", classifier])
    with pytest.raises(SystemExit, match="error: .* has no array 'x0'; it holds: samples"):
        ev.main()


# ---------------------------------------------------------------------- class agreement and the CLI


class NearestLevel(torch.nn.Module):
    """A stand-in classifier with logits we choose: an image's class is the level in linspace(-1, 1,
    10) nearest to its top-left pixel, logit_k = -(x[0, 0, 0] - level_k)^2."""

    def __init__(self):
        super().__init__()
        self.levels = torch.nn.Parameter(torch.linspace(-1, 1, 10))

    def forward(self, x):
        return -((x[:, 0, 0, 0, None] - self.levels) ** 2)  # (B, 10)


def images_of_class(classes, gen):
    """(N, 1, 32, 32) noise in [-1, 1] whose top-left pixel is the level of the given class, for
    NearestLevel."""
    x = torch.rand(len(classes), 1, 32, 32, generator=gen) * 2 - 1
    x[:, 0, 0, 0] = torch.linspace(-1, 1, 10)[torch.tensor(classes)]
    return x


def test_class_agreement_is_one_for_identical_sets():
    torch.manual_seed(0)
    model, x = ev.FeatureNet(width=8), torch.randn(7, 1, 32, 32).clamp(-1, 1)
    assert ev.class_agreement(model, x, x.clone(), batch_size=3) == (1.0, 0.0)


def test_class_agreement_matches_a_hand_count():
    gen = torch.Generator().manual_seed(0)
    a_cls, b_cls = (
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 9, 3, 4, 0, 6, 2],
    )  # same class at 0, 1, 3, 4, 6: 5 of 8
    a, b = images_of_class(a_cls, gen), images_of_class(b_cls, gen)
    model = NearestLevel()
    assert (
        ev.predict(model, a, batch_size=3).tolist() == a_cls
        and ev.predict(model, b).tolist() == b_cls
    )
    p, se = ev.class_agreement(model, a, b, batch_size=3)
    assert p == 5 / 8 and se == pytest.approx(np.sqrt(5 / 8 * 3 / 8 / 8), rel=1e-12)
    with pytest.raises(ValueError, match="equal size"):
        ev.class_agreement(model, a, b[:5])


def fake_real(split, data_dir=None, seen=None):
    """Stands in for Fashion-MNIST: 64 random images per split (no dataset in the tests); records
    the splits read."""
    if seen is not None:
        seen.append(split)
    gen = torch.Generator().manual_seed(("train", "val", "test").index(split))
    return torch.rand(64, 1, 32, 32, generator=gen) * 2 - 1, torch.zeros(64, dtype=torch.int64)


def test_cli_scores_identical_sets_alike_and_keeps_every_class(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    classifier = str(tmp_path / "classifier.pt")
    ev.save_classifier(
        ev.FeatureNet(width=8, feature_dim=16), 0.5, classifier
    )  # tiny: no training run
    x = np.random.default_rng(0).uniform(0, 1, (20, 1, 32, 32)).astype(np.float32)
    path = str(tmp_path / "samples.npz")
    np.savez(
        path, vae=x, x0=x
    )  # a refiner that changes nothing keeps every class, and the two sets score alike
    monkeypatch.setattr(ev, "_load_real", fake_real)
    ev.main(["--samples", path, "--classifier", classifier, "--judge", classifier, "--n", "16"])
    lines = capsys.readouterr().out.splitlines()
    x0, vae, floor, agreement = lines[-4:]
    assert x0.split("N=")[1] == vae.split("N=")[1] and floor.startswith("floor: held-out val[:16]")
    assert agreement == "class agreement x_hat_0 vs refinement: 100.0% ± 0.0% (N=16)"


def test_evaluate_gives_the_one_dimensional_frechet_distance_and_a_held_out_floor(monkeypatch):
    # with one feature, FID is (m1 - m2)^2 + (s1 - s2)^2 (means, standard deviations with ddof 1):
    # the Frechet distance of two 1-D Gaussians; the floor scores the validation split, which no
    # classifier was trained on
    model, gen = NearestLevel(), torch.Generator().manual_seed(0)
    model.features = lambda x: x[:, 0, 5, :1]  # one pixel as the feature
    samples = {
        "vae": images_of_class([0, 1, 2, 3] * 5, gen),
        "x0": images_of_class([0, 1, 2, 9] * 5, gen),
    }
    seen = []
    monkeypatch.setattr(
        ev, "_load_real", lambda split, data_dir=None: fake_real(split, data_dir, seen)
    )
    got = ev.evaluate(model, samples)
    ref = fake_real("test")[0][:, 0, 5, 0].double().numpy()

    def fid_1d(a):
        a = a[:, 0, 5, 0].double().numpy()
        return (a.mean() - ref.mean()) ** 2 + (a.std(ddof=1) - ref.std(ddof=1)) ** 2

    for name, x in samples.items():
        assert got["samples"][name]["fid"] == pytest.approx(fid_1d(x), rel=1e-9, abs=1e-12)
    assert seen == ["test", "val"] and got["floor"]["fid"] == pytest.approx(
        fid_1d(fake_real("val")[0][:20]), rel=1e-9
    )
    assert got["agreement"] == dict(
        p=0.75, se=pytest.approx(np.sqrt(0.75 * 0.25 / 20)), n=20
    )  # 15 of 20 kept
    assert (
        ev.evaluate(model, {"x0": samples["x0"]})["agreement"] is None
    )  # one set: nothing to compare


def test_no_floor_is_scored_from_fewer_held_out_images_than_samples(monkeypatch, capsys):
    # FID's bias depends on N: with 80 samples and a validation split of 64 the floor would score 64
    # images against the samples' 80, so it is not scored, and the report says why and which --n
    # would give one
    model, gen = NearestLevel(), torch.Generator().manual_seed(0)
    model.features = lambda x: x[:, 0, 5, :2]
    monkeypatch.setattr(ev, "_load_real", fake_real)
    got = ev.evaluate(model, {"x0": images_of_class([1, 2, 3, 4] * 20, gen)})
    assert got["floor"] is None and got["samples"]["x0"]["n"] == 80
    assert (
        "floor: not scored, the validation split holds 64 images, fewer than the 80 samples"
        in capsys.readouterr().out
    )
    assert (
        ev.evaluate(model, {"x0": images_of_class([1, 2, 3, 4] * 16, gen)})["floor"]["n"] == 64
    )  # same N: scored


def test_every_image_set_is_scored_clamped_to_the_data_range():
    # a VAE's x_hat_0 can leave [-1, 1] (sample.py saves it clamped): its features and classes are
    # those of the clamp
    torch.manual_seed(0)
    model, x = ev.FeatureNet(width=8).eval(), 1.5 * torch.randn(16, 1, 32, 32)
    assert (x.abs() > 1).float().mean() > 0.3
    assert torch.equal(ev.extract_features(model, x), ev.extract_features(model, x.clamp(-1, 1)))
    assert torch.equal(ev.predict(model, x), ev.predict(model, x.clamp(-1, 1)))


def test_the_judge_is_another_network_trained_on_other_images(monkeypatch):
    # the features and the judge share no training image, seed or width; neither sees the validation
    # split
    seen, read = {}, []
    monkeypatch.setattr(
        ev,
        "train_classifier",
        lambda **spec: (
            seen.setdefault(spec["half"], spec)
            and None
            or (ev.FeatureNet(width=spec["width"]), 0.5)
        ),
    )
    monkeypatch.setattr(ev, "save_classifier", lambda *a, **k: None)
    ev.load_or_train_classifier("/nonexistent/features.pt", role=ev.FEATURES)
    ev.load_or_train_classifier("/nonexistent/judge.pt", role=ev.JUDGE)
    features, judge = seen[0], seen[1]
    assert (
        features["seed"] != judge["seed"]
        and features["width"] != judge["width"]
        and judge["blur"] > 0
    )
    x = torch.arange(101)
    monkeypatch.setattr(ev, "_load_real", lambda split, data_dir=None: read.append(split) or (x, x))
    halves = [ev.training_half(h)[0] for h in (0, 1)]
    assert read == ["train", "train"] and set(halves[0].tolist()).isdisjoint(halves[1].tolist())
    assert sorted(torch.cat(halves).tolist()) == x.tolist()


def test_parse_args_dry_parses_and_rejects_a_command_with_nothing_to_do():
    args = ev.parse_args(["--samples", "s.npz", "--n", "500"])
    assert (args.samples, args.n, args.key, args.classifier) == (
        "s.npz",
        500,
        None,
        "runs/classifier.pt",
    )
    with pytest.raises(SystemExit):
        ev.parse_args(["--n", "500"])


def test_reconstruction_agreement_counts_accuracy_on_both_and_their_agreement():
    # a stand-in VAE: reconstructs every image exactly but those of class 0, moved to class 1
    class MoveClassZero:
        def encode(self, x):
            return x, None

        def decode(self, z):
            out = z.clone()
            zero = out[:, 0, 0, 0] < -0.9  # NearestLevel: class 0 is level -1
            out[zero, :, 0, 0] += 2 / 9  # the next level
            return out

    gen = torch.Generator().manual_seed(0)
    labels = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    x, y = images_of_class(labels, gen), torch.tensor(labels)
    y[9] = 0  # one image the classifier gets wrong
    got = ev.reconstruction_agreement(NearestLevel(), MoveClassZero(), x, y, batch_size=4)
    assert got == dict(acc_data=0.9, acc_recon=pytest.approx(0.7), agree=0.8, n=10)


def test_the_bound_of_a_truncated_chain_has_the_closed_form_prior_at_its_start():
    # a chain started at code t_s from N(sqrt(ab) m, (1 - ab) I): its prior term is KL(q(x_ts | x_0)
    # || that) = ab / (2 (1 - ab)) ||x_0 - m||^2 nats (equal variances), and only the t_s + 1 terms
    # 0..t_s follow it
    import ddpm

    diffusion, gen = ddpm.make_diffusion("linear", 1000), torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (3, 1, 4, 4), generator=gen).double() / 127.5 - 1
    m = x0 + 0.1 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[20]
    got = diffusion.vlb_terms_bpd(lambda x, t: torch.zeros_like(x), x0, t_start=20, start_mean=m)
    expected = ab / (2 * (1 - ab)) * (x0 - m).pow(2).flatten(1).sum(1) / (16 * np.log(2))
    assert got["terms"].shape == (3, 21)
    assert torch.allclose(got["prior"], expected, rtol=1e-10)
    assert torch.allclose(got["total"], got["prior"] + got["terms"].sum(1), rtol=1e-12)
    same = diffusion.vlb_terms_bpd(lambda x, t: torch.zeros_like(x), x0, t_start=20, start_mean=x0)
    assert same["prior"].abs().max() < 1e-12  # started at the data itself: nothing to pay


def test_likelihood_bounds_a_truncated_refiner_from_its_start(trained, monkeypatch, capsys):
    monkeypatch.setattr(ev, "_load_real", fake_real)
    parts = ev.likelihood(os.path.join(trained, "ddpm.pt"), n=2, batch_size=2)
    assert (
        "(the chain from code t 110)" in capsys.readouterr().out
    )  # trained on 0..110, started there
    assert torch.isfinite(parts["total"]).all() and (parts["total"] > 0).all()
