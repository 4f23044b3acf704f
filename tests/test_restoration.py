"""The image application: restoration tasks through the normal training path.

The reader corrupts clean images at read time (the same corruption at every level), the
Restoration objective trains by MSE and validates by PSNR/SSIM/MSE, the report and the
progress lines use that headline, and bad input is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpc_multires.data.corrupt import Corruption, corrupt
from hpc_multires.data.loader import ReadCorruption, iterate_batches, iterate_steps
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import ConfigError
from hpc_multires.methods.mge import restrict
from hpc_multires.plan.load import load_config
from hpc_multires.report import report
from hpc_multires.train.image_metrics import psnr, ssim
from hpc_multires.train.objective import Batch
from hpc_multires.train.restoration import (
    PSNR_CAP,
    Restoration,
    epoch_seed,
    image_ssim,
    ssim_window,
)

DENOISE = Corruption(task="denoise", t_range=(0.5, 1.0))


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


class Shift(nn.Module):
    """Adds a constant: prediction = input + offset."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


# ---------------------------------------------------------------- reading


def test_the_reader_gives_the_corrupted_input_and_the_clean_target(tiny_images: Path) -> None:
    """x: the corruption of the clean stored image (not normalised), y: the clean image;
    a sample's corruption depends on (seed, sample) alone, not on its batch or worker."""
    store = SampleStore(tiny_images)
    clean = np.stack([store.read_raw(i)[0] for i in range(8)]).astype(np.float32)
    assert clean.min() >= 0 and clean.max() <= 1 and store.mean[0] > 0.1  # raw, not centred
    batches = [np.array([5, 1, 3]), np.array([0, 7])]
    spec = ReadCorruption(DENOISE, seed=11)
    for workers in (0, 1):
        got = list(iterate_batches(store, batches, workers, 2, corruption=spec))
        for (x, y), b in zip(got, batches, strict=True):
            np.testing.assert_array_equal(y.numpy(), clean[b])
            np.testing.assert_array_equal(
                x.numpy(), corrupt(clean[b], b, seed=11, level=0, spec=DENOISE))
    # Sample 1 alone, in another batch: the same corruption.
    ((x1, _),) = iterate_batches(store, [np.array([1])], 0, 1, corruption=spec)
    np.testing.assert_array_equal(x1.numpy()[0], got[0][0].numpy()[1])
    # Another seed, another corruption.
    ((x2, _),) = iterate_batches(store, [np.array([1])], 0, 1,
                                 corruption=ReadCorruption(DENOISE, seed=12))
    assert not np.allclose(x1.numpy(), x2.numpy())


