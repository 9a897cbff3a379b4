"""tools/sweep.py's bookkeeping: a cell is reused only when everything it was measured with is the
same (--extra's sampler options too), and a model is refused a start outside the timesteps it was
trained on before anything is sampled."""

import json
import os

import pytest
import torch
from test_evaluate import fake_real
from test_pipeline import data_dir, trained  # noqa: F401 (fixtures: a tiny trained run)

from tools import evaluate as E
from tools import sweep


@pytest.fixture
def classifiers(tmp_path, monkeypatch):
    """Two tiny classifiers at paths of their own (no training run) and fake Fashion-MNIST
    splits."""
    torch.manual_seed(0)
    paths = [str(tmp_path / n) for n in ("features.pt", "judge.pt")]
    for p in paths:
        E.save_classifier(E.FeatureNet(width=8, feature_dim=16), 0.5, p)
    monkeypatch.setattr(E, "_load_real", fake_real)
    return ["--classifier", paths[0], "--judge", paths[1]]


def cells(out):
    with open(os.path.join(out, "results.json")) as f:
        return [r for r in json.load(f) if r["sampler"] != "-"]


def test_a_cell_is_measured_again_under_another_prior_split_or_batch_size(
    trained, classifiers, tmp_path
):
    out = str(tmp_path / "sweep")
    common = [
        "--models",
        f"m={os.path.join(trained, 'ddpm.pt')}",
        "--steps",
        "2",
        "--samplers",
        "ddim",
        "--n",
        "8",
        "--batch_size",
        "8",
        "--out",
        out,
        *classifiers,
    ]
    sweep.main(common)
    sweep.main(common)  # the same cell: reused
    assert len(cells(out)) == 1
    sweep.main(common + ["--prior", "normal"])
    sweep.main(common + ["--split", "val"])
    sweep.main(
        common + ["--batch_size", "4"]
    )  # the per-batch generators, so the z, follow the batch size
    rows = cells(out)
    assert [(r["prior"], r["split"], r["batch_size"]) for r in rows] == [
        ("expost", "test", 8),
        ("normal", "test", 8),
        ("expost", "val", 8),
        ("expost", "test", 4),
    ]
    assert rows[0]["fid"] != rows[1]["fid"]  # other z, other samples
    for r in rows:
        assert {"fid", "kid", "fid_judge", "kid_judge", "agree"} <= set(r)


def test_a_start_outside_the_trained_timesteps_is_refused_before_sampling(
    trained, classifiers, tmp_path
):
    out = str(tmp_path / "sweep")
    ck = os.path.join(trained, "ddpm.pt")  # trained on the code timesteps 0..110
    # the model's refusal (DiffuseVAE.start), naming the start and the trained timesteps
    refusals = {
        "999": r"--models m=.*: --t_start 999: .*code timesteps 0\.\.110",  # T - 1: from noise
        "300": r"--models m=.*: --t_start 300: .*code timesteps 0\.\.110",
    }
    for t_start, refusal in refusals.items():
        with pytest.raises(SystemExit, match=refusal):
            sweep.main(
                [
                    "--models",
                    f"m={ck}",
                    "--steps",
                    "2",
                    "--n",
                    "8",
                    "--t_start",
                    "50",
                    t_start,
                    "--out",
                    out,
                    *classifiers,
                ]
            )
    assert not os.path.exists(os.path.join(out, "results.json"))  # nothing was measured
    with pytest.raises(SystemExit):  # a code timestep or "default" only
        sweep.parse_args(["--models", f"m={ck}", "--t_start", "full"])


def test_rows_another_sweep_adds_to_the_same_out_while_this_one_runs_are_kept(
    trained, classifiers, tmp_path, monkeypatch
):
    out = str(tmp_path / "sweep")
    path = os.path.join(out, "results.json")
    draw = sweep.draw

    def draw_beside_another_sweep(
        *a, **k
    ):  # another sweep records a row between this one's reads and writes
        rows = json.load(open(path))
        with open(path, "w") as f:
            json.dump(rows + [dict(rows[0], model="other")], f)
        return draw(*a, **k)

    monkeypatch.setattr(sweep, "draw", draw_beside_another_sweep)
    sweep.main(
        [
            "--models",
            f"m={os.path.join(trained, 'ddpm.pt')}",
            "--steps",
            "2",
            "--samplers",
            "ddim",
            "--n",
            "8",
            "--batch_size",
            "8",
            "--out",
            out,
            *classifiers,
        ]
    )
    assert sorted(r["model"] for r in json.load(open(path))) == [
        "data",
        "m",
        "other",
        "vae",
        "vae_normal",
    ]


