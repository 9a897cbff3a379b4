"""tools/sweep.py's bookkeeping: a cell is reused only when everything it was measured with is the same (--extra's
sampler options too), and a model is refused a start outside the timesteps it was trained on before anything is
sampled."""
import json
import os

import pytest
import torch

from tools import evaluate as E
from tools import sweep
from test_evaluate import fake_real
from test_pipeline import data_dir, trained  # noqa: F401 (fixtures: a tiny trained run)


@pytest.fixture
def classifiers(tmp_path, monkeypatch):
    """Two tiny classifiers at paths of their own (no training run) and fake Fashion-MNIST splits."""
    torch.manual_seed(0)
    paths = [str(tmp_path / n) for n in ("features.pt", "judge.pt")]
    for p in paths:
        E.save_classifier(E.FeatureNet(width=8, feature_dim=16), 0.5, p)
    monkeypatch.setattr(E, "_load_real", fake_real)
    return ["--classifier", paths[0], "--judge", paths[1]]


def cells(out):
    with open(os.path.join(out, "results.json")) as f:
        return [r for r in json.load(f) if r["sampler"] != "-"]


def test_a_cell_is_measured_again_under_another_prior_split_or_batch_size(trained, classifiers, tmp_path):
    out = str(tmp_path / "sweep")
    common = ["--models", f"m={os.path.join(trained, 'ddpm.pt')}", "--steps", "2", "--samplers", "ddim", "--n", "8",
              "--batch_size", "8", "--out", out, *classifiers]
    sweep.main(common)
    sweep.main(common)  # the same cell: reused
    assert len(cells(out)) == 1
    sweep.main(common + ["--prior", "normal"])
    sweep.main(common + ["--split", "val"])
    sweep.main(common + ["--batch_size", "4"])  # the per-batch generators, so the z, follow the batch size
    rows = cells(out)
    assert [(r["prior"], r["split"], r["batch_size"]) for r in rows] == [
        ("expost", "test", 8), ("normal", "test", 8), ("expost", "val", 8), ("expost", "test", 4)]
    assert rows[0]["fid"] != rows[1]["fid"]  # other z, other samples
    for r in rows:
        assert {"fid", "kid", "fid_judge", "kid_judge", "agree"} <= set(r)


def test_a_start_outside_the_trained_timesteps_is_refused_before_sampling(trained, classifiers, tmp_path):
    out = str(tmp_path / "sweep")
    ck = os.path.join(trained, "ddpm.pt")  # trained on the code timesteps 0..110
    refusals = {"full": r"trained on the code timesteps 0\.\.110 only, so it cannot start from noise",
                "300": r"--t_start 300: this refiner was trained on the code timesteps 0\.\.110; start it there"}
    for t_start, refusal in refusals.items():
        with pytest.raises(SystemExit, match=refusal):
            sweep.main(["--models", f"m={ck}", "--steps", "2", "--n", "8", "--t_start", "50", t_start,
                        "--out", out, *classifiers])
    assert not os.path.exists(os.path.join(out, "results.json"))  # nothing was measured


def test_rows_another_sweep_adds_to_the_same_out_while_this_one_runs_are_kept(trained, classifiers, tmp_path,
                                                                             monkeypatch):
    out = str(tmp_path / "sweep")
    path = os.path.join(out, "results.json")
    draw = sweep.draw

    def draw_beside_another_sweep(*a, **k):  # another sweep records a row between this one's reads and writes
        rows = json.load(open(path))
        with open(path, "w") as f:
            json.dump(rows + [dict(rows[0], model="other")], f)
        return draw(*a, **k)
    monkeypatch.setattr(sweep, "draw", draw_beside_another_sweep)
    sweep.main(["--models", f"m={os.path.join(trained, 'ddpm.pt')}", "--steps", "2", "--samplers", "ddim", "--n", "8",
                "--batch_size", "8", "--out", out, *classifiers])
    assert sorted(r["model"] for r in json.load(open(path))) == ["data", "m", "other", "vae", "vae_normal"]


def test_extra_takes_key_value_options_as_literals_else_strings():
    args = sweep.parse_args(["--models", "m=x.pt", "--extra", "var_type=fixedsmall", "eta=0.25", "raw_eps=True"])
    assert args.extra_options == {"var_type": "fixedsmall", "eta": 0.25, "raw_eps": True}
    assert args.extra == "eta=0.25 raw_eps=True var_type=fixedsmall"  # the cache key's spelling: sorted by key
    assert sweep.parse_args(["--models", "m=x.pt"]).extra == ""
    for bad in ("steps=3", "no_such_option=1", "eta"):  # a swept option, an unknown one, no value
        with pytest.raises(SystemExit):
            sweep.parse_args(["--models", "m=x.pt", "--extra", bad])


def test_extra_options_reach_the_sampler_and_are_part_of_the_cells_key(trained, classifiers, tmp_path, monkeypatch):
    import ddpm
    import sample
    seen, ddpm_sample = [], ddpm.sample

    def recording(*a, **k):
        seen.append(k)
        return ddpm_sample(*a, **k)
    monkeypatch.setattr(ddpm, "sample", recording)
    out = str(tmp_path / "sweep")
    common = ["--models", f"m={os.path.join(trained, 'ddpm.pt')}", "--steps", "2", "--samplers", "ddpm", "--n", "8",
              "--batch_size", "8", "--out", out, *classifiers]
    sweep.main(common)
    eta = sample.parse_args([]).eta  # what sample.py samples with
    assert [(k["eta"], k["steps"], k["sampler"], "var_type" in k) for k in seen] == [(eta, 2, "ddpm", False)]
    sweep.main(common + ["--extra", "var_type=fixedsmall", "eta=0.0"])
    assert [(k["eta"], k["var_type"]) for k in seen[1:]] == [(0.0, "fixedsmall")]
    sweep.main(common + ["--extra", "eta=0.0", "var_type=fixedsmall"])  # the same options: the cell is reused
    assert len(seen) == 2
    assert [r["extra"] for r in cells(out)] == ["", "eta=0.0 var_type=fixedsmall"]
