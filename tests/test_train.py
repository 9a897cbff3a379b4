"""train.py's process setup and training step: --deterministic on a (pretend) GPU sets what cuBLAS
needs before the GPU is touched, under bf16 autocast stage 2's condition x_hat_0 is decoded in fp32,
as sampling decodes it, and --preset paper trains the derivations' objective where --preset cpu
trains the residual on t in 0..110."""

import os

import pytest
import torch

import ddpm
import diffusevae as DV
import runtime
import train
from data import to_model_range
from unet import UNet
from vae import VAE, reparameterize

CUBLAS = "CUBLAS_WORKSPACE_CONFIG"
# the two settings the CUDA Toolkit's cuBLAS docs ("Results reproducibility") and PyTorch's
# reproducibility notes name
DOCUMENTED = (":4096:8", ":16:8")


def no_cublas_setting(monkeypatch):
    """Remove CUBLAS_WORKSPACE_CONFIG for this test, and have monkeypatch remove whatever the code
    under test sets: setenv first records the variable's original state, which the undo restores
    last."""
    monkeypatch.setenv(CUBLAS, "placeholder")
    monkeypatch.delenv(CUBLAS)


class Started(Exception):
    """Raised in place of train.start: the process setup is done, nothing else runs."""


def setup_on(device, tmp_path, monkeypatch):
    """train.main --deterministic up to its process setup (train.start replaced by a stop) on
    `device`, a pretend GPU for "cuda": is_available says yes and set_device records the cuBLAS
    setting at the moment the GPU is bound. Returns (the use_deterministic_algorithms calls, the
    settings seen by set_device)."""
    calls, bound, runs = [], [], []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **k: calls.append(mode))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(os.environ.get(CUBLAS)))

    def stop(run):
        runs.append(run)
        raise Started

    monkeypatch.setattr(train, "start", stop)
    with pytest.raises(Started):
        train.main(
            ["--stage", "ddpm", "--device", device, "--deterministic", "--out_dir", str(tmp_path)]
        )
    assert runs[0].rt.device.type == device
    return calls, bound


def test_deterministic_on_cuda_sets_the_cublas_workspace_before_binding_the_gpu(
    tmp_path, monkeypatch
):
    no_cublas_setting(monkeypatch)
    calls, bound = setup_on("cuda", tmp_path, monkeypatch)
    assert calls == [True]
    assert os.environ.get(CUBLAS) in DOCUMENTED
    assert bound == [os.environ[CUBLAS]]  # already set when the process bound its GPU


def test_deterministic_keeps_the_users_own_cublas_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(CUBLAS, ":16:8")
    calls, _ = setup_on("cuda", tmp_path, monkeypatch)
    assert calls == [True] and os.environ[CUBLAS] == ":16:8"


def test_deterministic_on_the_cpu_needs_no_cublas_setting(tmp_path, monkeypatch):
    no_cublas_setting(monkeypatch)
    calls, bound = setup_on("cpu", tmp_path, monkeypatch)
    assert calls == [True] and CUBLAS not in os.environ and bound == []


# ----------------------------------------------------------------- the stage-2 condition under bf16


def test_bf16_training_step_decodes_x_hat_0_in_fp32(monkeypatch):
    """One stage-2 step of train.train_step under CPU bf16 autocast (runtime.choose('cpu',
    bf16=True)): ddpm_loss receives x_hat_0 = dec(z) in float32, equal to the plain fp32 decode of
    the same z, while the denoiser runs under autocast. z is the step's first draw after the batch
    (train_step's order: batch, z, t, noise)."""
    torch.manual_seed(0)
    vae = VAE(img_ch=1, image_size=8, ch=8, z_dim=4).eval().requires_grad_(False)
    net = UNet(
        img_ch=1,
        cond_ch=1,
        ch=8,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        image_size=8,
        norm_groups=8,
    )
    diffusion = ddpm.make_diffusion("linear", 1000)
    shard = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    rt = runtime.choose("cpu", bf16=True)
    assert rt.amp_dtype is torch.bfloat16
    args, cfg = train.parse_args(["--stage", "ddpm", "--set", "batch_size=2", "warmup=1"])
    run = train.Run(
        args,
        cfg,
        rt,
        0,
        shard=shard,
        vae=vae,
        diffusion=diffusion,
        model=net,
        wrapped=net,
        ema=train.EMA(net, 0.99),
        opt=runtime.make_optimizer(net.parameters(), 1e-3, rt),
    )
    seen, ddpm_loss = {}, DV.ddpm_loss

    def spy(model, diffusion, x0, x_hat0, **kw):
        seen.update(x0=x0, x_hat0=x_hat0, autocast=torch.is_autocast_enabled("cpu"))
        return ddpm_loss(model, diffusion, x0, x_hat0, **kw)

    monkeypatch.setattr(DV, "ddpm_loss", spy)
    loss = train.train_step(run)
    assert torch.isfinite(loss) and run.step == 1
    assert seen["autocast"]  # the denoiser's forward stays under bf16 autocast

    torch.manual_seed(
        train.step_seed(args.seed, 0, 0)
    )  # the step's stream: the batch indices, then z
    idx = torch.randint(0, len(shard), (2,))
    x0 = to_model_range(shard[idx]).contiguous(memory_format=torch.channels_last)
    assert torch.equal(seen["x0"], x0)
    with torch.no_grad():
        mu, logvar = vae.encode(x0)
        expected = vae.decode(reparameterize(mu, logvar))  # fp32: no autocast here
    assert expected.dtype == torch.float32
    assert seen["x_hat0"].dtype == torch.float32 and torch.equal(seen["x_hat0"], expected)


