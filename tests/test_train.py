"""train.py's process setup and training step: --deterministic on a (pretend) GPU sets what cuBLAS needs before
the GPU is touched, and under bf16 autocast stage 2's condition x_hat_0 is decoded in fp32, as sampling decodes it."""
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
# the two settings the CUDA Toolkit's cuBLAS docs ("Results reproducibility") and PyTorch's reproducibility notes name
DOCUMENTED = (":4096:8", ":16:8")


def no_cublas_setting(monkeypatch):
    """Remove CUBLAS_WORKSPACE_CONFIG for this test, and have monkeypatch remove whatever the code under test sets:
    setenv first records the variable's original state, which the undo restores last."""
    monkeypatch.setenv(CUBLAS, "placeholder")
    monkeypatch.delenv(CUBLAS)


def setup_on(device, tmp_path, monkeypatch):
    """train.setup(--deterministic) on `device`, a pretend GPU for "cuda": is_available says yes and set_device
    records the cuBLAS setting at the moment the GPU is bound. Returns (the use_deterministic_algorithms calls, the
    settings seen by set_device)."""
    calls, bound = [], []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **k: calls.append(mode))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(os.environ.get(CUBLAS)))
    args, cfg = train.parse_args(["--stage", "ddpm", "--device", device, "--deterministic",
                                  "--out_dir", str(tmp_path)])
    _, _, rt = train.setup(args, cfg)
    assert rt.device.type == device
    return calls, bound


def test_deterministic_on_cuda_sets_the_cublas_workspace_before_binding_the_gpu(tmp_path, monkeypatch):
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


# ----------------------------------------------------------------------------- the stage-2 condition under bf16

@pytest.mark.parametrize("cached", [True, False], ids=["cached codes", "encoder every batch"])
def test_bf16_training_step_decodes_x_hat_0_in_fp32(monkeypatch, cached):
    """One stage-2 step of train.train_step under CPU bf16 autocast (runtime.choose('cpu', bf16=True)): ddpm_loss
    receives x_hat_0 = dec(z) in float32, equal to the plain fp32 decode of the same z, while the denoiser runs
    under autocast. z is the step's first draw after the batch (train_step's order: batch, z, t, noise)."""
    torch.manual_seed(0)
    vae = VAE(img_ch=1, image_size=8, ch=8, z_dim=4).eval().requires_grad_(False)
    net = UNet(img_ch=1, cond_ch=1, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
               image_size=8, norm_groups=8)
    diffusion = ddpm.make_diffusion("linear", 1000)
    shard = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    codes = (torch.randn(10, 4), torch.randn(10, 4) - 2) if cached else None
    rt = runtime.choose("cpu", bf16=True)
    assert rt.amp_dtype is torch.bfloat16
    args, cfg = train.parse_args(["--stage", "ddpm"])
    cfg.update(batch_size=2, warmup=1)
    state = train.TrainState(net, train.EMA(net, 0.99), runtime.make_optimizer(net.parameters(), 1e-3, rt), 1e-3)
    seen, ddpm_loss = {}, DV.ddpm_loss

    def spy(model, diffusion, x0, x_hat0, **kw):
        seen.update(x0=x0, x_hat0=x_hat0, autocast=torch.is_autocast_enabled("cpu"))
        return ddpm_loss(model, diffusion, x0, x_hat0, **kw)
    monkeypatch.setattr(DV, "ddpm_loss", spy)
    loss, _, _ = train.train_step(args, cfg, rt, 0, net, state, vae, diffusion, shard, codes, 110, runtime.autocast(rt))
    assert torch.isfinite(loss) and state.step == 1
    assert seen["autocast"]  # the denoiser's forward stays under bf16 autocast

    torch.manual_seed(train.step_seed(args.seed, 0, 0))  # the step's stream: the batch indices, then z
    idx = torch.randint(0, len(shard), (2,))
    x0 = runtime.prepare_batch(to_model_range(shard[idx]), rt)
    assert torch.equal(seen["x0"], x0)
    with torch.no_grad():
        mu, logvar = (codes[0][idx], codes[1][idx]) if cached else vae.encode(x0)
        expected = vae.decode(reparameterize(mu, logvar))  # fp32: no autocast here
    assert expected.dtype == torch.float32
    assert seen["x_hat0"].dtype == torch.float32 and torch.equal(seen["x_hat0"], expected)
