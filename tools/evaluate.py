"""Sample quality: FID and KID in the feature space of a small Fashion-MNIST classifier.

FID (Heusel et al. 2017) fits a Gaussian to the features of each image set and reports the Frechet
(2-Wasserstein) distance between the two; KID (Binkowski et al. 2018) is the unbiased MMD^2 with a
cubic polynomial kernel. Both normally use Inception-v3 pool3 features. Inception weights cannot be
had here, so this file trains its own small CNN on Fashion-MNIST and uses its 128-d penultimate
layer. THE NUMBERS ARE NOT COMPARABLE TO PUBLISHED (INCEPTION) FIDs; compare them only with each
other, made with the same classifier checkpoint.

FID is biased at finite N: for two N-sets from one distribution with d-dim features it is ~(d^2 /
2N) x the mean feature variance, not 0 (tests/test_evaluate.py derives the exact second-order term);
KID is unbiased. So the CLI also prints a floor: held-out images of the validation split vs the test
set, with the same N as the samples.

    # (re)train and cache both classifiers
    python -m tools.evaluate --train_classifier
    python -m tools.evaluate --samples out/samples.npz --n 5000
    # the bound in bits/dim (DiffuseVAE.bound_bpd)
    python -m tools.evaluate --bpd runs/fashion/ddpm.pt --n 100
    # accuracy on test images and their reconstructions
    python -m tools.evaluate --recon runs/fashion/vae.pt

When a sample file holds both the VAE's x_hat_0 ("vae") and its refinement ("x0"), the CLI also
prints how often a second classifier, the judge, puts the two in the same class: does the refiner
keep the garment the VAE drew? That is agreement, not quality: a refiner that returns x_hat_0
unchanged scores 100%, so it is always read beside FID. The judge is another network (width 48, seed
1) trained on the other half of the training split, on sharp and blurred images (blur_augment), so
that it can name the class of a blurry x_hat_0 at all; FID/KID keep the features of the one trained
on sharp images, which tell blur from detail.

Images: the classifier reads [-1, 1]; sample files hold [0, 1] and are converted here, in
load_samples."""

import argparse
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sample
from data import DataError, load_dataset, to_model_range
from runtime import CheckpointError, load_checkpoint, save_atomic
from vae import VAE

SAMPLE_KEYS = ("x0", "vae")  # sample.py: the DiffuseVAE / DDPM output, and the VAE's own x_hat_0
# Two classifiers trained independently, neither on the validation split (data.py) nor on the test
# set: the features of FID/KID (width 32, seed 0, the first half of the training split, sharp
# images: its features tell blur from detail, as a sample-quality metric must) and the judge of
# class agreement (width 48, seed 1, the second half, half of each batch blurred, so that it can
# name the class of a blurry x_hat_0). The judge's features are the second, independent feature
# space in which tools/sweep.py also scores FID and KID.
FEATURES, JUDGE = "runs/classifier.pt", "runs/classifier_judge.pt"
ROLES = {
    FEATURES: dict(width=32, seed=0, half=0, blur=0.0),
    JUDGE: dict(width=48, seed=1, half=1, blur=0.5),
}


class SamplesError(ValueError):
    """A sample file that is missing or does not hold (N, 1, 32, 32) images in [0, 1]."""


# ----------------------------------------------------------------------------- the feature network


def _conv_block(c_in, c_out, n_conv):
    """n_conv 3x3 convs, (B, c_in, H, W) -> (B, c_out, H/2, W/2). The max-pool comes before the last
    BatchNorm and ReLU: max-pooling commutes with a per-channel increasing map (ReLU; BN's affine
    map when its scale is positive), so the block computes the same kind of function at 1/4 of the
    elementwise work."""
    layers = []
    for i in range(n_conv):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False)]
        layers += [nn.MaxPool2d(2)] if i == n_conv - 1 else []
        layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