def test_a_sample_is_corrupted_alike_on_every_level(tiny_images: Path) -> None:
    """Read at level 1 from the pyramid, a sample's corrupted input and clean target are
    the level-0 ones averaged by 2: MGE's restriction of a level-0 batch is what the level-1
    batch of the same sample holds."""
    fine, coarse = SampleStore(tiny_images, 0), SampleStore(tiny_images, 1)
    batch = np.array([2, 9, 4])
    spec = ReadCorruption(DENOISE, seed=3)
    [(x0, y0), (x1, y1)] = next(iterate_steps([fine, coarse], [(batch, batch)], 0, 1, 0.0,
                                              [spec, spec]))
    assert x1.shape == (3, 1, 16, 16)
    torch.testing.assert_close(restrict(y0, "avg"), y1, rtol=0, atol=1e-6)
    torch.testing.assert_close(restrict(x0, "avg"), x1, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- objective


def test_restoration_loss_is_the_mse_plus_the_ssim_term() -> None:
    torch.manual_seed(0)
    y = torch.rand(3, 1, 16, 16)
    x = (y + 0.1 * torch.randn_like(y)).requires_grad_()
    model = Shift(0.05)
    plain = Restoration(DENOISE, seed=0, val_seed=0)
    out = plain.loss(model, [Batch(0, x, y, np.arange(3))], step=0)
    assert torch.allclose(out.loss, ((x + 0.05 - y) ** 2).mean())
    with_ssim = Restoration(DENOISE, seed=0, val_seed=0, ssim_weight=0.5)
    expected = ((x + 0.05 - y) ** 2).mean() + 0.5 * (1 - ssim(x + 0.05, y).mean())
    got = with_ssim.loss(model, [Batch(0, x, y, np.arange(3))], step=0).loss
    assert torch.allclose(got, expected.float())
    got.backward()  # differentiable through SSIM
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_restoration_validation_is_psnr_ssim_and_mse_over_images() -> None:
    torch.manual_seed(1)
    y = torch.rand(5, 1, 16, 16) * 0.8 + 0.1
    x = (y + 0.05 * torch.randn_like(y)).clamp(0, 1)
    model = Shift(0.02)
    objective = Restoration(DENOISE, seed=0, val_seed=0)
    whole = objective.validation([], 0)
    whole.add(model, Batch(0, x, y, np.arange(5)))
    result = whole.result(whole.sums())
    restored = (x + 0.02).clamp(0, 1)
    assert result["val_psnr"] == pytest.approx(float(psnr(restored, y).mean()), rel=1e-5)
    assert result["val_ssim"] == pytest.approx(float(ssim(restored, y).mean()), rel=1e-5)
    assert result["val_mse"] == pytest.approx(float(((restored - y) ** 2).mean()), rel=1e-5)
    assert result["val_psnr_input"] == pytest.approx(float(psnr(x, y).mean()), rel=1e-5)
    # Two ranks' sums added give the one-rank figures: exact over ranks.
    a, b = objective.validation([], 0), objective.validation([], 0)
    a.add(model, Batch(0, x[:2], y[:2], np.arange(2)))
    b.add(model, Batch(0, x[2:], y[2:], np.arange(2, 5)))
    assert a.result([p + q for p, q in zip(a.sums(), b.sums(), strict=True)]) \
        == pytest.approx(result)
    # A perfect restoration counts as PSNR_CAP, not infinity.
    exact = objective.validation([], 0)
    exact.add(Shift(0.0), Batch(0, y, y, np.arange(5)))
    assert exact.result(exact.sums())["val_psnr"] == PSNR_CAP


def test_training_corruptions_change_per_epoch_and_validation_stays() -> None:
    objective = Restoration(DENOISE, seed=4, val_seed=9)
    assert objective.corruption(None) == ReadCorruption(DENOISE, 9)
    assert objective.corruption(0).seed == epoch_seed(4, 0) != objective.corruption(1).seed
    assert Restoration(DENOISE, seed=5, val_seed=9).corruption(None).seed == 9


def test_ssim_window_fits_coarse_levels() -> None:
    assert ssim_window(64, 64) == (11, 1.5)
    assert ssim_window(8, 8) == (7, pytest.approx(1.5 * 7 / 11))
    y = torch.rand(2, 1, 8, 8)
    assert torch.allclose(image_ssim(y, y), torch.ones(2, dtype=y.dtype))


# ---------------------------------------------------------------- the whole path


def test_a_denoising_run_reports_psnr(cli, images_config, tmp_path: Path) -> None:
    """`hpc-multires train` on images: the start record names val_psnr as its headline,
    every epoch has val_psnr, val_ssim and val_mse, training improves the restoration, and
    the report shows the run's own final PSNR and takes the best as the highest."""
    run = tmp_path / "run"
    r = cli(["train", str(images_config(epochs=3, workers=1)), "--run-dir", str(run)])
    assert r.returncode == 0, r.stderr
    (start,) = records(run, "start")
    assert start["headline"] == "val_psnr" and start["higher_is_better"] is True
    assert start["sample_shape"] == [1, 32, 32] and start["step_work"] == 8.0
    epochs = records(run, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for e in epochs:
        assert {"val_psnr", "val_ssim", "val_mse", "val_psnr_input"} <= e.keys()
        assert 0 < e["val_mse"] < 1 and -1 <= e["val_ssim"] <= 1
        assert e["val_psnr"] == pytest.approx(e["val_psnr"])  # finite
    # The corrupted validation inputs are the same every epoch (a fixed seed).
    assert len({e["val_psnr_input"] for e in epochs}) == 1
    assert epochs[-1]["val_mse"] < epochs[0]["val_mse"]
    assert "val_psnr" in r.stderr and f"done: val_psnr {epochs[-1]['val_psnr']:.4f}" in r.stdout
    text = report([run], tmp_path / "r.png")
    header, row = text.splitlines()[:2]
    assert header.split()[-4:] == ["metric", "final", "best", "reference"]
    cells = row.split()
    assert cells[-4] == "val_psnr"
    assert cells[-3] == f"{epochs[-1]['val_psnr']:.4g}"
    assert cells[-2] == f"{max(e['val_psnr'] for e in epochs):.4g}"
    assert cells[-1] == f"{epochs[-1]['val_psnr_input']:.4g}"


def test_the_report_takes_the_lowest_mae_as_best(tmp_path: Path) -> None:
    """A regression run (no headline in its start record: written before it existed)."""
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"kind": "start", "stage": "main", "wall_s": 0.5, "world_size": 1,
             "val_mae_mean_predictor": 0.3},
            {"kind": "epoch", "stage": "main", "level": 0, "epoch": 1, "wall_s": 2.0,
             "val_mae": 0.1, "samples_per_s": 1.0},
            {"kind": "epoch", "stage": "main", "level": 0, "epoch": 2, "wall_s": 4.0,
             "val_mae": 0.2, "samples_per_s": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    row = report([run], tmp_path / "r.png").splitlines()[1].split()
    assert row[-4:] == ["val_mae", "0.2", "0.1", "0.3"]


def one_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("hpc-multires: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_unet_deeper_than_the_images_allow_is_one_line(cli, images_config) -> None:
    """32x32 images at level 0, 8x8 at level 2: four multipliers halve 8 pixels three
    times, which leaves no whole pixel at the bottom of the coarse stage's UNet."""
    extra = """
[[stages]]
name = "coarse"
level = 2
[[stages]]
name = "fine"
level = 0
init = "fuse"
fuse_from = ["coarse"]
"""
    r = cli(["train", str(images_config(extra=extra)), "--set",
             "model.unet_multipliers=[1, 2, 4, 8, 16]"])
    line = one_error(r)
    assert "stage 'coarse' at level 2" in line and "model.unet_multipliers" in line
    assert "images here are 8x8" in line and "use at most 4 multipliers" in line


@pytest.mark.parametrize(("sets", "fix"), [
    (["task.kind=regression"], "set task.kind to an image task"),
    (["model.name=cosmoflow"], "restores images, but model.name = 'cosmoflow'"),
    (["model.name=espcn"], "use it with task.kind = \"sr\""),
    (["task.kind=sr", "task.sr_input=half"], "only model.name = \"espcn\""),
    (["task.t_range=[0.5, 2.0]"], "task.t_range = (0.5, 2.0): use 0 <= low <= high <= 1"),
    (["task.box_align=6"], "task.box_align = 6: use a power of 2"),
    (["model.conv=meshfree"], "model.name = 'unet' (a 2D image network) has standard "
                              "convolutions only"),
    (["train.estimator=mge", "train.downsample.fraction=0.5"],
     "use either mge or dynamic downsampling, not both"),
])
def test_task_and_model_that_do_not_fit_are_one_line(images_config, sets: list[str],
                                                     fix: str) -> None:
    with pytest.raises(ConfigError, match=fix.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(images_config(), sets)
    assert "\n" not in str(e.value)


def test_a_denoising_run_with_dynamic_downsampling(cli, images_config, tmp_path: Path
                                                   ) -> None:
    """Downsampling wraps Restoration: the downsampled steps restrict the clean target with
    the corrupted input, and the run keeps the image task's headline."""
    run = tmp_path / "run"
    r = cli(["train", str(images_config(epochs=1)), "--run-dir", str(run),
             "--set", "train.downsample.fraction=0.5", "--set",
             "train.downsample.schedule=every"])
    assert r.returncode == 0, r.stderr
    (start,) = records(run, "start")
    assert start["headline"] == "val_psnr" and start["higher_is_better"] is True
    steps = records(run, "step")
    assert [s["downsampled"] for s in steps[:4]] == [1.0, 0.0, 1.0, 0.0]
    assert "val_psnr" in records(run, "epoch")[-1]


def test_image_tasks_refuse_windows(images_config) -> None:
    with pytest.raises(ConfigError, match="crop = 8 with task.kind = 'denoise'"):
        load_config(images_config(extra='[[stages]]\nname = "w"\ncrop = 8\n'))


@pytest.mark.parametrize("name", ["unet", "resnet2d"])
def test_an_untrained_residual_network_returns_its_input(name: str) -> None:
    """model.residual (the default): the output is the input plus a correction that starts
    at 0, so training starts from "change nothing"; without it, the image itself."""
    from hpc_multires.models import build_model
    from hpc_multires.models.config import ModelConfig

    x = torch.rand(2, 1, 16, 16)
    small = {"unet_base_channels": 4, "resnet_channels": 4}
    model = build_model(ModelConfig(name=name, **small), (1, 16, 16), 5)
    assert torch.equal(model(x), x)
    plain = build_model(ModelConfig(name=name, residual=False, **small), (1, 16, 16), 5)
    assert not torch.allclose(plain(x), x, atol=1e-2)


@pytest.mark.parametrize("name", ["UNet", "ResNet2d"])
def test_a_residual_network_with_other_output_channels_is_refused(name: str) -> None:
    from hpc_multires.models.resnet2d import ResNet2d
    from hpc_multires.models.unet import UNet

    net = {"UNet": UNet, "ResNet2d": ResNet2d}[name]
    with pytest.raises(ConfigError, match=f"a residual {name} adds its input to its output: "
                       "it needs as many output channels as input channels, not 1 for 3"):
        net(in_channels=3, out_channels=1, residual=True)
    assert net(in_channels=3, out_channels=1, residual=False) is not None
