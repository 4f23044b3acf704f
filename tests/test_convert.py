"""`data convert`: arrays made elsewhere -> a store, streamed in bounded memory."""

from __future__ import annotations

import io
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hpc_multires.data.convert import ArraySource, convert
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import DataError, UserError


def make(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.normal(size=(n, 3, 8, 8, 8)).astype(np.float32),
            rng.uniform(10, 20, size=(n, 2)))


@pytest.mark.parametrize("fmt", ["npy", "npz", "npz-compressed"])
def test_convert_formats_give_the_same_store(tmp_path: Path, fmt: str) -> None:
    x, y = make()
    if fmt == "npy":
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", y)
        args: tuple[Path, Path | None] = (tmp_path / "x.npy", tmp_path / "y.npy")
    else:
        save = np.savez_compressed if fmt == "npz-compressed" else np.savez
        save(tmp_path / "d.npz", x=x, y=y)
        args = (tmp_path / "d.npz", None)
    shards = convert(*args, tmp_path / "out", samples_per_shard=16, label_names=["a", "b"])
    store = SampleStore(tmp_path / "out")
    assert shards == 3 and len(store) == 40 and store.schema.label_names == ("a", "b")
    raw = np.stack([store.read_raw(i)[0] for i in range(40)])
    np.testing.assert_array_equal(raw, x)
    labels = store.labels()
    assert labels.min() == -1 and labels.max() == 1  # min-max scaled per label
    np.testing.assert_allclose(labels, 2 * (y - y.min(0)) / (y.max(0) - y.min(0)) - 1,
                               rtol=1e-5)


def test_memory_stays_bounded_for_large_inputs(tmp_path: Path) -> None:
    # 400 samples x 128 KiB = 50 MiB input; converting must not hold it all.
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                  shape=(400, 1, 32, 32, 32))
    for i in range(0, 400, 50):
        x[i:i + 50] = rng.normal(size=(50, 1, 32, 32, 32))
    x.flush()
    del x
    np.save(tmp_path / "y.npy", rng.normal(size=(400, 1)))
    tracemalloc.start()
    convert(tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "out", samples_per_shard=100)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for a 50 MiB input"
    assert len(SampleStore(tmp_path / "out")) == 400


@pytest.mark.parametrize(("x_shape", "y_shape", "message"), [
    ((10, 8), (10, 1), r"inputs must be \(N, C, \*spatial\)"),
    ((10, 1, 8), (10,), r"labels must be \(N, P\): use y\[:, None\]"),
    ((10, 1, 8), (9, 2), r"labels must be \(10, P\)"),
])
def test_wrong_shapes(tmp_path: Path, x_shape, y_shape, message: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros(x_shape, np.float32))
    np.save(tmp_path / "y.npy", np.zeros(y_shape, np.float32))
    with pytest.raises(DataError, match=message):
        convert(tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "out")


def test_nan_in_inputs_is_refused_and_nothing_half_written(tmp_path: Path) -> None:
    x, y = make(20)
    x[13, 1, 2, 3, 4] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataError, match="sample 13 holds NaN"):
        convert(tmp_path / "d.npz", None, tmp_path / "out", samples_per_shard=8)
    assert not list((tmp_path / "out").glob("shard-00001.h5*"))  # the bad shard is not left
    # Shard 0 was written before the bad sample: the directory says it is incomplete.
    with pytest.raises(DataError, match="is incomplete: the command that wrote it failed"):
        SampleStore(tmp_path / "out")
    x[13, 1, 2, 3, 4] = 0.0
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(UserError, match="holds an incomplete dataset .* pass --overwrite"):
        convert(tmp_path / "d.npz", None, tmp_path / "out", samples_per_shard=8)
    convert(tmp_path / "d.npz", None, tmp_path / "out", samples_per_shard=8, overwrite=True)
    assert len(SampleStore(tmp_path / "out")) == 20
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    y[4, 0] = np.inf
    np.savez(tmp_path / "e.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"labels of samples \[4\]"):
        convert(tmp_path / "e.npz", None, tmp_path / "out2")


def test_missing_and_malformed_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        convert(tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "out")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        convert(tmp_path / "bad.npz", None, tmp_path / "out")
    np.savez(tmp_path / "only.npz", inputs=np.zeros((2, 1, 4)))
    with pytest.raises(DataError, match="no array 'x'"):
        convert(tmp_path / "only.npz", None, tmp_path / "out")


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize(("start", "row"), [(20, 10), (4, 10)])  # skipping / reading past the end
def test_truncated_npz_member_is_an_error_not_a_hang(tmp_path: Path, compress: int, start: int,
                                                     row: int) -> None:
    # A well-formed archive whose x.npy header promises 40 samples but holds 10: its
    # stream reads b"" after them. Read in a thread so that a loop waiting for bytes that
    # never come fails the test instead of hanging it.
    x, _ = make()
    member = io.BytesIO()
    np.save(member, x)
    header = len(member.getvalue()) - x.nbytes
    with zipfile.ZipFile(tmp_path / "d.npz", "w", compression=compress) as z:
        z.writestr("x.npy", member.getvalue()[:header + 10 * x[0].nbytes])
    source = ArraySource(tmp_path / "d.npz", "x")
    assert source.shape == x.shape  # the header alone looks fine
    outcome: list[BaseException | int] = []

    def read() -> None:
        try:
            outcome.append(len(list(source.rows(start, 30))))
        except BaseException as e:  # handed to the test's thread
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "reading a truncated .npz member did not return"
    (err,) = outcome
    assert isinstance(err, DataError)
    assert f"d.npz:x ends at row {row} of 40; the file is truncated" in str(err)


def test_a_constant_label_and_channelless_volumes_are_pointed_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(12, 16, 16, 16)).astype(np.float32))
    y = np.stack([rng.uniform(size=12), np.full(12, 3.0)], axis=1)
    np.save(tmp_path / "y.npy", y)
    convert(tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "out", label_names=["a", "b"])
    err = capsys.readouterr().err
    assert "label(s) b hold one value in every sample" in err
    assert "read as 16 channels of 16x16 images" in err and "x[:, None]" in err