class FeatureNet(nn.Module):
    """A small CNN classifier for (B, 1, 32, 32) images in [-1, 1]; its penultimate layer plays
    Inception's part."""

    def __init__(self, width=32, feature_dim=128, n_classes=10):
        super().__init__()
        self.config = dict(
            width=width, feature_dim=feature_dim, n_classes=n_classes
        )  # rebuilds it from a checkpoint
        self.trunk = nn.Sequential(
            _conv_block(1, width, 1),
            _conv_block(width, 2 * width, 2),
            _conv_block(2 * width, 4 * width, 2),
        )  # (B, 1, 32, 32) -> (B, 4w, 4, 4)
        self.feature = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * width * 4 * 4, feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x):
        """(B, 1, 32, 32) -> (B, 4w, 4, 4) -> (B, 16 * 4w) -> (B, feature_dim), float32."""
        return self.feature(self.trunk(x))

    def forward(self, x):
        """Class logits (B, n_classes)."""
        return self.head(self.features(x))


# ---------------------------------------------------------------------- training and the checkpoint


def augment(x, generator=None, max_shift=2):
    """Random horizontal flip and a random shift of up to max_shift pixels per image (background -1
    fills in)."""
    B, C, H, W = x.shape
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (B, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B, 1), generator=generator)
    rows, cols = (
        torch.arange(H) + dy,
        torch.arange(W) + dx,
    )  # (B, H), (B, W): the window each image keeps
    b = torch.arange(B)[:, None, None]
    return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def gaussian_kernel1d(sigma, dtype=torch.float64):
    """k_i = exp(-i^2 / (2 sigma^2)) / sum_j exp(-j^2 / (2 sigma^2)), i = -r..r, r = ceil(3 sigma);
    sums to 1."""
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0 (in pixels), got {sigma}")
    r = math.ceil(3 * sigma)
    i = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(i**2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype)  # (2r + 1,)


def gaussian_blur(x, sigma):
    """y = k * (k * x): the separable 2-D Gaussian k(i) k(j), one 1-D pass along H then one along W.

    The image is reflect-padded by r = ceil(3 sigma) (x_{-i} = x_i, no edge repeat), so a constant
    image stays constant and the per-image mean changes only by boundary terms of order r / H
    (exactly zero when the image is constant within r + 1 pixels of its border). Each output pixel
    is a convex combination of inputs, so [-1, 1] is kept; the final clamp only removes float
    rounding of the kernel's sum."""
    B, C, H, W = x.shape
    k = gaussian_kernel1d(sigma, x.dtype).to(x.device)
    r = (len(k) - 1) // 2
    if r >= min(H, W):
        raise ValueError(
            f"blur radius ceil(3 sigma) = {r} needs H and W > {r} for reflect padding, got {H}x{W}"
        )
    k_h = k.view(1, 1, -1, 1).expand(C, 1, -1, 1)  # (C, 1, 2r+1, 1): one filter per channel
    k_w = k.view(1, 1, 1, -1).expand(C, 1, 1, -1)  # (C, 1, 1, 2r+1)
    x = F.conv2d(
        F.pad(x, (0, 0, r, r), mode="reflect"), k_h, groups=C
    )  # (B, C, H+2r, W) -> (B, C, H, W)
    x = F.conv2d(
        F.pad(x, (r, r, 0, 0), mode="reflect"), k_w, groups=C
    )  # (B, C, H, W+2r) -> (B, C, H, W)
    return x.clamp(-1, 1)


def blur_augment(x, generator=None, p=0.5, sigmas=(0.5, 1.0, 1.5, 2.0)):
    """Gaussian-blur a random fraction p of x, each with a sigma drawn from `sigmas` (pixels).

    Seeing blurred copies in training lets a classifier judge the class of a blurry x_hat_0 = dec(z)
    as well as that of a sharp refinement, which the agreement metric needs."""
    pick = torch.randint(
        1, len(sigmas) + 1, (len(x),), generator=generator
    )  # which sigma; 0 below: keep sharp
    pick[torch.rand(len(x), generator=generator) >= p] = 0
    out = x.clone()
    for k, sigma in enumerate(sigmas, start=1):
        rows = pick == k
        if rows.any():
            out[rows] = gaussian_blur(x[rows], sigma)
    return out


def train_step(model, opt, x, y):
    """One AdamW step on the cross-entropy; returns the loss."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@torch.inference_mode()
def accuracy(model, x, y, batch_size=500):
    """Fraction of x classified correctly, in eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    hits = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return hits / len(x)


def _load_real(split, data_dir=None):
    """Fashion-MNIST `split` ("train", "val" or "test", data.py) as float32 (N, 1, 32, 32) in [-1,
    1] and labels (N,)."""
    images, labels = load_dataset("fashion_mnist", data_dir=data_dir, split=split)
    return to_model_range(images), labels