def test_extra_takes_key_value_options_as_literals_else_strings():
    args = sweep.parse_args(
        ["--models", "m=x.pt", "--extra", "var_type=fixedsmall", "eta=0.25", "raw_eps=True"]
    )
    assert args.extra_options == {"var_type": "fixedsmall", "eta": 0.25, "raw_eps": True}
    assert (
        args.extra == "eta=0.25 raw_eps=True var_type=fixedsmall"
    )  # the cache key's spelling: sorted by key
    assert sweep.parse_args(["--models", "m=x.pt"]).extra == ""
    for bad in ("steps=3", "no_such_option=1", "eta"):  # a swept option, an unknown one, no value
        with pytest.raises(SystemExit):
            sweep.parse_args(["--models", "m=x.pt", "--extra", bad])


def test_extra_options_reach_the_sampler_and_are_part_of_the_cells_key(
    trained, classifiers, tmp_path, monkeypatch
):
    import ddpm
    import sample
    from diffusevae import DiffuseVAE

    # each refine call's options (seen), then those ddpm.sample got from it (sampled)
    seen, sampled, refine, ddpm_sample = [], [], DiffuseVAE.refine, ddpm.sample

    def recording_refine(model, x_hat0, **k):
        seen.append(k)
        return refine(model, x_hat0, **k)

    def recording(diffusion, eps_fn, x, steps=None, t_start=None, **k):
        sampled.append(dict(k, steps=steps))
        return ddpm_sample(diffusion, eps_fn, x, steps, t_start, **k)

    monkeypatch.setattr(DiffuseVAE, "refine", recording_refine)
    monkeypatch.setattr(ddpm, "sample", recording)
    out = str(tmp_path / "sweep")
    common = [
        "--models",
        f"m={os.path.join(trained, 'ddpm.pt')}",
        "--steps",
        "2",
        "--samplers",
        "ddpm",
        "--n",
        "8",
        "--batch_size",
        "8",
        "--out",
        out,
        *classifiers,
    ]
    sweep.main(common)
    eta = sample.parse_args([]).eta  # what sample.py samples with
    assert [(k["eta"], k["steps"], k["sampler"], "var_type" in k) for k in seen] == [
        (eta, 2, "ddpm", False)
    ]
    assert [(k["steps"], k["sampler"], "var_type" in k) for k in sampled] == [(2, "ddpm", False)]
    sweep.main(common + ["--extra", "var_type=fixedsmall", "eta=0.0"])
    assert [(k["eta"], k["var_type"]) for k in seen[1:]] == [(0.0, "fixedsmall")]
    assert [k["var_type"] for k in sampled[1:]] == ["fixedsmall"]
    sweep.main(
        common + ["--extra", "eta=0.0", "var_type=fixedsmall"]
    )  # the same options: the cell is reused
    assert len(seen) == 2
    assert [r["extra"] for r in cells(out)] == ["", "eta=0.0 var_type=fixedsmall"]


def test_an_option_of_one_sampler_reaches_that_samplers_cells_only():
    # var_type is the ancestral sampler's, raw_eps DDIM's: a sweep of both samplers passes each to
    # its own cells
    seen = []

    class Recording:
        vae = None

        def sample(self, n, generators, prior, **options):
            seen.append(options)
            return None, torch.zeros(n, 1, 2, 2)

    extra = dict(var_type="fixedsmall", raw_eps=True, guidance=0.0)
    for sampler in ("ddim", "ddpm"):
        sweep.draw(Recording(), 2, 2, 2, sampler, extra=extra)
    ddim, ddpm_ = seen
    assert ddim["raw_eps"] is True and "var_type" not in ddim and ddim["sampler"] == "ddim"
    assert (
        ddpm_["var_type"] == "fixedsmall" and "raw_eps" not in ddpm_ and ddpm_["sampler"] == "ddpm"
    )
    assert ddim["guidance"] == ddpm_["guidance"] == 0.0 and ddim["eta"] == ddpm_["eta"]