# -------------------------------------------------------------------------- the presets' objectives


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A tiny Fashion-MNIST-format dataset and a VAE trained one step on it: (data_dir, vae.pt)."""
    from test_pipeline import TINY, make_fashion

    data_dir = make_fashion(str(tmp_path_factory.mktemp("fashion")))
    out = str(tmp_path_factory.mktemp("run"))
    train.main(["--stage", "vae", "--data_dir", data_dir, "--out_dir", out, "--steps", "1", *TINY])
    return data_dir, os.path.join(out, "vae.pt")


@pytest.mark.parametrize("preset,target,t_start", [("cpu", "residual", 110), ("paper", "eps", 999)])
def test_paper_preset_trains_the_derivations_objective_and_cpu_the_residual_on_0_to_110(
    vae_run, tmp_path, monkeypatch, preset, target, t_start
):
    # --preset paper is the cpu model trained on the derivations' objective: eps on every t, sampled
    # from x_T; --preset cpu predicts the residual x_0 - x_hat_0 on t in 0..110 and samples from
    # t_start 110. Recorded from train.py's own stage-2 steps: what ddpm_loss is asked for and the t
    # it draws (3 steps of 8 draws of 0..999 all <= 110 with probability (111/1000)^24 ~ 1e-23)
    from test_pipeline import TINY

    from runtime import load_checkpoint

    data_dir, vae = vae_run
    assert {k: v for k, v in train.PRESETS["paper"].items() if k not in ("target", "t_start")} == {
        k: v for k, v in train.PRESETS["cpu"].items() if k not in ("target", "t_start")
    }  # the same model otherwise
    calls, ddpm_loss = [], DV.ddpm_loss

    def spy(*a, **kw):
        out = ddpm_loss(*a, **kw)
        calls.append(dict(kw, t=out[1]))
        return out

    monkeypatch.setattr(DV, "ddpm_loss", spy)
    out = str(tmp_path / preset)
    train.main(
        [
            "--stage",
            "ddpm",
            "--preset",
            preset,
            "--data_dir",
            data_dir,
            "--vae_ckpt",
            vae,
            "--out_dir",
            out,
            "--steps",
            "3",
            *TINY,
        ]
    )
    assert len(calls) == 3
    assert {c["target"] for c in calls} == {target} and {c["form"] for c in calls} == {2}
    assert max(int(c["t"].max()) for c in calls) <= t_start
    t = torch.cat([c["t"] for c in calls])
    assert (t.max() > 110) == (t_start == 999)
    cfg = load_checkpoint(os.path.join(out, "ddpm.pt"))["config"]
    assert cfg["target"] == target and cfg["t_start"] == t_start
    model = DV.DiffuseVAE.from_checkpoint(os.path.join(out, "ddpm.pt"))
    assert model.t_start == t_start  # sampling starts there: x_T at 999, the truncated start at 110


def test_the_cpu_preset_trains_and_starts_its_refiner_at_110_and_the_baseline_runs_the_full_chain():
    cfg = train.parse_args(["--stage", "ddpm"])[1]
    assert (cfg["t_start"], cfg["target"], cfg["form"]) == (110, "residual", 2)
    assert train.parse_args(["--stage", "ddpm", "--set", "t_start=100"])[1]["t_start"] == 100
    baseline = train.parse_args(["--stage", "ddpm", "--cond", "none"])[1]
    assert (baseline["t_start"], baseline["target"], baseline["form"]) == (999, "eps", 1)
    assert train.parse_args(["--stage", "ddpm", "--preset", "paper"])[1]["t_start"] == 999


def test_ch_and_ch_mult_set_the_widths_of_the_stage_2_unet_only():
    from unet import UNet

    base = train.parse_args(["--stage", "ddpm"])[1]
    cfg = train.parse_args(["--stage", "ddpm", "--set", "ch=16", "ch_mult=[1,4,4]"])[1]
    assert (cfg["ch"], cfg["ch_mult"]) == (16, [1, 4, 4])
    others = lambda c: {k: v for k, v in c.items() if k not in ("ch", "ch_mult")}
    assert others(cfg) == others(base)  # the VAE's vae_ch and z_dim among them
    net = UNet(
        img_ch=1, cond_ch=1, **{k: cfg[k] for k in train.UNET_KEYS}
    )  # as train.start builds it
    assert net.conv_in.out_channels == 16 and net.mid[0].conv1.out_channels == 64
