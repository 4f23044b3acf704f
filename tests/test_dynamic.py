"""Dynamic downsampling in training: the objective wrapper, its config, and real runs (N
ranks against 1, DDP and Horovod, every rank's decision, resume against straight)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_horovod import needs_horovod

from hpc_multires.errors import ConfigError
from hpc_multires.methods.coarse_steps import downsample_decision
from hpc_multires.methods.downsample import downsampled, restrict_input
from hpc_multires.methods.dynamic import Downsampling, inner_module
from hpc_multires.models import build_model
from hpc_multires.models.config import ModelConfig
from hpc_multires.plan.load import apply_overrides, config_from_dict, load_config
from hpc_multires.train.config import DownsampleConfig
from hpc_multires.train.objective import Batch, Regression

ROOT = Path(__file__).resolve().parents[1]
GAP = ["--set", "model.head=gap"]


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def tiny_model(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(width=0.125, depth=3, head="gap", fc_sizes=(8,), **kw)  # type: ignore[arg-type]
    return build_model(cfg, (4, 16, 16, 16), 3)


def test_a_coarse_step_is_the_inner_loss_on_restricted_inputs_through_pooled_kernels() -> None:
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    batch = Batch(0, torch.randn(4, 4, 16, 16, 16, generator=g),
                  torch.rand(4, 3, generator=g) * 2 - 1, np.arange(4))
    settings = DownsampleConfig(fraction=0.5, factor=2, schedule="every", kernel_pool="bilinear")
    objective = Downsampling(Regression(), settings, seed=3, total_steps=10)
    assert [objective.coarse(s) for s in range(4)] == [True, False, True, False]

    coarse = objective.loss(model, [batch], 0)
    with torch.no_grad():
        with downsampled(model, 2, "bilinear"):
            expected = torch.nn.functional.mse_loss(model(restrict_input(batch.x, 2)), batch.y)
        plain = torch.nn.functional.mse_loss(model(batch.x), batch.y)
    assert float(coarse.loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert abs(float(coarse.loss.detach()) - float(plain)) > 1e-4  # not the plain step
    assert float(coarse.logged["downsampled"]) == 1.0
    fine = objective.loss(model, [batch], 1)
    assert float(fine.loss.detach()) == pytest.approx(float(plain), rel=1e-6)
    assert float(fine.logged["downsampled"]) == 0.0
    # backward after the block reaches every parameter, the full-size kernels included
    coarse.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # what it reads and how it validates are the inner objective's
    assert objective.requests(1, 8) == Regression().requests(1, 8)
    assert objective.headline == "val_mae"
    assert inner_module(model) is model


def test_the_driver_mixes_downsampling_in_only_when_it_is_on() -> None:
    from hpc_multires.driver.run import stage_objective
    from hpc_multires.plan.stages import resolve

    on = resolve(config_from_dict({"model": {"head": "gap"}, "train": {
        "epochs": 3, "global_batch": 8, "downsample": {"fraction": 0.25, "schedule": "decay"}}}),
        1)[0]
    objective = stage_objective(on, seed=5, train_samples=70)
    assert isinstance(objective, Downsampling)
    assert objective.total_steps == 3 * 8 and objective.seed == 5  # 70 // 8 steps per epoch
    assert sum(objective.coarse(s) for s in range(24)) == 6  # decay: ceil(0.25 * 24)
    for down in ({"fraction": 0.0}, {"fraction": 0.5, "factor": 1}):
        off = resolve(config_from_dict({"model": {"head": "gap"},
                                        "train": {"downsample": down}}), 1)[0]
        assert isinstance(stage_objective(off, 0, 70), Regression)


MRT = ROOT / "configs" / "cosmoflow-mrt.toml"  # stages coarse1 and fine, head gap


def test_a_stage_overrides_the_run_downsampling_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MRT.read_text().replace("[log]", "[train.downsample]\nfraction = 0.5\n"
                                            "factor = 4\n\n[log]")
                    + "[stages.train.downsample]\nschedule = 'decay'\n")
    cfg = load_config(path)
    coarse, fine = (s.train.downsample for s in cfg.stages)
    assert coarse == DownsampleConfig(fraction=0.5, factor=4)
    assert fine == DownsampleConfig(fraction=0.5, factor=4, schedule="decay")
    # --set of a run key reaches the stages that inherit it, on a file as on a resolved
    # config; a stage's own key is its own
    again = load_config(path, ["train.downsample.factor=2", "train.downsample.schedule=every"])
    assert [s.train.downsample.factor for s in again.stages] == [2, 2]
    assert [s.train.downsample.schedule for s in again.stages] == ["every", "decay"]
    assert apply_overrides(cfg, ["train.downsample.factor=2",
                                 "train.downsample.schedule=every"]) == again
    with pytest.raises(ConfigError, match="every stage sets its own train.downsample.schedule"):
        load_config(path, ["stages.coarse1.train.downsample.schedule=random",
                           "train.downsample.schedule=every"])


@pytest.mark.parametrize(("table", "message"), [
    ({"train": {"downsample": {"fraction": 1.5}}},
     "train.downsample.fraction = 1.5: use a number in [0, 1]"),
    ({"train": {"downsample": {"fraction": -0.1}}}, "train.downsample.fraction = -0.1"),
    ({"train": {"downsample": {"factor": 0}}}, "train.downsample.factor = 0: use an integer >= 1"),
    ({"train": {"downsample": {"schedule": "decy"}}}, "did you mean 'decay'"),
    ({"train": {"downsample": {"kernel_pool": "max"}}}, "'avg' | 'bilinear'"),
    ({"train": {"downsample": {"fractoin": 0.5}}}, "did you mean 'train.downsample.fraction'"),
    ({"train": {"downsample": {"fraction": 0.5}}},
     "train.downsample.fraction = 0.5: downsampled steps need a model that takes any input "
     "size: set model.head = 'gap' (not 'flatten')"),
    ({"model": {"head": "gap", "kernel_level": 1, "pool_type": "avg"},
      "train": {"downsample": {"fraction": 0.5}}}, "model.kernel_level = 0"),
    ({"model": {"conv": "meshfree", "kernel_size": 4}},
     "model.kernel_size = 4: a mesh-free convolution (model.conv = 'meshfree') is centred: "
     "use an odd size such as 3 or 5"),
    ({"model": {"conv": "meshfree", "stem_level": 1}}, "model.stem_level = 1: use 0 with "
     "model.conv = 'meshfree'"),
    ({"model": {"conv": "meshfree", "kernel_level": 1}}, "model.kernel_level = 1: use 0 with "
     "model.conv = 'meshfree'"),
    ({"model": {"conv": "mesh"}}, "did you mean 'meshfree'"),
])
def test_bad_settings_are_one_line_naming_the_key(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(table)
    assert message in str(err.value) and "\n" not in str(err.value)


def one_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("hpc-multires: error:")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_configs_through_the_cli_are_one_line(cli, tiny_config, tmp_path: Path) -> None:
    cfg = str(tiny_config())
    line = one_error(cli(["train", cfg, *GAP, "--set", "train.downsample.fraction=1.5"]))
    assert "train.downsample.fraction = 1.5: use a number in [0, 1]" in line
    line = one_error(cli(["train", cfg, "--set", "train.downsample.fraction=0.5"]))
    assert "set model.head = 'gap' (not 'flatten')" in line
    # 16^3 samples: 3 does not divide them, at level 0 or in windows of 8
    line = one_error(cli(["plan", cfg, "--ranks", "2", *GAP, "--set",
                          "train.downsample.fraction=0.5", "--set", "train.downsample.factor=3"]))
    assert ("stage 'main': train.downsample.factor = 3 does not divide the samples at level 0, "
            "16x16x16; use a factor that divides them (2, 4, 8, 16)") in line
    windows = tmp_path / "windows.toml"
    windows.write_text(Path(cfg).read_text().replace("fc_sizes", 'head = "gap"\nfc_sizes') +
                       '\n[[stages]]\nname = "w"\ncrop = 6\n[stages.train.downsample]\n'
                       'fraction = 0.5\nfactor = 4\n')
    line = one_error(cli(["train", str(windows), "--run-dir", str(tmp_path / "run")]))
    assert "stage 'w': train.downsample.factor = 4 does not divide its windows, 6x6x6" in line
    assert not (tmp_path / "run").exists()
    line = one_error(cli(["train", cfg, "--set", "model.conv=meshfree",
                          "--set", "model.kernel_size=4"]))
    assert "model.kernel_size = 4: a mesh-free convolution" in line


def test_a_factor_that_leaves_the_model_too_little_is_one_line(cli, tmp_path: Path) -> None:
    from conftest import write_arrays_store

    rng = np.random.default_rng(0)
    data = write_arrays_store(tmp_path / "traces", rng.normal(size=(32, 2, 64)).astype(np.float32),
                              rng.uniform(-1, 1, size=(32, 2)).astype(np.float32))
    cfg = tmp_path / "neuron.toml"
    cfg.write_text(f'[data]\npath = "{data}"\nval_fraction = 0.25\nnum_workers = 0\n'
                   '[model]\nname = "neuron_inverter"\nconv_channels = [4, 4, 4]\nhead = "gap"\n'
                   'fc_sizes = [8]\n[train]\nglobal_batch = 8\n'
                   '[train.downsample]\nfraction = 0.5\nfactor = 2\n')
    # 64 bins pooled by 4 three times leave 1; halved first, 0
    line = one_error(cli(["plan", str(cfg), "--ranks", "1"]))
    assert "stage 'main': train.downsample.factor = 2 leaves inputs of 32, too small for the " \
        "model" in line and "use a smaller factor" in line
    assert cli(["plan", str(cfg), "--ranks", "1", "--set", "train.downsample.factor=1"]
               ).returncode == 0


def test_resume_inside_an_epoch_with_downsampling_is_exact(cli, tiny_config,
                                                           tmp_path: Path) -> None:
    """Checkpoints every 4 steps over 2 epochs of 9; every 3rd step downsampled. A run that
    lost everything after step 12 (inside epoch 2, a coarse step next) resumes from there
    and ends as the straight run does, bit for bit: the decisions follow the step."""
    cfg = str(tiny_config(epochs=2))
    opts = [*GAP, "--set", "train.downsample.fraction=0.34", "--set",
            "train.downsample.schedule=every", "--set", "train.checkpoint_every_steps=4",
            "--set", "train.checkpoint_keep=10"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    a = cli(["train", cfg, "--run-dir", str(straight), *opts])
    assert a.returncode == 0, a.stderr
    shutil.copytree(straight, crashed)
    ckpts = crashed / "stages" / "main" / "checkpoints"
    for name in ("epoch-0002-step-00000016.pt", "epoch-0002.pt"):  # what the crash lost
        (ckpts / name).unlink()
    (crashed / "stages" / "main" / "final.pt").unlink()
    b = cli(["train", cfg, "--run-dir", str(crashed), "--resume", *opts])
    assert b.returncode == 0, b.stderr
    assert "resumed from epoch-0002-step-00000012.pt" in b.stderr
    sa, sb = records(straight, "step"), records(crashed, "step")
    assert [r["step"] for r in sb] == list(range(1, 19))
    assert [r["downsampled"] for r in sa] == [float(s % 3 == 0) for s in range(18)]
    assert [(r["loss"], r["downsampled"]) for r in sb] == [(r["loss"], r["downsampled"])
                                                           for r in sa]
    fa = torch.load(straight / "stages" / "main" / "final.pt", weights_only=False)["model"]
    fb = torch.load(crashed / "stages" / "main" / "final.pt", weights_only=False)["model"]
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    # the resumed part trained: the checkpoint it resumed from is not the end
    mid = torch.load(ckpts / "epoch-0002-step-00000012.pt", weights_only=False)["model"]
    assert any(not torch.equal(mid[k], fb[k]) for k in fb)


def test_a_resume_may_not_change_the_downsampling(cli, tiny_config, tmp_path: Path) -> None:
    cfg = str(tiny_config(epochs=2))
    run = tmp_path / "run"
    on = [*GAP, "--set", "train.downsample.fraction=0.5"]
    assert cli(["train", cfg, "--run-dir", str(run), "--stop-after-epoch", "1", *on]
               ).returncode == 0
    line = one_error(cli(["train", cfg, "--run-dir", str(run), "--resume", *GAP,
                          "--set", "train.downsample.fraction=0.25"]))
    assert "['train.downsample.fraction']" in line


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["ddp", "mpi",
                                     pytest.param("horovod", marks=needs_horovod)])
def test_two_ranks_take_the_same_decisions_and_the_losses_of_one(cli, tiny_config,
                                                                 tmp_path: Path,
                                                                 backend: str) -> None:
    """Same seed and global batch: 2 ranks give 1 rank's losses with downsampled steps mixed
    in, and every step record's `downsampled`, the mean over the ranks of each rank's own
    decision, is 0 or 1 (a rank that decided otherwise would make it 0.5) and is the
    decision of (seed, step). The tolerance is test_mpi's parity bound: float32 sums in
    another order; a rank training at the other resolution would be off by 1e-2."""
    cfg = str(tiny_config(epochs=1))
    opts = [*GAP, "--set", "train.downsample.fraction=0.5", "--set",
            "train.downsample.kernel_pool=bilinear", "--set", f"comm.backend={backend}"]
    losses, flags = {}, {}
    for ranks in (1, 2):
        run = tmp_path / f"r{ranks}"
        r = cli(["train", cfg, "--run-dir", str(run), *opts], ranks=ranks, timeout=240)
        assert r.returncode == 0, r.stderr
        steps = records(run, "step")
        losses[ranks] = np.array([s["loss"] for s in steps])
        flags[ranks] = [s["downsampled"] for s in steps]
    expected = [float(downsample_decision(1, s, 9, 0.5)) for s in range(9)]  # run.seed = 1
    assert 0.0 in expected and 1.0 in expected  # both kinds of step happen
    assert flags[2] == flags[1] == expected
    assert np.ptp(losses[1]) > 1e-3
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("app", ["cosmoflow", "neuron"])
def test_shipped_configs_compare_like_with_like(app: str) -> None:
    """The dynamic config is its baseline's run with train.downsample on, the same network
    (gap head) and schedule; each mesh-free config is its standard plan with model.conv and
    an odd kernel_size changed, nothing else."""
    from dataclasses import replace

    configs = ROOT / "configs"
    base = load_config(configs / f"{app}-{'baseline' if app == 'cosmoflow' else 'baseline-gap'}"
                       ".toml")
    dynamic = load_config(configs / f"{app}-dynamic.toml")
    assert dynamic.train.downsample.on and dynamic.model.head == "gap"
    assert replace(dynamic, run=base.run,
                   train=replace(dynamic.train, downsample=DownsampleConfig())) == base
    if app == "neuron":  # the gap baseline is the reference one but for its head
        reference = load_config(configs / "neuron-baseline.toml")
        assert replace(base, run=reference.run,
                       model=replace(base.model, head="flatten")) == reference
    for plan in ("baseline", "mrt", "mrmf"):
        standard = load_config(configs / f"{app}-{plan}.toml")
        name = "meshfree" if plan == "baseline" else f"{plan}-meshfree"
        mfc = load_config(configs / f"{app}-{name}.toml")
        assert mfc.model.conv == "meshfree" and mfc.model.kernel_size == 5
        assert replace(mfc, run=standard.run, model=replace(
            mfc.model, conv="standard", kernel_size=standard.model.kernel_size)) == standard


def test_every_downsample_key_is_documented() -> None:
    from dataclasses import fields

    from test_config import field_docs

    docs = field_docs(DownsampleConfig)
    assert [f.name for f in fields(DownsampleConfig) if not docs.get(f.name)] == []
    assert field_docs(ModelConfig).get("conv")
