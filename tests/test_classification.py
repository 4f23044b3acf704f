"""Classification: the objective (cross-entropy, accuracy exact over ranks), the convnet2d
model, class indices in the store, config errors, and a 2-rank run that learns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, write_arrays_store

from hpc_multires.data.store import SampleStore, ShardWriter, provenance
from hpc_multires.data.synth import classes as cl
from hpc_multires.errors import ConfigError, DataError
from hpc_multires.models import ConvNet2d, build_model
from hpc_multires.models.config import ModelConfig
from hpc_multires.train.classification import Classification
from hpc_multires.train.objective import Batch

NAMES = ("cat", "dog", "owl")


class Identity(torch.nn.Module):
    """A 'model' whose inputs are its logits, so the metrics can be checked by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def batch(logits: torch.Tensor, classes: list[int]) -> Batch:
    y = torch.tensor(classes, dtype=torch.float32)[:, None]  # (b, 1) as stored
    return Batch(0, logits, y, np.arange(len(classes)))


def test_loss_is_the_cross_entropy_of_the_class_indices() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    classes = [0, 2, 1, 1, 0, 2]
    target = torch.tensor(classes)
    out = Classification(NAMES).loss(Identity(), [batch(logits, classes)], step=0)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, target))
    smoothed = Classification(NAMES, label_smoothing=0.2).loss(
        Identity(), [batch(logits, classes)], step=0).loss
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, target, label_smoothing=0.2))
    assert not torch.allclose(smoothed, out.loss)


def test_accuracy_per_class_and_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0],   # cat, right
                           [0.0, 3.0, 0.0],   # dog, wrong (true: cat)
                           [0.0, 1.0, 0.0],   # dog, right
                           [0.0, 0.0, 1.0],   # owl, wrong (true: dog)
                           [1.0, 0.0, 4.0]])  # owl, right
    classes = [0, 0, 1, 1, 2]
    objective = Classification(NAMES)
    assert (objective.headline, objective.higher_is_better) == ("val_acc", True)
    v = objective.validation(("class",), crop=0)
    v.add(Identity(), batch(logits, classes))
    result = v.result(v.sums())
    assert result["val_acc"] == pytest.approx(3 / 5)
    assert result["val_acc/cat"] == pytest.approx(1 / 2)
    assert result["val_acc/dog"] == pytest.approx(1 / 2)
    assert result["val_acc/owl"] == pytest.approx(1.0)
    assert result["val_loss"] == pytest.approx(
        float(F.cross_entropy(logits, torch.tensor(classes))), rel=1e-6)


def test_metrics_are_exact_whatever_the_split_over_ranks() -> None:
    """Each rank adds its share; the summed sums give the metrics of the whole set, a rank
    with no sample included."""
    torch.manual_seed(1)
    logits, classes = torch.randn(23, 3), torch.randint(0, 3, (23,)).tolist()
    objective = Classification(NAMES)
    whole = objective.validation(("class",), 0)
    whole.add(Identity(), batch(logits, classes))
    ranks = [objective.validation(("class",), 0) for _ in range(3)]
    for v, part in zip(ranks, (slice(0, 9), slice(9, 23)), strict=False):  # rank 2: nothing
        v.add(Identity(), batch(logits[part], classes[part]))
    summed = np.sum([v.sums() for v in ranks], axis=0).tolist()
    got, want = ranks[0].result(summed), whole.result(whole.sums())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_reference_is_the_majority_class_share() -> None:
    train_y = np.array([[0.0], [1.0], [1.0], [2.0]])
    val_y = np.array([[1.0], [0.0], [1.0], [2.0], [2.0]])
    ref = Classification(NAMES).reference(train_y, val_y)
    assert ref == {"val_acc_majority": pytest.approx(2 / 5)}  # class 1 is the majority


@pytest.mark.parametrize("side", [64, 40, 8, 3])
def test_convnet2d_with_gap_takes_any_image_size(side: int) -> None:
    model = ConvNet2d(in_channels=3, spatial=(64, 64), num_outputs=5, width=0.25, depth=4)
    assert model(torch.randn(2, 3, side, side)).shape == (2, 5)
    assert model.dense_input_shapes() == {}


def test_convnet2d_flatten_head_depends_on_the_size() -> None:
    model = ConvNet2d(in_channels=1, spatial=(32, 32), num_outputs=4, width=0.25, depth=3,
                      head="flatten", fc_sizes=(8,))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert model.dense_input_shapes() == {"head.1.weight": (16, 4, 4)}
    with pytest.raises(ConfigError, match="model.depth <= 2"):
        ConvNet2d(in_channels=1, spatial=(4, 4), num_outputs=4, depth=3, head="flatten")


