"""`data convert --x FOLDER`: PNG/JPEG images -> a store of values in [0, 1]; a folder the
store cannot hold is one line and nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpc_multires.data.store import SampleStore


def save(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def grey(seed: int, size: tuple[int, int] = (16, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


def one_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("hpc-multires: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_folder_of_grey_images_becomes_a_store(cli, tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    images = [grey(i) for i in range(5)]
    for i, a in enumerate(images):
        save(folder / f"img{i}.png", a)
    (folder / "notes.txt").write_text("not an image: left out")
    r = cli(["data", "convert", "--x", str(folder), "--out", str(tmp_path / "out"),
             "--samples-per-shard", "2"])
    assert r.returncode == 0, r.stderr
    store = SampleStore(tmp_path / "out")
    assert len(store) == 5 and store.sample_shape == (1, 16, 24)
    assert store.schema.label_names == ("none",)
    for i, a in enumerate(images):  # name order, values / 255
        x, y = store.read(i, normalise=False)
        np.testing.assert_allclose(x[0], a / 255.0, rtol=0, atol=1e-7)
        assert y.tolist() == [0.0]


def test_grey_among_colour_is_stored_as_rgb(cli, tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    rgb = np.stack([grey(1), grey(2), grey(3)], axis=-1)
    save(folder / "a.png", rgb)
    save(folder / "b.png", grey(4))
    Image.fromarray(rgb).save(folder / "c.jpg", quality=95)
    r = cli(["data", "convert", "--x", str(folder), "--out", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    store = SampleStore(tmp_path / "out")
    assert store.sample_shape == (3, 16, 24)
    np.testing.assert_allclose(store.read(0, normalise=False)[0],
                               rgb.transpose(2, 0, 1) / 255.0, atol=1e-7)
    b = store.read(1, normalise=False)[0]
    np.testing.assert_allclose(b, np.stack([grey(4)] * 3) / 255.0, atol=1e-7)


@pytest.mark.parametrize(("bad", "fix"), [
    ("size", "the images differ in size: a.png is 24x16, b.png is 20x16 (width x height)"),
    ("text", "cannot read"),
    ("truncated", "cannot read"),
])
def test_a_folder_the_store_cannot_hold_is_one_line_and_nothing_written(
        cli, tmp_path: Path, bad: str, fix: str) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    save(folder / "a.png", grey(0))
    if bad == "size":
        save(folder / "b.png", grey(1, (16, 20)))
    elif bad == "text":
        (folder / "b.png").write_text("this is not a PNG")
    else:
        save(folder / "b.png", grey(1))
        data = (folder / "b.png").read_bytes()
        (folder / "b.png").write_bytes(data[: len(data) // 2])
    save(folder / "c.png", grey(2))
    out = tmp_path / "out"
    line = one_error(cli(["data", "convert", "--x", str(folder), "--out", str(out)]))
    assert fix in line and "nothing was written" in line
    if bad != "size":
        assert "b.png" in line
    assert not out.exists()


def test_options_for_arrays_are_refused_for_a_folder(cli, tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    save(folder / "a.png", grey(0))
    line = one_error(cli(["data", "convert", "--x", str(folder), "--out",
                          str(tmp_path / "out"), "--transform", "log1p"]))
    assert "--transform log1p do(es) not apply to a folder of images" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error(cli(["data", "convert", "--x", str(empty), "--out", str(tmp_path / "o")]))
    assert "holds no .png, .jpg or .jpeg files" in line


def class_folder(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, list]:
    """root/<class>/img<j>.png for each class, grey 16x24; returns the arrays by class."""
    arrays: dict[str, list] = {}
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        arrays[name] = [grey(100 * seed + 10 * c + j) for j in range(n)]
        for j, a in enumerate(arrays[name]):
            save(root / name / f"img{j}.png", a)
    return arrays


def test_class_sub_folders_become_a_labelled_store(cli, tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    arrays = class_folder(folder, {"zebra": 2, "ant": 4, "mole": 2})
    (folder / ".hidden").mkdir()  # skipped, as names starting with "." are
    (folder / "ant" / "notes.txt").write_text("not an image: left out")
    out = tmp_path / "out"
    r = cli(["data", "convert", "--x", str(folder), "--out", str(out),
             "--samples-per-shard", "3"])
    assert r.returncode == 0, r.stderr
    store = SampleStore(out)
    assert len(store) == 8 and store.sample_shape == (1, 16, 24)
    assert store.schema.class_names == ("ant", "mole", "zebra")  # sorted names -> indices
    assert store.schema.label_names == ("class",)
    labels = store.labels()[:, 0]
    assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 2, 2]
    # Interleaved in proportion: each half of the store holds half of every class.
    assert sorted(labels[4:].tolist()) == [0, 0, 1, 2]
    names = ("ant", "mole", "zebra")
    seen: dict[int, int] = {}
    for i in range(8):
        x, y = store.read(i, normalise=False)
        c = int(y[0])
        j = seen.get(c, 0)  # each class's images in file-name order
        seen[c] = j + 1
        np.testing.assert_allclose(x[0], arrays[names[c]][j] / 255.0, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("layout", "match"), [
    ("mixed", r"holds both images \(loose.png\) and sub-folders \(a, b\); put every image"),
    ("empty", r"class folder\(s\) b of .* hold no .png, .jpg or .jpeg images; add images or "
              "remove"),
    ("nested", r"class folder\(s\) a of .* hold folders of their own"),
    ("single", r"has one class folder, a: a classification needs 2 classes"),
])
def test_a_class_layout_that_cannot_work_is_one_line(cli, tmp_path: Path, layout: str,
                                                     match: str) -> None:
    folder = tmp_path / "pics"
    class_folder(folder, {"a": 2} if layout == "single" else {"a": 2, "b": 1})
    if layout == "mixed":
        save(folder / "loose.png", grey(9))
    elif layout == "empty":
        for f in (folder / "b").iterdir():
            f.unlink()
        (folder / "b" / "readme.txt").write_text("no images here")
    elif layout == "nested":
        class_folder(folder / "a", {"deeper": 1})
    r = cli(["data", "convert", "--x", str(folder), "--out", str(tmp_path / "out")])
    line = one_error(r)
    assert re.search(match, line), line
    assert "nothing was written" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.mpi
def test_class_folders_convert_alike_on_two_ranks(tmp_path: Path) -> None:
    from conftest import run_cli

    folder = tmp_path / "pics"
    class_folder(folder, {"a": 3, "b": 4})
    stores = []
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        r = run_cli(["data", "convert", "--x", str(folder), "--out", str(out),
                     "--samples-per-shard", "2"], ranks=ranks, timeout=120)
        assert r.returncode == 0, r.stderr
        stores.append(SampleStore(out))
    np.testing.assert_array_equal(stores[0].labels(), stores[1].labels())
    for i in range(7):
        np.testing.assert_array_equal(stores[0].read_raw(i)[0], stores[1].read_raw(i)[0])
