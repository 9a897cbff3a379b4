"""Bad input and faults: every mistake gets a message that says what to do, and nothing trained is
lost."""

import os

import pytest
import torch
from test_pipeline import TINY, make_fashion, train_both

import sample
import train
from runtime import CheckpointError, save_atomic
from runtime import load_checkpoint as load


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fashion(str(tmp_path_factory.mktemp("fashion")), n=32)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    return train_both(str(tmp_path_factory.mktemp("run")), data_dir, steps=2)


def fails_with(fn, argv, *fragments, capsys=None):
    """The command exits, and its message (SystemExit's, or argparse's on stderr) holds every
    fragment."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    message = str(e.value.code) + (capsys.readouterr().err if capsys else "")
    for f in fragments:
        assert f in message, message
    return message


def argparse_fails_with(fn, argv, capsys, *fragments):
    """fails_with for a usage error: argparse's p.error, exit status 2, the usage and message on
    stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage:" in err, (e.value.code, err)
    said = err.split(" (got {")[
        0
    ]  # what the message says, without the configuration it may print after it
    for f in fragments:
        assert f in said, err
    return err


def test_ddpm_stage_before_a_vae_exists(tmp_path, data_dir):
    fails_with(
        train.main,
        ["--stage", "ddpm", "--data_dir", data_dir, "--out_dir", str(tmp_path), *TINY],
        "no checkpoint at",
        "vae.pt",
        "python train.py --stage vae",
    )


def test_sample_without_a_checkpoint(tmp_path):
    fails_with(
        sample.main,
        ["--ckpt", str(tmp_path / "none.pt")],
        "no checkpoint at",
        "train.py --stage ddpm",
    )


