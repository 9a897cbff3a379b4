"""Bad input and faults: every mistake gets a message that says what to do, and nothing trained is lost."""
import os

import numpy as np
import pytest
import torch

import sample
import train
from checkpoint import CheckpointError, load, save_atomic
from test_pipeline import TINY, make_fashion, train_both, write_idx


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fashion(str(tmp_path_factory.mktemp("fashion")), n=32)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    return train_both(str(tmp_path_factory.mktemp("run")), data_dir, steps=2)


def fails_with(fn, argv, *fragments, capsys=None):
    """The command exits, and its message (SystemExit's, or argparse's on stderr) holds every fragment."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    message = str(e.value.code) + (capsys.readouterr().err if capsys else "")
    for f in fragments:
        assert f in message, message
    return message


def test_ddpm_stage_before_a_vae_exists(tmp_path, data_dir):
    fails_with(train.main, ["--stage", "ddpm", "--data_dir", data_dir, "--out_dir", str(tmp_path), *TINY],
               "no checkpoint at", "vae.pt", "python train.py --stage vae")


def test_sample_without_a_checkpoint(tmp_path):
    fails_with(sample.main, ["--ckpt", str(tmp_path / "none.pt")], "no checkpoint at", "train.py --stage ddpm")


def test_sample_with_a_checkpoint_of_the_other_stage(run):
    fails_with(sample.main, ["--ckpt", os.path.join(run, "vae.pt")], "stage 'vae'", "stage 'ddpm'")


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_truncated_or_corrupt_checkpoint(run, tmp_path, damage):
    raw = open(os.path.join(run, "ddpm.pt"), "rb").read()
    bad = tmp_path / "bad.pt"
    bad.write_bytes({"truncate": raw[: len(raw) // 2], "random": os.urandom(4096), "empty": b""}[damage])
    fails_with(sample.main, ["--ckpt", str(bad)], "not a readable checkpoint", "truncated or corrupt")


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    path = tmp_path / "evil.pt"
    torch.save({"stage": "ddpm", "model_args": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load(str(path))
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_whose_model_does_not_fit_the_dataset(run, data_dir, tmp_path):
    # a Fashion-MNIST VAE (1 channel) used to train on 3-channel images: name both
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image
    for i in range(10):
        Image.new("RGB", (40, 40), (i * 20, 100, 50)).save(folder / f"{i}.png")
    fails_with(train.main, ["--stage", "ddpm", "--dataset", "folder", "--data_dir", str(folder), "--out_dir",
                            str(tmp_path), "--vae_ckpt", os.path.join(run, "vae.pt"), *TINY], "1x32", "3x32")


@pytest.mark.parametrize("argv,fragment", [
    (["--steps", "1001"], "more than the T = 1000"),
    (["--steps", "0"], "at least 1"),
    (["--eta", "-0.1"], "--eta must be >= 0"),
    (["--t_start", "111"], "trained on the code timesteps 0..110 only"),  # the cpu preset's range
    (["--t_start", "full"], "trained on the code timesteps 0..110 only"),
])
def test_bad_sampling_arguments(run, argv, fragment, capsys):
    fails_with(sample.main, ["--ckpt", os.path.join(run, "ddpm.pt"), *argv], fragment, capsys=capsys)


@pytest.mark.parametrize("argv,fragment", [
    (["--preset", "imagenet"], "unknown preset"),
    (["--form", "3"], "unknown form"),
    (["--cond", "text"], "unknown --cond"),
    (["--sample_t_start", "111"], "--sample_t_start must be in 0..t_start (110)"),
    (["--t_start", "100", "--sample_t_start", "200"], "--sample_t_start must be in 0..t_start (100)"),
    (["--cond_drop", "0", "--sample_guidance", "1"], "--sample_guidance must be >= 0, and > 0 only with --cond_drop"),
    (["--cond_drop", "0.1", "--sample_guidance", "-1"], "--sample_guidance must be >= 0"),
    (["--cond", "none", "--sample_guidance", "1"], "the unconditional baseline"),
    (["--ch", "20"], "--ch must be a multiple of the preset's norm_groups (8)"),
    (["--ch", "0"], "--ch must be at least 1"),
    (["--ch_mult", "1", "2"], "--ch_mult takes 3 integers >= 1"),
    (["--ch_mult", "1", "0", "2"], "--ch_mult takes 3 integers >= 1"),
    (["--border", "1"], "--border must be >= 0 and leave a content side"),   # 30 is not divisible by 4
    (["--border", "-2"], "--border must be >= 0"),
    (["--border", "16"], "--border must be >= 0 and leave a content side"),  # nothing left
])
def test_bad_training_arguments(argv, fragment, capsys):
    fails_with(train.main, ["--stage", "vae", *argv], fragment, capsys=capsys)


def test_a_border_over_the_images_content_is_refused(tmp_path, run):
    # a bright pixel at (1, 1) of the 28x28 image is at (3, 3) of the padded 32x32 one: in its outer 4 px
    imgs, labels = np.zeros((16, 28, 28), np.uint8), np.arange(16) % 10
    imgs[:, 14, 14], imgs[3, 1, 1] = 100, 255
    for split in ("train", "t10k"):
        write_idx(str(tmp_path / f"{split}-images-idx3-ubyte.gz"), imgs, 0x803)
        write_idx(str(tmp_path / f"{split}-labels-idx1-ubyte.gz"), labels, 0x801)
    fails_with(train.main, ["--stage", "ddpm", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "r"),
                            "--vae_ckpt", os.path.join(run, "vae.pt"), "--border", "4", "--steps", "1", *TINY],
               "--border 4: the training images are not 0 in their outer 4 pixels", "--border 0")


def test_resuming_with_another_border_says_which_border_the_run_had(run, data_dir):
    fails_with(train.main, ["--stage", "ddpm", "--data_dir", data_dir, "--out_dir", run, "--border", "2",
                            "--steps", "3", "--resume", *TINY], "its border was 0: add --border 0")


def test_unwritable_output_directory(run, data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fails_with(train.main, ["--stage", "vae", "--data_dir", data_dir, "--out_dir", str(blocker / "sub"),
                            "--steps", "1", *TINY], "cannot write", "--out_dir")
    fails_with(sample.main, ["--ckpt", os.path.join(run, "ddpm.pt"), "--steps", "2", "--out",
                             str(blocker / "sub" / "x")], "cannot write")


def test_missing_dataset_says_how_to_get_it(tmp_path):
    fails_with(train.main, ["--stage", "vae", "--data_dir", str(tmp_path / "nowhere"), "--out_dir",
                            str(tmp_path), *TINY], "dataset-fashion-mnist")


def test_a_trained_model_is_never_overwritten(run, data_dir):
    before = open(os.path.join(run, "vae.pt"), "rb").read()
    fails_with(train.main, ["--stage", "vae", "--data_dir", data_dir, "--out_dir", run, "--steps", "2", *TINY],
               "exists", "--resume")
    assert open(os.path.join(run, "vae.pt"), "rb").read() == before


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(run, data_dir, tmp_path):
    ck = str(tmp_path / "nan.pt")
    train.main(["--stage", "vae", "--data_dir", data_dir, "--ckpt", ck, "--steps", "2", *TINY])
    before = open(ck, "rb").read()
    message = fails_with(train.main, ["--stage", "vae", "--data_dir", data_dir, "--ckpt", ck, "--steps", "40",
                                      "--resume", "--lr", "1e12", *TINY], "at step", "last good checkpoint")
    assert "loss is" in message or "non-finite" in message
    assert open(ck, "rb").read() == before


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ck.pt")
    save_atomic({"stage": "vae", "model_args": {}, "v": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        save_atomic({"stage": "vae", "model_args": {}, "v": Unsaveable()}, path)
    assert load(path)["v"] == 1
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []
