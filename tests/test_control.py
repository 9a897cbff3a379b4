"""tools/control.py on a tiny trained run: does z decide the refined sample (K latents x R
refinements), and does the refinement keep its x_hat_0's class along interpolation and arithmetic
paths in z?"""

import os

import numpy as np
import pytest
import torch
from test_pipeline import data_dir, trained  # noqa: F401 (fixtures: a tiny trained run)

from tools import control, evaluate


def tiny_judge(path):
    """A tiny untrained judge: no training run, and the measurements only need its classes."""
    evaluate.save_classifier(evaluate.FeatureNet(width=8, feature_dim=16), 0.5, path)
    return path


def test_control_reports_its_measurements(trained, data_dir, tmp_path, capsys):
    judge = tiny_judge(str(tmp_path / "judge.pt"))
    out = str(tmp_path / "control")
    with pytest.raises(SystemExit, match="no classifier"):
        control.main(
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
                "--judge",
                str(tmp_path / "missing.pt"),
            ]
        )
    control.main(
        [
            "--ckpt",
            os.path.join(trained, "ddpm.pt"),
            "--n",
            "4",
            "--steps",
            "2",
            "--repeats",
            "3",
            "--data_dir",
            data_dir,
            "--out",
            out,
            "--judge",
            judge,
        ]
    )
    printed, arrays = capsys.readouterr().out, np.load(out + ".npz")
    assert (
        arrays["x0"].shape == (4, 3, 1, 32, 32)
        and "within one z" in printed
        and "across z's" in printed
    )
    with pytest.raises(SystemExit):
        control.parse_args(["--repeats", "1"])


@pytest.mark.parametrize("mode,extra", [("interp", []), ("arith", ["--arith", "7", "1"])])
def test_paths_in_z_report_whether_the_refinement_follows_the_edit(
    trained, data_dir, tmp_path, capsys, mode, extra
):
    judge = tiny_judge(str(tmp_path / "judge.pt"))
    out = str(tmp_path / mode)
    control.main(
        [
            "--ckpt",
            os.path.join(trained, "ddpm.pt"),
            "--mode",
            mode,
            "--n",
            "4",
            "--steps",
            "2",
            "--paths",
            "3",
            "--data_dir",
            data_dir,
            "--out",
            out,
            "--judge",
            judge,
            *extra,
        ]
    )
    printed, arrays = capsys.readouterr().out, np.load(out + ".npz")
    assert arrays["vae"].shape == arrays["x0"].shape == (3, 4, 1, 32, 32)
    assert "3 paths x 4 points" in printed and ("in class 7" in printed) == (mode == "arith")
    with pytest.raises(SystemExit):
        control.parse_args(["--mode", mode, "--paths", "0", *extra])
    assert "--paths must be between 1 and 256" in capsys.readouterr().err


def test_the_paths_are_those_sample_py_draws_with_the_same_seed(trained, tmp_path):
    # the claim of the docstring: --mode interp here measures the very images `sample.py --mode
    # interp` writes
    import sample

    flags = [
        "--ckpt",
        os.path.join(trained, "ddpm.pt"),
        "--mode",
        "interp",
        "--n",
        "3",
        "--steps",
        "2",
        "--paths",
        "2",
        "--seed",
        "5",
    ]
    sample.main([*flags, "--out", str(tmp_path / "sample.png")])  # the stem is "sample"
    control.main(
        [
            *flags,
            "--out",
            str(tmp_path / "control"),
            "--judge",
            tiny_judge(str(tmp_path / "judge.pt")),
        ]
    )
    a, b = np.load(str(tmp_path / "sample") + ".npz"), np.load(str(tmp_path / "control") + ".npz")
    assert a["x0"].shape == (2, 3, 1, 32, 32)
    assert np.array_equal(a["vae"], b["vae"]) and np.array_equal(a["x0"], b["x0"])
    assert not np.array_equal(a["vae"][0], a["vae"][1])  # two different paths


def test_path_agreement_counts_points_ends_and_the_added_class():
    c_vae = torch.tensor([[1, 1, 5, 5], [2, 2, 2, 7]])
    c_ref = torch.tensor([[1, 3, 5, 5], [2, 2, 7, 2]])
    r = control.path_agreement(c_vae, c_ref, attr=5)
    assert r["points"] == 5 / 8 and r["last"] == 1 / 2
    assert (
        r["attr_first_vae"] == r["attr_first_ref"] == 0
        and r["attr_last_vae"] == r["attr_last_ref"] == 1 / 2
    )
    assert set(control.path_agreement(c_vae, c_ref)) == {"points", "last"}