def test_sample_with_a_checkpoint_of_the_other_stage(run):
    fails_with(sample.main, ["--ckpt", os.path.join(run, "vae.pt")], "stage 'vae'", "stage 'ddpm'")


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_truncated_or_corrupt_checkpoint(run, tmp_path, damage):
    raw = open(os.path.join(run, "ddpm.pt"), "rb").read()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(
        {"truncate": raw[: len(raw) // 2], "random": os.urandom(4096), "empty": b""}[damage]
    )
    fails_with(
        sample.main, ["--ckpt", str(bad)], "not a readable checkpoint", "truncated or corrupt"
    )


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
    fails_with(
        train.main,
        [
            "--stage",
            "ddpm",
            "--set",
            "dataset=folder",
            "--data_dir",
            str(folder),
            "--out_dir",
            str(tmp_path),
            "--vae_ckpt",
            os.path.join(run, "vae.pt"),
            *TINY,
        ],
        "1x32",
        "3x32",
    )


def test_a_checkpoint_whose_weights_do_not_fit_the_network_says_to_retrain(run, tmp_path):
    # weights under names the network does not have: refused with a message, not a traceback
    ck = load(os.path.join(run, "ddpm.pt"))
    for name in ("model", "ema"):
        ck[name] = {k.replace("conv_in.", "input_conv."): v for k, v in ck[name].items()}
    path = tmp_path / "other.pt"
    torch.save(ck, path)
    argv = ["--ckpt", str(path), "--steps", "2", "--n", "2", "--out", str(tmp_path / "s")]
    fails_with(sample.main, argv, str(path), "does not fit this code's models", "retrain")


def test_stage_2_refuses_a_vae_whose_stage_1_stopped_before_its_prior_was_fitted(
    run, data_dir, tmp_path
):
    # a VAE checkpoint written before stage 1's last step (every ckpt_every steps, or on a signal)
    # has no ex-post prior, which sampling draws z from: stage 2 says how to finish stage 1 instead
    # of sampling another prior
    ck = load(os.path.join(run, "vae.pt"))
    ck["prior"] = None
    path = tmp_path / "early" / "vae.pt"
    save_atomic(ck, str(path))
    fails_with(
        train.main,
        [
            "--stage",
            "ddpm",
            "--data_dir",
            data_dir,
            "--out_dir",
            str(tmp_path / "r"),
            "--vae_ckpt",
            str(path),
            "--steps",
            "1",
            *TINY,
        ],
        "has no ex-post prior",
        f"python train.py --stage vae --resume --out_dir {tmp_path / 'early'}",
    )
    assert not os.path.exists(tmp_path / "r" / "ddpm.pt")


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (
            ["--steps", "1001"],
            ["--steps must be between 1 and 111 (the timesteps 0..110)"],
        ),  # the cpu preset's range
        (["--steps", "0"], ["--steps", "at least 1"]),
        (["--eta", "-0.1"], ["--eta", "at least 0"]),
        (["--guidance", "-1"], ["--guidance", "at least 0"]),
        (["--t_start", "111"], ["trained on the code timesteps 0..110", "start it there or below"]),
        (["--t_start", "999"], ["trained on the code timesteps 0..110", "start it there or below"]),
        (["--t_start", "x"], ["--t_start", "invalid int value"]),
        (["--mode", "arith"], ["--mode arith needs --arith ATTR BASE"]),
    ],
)
def test_bad_sampling_arguments(run, argv, fragments, capsys):
    fails_with(
        sample.main, ["--ckpt", os.path.join(run, "ddpm.pt"), *argv], *fragments, capsys=capsys
    )


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (
            ["--preset", "imagenet"],
            ["--preset: invalid choice: 'imagenet'", "choose from", "'paper'"],
        ),
        (["--form", "3"], ["--form: invalid choice: 3", "choose from"]),
        (["--cond", "text"], ["--cond: invalid choice: 'text'", "choose from"]),
        (["--steps", "0"], ["invalid configuration", "steps", "at least 1"]),
        # --set: a key of the preset, with a value of that key's type; else the message names the
        # keys / the type
        (
            ["--set", "lrr=1e-3"],
            ["--set lrr=1e-3: no key 'lrr' in the preset; its keys are", "batch_size, ", "vae_lr"],
        ),
        (
            ["--set", "batch_size=8", "--set", "warmups=3"],
            ["no key 'warmups' in the preset; its keys are", "warmup"],
        ),
        (["--set", "lr=fast"], ["--set lr=fast: lr takes a float like 0.001"]),
        (["--set", "batch_size=8.5"], ["--set batch_size=8.5: batch_size takes a int like 64"]),
        (["--set", "batch_size"], ["--set batch_size: batch_size takes a int like 64"]),
        (["--set", "ch_mult=4"], ["--set ch_mult=4: ch_mult takes a list like [1, 2, 2]"]),
        (["--set", "t_start=1000"], ["invalid configuration", "t_start is a code timestep 0..T-1"]),
        (
            ["--stage", "ddpm", "--set", "cond_drop=1.0"],
            ["cond_drop (the fraction without x_hat_0) is in [0, 1)"],
        ),
        (
            ["--stage", "ddpm", "--set", "target=noise"],
            ["target is one of ('eps', 'x0', 'residual', 'v')"],
        ),
        (["--set", "subset=-1"], ["invalid configuration", "subset", "0: every image"]),
        (["--set", "ch=0"], ["invalid configuration", "ch a multiple of norm_groups"]),
        # the UNet's shape: a width its GroupNorms divide, one ch_mult >= 1 per level (the 8x8
        # attention is level 3)
        (["--stage", "ddpm", "--set", "ch=20"], ["ch", "multiple of", "norm_groups"]),
        (["--stage", "ddpm", "--set", "ch_mult=[1,2]"], ["ch_mult"]),
        (["--stage", "ddpm", "--set", "ch_mult=[1,0,2]"], ["ch_mult"]),
        # every key's range, checked once with the configuration, before anything runs
        (["--set", "warmup=0"], ["invalid configuration", "warmup", "is at least 1"]),
        (["--set", "ckpt_every=0"], ["invalid configuration", "ckpt_every", "is at least 1"]),
        (["--set", "sample_every=0"], ["invalid configuration", "sample_every", "is at least 1"]),
        (["--set", "log_every=0"], ["invalid configuration", "log_every", "is at least 1"]),
        (["--set", "ema_decay=1.5"], ["invalid configuration", "ema_decay is in [0, 1)"]),
        (["--set", "ema_decay=1.0"], ["invalid configuration", "ema_decay is in [0, 1)"]),
        (["--set", "lr=0.0"], ["invalid configuration", "lr and vae_lr are positive"]),
        (["--set", "vae_lr=-1e-3"], ["invalid configuration", "lr and vae_lr are positive"]),
        (["--set", "z_dim=0"], ["invalid configuration", "z_dim", "is at least 1"]),
        (["--set", "T=0"], ["invalid configuration", "T: every count", "is at least 1"]),
        (["--set", "vae_ch=12"], ["invalid configuration", "vae_ch is a positive multiple of 8"]),
        (["--set", "image_size=28"], ["invalid configuration", "image_size is a multiple of 8"]),
        (
            ["--set", "schedule=sigmoid"],
            ["invalid configuration", "schedule is one of ('linear', 'cosine')"],
        ),
        (
            ["--set", "dataset=mnist"],
            ["invalid configuration", "dataset is one of ('fashion_mnist', 'cifar10', 'folder')"],
        ),
    ],
)
def test_bad_training_arguments(argv, fragments, capsys):
    # argparse's own error (exit status 2, the usage first) at parse time: before any data, model or
    # output folder
    stage = [] if "--stage" in argv else ["--stage", "vae"]
    argparse_fails_with(train.parse_args, [*stage, *argv], capsys, *fragments)


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--set", "ch=16"], "ch=16 (saved: 32)"),
        (["--form", "1"], "form=1 (saved: 2)"),
        (["--seed", "3"], "seed=3 (saved: 0)"),
        (["--set", "lr=0.002"], "lr=0.002 (saved: 0.001)"),
        (["--cond", "none"], "cond='none' (saved: 'vae')"),
    ],
)
def test_resuming_with_other_settings_is_refused_naming_each(run, data_dir, flags, named):
    before = open(os.path.join(run, "ddpm.pt"), "rb").read()
    fails_with(
        train.main,
        [
            "--stage",
            "ddpm",
            "--data_dir",
            data_dir,
            "--out_dir",
            run,
            "--steps",
            "3",
            "--resume",
            *TINY,
            *flags,
        ],
        "--resume continues the run saved in",
        named,
        "Drop those flags",
    )
    assert open(os.path.join(run, "ddpm.pt"), "rb").read() == before


