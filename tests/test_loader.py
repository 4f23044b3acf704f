"""The background reader: its failures end the training with one line, never a hang or a
leftover process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ROOT, read_line, run_env, write_arrays_store
from package_source import package_statements

from hpc_multires.data.loader import SLOT_BYTES, BatchReader, iterate_batches, read_ahead
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import SampleError


def _store(path: Path, n: int = 32) -> SampleStore:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2, 8)).astype(np.float32)  # (N, C, T)
    y = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)  # (N, P)
    return SampleStore(write_arrays_store(path, x, y))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_shard_truncated_after_opening_names_the_sample_and_the_file(
        tmp_path: Path, num_workers: int) -> None:
    """Only the rank that reads it sees it: a one-line SampleError (not an all-ranks
    DataError, nor torch's re-raised traceback text) naming the sample and the file."""
    store = _store(tmp_path / "s")
    shard = store.shards[2].path  # samples 16..23
    shard.write_bytes(shard.read_bytes()[:1000])
    batches = [np.array([i, i + 1]) for i in range(0, 32, 2)]
    with pytest.raises(SampleError) as info:
        for _ in iterate_batches(store, batches, num_workers, prefetch=1):
            pass
    message = str(info.value)
    assert "\n" not in message and not info.value.all_ranks
    assert "sample 16" in message and "shard-00002.h5" in message


def test_a_killed_reader_process_ends_the_loop_with_one_line(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    batches = [np.array([i % 32]) for i in range(500)]
    me = psutil.Process()
    before = set(me.children(recursive=True))  # the fork server, an earlier test's workers
    start = time.monotonic()
    with pytest.raises(SampleError, match=r"reader process .* ended unexpectedly .*data\."):
        for k, _ in enumerate(iterate_batches(store, batches, num_workers=1, prefetch=1)):
            if k == 0:
                workers = [p for p in me.children(recursive=True)
                           if p not in before and p.ppid() != me.pid]
                assert len(workers) == 1, workers
                workers[0].kill()  # with a batch or two in flight, 500 cannot all arrive
    assert time.monotonic() - start < 60


def test_a_loop_left_early_ends_its_readers_at_once(tmp_path: Path) -> None:
    """A loop left after a few batches (an error in the step, a stop) asks its readers to
    leave; they do, while reading ahead, without waiting for the SIGKILL fallback."""
    store = _store(tmp_path / "s")
    batches = [np.array([i % 32, (i + 1) % 32]) for i in range(500)]
    me = psutil.Process()
    before = set(me.children(recursive=True))
    loop = iterate_batches(store, batches, num_workers=2, prefetch=2)
    for k, (x, _) in enumerate(loop):
        assert x.shape == (2, 2, 8)
        if k == 0:
            workers = [p for p in me.children(recursive=True)
                       if p not in before and p.ppid() != me.pid]
        if k == 3:
            break
    start = time.monotonic()
    loop.close()
    assert time.monotonic() - start < 4
    assert len(workers) == 2 and all(_gone(p.pid) for p in workers), workers


@pytest.mark.slow
def test_a_read_stuck_in_the_kernel_ends_the_loop_after_the_read_timeout(
        tmp_path: Path) -> None:
    """A shard that became a FIFO after the store was opened: the worker's open() of it
    waits in the kernel for a writer, as a read waits on a file system that stopped
    answering. The worker is alive, so nothing notices a death: without the timeout the
    loop would wait for its batch forever."""
    store = _store(tmp_path / "s")
    shard = store.shards[2].path  # samples 16..23; workers open shards lazily
    shard.unlink()
    os.mkfifo(shard)
    batches = [np.array([i, i + 1]) for i in range(0, 32, 2)]

    def release() -> None:  # without the timeout: let the open return, so the loop ends
        fd = os.open(shard, os.O_WRONLY | os.O_NONBLOCK)  # with another error, and the
        os.close(fd)  # test fails instead of hanging

    wake = threading.Timer(30.0, release)
    wake.start()
    start = time.monotonic()
    try:
        with pytest.raises(SampleError, match=r"no batch from this rank's reader processes in "
                           r"2 s \(batch 9 of 16, dataset .*\).*data\.read_timeout_s"):
            for _ in iterate_batches(store, batches, num_workers=1, prefetch=1, timeout_s=2.0):
                pass
        assert time.monotonic() - start < 30
    finally:
        wake.cancel()


KILLED_MID_BATCH = """
import os, signal, sys, time
import numpy as np
import psutil
from hpc_multires.data.loader import SLOT_BYTES, BatchReader, iterate_batches, read_ahead
from hpc_multires.data.store import SampleStore
from hpc_multires.errors import SampleError

if __name__ == "__main__":
    store = SampleStore(sys.argv[1])
    batches = [np.arange(8) + 8 * (k % 4) for k in range(200)]  # 8 x 32 KiB: past the pipe
    me = psutil.Process()
    before = set(me.children(recursive=True))
    try:
        for k, _ in enumerate(iterate_batches(store, batches, num_workers=1, prefetch=2)):
            if k == 0:
                time.sleep(1.0)  # the reader has filled the pipe and waits inside a batch
                worker = [p for p in me.children(recursive=True)
                          if p not in before and p.ppid() != me.pid][0]
                os.kill(worker.pid, signal.SIGKILL)
    except SampleError as e:
        print("ERROR", e, flush=True)
"""


@pytest.mark.slow
def test_a_reader_killed_in_the_middle_of_a_batch_ends_the_loop(tmp_path: Path) -> None:
    """The OOM killer's SIGKILL while a reader is sending a batch larger than the pipe
    holds: the training process has half a batch and its own end of the pipe open, so
    without a watch on the readers it would wait for the rest forever."""
    rng = np.random.default_rng(0)
    write_arrays_store(tmp_path / "s", rng.normal(size=(32, 2, 16, 16, 16)).astype(np.float32),
                       rng.uniform(-1, 1, size=(32, 2)).astype(np.float32))
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_MID_BATCH))
    try:
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], cwd=ROOT,
                             env=run_env(), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the loop still waits 60 s after its reader was killed inside a batch")
    assert "ERROR a reader process of this rank" in out.stdout, out.stdout + out.stderr


