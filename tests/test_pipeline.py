"""The two-stage pipeline end to end on a tiny Fashion-MNIST-format dataset made here: train both stages a few
steps, sample with 10 steps, resume exactly, stay deterministic, run 2 processes with gloo, survive signals,
and give clear errors for the mistakes users make."""
import gzip
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ddpm
import diffusevae as DV
import runtime
import sample
import train
from checkpoint import load
from data import to_unit_range
from unet import UNet
from data import load_dataset
from vae import VAE, encode_dataset, sample_prior

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch_size", "8", "--log_every", "2", "--sample_every", "1000", "--ckpt_every", "1000"]


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion(directory, n=64, seed=0):
    """Tiny IDX files: bright rectangles of random size on black, label = a size bucket (0..9)."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for split in ("train", "t10k"):
        imgs = np.zeros((n, 28, 28), np.uint8)
        labels = rng.integers(0, 10, n)
        for i, c in enumerate(labels):
            imgs[i, 14 - c - 2: 14 + c + 2, 8:20] = 200 + rng.integers(0, 55)
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), imgs, 0x803)
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels, 0x801)
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fashion(str(tmp_path_factory.mktemp("fashion")))


def train_both(out, data_dir, steps):
    """Stage 1 then stage 2, `steps` steps each, at the TINY size; returns the run folder."""
    for stage in ("vae", "ddpm"):
        train.main(["--stage", stage, "--data_dir", data_dir, "--out_dir", out, "--steps", str(steps), *TINY])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """Both stages, a few steps each: the run the sampling tests use."""
    return train_both(str(tmp_path_factory.mktemp("run")), data_dir, steps=4)


def weights(path):
    ck = load(path)
    return ck["model"], ck["ema"], {f"{k}.{n}": v for k, st in ck["optimizer"]["state"].items() for n, v in st.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_stages_write_checkpoints_pictures_and_sample_in_10_steps(trained):
    vae_ck, ddpm_ck = load(os.path.join(trained, "vae.pt")), load(os.path.join(trained, "ddpm.pt"))
    assert vae_ck["stage"] == "vae" and ddpm_ck["stage"] == "ddpm" and ddpm_ck["step"] == 4
    assert ddpm_ck["model_args"]["cond_ch"] == 1 and "vae" in ddpm_ck
    prior = vae_ck["prior"]  # stage 1 ends by fitting the ex-post prior; stage 2 carries it along
    assert prior["means"].shape == (prior["weights"].numel(), vae_ck["model_args"]["z_dim"])
    assert all(torch.equal(prior[k], ddpm_ck["vae"]["prior"][k]) for k in prior)
    for name in ("vae_samples.png", "vae_loss.png", "ddpm_samples.png", "ddpm_loss.png"):
        assert os.path.getsize(os.path.join(trained, name)) > 0
    out = os.path.join(trained, "s10")
    sample.main(["--ckpt", os.path.join(trained, "ddpm.pt"), "--steps", "10", "--n", "6", "--out", out])
    arrays = np.load(out + ".npz")
    assert arrays["x0"].shape == arrays["vae"].shape == (6, 1, 32, 32)
    assert arrays["x0"].min() >= 0 and arrays["x0"].max() <= 1
    assert os.path.getsize(out + ".png") > 0


def test_a_refiner_of_the_content_samples_whole_images_with_the_datas_frame(trained, data_dir, tmp_path):
    # train.py --border 2: the UNet models the 28x28 content; sample.py and the bound see 32x32 images, black frame
    ck = str(tmp_path / "ddpm.pt")
    train.main(["--stage", "ddpm", "--data_dir", data_dir, "--ckpt", ck, "--vae_ckpt", os.path.join(trained, "vae.pt"),
                "--steps", "2", "--border", "2", *TINY])
    cfg = load(ck)
    assert cfg["model_args"]["image_size"] == 28 and cfg["model_args"]["attn_resolutions"] == [7]
    assert cfg["config"]["border"] == 2
    out = str(tmp_path / "s")
    sample.main(["--ckpt", ck, "--steps", "3", "--n", "4", "--out", out])
    x0, vae = (np.load(out + ".npz")[k] for k in ("x0", "vae"))
    frame = np.ones((32, 32), bool)
    frame[2:30, 2:30] = False
    assert x0.shape == vae.shape == (4, 1, 32, 32)
    assert (x0[..., frame] == 0).all() and (x0[..., ~frame] > 0).any()  # the data's frame, black


def test_sampling_is_deterministic_with_a_seed(trained):
    ck = os.path.join(trained, "ddpm.pt")
    outs = []
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        sample.main(["--ckpt", ck, "--steps", "5", "--n", "3", "--seed", str(seed), "--sampler", "ddpm",
                     "--out", os.path.join(trained, name)])
        outs.append(np.load(os.path.join(trained, name + ".npz"))["x0"])
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_spacing_and_t_start_flags_pick_the_timesteps_the_refiner_visits(trained, monkeypatch):
    ck = os.path.join(trained, "ddpm.pt")
    net, vae, diffusion, cfg = sample.load_models(ck, torch.device("cpu"))
    assert cfg["t_start"] == train.PRESETS["cpu"]["t_start"]  # trained on 0..t_start
    assert DV.sample_start(cfg) == cfg["t_start"]  # and sampled from its top
    visited, forward = [], UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, x, t, *a: visited.append(int(t[0])) or forward(self, x, t, *a))
    for spacing, flag, t_start in [(s, [], DV.sample_start(cfg)) for s in ddpm.SPACINGS] + [
            ("uniform", ["40"], 40), ("uniform", ["60"], 60), ("uniform", ["80"], 80)]:
        visited.clear()
        out = os.path.join(trained, "spacing_" + spacing)
        sample.main(["--ckpt", ck, "--steps", "4", "--n", "3", "--spacing", spacing, "--out", out]
                    + (["--t_start"] + flag if flag else []))
        assert visited == ddpm.ddim_timesteps(diffusion.T, 4, spacing, t_start).flip(0).tolist()  # e.g. 100 67 33 0
        g = torch.Generator().manual_seed(0)  # sample.py's default seed: z first, then the x_T noise
        with torch.no_grad():
            x_hat0 = vae.decode(sample_prior(3, vae.z_dim, vae.prior, generator=g))
            x0 = DV.refine(net, diffusion, x_hat0, form=cfg["form"], steps=4, generator=g, spacing=spacing,
                           t_start=t_start, param=cfg["param"])
        assert np.allclose(np.load(out + ".npz")["x0"], to_unit_range(x0.clamp(-1, 1)).numpy(), atol=1e-6)


def test_sampling_runs_in_the_devices_memory_format_and_gives_the_same_samples(trained):
    # load_models takes runtime.choose's layout (channels_last on this CPU: bench.py "sample"); --channels_last off
    # is the contiguous path. Same math in another memory order: only the fp32 summation order of the convs moves,
    # through 10 denoiser calls and the decoder; measured ~2e-6 on the default model, allowed 1e-4 of the [0, 1] range.
    ck = os.path.join(trained, "ddpm.pt")
    for flag, nhwc in (("auto", runtime.CPU_CHANNELS_LAST), ("on", True), ("off", False)):
        net, vae, _, _ = sample.load_models(ck, torch.device("cpu"), runtime.AUTO_ON_OFF[flag])
        for w in (net.conv_in.weight, vae.dec[-1].weight):
            assert w.is_contiguous(memory_format=torch.channels_last) == nhwc and w.is_contiguous() != nhwc
    outs = {}
    for flag in ("on", "off"):
        out = os.path.join(trained, "layout_" + flag)
        sample.main(["--ckpt", ck, "--steps", "10", "--n", "6", "--channels_last", flag, "--out", out])
        outs[flag] = np.load(out + ".npz")
    for key in ("vae", "x0"):
        assert np.abs(outs["on"][key] - outs["off"][key]).max() < 1e-4


def test_training_draws_t_from_0_to_t_start_only(trained):
    _, _, diffusion, cfg = sample.load_models(os.path.join(trained, "ddpm.pt"), torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.zeros(5000, 1, 1, 1)
    draws = [DV.ddpm_loss(lambda x, t, c: x, diffusion, x, x, form=2, t_max=t_max)[1]
             for t_max in (cfg["t_start"], None)]
    # 5000 uniform draws on 0..300 miss a given value with probability (300/301)^5000 ~ 6e-8: both ends are hit
    assert draws[0].min() == 0 and draws[0].max() == cfg["t_start"]
    assert draws[1].max() > cfg["t_start"] and draws[1].max() <= diffusion.T - 1


def test_sampling_draws_z_from_the_ex_post_prior_unless_told_otherwise(trained):
    ck = os.path.join(trained, "ddpm.pt")
    _, vae, _, _ = sample.load_models(ck, torch.device("cpu"))
    for prior, p_z in (("expost", vae.prior), ("normal", None)):
        out = os.path.join(trained, "prior_" + prior)
        sample.main(["--ckpt", ck, "--steps", "2", "--n", "4", "--prior", prior, "--out", out])
        z = sample_prior(4, vae.z_dim, p_z, generator=torch.Generator().manual_seed(0))  # sample.py's first draw
        with torch.no_grad():
            expected = to_unit_range(vae.decode(z)).numpy()
        assert np.allclose(np.load(out + ".npz")["vae"], expected, atol=1e-6)


@pytest.mark.parametrize("mode,extra", [("recon", []), ("interp", []), ("arith", ["--attr", "7", "--base", "1"])])
def test_sampling_modes(trained, data_dir, mode, extra):
    out = os.path.join(trained, mode)
    sample.main(["--ckpt", os.path.join(trained, "ddpm.pt"), "--mode", mode, "--n", "4", "--steps", "3",
                 "--data_dir", data_dir, "--out", out, *extra])
    arrays = np.load(out + ".npz")
    assert arrays["x0"].shape == ((4, 1, 32, 32) if mode == "recon" else (1, 4, 1, 32, 32))
    if mode == "interp":  # the two ends of the path differ, the DDPM noise was shared
        assert not np.allclose(arrays["vae"][0, 0], arrays["vae"][0, -1])


@pytest.mark.parametrize("mode,extra", [("interp", []), ("arith", ["--attr", "7", "--base", "1"])])
def test_paths_in_z_report_whether_the_refinement_follows_the_edit(trained, data_dir, tmp_path, capsys, mode, extra):
    import evaluate as E
    judge = str(tmp_path / "judge.pt")
    E.save_classifier(E.FeatureNet(width=8, feature_dim=16), 0.5, judge)  # tiny and untrained: no training run
    out = str(tmp_path / mode)
    sample.main(["--ckpt", os.path.join(trained, "ddpm.pt"), "--mode", mode, "--n", "4", "--steps", "2", "--paths", "3",
                 "--data_dir", data_dir, "--out", out, "--judge", judge, *extra])
    printed, arrays = capsys.readouterr().out, np.load(out + ".npz")
    assert arrays["vae"].shape == arrays["x0"].shape == (3, 4, 1, 32, 32)
    assert "3 paths x 4 points" in printed and ("in class 7" in printed) == (mode == "arith")
    with pytest.raises(SystemExit):
        sample.parse_args(["--mode", mode, "--paths", "0", *extra])
    assert "--paths must be between 1 and 256" in capsys.readouterr().err


def test_path_agreement_counts_points_ends_and_the_added_class():
    c_vae = torch.tensor([[1, 1, 5, 5], [2, 2, 2, 7]])
    c_ref = torch.tensor([[1, 3, 5, 5], [2, 2, 7, 2]])
    r = sample.path_agreement(c_vae, c_ref, attr=5)
    assert r["points"] == 5 / 8 and r["last"] == 1 / 2
    assert r["attr_first_vae"] == r["attr_first_ref"] == 0 and r["attr_last_vae"] == r["attr_last_ref"] == 1 / 2
    assert set(sample.path_agreement(c_vae, c_ref)) == {"points", "last"}


def test_form1_and_unconditional_baseline_train_and_sample(tmp_path, data_dir, trained):
    for flags in (["--form", "1"], ["--cond", "none"]):
        ck = str(tmp_path / f"ddpm{flags[1]}.pt")
        train.main(["--stage", "ddpm", "--data_dir", data_dir, "--out_dir", trained, "--ckpt", ck, "--steps", "2",
                    *flags, *TINY])
        assert load(ck)["config"]["form"] == 1
        sample.main(["--ckpt", ck, "--steps", "2", "--n", "2", "--out", str(tmp_path / flags[1])])
    assert load(str(tmp_path / "ddpmnone.pt"))["model_args"]["cond_ch"] == 0


def test_resume_continues_exactly_and_runs_are_deterministic(tmp_path, data_dir, trained):
    vae = os.path.join(trained, "vae.pt")
    common = ["--stage", "ddpm", "--data_dir", data_dir, "--vae_ckpt", vae, *TINY]
    full1, full2, part = (str(tmp_path / n) for n in ("full1.pt", "full2.pt", "part.pt"))
    train.main([*common, "--ckpt", full1, "--steps", "6", "--deterministic"])
    train.main([*common, "--ckpt", full2, "--steps", "6", "--deterministic"])
    train.main([*common, "--ckpt", part, "--steps", "3", "--deterministic"])
    train.main([*common, "--ckpt", part, "--steps", "6", "--deterministic", "--resume"])
    a, b, c = weights(full1), weights(full2), weights(part)
    for x, y in ((a, b), (a, c)):  # weights, EMA weights and AdamW moments: bit for bit
        for part_x, part_y in zip(x, y):
            assert_same(part_x, part_y)
    assert load(part)["step"] == 6


def test_two_processes_with_gloo_keep_identical_weights(tmp_path, data_dir, trained):
    ck = str(tmp_path / "ddp.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", "--stage", "ddpm", "--data_dir", data_dir, "--vae_ckpt",
                        os.path.join(trained, "vae.pt"), "--ckpt", ck, "--steps", "3", "--device", "cpu", *TINY],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "weights identical on 2 processes" in r.stdout + r.stderr
    assert load(ck)["config"]["world"] == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_and_resume_matches_an_uninterrupted_run(tmp_path, data_dir, trained, signum):
    common = [sys.executable, "train.py", "--stage", "vae", "--data_dir", data_dir, "--batch_size", "8",
              "--log_every", "1", "--sample_every", "100000", "--ckpt_every", "100000", "--deterministic"]
    killed, whole = str(tmp_path / "killed.pt"), str(tmp_path / "whole.pt")
    p = subprocess.Popen([*common, "--ckpt", killed, "--steps", "100000"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    # wait until it is training (the tqdm bar has moved), then send a real signal (SIGINT is Ctrl-C)
    deadline, seen = time.time() + 120, ""
    while time.time() < deadline and "img_s" not in seen:
        seen += p.stdout.read(1) or ""
    p.send_signal(signum)
    out = seen + p.communicate(timeout=120)[0]
    assert p.returncode == 128 + signum, out[-2000:]
    stopped_at = load(killed)["step"]
    assert 0 < stopped_at < 100000
    subprocess.run([*common, "--ckpt", killed, "--steps", str(stopped_at + 3), "--resume"], cwd=REPO, check=True,
                   capture_output=True)
    subprocess.run([*common, "--ckpt", whole, "--steps", str(stopped_at + 3)], cwd=REPO, check=True,
                   capture_output=True)
    assert_same(weights(killed)[0], weights(whole)[0])


def test_bf16_autocast_trains_stage_2_to_bf16_precision_of_the_fp32_loss(tmp_path, data_dir, trained, capsys):
    # train.py --bf16 on: the same seeded first batch, t and noise, the forward under bf16 autocast. Its first loss,
    # before any update, differs from fp32 by bf16 rounding only (test_runtime's 5 u bound, u = 2^-8).
    common = ["--stage", "ddpm", "--data_dir", data_dir, "--vae_ckpt", os.path.join(trained, "vae.pt"),
              "--steps", "2", *TINY, "--log_every", "1"]
    train.main([*common, "--ckpt", str(tmp_path / "fp32.pt")])
    capsys.readouterr()
    train.main([*common, "--ckpt", str(tmp_path / "bf16.pt"), "--bf16", "on"])
    assert "amp bf16" in capsys.readouterr().out
    fp32, bf16 = (load(str(tmp_path / f"{n}.pt"))["history"][0][1] for n in ("fp32", "bf16"))
    assert fp32 != bf16 and abs(bf16 / fp32 - 1) < 5 * 2.0 ** -8, (fp32, bf16)


def test_stage2_draws_z_from_the_cached_codes_of_its_vae(tmp_path, data_dir, trained):
    vae_path = os.path.join(trained, "vae.pt")
    ck = load(vae_path)
    vae = VAE(**ck["model_args"])
    vae.load_state_dict(ck["ema"])
    images, _ = load_dataset("fashion_mnist", data_dir, split="train")
    codes = ck["codes"]  # stage 1 cached q(z|x) of its training images, tied to them by a hash
    assert codes["fingerprint"] == train.fingerprint(images)
    mu, logvar = encode_dataset(vae.eval(), images)
    # stage 1 may have run its convs in another memory format (runtime.py): float32 rounds differently there
    assert torch.allclose(codes["mu"], mu, atol=1e-5) and torch.allclose(codes["logvar"], logvar, atol=1e-5)
    vae.codes = codes
    other = images.flip(0)  # other images: the cache does not apply and they are encoded afresh
    assert torch.allclose(train.vae_codes(vae, other)[0], mu.flip(0), atol=1e-5)
    # the cached path and the encode-every-batch path train the same model (same z draws, same t and noise)
    common = ["--stage", "ddpm", "--data_dir", data_dir, "--vae_ckpt", vae_path, "--steps", "2", *TINY]
    train.main([*common, "--ckpt", str(tmp_path / "cached.pt")])
    train.main([*common, "--ckpt", str(tmp_path / "encoded.pt"), "--no_cache"])
    a, b = load(str(tmp_path / "cached.pt"))["history"], load(str(tmp_path / "encoded.pt"))["history"]
    assert len(a) == len(b) == 1 and a[0][1] == pytest.approx(b[0][1], rel=1e-4)


@pytest.mark.parametrize("mode", ["control", "degrade"])
def test_control_and_degrade_modes_report_their_measurements(trained, data_dir, tmp_path, capsys, mode):
    import evaluate as E
    classifier = str(tmp_path / "classifier.pt")
    E.save_classifier(E.FeatureNet(width=8, feature_dim=16), 0.5, classifier)  # tiny and untrained: no training run
    out = str(tmp_path / mode)
    with pytest.raises(SystemExit, match="no classifier"):
        sample.main(["--ckpt", os.path.join(trained, "ddpm.pt"), "--mode", mode, "--n", "4", "--steps", "2",
                     "--data_dir", data_dir, "--out", out, "--classifier", str(tmp_path / "missing.pt"),
                     "--judge", str(tmp_path / "missing.pt")])
    sample.main(["--ckpt", os.path.join(trained, "ddpm.pt"), "--mode", mode, "--n", "4", "--steps", "2",
                 "--repeats", "3", "--data_dir", data_dir, "--out", out, "--classifier", classifier, "--judge", classifier])
    printed, arrays = capsys.readouterr().out, np.load(out + ".npz")
    if mode == "control":
        assert arrays["x0"].shape == (4, 3, 1, 32, 32) and "within one z" in printed and "across z's" in printed
    else:  # every degradation and the VAE reconstruction get a table row and their arrays
        import degrade
        assert all(degrade.LABELS[k] in printed for k in degrade.DEGRADATIONS) and "vae recon" in printed
        assert arrays["noise0.3_in"].shape == arrays["noise0.3_refined"].shape == (4, 1, 32, 32)
    with pytest.raises(SystemExit):
        sample.parse_args(["--mode", "control", "--repeats", "1"])


def test_guidance_and_z_conditioning_train_and_sample(tmp_path, data_dir, trained):
    ck = str(tmp_path / "cfg.pt")
    train.main(["--stage", "ddpm", "--data_dir", data_dir, "--out_dir", trained, "--ckpt", ck, "--steps", "2",
                "--cond_drop", "0.5", "--z_cond", *TINY])
    saved = load(ck)
    assert saved["config"]["cond_drop"] == 0.5 and saved["model_args"]["z_dim"] == load(
        os.path.join(trained, "vae.pt"))["model_args"]["z_dim"]
    for mode in ("sample", "recon"):
        sample.main(["--ckpt", ck, "--mode", mode, "--steps", "2", "--n", "2", "--guidance", "1.0",
                     "--data_dir", data_dir, "--out", str(tmp_path / mode)])
        assert np.load(str(tmp_path / mode) + ".npz")["x0"].shape == (2, 1, 32, 32)
    with pytest.raises(SystemExit, match="cond_drop"):  # guidance on a model that never learnt the null input
        sample.main(["--ckpt", os.path.join(trained, "ddpm.pt"), "--steps", "2", "--n", "2", "--guidance", "1",
                     "--out", str(tmp_path / "x")])
    for bad in (["--cond_drop", "1.0"], ["--cond_drop", "-0.1"], ["--cond", "none", "--z_cond"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--stage", "ddpm", *bad])