def test_convnet2d_outputs_are_not_squashed() -> None:
    """Logits, not the scaled tanh of the regression networks: a large input gives a
    large output."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="convnet2d", head="gap", width=0.25, depth=2),
                        (1, 16, 16), 4)
    assert model(100 * torch.randn(4, 1, 16, 16)).abs().max() > 1.2


def test_convnet2d_takes_images_only() -> None:
    with pytest.raises(ConfigError, match="takes 2D images"):
        build_model(ModelConfig(name="convnet2d"), (1, 8, 8, 8), 3)


def test_a_class_store_refuses_a_class_outside_its_classes(tmp_path: Path) -> None:
    def write(y: float) -> None:
        with ShardWriter(tmp_path, 0, num_shards=1, first_sample=0, total_samples=1,
                         num_samples=1, sample_shape=(1, 4, 4), x_dtype="float32",
                         label_names=["class"], x_transform="none", prov=provenance("test"),
                         class_names=NAMES) as w:
            w.write(np.zeros((1, 4, 4), np.float32), np.array([y], np.float32))

    for bad in (3.0, -1.0, 0.5):
        with pytest.raises(DataError, match="not an index of its 3 classes"):
            write(bad)
    write(2.0)
    store = SampleStore(tmp_path)
    assert store.schema.class_names == NAMES and store.schema.num_classes == 3


def test_a_class_store_has_one_label_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="one label column"):
        ShardWriter(tmp_path, 0, num_shards=1, first_sample=0, total_samples=1, num_samples=1,
                    sample_shape=(1, 4, 4), x_dtype="float32", label_names=["a", "b"],
                    x_transform="none", prov=provenance("test"), class_names=NAMES)


# ---------------------------------------------------------------- configs and data errors

CONFIG = """
[run]
name = "classify"
seed = 0

[data]
path = "{data}"
val_fraction = 0.25
num_workers = {workers}

[task]
kind = "classify"

[model]
name = "convnet2d"
width = 0.5
depth = 4
norm = "batch"
head = "gap"
fc_sizes = [32]

[train]
epochs = {epochs}
global_batch = 32
lr = 5e-3
warmup_epochs = 0.5

[log]
every_steps = 6
"""


@pytest.fixture(scope="module")
def classes32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """768 synthetic images of 32x32 in 4 classes."""
    out = tmp_path_factory.mktemp("classes") / "c32"
    r = run_cli(["data", "synth", "classes", "--out", str(out), "--samples", "768", "--size",
                 "32", "--classes", "4", "--samples-per-shard", "128", "--seed", "1"])
    assert r.returncode == 0, r.stderr
    return out


def one_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("hpc-multires: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def config(tmp_path: Path, data: Path, epochs: int = 1, workers: int = 0) -> Path:
    p = tmp_path / "classify.toml"
    p.write_text(CONFIG.format(data=data, epochs=epochs, workers=workers))
    return p


@pytest.mark.parametrize(("sets", "match"), [
    (["model.name=cosmoflow"], 'task.kind = "classify" needs class logits.*convnet2d'),
    (["model.name=unet"], "maps images to images"),
    (["task.label_smoothing=1.0"], r"task.label_smoothing = 1.0: use a value in \[0, 1\)"),
    (["task.kind=regression", "task.label_smoothing=0.1"],
     'task.label_smoothing = 0.1: it smooths a classification'),
    (["model.conv=meshfree", "model.kernel_size=3"],
     "model.conv = 'meshfree': model.name = 'convnet2d' has plain convolutions only"),
])
def test_config_errors_name_the_key_and_the_fix(cli_in_process, tmp_path: Path,
                                                sets: list[str], match: str) -> None:
    cfg = config(tmp_path, tmp_path / "unused")
    args = [a for s in sets for a in ("--set", s)]
    line = one_error(cli_in_process(["plan", str(cfg), "--ranks", "1", *args]))
    assert re.search(match, line), line


def test_classify_needs_a_store_of_classes(cli_in_process, tmp_path: Path) -> None:
    data = write_arrays_store(tmp_path / "reg", np.zeros((8, 1, 8, 8), np.float32),
                              np.zeros((8, 2), np.float32))
    line = one_error(cli_in_process(["plan", str(config(tmp_path, data)), "--ranks", "1"]))
    assert "needs a store of class indices" in line and "data synth classes" in line


def test_regression_on_a_store_of_classes_is_refused(cli_in_process, tmp_path: Path,
                                                     classes32: Path) -> None:
    line = one_error(cli_in_process(["plan", str(config(tmp_path, classes32)), "--ranks", "1",
                                     "--set", "task.kind=regression",
                                     "--set", "model.name=cosmoflow"]))
    assert "holds the class of each sample (4 classes: o000-few" in line
    assert 'set task.kind = "classify"' in line


def test_plan_sizes_the_head_by_the_classes(cli_in_process, tmp_path: Path,
                                            classes32: Path) -> None:
    r = cli_in_process(["plan", str(config(tmp_path, classes32)), "--ranks", "2"])
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
@pytest.mark.mpi
def test_two_ranks_learn_the_classes(tmp_path: Path, classes32: Path) -> None:
    """A small run under mpiexec -n 2: well above chance (0.25) and the majority-class
    reference (0.82 measured after 6 epochs, single process)."""
    run = tmp_path / "run"
    r = run_cli(["train", str(config(tmp_path, classes32, epochs=6, workers=1)),
                 "--run-dir", str(run)], ranks=2, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(rec for rec in records if rec["kind"] == "start")
    assert start["headline"] == "val_acc" and start["higher_is_better"] is True
    assert start["world_size"] == 2
    assert start["val_acc_majority"] == pytest.approx(0.25)  # balanced classes
    last = [rec for rec in records if rec["kind"] == "epoch"][-1]
    assert last["val_acc"] > 0.55, last
    assert {f"val_acc/{n}" for n in cl.class_names(4)} <= last.keys()
    assert last["val_loss"] < np.log(4)  # below what uniform probabilities give
    table = run_cli(["report", str(run)]).stdout
    assert "val_acc" in table


PLAN = """
[[stages]]
name = "coarse"
level = 1
crop = 8
[stages.train]
epochs = 1