TRAINER = """
import os, sys, time
import numpy as np
import psutil
from hpc_multires.data.loader import SLOT_BYTES, BatchReader, iterate_batches, read_ahead
from hpc_multires.data.store import SampleStore

if __name__ == "__main__":
    store = SampleStore(sys.argv[1])
    batches = [np.array([i % len(store)]) for i in range(100000)]
    for k, _ in enumerate(iterate_batches(store, batches, num_workers=2, prefetch=1)):
        if k == 0:
            pids = [p.pid for p in psutil.Process().children(recursive=True)]
            print(" ".join(map(str, pids)), flush=True)
        time.sleep(0.01)
"""


@pytest.mark.slow
def test_reader_processes_end_when_the_training_process_is_killed(tmp_path: Path) -> None:
    """kill -9 (or the OOM killer) runs no clean-up in the training process. The workers'
    parent is the fork server, which stays up while they do: without a watch on the
    training process itself, the fork server and the workers would run forever."""
    _store(tmp_path / "s", n=8)
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(TRAINER))
    trainer = subprocess.Popen([sys.executable, str(script), str(tmp_path / "s")], cwd=ROOT,
                               env=run_env(), stdout=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        assert trainer.stdout is not None
        line = read_line(trainer, 60)  # the first batch, or "" on a crash
        children = [int(p) for p in line.split()]
        assert len(children) >= 3, line  # the fork server, its 2 workers (and a tracker)
        trainer.kill()
        trainer.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in children if not _gone(p)]
        assert not left, f"processes left running after the trainer was killed: {left}"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(timeout=10)
        # Should it have failed: end what this test started, but not Python's resource
        # tracker, which leaves by itself once the trainer's end of its pipe is closed.
        for pid in children:
            try:
                if not _gone(pid) and "resource_tracker" not in " ".join(
                        psutil.Process(pid).cmdline()):
                    os.kill(pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass


# Private names the package may use all the same: os._exit is documented public API.
PUBLIC_UNDERSCORE = {"os . _exit"}


def test_the_package_uses_no_private_name_of_torch_or_any_other_module() -> None:
    """Private attributes change without notice between releases (the loader once reached
    into DataLoader's iterator for its workers, and pinned torch below 2.14 for it): no
    `thing._name` but on self and cls, no getattr/hasattr/setattr of one, no import of a
    private module."""
    attribute = re.compile(r"(\w+) \. (_[A-Za-z0-9]\w*)\b(?<!__)")
    by_name = re.compile(r"\b(getattr|hasattr|setattr) \( [^,]+ , [rbuf]*[\"']_[A-Za-z0-9]")
    private_module = re.compile(r"^(from|import) [\w. ]*\b_[A-Za-z0-9]")
    found = []
    for path, n, text in package_statements():
        uses = [f"{m.group(1)} . {m.group(2)}" for m in attribute.finditer(text)
                if m.group(1) not in ("self", "cls")]
        uses = [u for u in uses if u not in PUBLIC_UNDERSCORE]
        if uses or by_name.search(text) or private_module.search(text.strip()):
            found.append(f"{path}:{n}: {text.strip()}")
    assert not found, found
    assert any("os . _exit" in text for _, _, text in package_statements())  # it reads code


class _Policy(BatchReader):
    """Reads nothing: sends the scheduling policy of the reader process it runs in."""

    def read(self, item):  # type: ignore[no-untyped-def]
        return np.array([os.sched_getscheduler(0)]), np.zeros(1)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_readers_run_under_sched_batch(tmp_path: Path) -> None:
    """A reader woken by the next task must not take the core from the training process
    (docs/experiments/data-wait.md): readers run under SCHED_BATCH, the trainer does not."""
    reader = _Policy(_store(tmp_path / "s"))
    (x, _), = read_ahead(reader, [np.array([0])], num_workers=1, prefetch=1)
    assert int(x[0]) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_batches_above_a_pipe_buffer_cross_in_slots(tmp_path: Path) -> None:
    """A batch larger than SLOT_BYTES (32 samples of 2 x 512 float32 = 128 KiB) arrives as a
    view of a shared-memory slot, not through the pipe; a small one through the pipe."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2, 512)).astype(np.float32)
    y = rng.uniform(-1, 1, size=(64, 2)).astype(np.float32)
    store = SampleStore(write_arrays_store(tmp_path / "big", x, y))
    assert 32 * x[0].nbytes > SLOT_BYTES > 2 * x[0].nbytes
    from hpc_multires.data import slots

    for size, in_slot in ((32, True), (2, False)):
        batches = [np.arange(k, k + size) for k in range(0, 64, size)]
        slots._IDLE.clear()
        pointers = []
        for (bx, _), b in zip(iterate_batches(store, batches, 1, 2), batches, strict=True):
            assert bx.shape == (size, 2, 512)
            assert np.allclose(bx.numpy(), (x[b] - store.mean[:, None]) / store.std[:, None],
                               atol=1e-5)
            pointers.append(bx.data_ptr())
        # The loader's slots wait for the next one in slots._IDLE.
        ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in slots._IDLE]
        assert all(any(lo <= p < hi for lo, hi in ranges) for p in pointers) == in_slot
        assert bool(ranges) == in_slot