def test_unwritable_output_directory(run, data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fails_with(
        train.main,
        [
            "--stage",
            "vae",
            "--data_dir",
            data_dir,
            "--out_dir",
            str(blocker / "sub"),
            "--steps",
            "1",
            *TINY,
        ],
        "cannot write",
        "--out_dir",
    )
    fails_with(
        sample.main,
        [
            "--ckpt",
            os.path.join(run, "ddpm.pt"),
            "--steps",
            "2",
            "--out",
            str(blocker / "sub" / "x"),
        ],
        "cannot write",
    )


def test_missing_dataset_says_how_to_get_it(tmp_path):
    fails_with(
        train.main,
        [
            "--stage",
            "vae",
            "--data_dir",
            str(tmp_path / "nowhere"),
            "--out_dir",
            str(tmp_path),
            *TINY,
        ],
        "dataset-fashion-mnist",
    )


def test_a_trained_model_is_never_overwritten(run, data_dir):
    before = open(os.path.join(run, "vae.pt"), "rb").read()
    fails_with(
        train.main,
        ["--stage", "vae", "--data_dir", data_dir, "--out_dir", run, "--steps", "2", *TINY],
        "exists",
        "--resume",
    )
    assert open(os.path.join(run, "vae.pt"), "rb").read() == before


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(run, data_dir, tmp_path):
    out = str(tmp_path / "nan")
    ck = os.path.join(out, "vae.pt")
    train.main(["--stage", "vae", "--data_dir", data_dir, "--out_dir", out, "--steps", "2", *TINY])
    saved = load(ck)  # the run's learning rate made absurd, as a diverging run's would be
    saved["config"].update(vae_lr=1e12, peak_lr=1e12)
    save_atomic(saved, ck)
    before = open(ck, "rb").read()
    message = fails_with(
        train.main,
        ["--stage", "vae", "--data_dir", data_dir, "--out_dir", out, "--steps", "40", "--resume"],
        "at step",
        "last good checkpoint",
    )
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