[[stages]]
name = "fine"
level = 0
init = "fuse"
fuse_from = ["coarse"]
fusion = "transfer"
[stages.train]
epochs = 1
estimator = "mge"
mge_levels = 2
"""


@pytest.mark.slow
def test_a_multiresolution_plan_classifies(tmp_path: Path) -> None:
    """Classification under the plans' machinery: windows at a coarse level (validated on
    whole samples), transfer fusion (the fused start scored by accuracy), MGE over two
    levels; one rank."""
    data = tmp_path / "c32"
    r = run_cli(["data", "synth", "classes", "--out", str(data), "--samples", "128",
                 "--size", "32", "--samples-per-shard", "64"])
    assert r.returncode == 0, r.stderr
    assert run_cli(["data", "pyramid", str(data), "--levels", "1"]).returncode == 0
    cfg = config(tmp_path, data)
    cfg.write_text(cfg.read_text().replace("global_batch = 32", "global_batch = 16") + PLAN)
    run = tmp_path / "run"
    r = run_cli(["train", str(cfg), "--run-dir", str(run)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    starts = {rec["stage"]: rec for rec in records if rec["kind"] == "start"}
    assert starts["fine"]["headline"] == "val_acc"
    assert 0.0 <= starts["fine"]["start_val_acc"] <= 1.0  # the fused model, before training
    epochs = {rec["stage"]: rec for rec in records if rec["kind"] == "epoch"}
    for stage in ("coarse", "fine"):
        assert 0.0 <= epochs[stage]["val_acc"] <= 1.0
        assert epochs[stage]["level"] == starts[stage]["level"]
    steps = [rec for rec in records if rec["kind"] == "step" and rec["stage"] == "fine"]
    assert "mge_term1" in steps[-1]  # the MGE estimator's coarse term was logged


def test_a_validation_set_needs_the_training_classes(cli_in_process, tmp_path: Path,
                                                     classes32: Path) -> None:
    other = tmp_path / "k3"
    r = cli_in_process(["data", "synth", "classes", "--out", str(other), "--samples", "8",
                        "--size", "32", "--classes", "3"])
    assert r.returncode == 0, r.stderr
    line = one_error(cli_in_process(["plan", str(config(tmp_path, classes32)), "--ranks", "1",
                                     "--set", f"data.val_path={other}"]))
    assert "holds the classes ['o000-few', 'o000-many', 'o090-few']" in line
    assert "use a validation set with the training set's classes" in line


def test_the_shipped_config_plans_on_classes(cli_in_process, classes32: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    r = cli_in_process(["plan", str(root / "configs" / "images-classify.toml"), "--ranks", "2",
                        "--set", f"data.path={classes32}"])
    assert r.returncode == 0, r.stderr
    assert "level 0 (1, 32, 32)" in r.stderr + r.stdout