def training_half(half, data_dir=None):
    """The first (half 0) or second (half 1) half of the training split: the two classifiers'
    disjoint data."""
    x, y = _load_real("train", data_dir)
    part = slice(None, len(x) // 2) if half == 0 else slice(len(x) // 2, None)
    return x[part], y[part]


def train_classifier(
    data_dir=None,
    steps=1200,
    batch_size=128,
    lr=2e-3,
    seed=0,
    device="cpu",
    blur=0.0,
    width=32,
    half=0,
):
    """Train FeatureNet(width) on one half (0: first, 1: second) of the training split; returns
    (model, test accuracy). AdamW, linear warm-up then cosine decay; 1200 steps of 128 are 5.6
    epochs of a half; flips, shifts, and with blur > 0 blur_augment of that fraction of each batch
    (the judge of class agreement)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = training_half(half, data_dir)
    model = FeatureNet(width=width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    pbar = tqdm(range(steps), desc="classifier")
    for step in pbar:
        model.train()
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb = augment(x[idx], gen)
        if blur > 0:
            xb = blur_augment(xb, gen, p=blur)
        loss = train_step(model, opt, xb.to(device), y[idx].to(device))
        sched.step()
        if step % 50 == 0:
            pbar.set_postfix(loss=f"{loss:.3f}")
    x_test, y_test = _load_real("test", data_dir)
    return model, accuracy(model, x_test.to(device), y_test.to(device))


def save_classifier(model, test_accuracy, path, blur=0.0):
    """Write plain data {"state_dict", "config" (FeatureNet's arguments), "test_accuracy", "blur"},
    atomically."""
    save_atomic(
        {
            "state_dict": model.state_dict(),
            "config": dict(model.config),
            "test_accuracy": float(test_accuracy),
            "blur": float(blur),
        },
        path,
    )


def load_classifier(path, device="cpu"):
    """(model in eval mode, test accuracy) from a checkpoint written by save_classifier."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = FeatureNet(**ckpt["config"]).to(device)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["test_accuracy"]


def load_or_train_classifier(path=FEATURES, data_dir=None, device="cpu", retrain=False, role=None):
    """The cached classifier at `path`, trained and saved first if absent (or if retrain) with the
    settings of its `role` (FEATURES or JUDGE in ROLES; default: the role whose path this is, else
    the features' settings)."""
    if os.path.exists(path) and not retrain:
        return load_classifier(path, device)
    spec = dict(ROLES.get(role or path, ROLES[FEATURES]))
    t0 = time.time()
    model, acc = train_classifier(data_dir=data_dir, device=device, **spec)
    save_classifier(model, acc, path, blur=spec["blur"])
    print(
        f"trained the classifier in {time.time() - t0:.0f} s, test accuracy {acc:.2%}; saved {path}"
    )
    return model.eval(), acc


# ----------------------------------------------------------------------------- the metrics


@torch.inference_mode()
def extract_features(model, x, batch_size=500):
    """Penultimate features (N, D) float32 of images x (N, 1, 32, 32), clamped to the data range
    [-1, 1] first: every image set is scored as sample.py saves it, whether a model's output stays
    in range (a VAE's need not) or not."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [
            model.features(x[i : i + batch_size].to(device).clamp(-1, 1)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def feature_stats(feats):
    """Mean (D,) and covariance (D, D), ddof=1, in float64: the Gaussian that FID fits to a feature
    set."""
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False, ddof=1))  # (1, 1) for one feature


def _psd_eigvalsh(a, vectors=False):
    """eigh of a symmetric PSD matrix, with eigenvalues below eigh's rounding level (d eps ||a||)
    set to 0: they are indistinguishable from 0, and sqrt would turn rounding noise of 1e-16 into
    1e-8."""
    w, v = np.linalg.eigh((a + a.T) / 2)  # symmetrise away rounding first
    w = np.where(w > len(w) * np.finfo(np.float64).eps * np.abs(w).max(), w, 0.0)
    return (w, v) if vectors else w


def _sqrt_psd(a):
    """The symmetric square root V sqrt(W) V^T of a symmetric PSD matrix a = V W V^T."""
    w, v = _psd_eigvalsh(a, vectors=True)
    return (v * np.sqrt(w)) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, S1) and N(mu2, S2) (the FID of Heusel et al. 2017), in
    float64:

        d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2}).

    Tr(S1 S2)^{1/2}, which the usual scipy.linalg.sqrtm code computes from the non-symmetric S1 S2,
    has the same value as Tr(S1^{1/2} S2 S1^{1/2})^{1/2} (similar matrices). The latter matrix is
    symmetric PSD, so eigh gives real eigenvalues with a backward-stable algorithm, and the trace of
    its square root is the sum of their square roots: no complex sqrtm, no imaginary parts to
    discard, fine for singular (N < D) covariances. Not clamped: equal inputs can give ~ -1e-16 x
    the trace."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    r1 = _sqrt_psd(s1)
    tr_sqrt = np.sqrt(_psd_eigvalsh(r1 @ s2 @ r1)).sum()  # Tr (S1^{1/2} S2 S1^{1/2})^{1/2}
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def fid_from_features(f1, f2):
    """FID between two feature sets (N1, D), (N2, D)."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def polynomial_kernel(x, y):
    """KID's kernel k(x, y) = (x.y / d + 1)^3, for all pairs: (m, d), (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y):
    """Unbiased MMD^2 (Gretton et al. 2012, MMD^2_u): the mean of k over distinct pairs within x and
    within y, minus twice its mean over all (x, y) pairs. Its expectation is exactly 0 when x and y
    share a law."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2.0 * kxy.mean()
    )


def kid(feats1, feats2, subsets=100, subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018): unbiased MMD^2 averaged over random equal-size subsets; (mean,
    std)."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    size = min(subset_size, len(f1), len(f2))
    rng = np.random.default_rng(seed)
    vals = [
        mmd2_unbiased(
            f1[rng.choice(len(f1), size, replace=False)],
            f2[rng.choice(len(f2), size, replace=False)],
        )
        for _ in range(subsets)
    ]
    return float(np.mean(vals)), float(np.std(vals))


# ----------------------------------------------------------------------------- samples and the CLI


def load_samples(path, key="x0", n=None):
    """The first n images `key` of an .npz from sample.py ((N, 1, 32, 32) floats in [0, 1]) as
    float32 in [-1, 1]."""
    if not os.path.isfile(path):
        raise SamplesError(f"no sample file at {path}: run sample.py first")
    if not zipfile.is_zipfile(path):
        raise SamplesError(f"{path} is not an .npz file (np.savez writes a zip archive)")
    with np.load(path) as f:
        if key not in f.files:
            raise SamplesError(
                f"{path} has no array '{key}'; it holds: {', '.join(f.files) or 'nothing'}"
            )
        x = f[key][:n]
    if (
        x.ndim != 4
        or x.shape[1:] != (1, 32, 32)
        or not np.issubdtype(x.dtype, np.floating)
        or len(x) < 2
    ):
        raise SamplesError(
            f"'{key}' in {path}: expected floats of shape (N >= 2, 1, 32, 32) (Fashion-MNIST, the "
            f"classifier's dataset), got {x.dtype} {x.shape}"
        )
    if not np.isfinite(x).all() or x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise SamplesError(
            f"'{key}' in {path}: values must be in [0, 1], found [{x.min():.4g}, {x.max():.4g}]"
        )
    return (
        torch.from_numpy(x.astype(np.float32)).clamp(0, 1) * 2 - 1
    )  # [0, 1] -> [-1, 1], the one conversion


def keys_to_score(path, key=None):
    """[key] if given, else each of SAMPLE_KEYS the file holds (if none: "x0", whose error lists
    what is there)."""
    if key or not zipfile.is_zipfile(path):
        return [key or "x0"]
    with np.load(path) as f:
        return [k for k in SAMPLE_KEYS if k in f.files] or ["x0"]


def _report(name, feats, ref):
    """Print one FID / KID line; return its figures {"n", "fid", "kid", "kid_std"} (KID: mean and
    std over subsets)."""
    fid, (kid_mean, kid_std) = fid_from_features(feats, ref), kid(feats, ref)
    print(f"{name:<30s} N={len(feats):<6d} FID {fid:9.3f}   KID {kid_mean:8.3f} ± {kid_std:.3f}")
    return dict(n=len(feats), fid=fid, kid=kid_mean, kid_std=kid_std)


@torch.inference_mode()
def predict(model, x, batch_size=500):
    """Predicted classes (N,) int64: argmax of the classifier's logits on images x (N, 1, 32, 32)
    clamped to [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [
            model(x[i : i + batch_size].to(device).clamp(-1, 1)).argmax(1).cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def class_agreement(model, a, b, batch_size=500):
    """How often the classifier puts a[i] and b[i] (paired image sets in [-1, 1], e.g. x_hat_0 and
    its refinement) in the same class, with the binomial standard error of that fraction:

        p = (1/N) sum_i 1[argmax f(a_i) = argmax f(b_i)],    SE = sqrt(p (1 - p) / N).

    Returns (p, SE). The SE treats the N pairs as independent draws, which samples from independent
    z are."""
    if len(a) != len(b):
        raise ValueError(
            f"class_agreement needs paired sets of equal size, got {len(a)} and {len(b)}"
        )
    p = (predict(model, a, batch_size) == predict(model, b, batch_size)).double().mean().item()
    return p, math.sqrt(p * (1 - p) / len(a))


def evaluate(model, samples, data_dir=None, judge=None):
    """Print FID and KID of each image set in `samples` ({name: (N, 1, 32, 32) in [-1, 1]}) vs the
    Fashion-MNIST test set, then of the first N images of the validation split vs the test set: the
    floor (held out of every model and classifier; same N: FID's bias depends on N). If `samples`
    holds both "vae" (x_hat_0) and "x0" (its refinement), also print their class agreement by
    `judge` (default: model).

    Returns what it printed: {"samples": {name: {"n", "fid", "kid", "kid_std"}}, "floor": {the same}
    or None when the validation split has fewer images than the samples, "agreement": {"p", "se",
    "n"} or None}."""
    ref = extract_features(model, _load_real("test", data_dir)[0])
    print(
        f"features: the classifier's {ref.shape[1]}-d penultimate layer; "
        f"reference: the {len(ref)} test images.\n"
        "NOT comparable to published (Inception) FIDs. KID: mean ± std over 100 subsets of 1000."
    )
    scores = {
        name: _report(f"samples '{name}'", extract_features(model, x), ref)
        for name, x in samples.items()
    }
    n, held_out = len(next(iter(samples.values()))), _load_real("val", data_dir)[0]
    floor = None
    if n <= len(held_out):
        floor = _report(f"floor: held-out val[:{n}]", extract_features(model, held_out[:n]), ref)
    # FID's bias depends on N: a floor of fewer images than the samples would not be their floor
    else:
        print(
            f"floor: not scored, the validation split holds {len(held_out)} images, "
            f"fewer than the {n} samples "
            f"(score at most --n {len(held_out)} for a floor at the same N)"
        )
    agreement = None
    if "vae" in samples and "x0" in samples:
        p, se = class_agreement(model if judge is None else judge, samples["vae"], samples["x0"])
        agreement = dict(p=p, se=se, n=len(samples["x0"]))
        print(f"class agreement x_hat_0 vs refinement: {p:.1%} ± {se:.1%} (N={agreement['n']})")
    return dict(samples=scores, floor=floor, agreement=agreement)


def reconstruction_agreement(model, vae, x, y, batch_size=500):
    """The ceiling of the agreement figure: the classifier's accuracy on images x (labels y) and on
    their VAE reconstructions dec(mu(x)), and how often it gives an image and its reconstruction the
    same class. A refiner that returned each x exactly from its reconstruction would score this
    agreement, not 100%."""
    with torch.inference_mode():
        recon = torch.cat(
            [
                vae.decode(vae.encode(x[i : i + batch_size])[0]).clamp(-1, 1)
                for i in range(0, len(x), batch_size)
            ]
        )
    return dict(
        acc_data=(predict(model, x) == y).double().mean().item(),
        acc_recon=(predict(model, recon) == y).double().mean().item(),
        agree=class_agreement(model, x, recon)[0],
        n=len(x),
    )


def load_vae(path):
    """The EMA VAE of a stage-1 checkpoint, in eval mode."""
    ck = load_checkpoint(path, stage="vae", hint="Train one with: python train.py --stage vae")
    return VAE.from_checkpoint(ck)


def likelihood(ckpt, n=100, batch_size=100, data_dir=None, device="cpu", seed=0):
    """The bound of DiffuseVAE.bound_bpd on the first n Fashion-MNIST test images: mean and standard
    error. A refiner trained on the timesteps 0..t_start is bounded as sample.py runs it, started at
    its default start."""
    model = sample.load_model(ckpt, torch.device(device))
    x = _load_real("test", data_dir)[0][:n]
    torch.manual_seed(seed)
    parts = {"total": [], "ddpm": [], "kl_z": []}
    for i in range(0, len(x), batch_size):
        out = model.bound_bpd(x[i : i + batch_size].to(device), progress=True)
        for k in parts:
            parts[k].append(out[k].double().cpu())
    parts = {k: torch.cat(v) for k, v in parts.items()}
    se = parts["total"].std().item() / math.sqrt(len(x))
    full = model.t_start == model.diffusion.T - 1
    chain = "the whole chain" if full else f"the chain from code t {model.t_start}"
    print(
        f"{ckpt} ({chain}): -log p(x_0) <= {parts['total'].mean():.3f} ± {se:.3f} bits/dim "
        f"on {len(x)} test images "
        f"(DDPM given x_hat_0 {parts['ddpm'].mean():.3f}, KL of z {parts['kl_z'].mean():.3f}; "
        "sigma_t^2 = beta-tilde_t)"
    )
    return parts


def parse_args(argv=None):
    """The CLI's options (argv: a list of strings, default sys.argv[1:]); argparse exits on a bad
    command."""
    p = argparse.ArgumentParser(
        prog="python -m tools.evaluate",
        description="FID / KID in the feature space of a small Fashion-MNIST classifier",
    )
    p.add_argument("--samples", help=".npz from sample.py")
    p.add_argument(
        "--key", help=f"array to score (default: each of {', '.join(SAMPLE_KEYS)} the file holds)"
    )
    p.add_argument("--n", type=int, help="score the first n samples (default: all)")
    p.add_argument("--data_dir", help="Fashion-MNIST directory (default: data.py's)")
    p.add_argument(
        "--classifier", default=FEATURES, help="the FID/KID features (trained on first use)"
    )
    p.add_argument(
        "--judge",
        default=JUDGE,
        help="the classifier of class agreement, trained with blurred images "
        "too (trained on first use)",
    )
    p.add_argument(
        "--train_classifier", action="store_true", help="(re)train and cache both classifiers"
    )
    p.add_argument(
        "--bpd",
        metavar="CKPT",
        help="the variational bound in bits/dim of a stage-2 checkpoint on the "
        "first --n test images (default 100; T network calls per image)",
    )
    p.add_argument(
        "--recon",
        metavar="VAE_CKPT",
        help="the classifier on the first --n test images (default all) and "
        "on their reconstructions by this stage-1 checkpoint: the ceiling of the "
        "class-agreement figure",
    )
    args = p.parse_args(argv)
    if not (args.samples or args.train_classifier or args.bpd or args.recon):
        p.error("give --samples, --train_classifier, --bpd and/or --recon")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.bpd:
        try:
            likelihood(args.bpd, n=args.n or 100, data_dir=args.data_dir)
        except (DataError, CheckpointError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        if not (args.samples or args.train_classifier):
            return
    try:
        samples = (
            {
                k: load_samples(args.samples, k, args.n)
                for k in keys_to_score(args.samples, args.key)
            }
            if args.samples
            else {}
        )  # checked before anything slow
        model, acc = load_or_train_classifier(
            args.classifier, args.data_dir, retrain=args.train_classifier
        )
        print(f"classifier {args.classifier}: Fashion-MNIST test accuracy {acc:.2%}")
        judge = None
        if (
            args.train_classifier
            or args.recon
            or (samples and "vae" in samples and "x0" in samples)
        ):
            judge, acc = load_or_train_classifier(
                args.judge, args.data_dir, retrain=args.train_classifier, role=JUDGE
            )
            print(f"judge {args.judge} (blurred images too): Fashion-MNIST test accuracy {acc:.2%}")
        if samples:
            evaluate(model, samples, args.data_dir, judge)
        if args.recon:
            x, y = _load_real("test", args.data_dir)
            r = reconstruction_agreement(judge, load_vae(args.recon), x[: args.n], y[: args.n])
            print(
                f"{args.recon}, {r['n']} test images: classifier accuracy "
                f"{r['acc_data']:.1%} on the images, "
                f"{r['acc_recon']:.1%} on their reconstructions; "
                f"the same class for both: {r['agree']:.1%}"
            )
    except (SamplesError, DataError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
