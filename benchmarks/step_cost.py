"""Per-step costs that do not shrink with the input, each beside the way it was done before.

    python benchmarks/step_cost.py [--ranks 4] [--samples 256]

On a generated Neuron-style dataset (4 x 1,600 float32 per sample) and the Neuron
Inverter network at its defaults, in one run:

1. one sample read: the HDF5 dataset looked up by name for every read, against the
   dataset handle the store keeps (`SampleStore.read_raw`);
2. a batch of 8 from the reader process: as shared-memory tensors, against pickled arrays
   through the reader's pipe; the training process's CPU time per batch;
3. the optimizer step: AdamW's per-tensor loop against the fused kernel;
4. under mpiexec with --ranks ranks (the network at width 0.5, random batches of 8): a
   DDP training step followed by a blocking allreduce of the stop vote, against the vote
   started after the step and collected after the next (`Comm.max_started`); and, for
   scale, the step with no vote at all.

Each line prints both and their ratio. Lower is better everywhere.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, ROOT, best_seconds, cli, env, machine

from hpc_multires.data import loader
from hpc_multires.data.store import SampleStore


def per_call(fn: Callable[[], object], n: int, repeats: int = 3) -> float:
    """Best of `repeats` mean seconds per call over `n` calls."""
    def calls() -> None:
        for _ in range(n):
            fn()
    return best_seconds(calls, repeats) / n


def line(what: str, before: float, after: float, unit: str) -> None:
    print(f"{what:<44} {before:9.3f} {after:9.3f} {unit:<3} {before / after:7.1f}x")


def reads(store: SampleStore, n: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, store.shards[0].num_samples, n)
    f = h5py.File(store.shards[0].path, "r", locking=False)
    it = iter(np.tile(rows, 4))

    def by_name() -> None:
        row = int(next(it))
        f["x"][row]
        f["y"][row]

    before = per_call(by_name, n)
    f.close()
    it = iter(np.tile(rows, 4))
    after = per_call(lambda: store.read_raw(int(next(it))), n)
    return before * 1e6, after * 1e6


def read_batches(store: SampleStore, idx: list[np.ndarray], pipe_bytes: int) -> bool:
    """Every batch through one reader process, as `loader.iterate_batches` reads them, with
    the reader's threshold for shared memory set to `pipe_bytes`; True if the batches came
    as shared-memory tensors."""
    reader = loader.BatchReader(store, pipe_bytes=pipe_bytes)
    shared = []
    for x, y in loader.read_ahead(reader, idx, num_workers=1, prefetch=4):
        shared.append(isinstance(x, torch.Tensor) and x.is_shared())
        torch.as_tensor(x), torch.as_tensor(y)
    return all(shared)


def batches(store: SampleStore, count: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    idx = [rng.choice(len(store), 8, replace=False) for _ in range(count)]
    out = []
    for pipe_bytes in (0, 2**62):  # 0: every batch as shared-memory tensors; then all piped
        read_batches(store, idx[:8], pipe_bytes)  # forkserver start-up
        cpu = time.process_time()
        shared = read_batches(store, idx, pipe_bytes)
        out.append((time.process_time() - cpu) / count * 1e3)
        if shared != (pipe_bytes == 0):
            sys.exit(f"the reader sent batches {'as' if shared else 'not as'} shared-memory "
                     f"tensors with PIPE_BYTES = {pipe_bytes}: the comparison would not be "
                     "shared memory against the pipe")
    return out[0], out[1]


def optimizer_step() -> tuple[float, float]:
    from hpc_multires.models.neuron_inverter import NeuronInverter

    model = NeuronInverter(in_channels=4, length=1600, num_outputs=6)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    times = []
    for fused in (False, True):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
        times.append(per_call(opt.step, 50) * 1e3)
    return times[0], times[1]


def vote_worker(steps: int) -> None:
    """One rank of part 4 (run under mpiexec): mean ms per step with each vote."""
    from hpc_multires.comm import dist as comm_dist
    from hpc_multires.models.neuron_inverter import NeuronInverter

    torch.set_num_threads(1)
    comm = comm_dist.init()
    model = NeuronInverter(in_channels=4, length=1600, num_outputs=6, width=0.5)
    ddp = comm.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(8, 4, 1600), torch.rand(8, 6)
    result = {}
    for mode in ("none", "blocking", "started") * 2:
        pending = None
        comm.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mode == "blocking":
                comm.max(0.0)
            elif mode == "started":
                vote = comm.max_started([0.0, 0.0])
                if pending is not None:
                    pending()
                pending = vote
        if pending is not None:
            pending()
        comm.barrier()
        ms = (time.perf_counter() - t) / steps * 1e3
        result[mode] = min(ms, result.get(mode, float("inf")))  # best of two passes
    if comm.is_root:
        print(json.dumps(result))
    comm_dist.shutdown(comm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--vote-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vote_worker:
        vote_worker(args.steps)
        return
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "neuron"
        cli(["data", "synth", "neuron", "--out", str(data), "--samples", str(args.samples)])
        store = SampleStore(data)
        print(f"{'cost':<44} {'before':>9} {'after':>9} {'':<3} {'ratio':>8}")
        line("1 sample read: name lookup / kept handle", *reads(store, 2000), "us")
        line("batch of 8 from reader: shm / pipe (CPU)", *batches(store, 200), "ms")
        line("AdamW step, 2.5M params: loop / fused", *optimizer_step(), "ms")
        store.close()
    cmd = [str(BIN / "mpiexec"), "-n", str(args.ranks), sys.executable, __file__,
           "--vote-worker", "--steps", str(args.steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env())
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    votes = json.loads(r.stdout.strip().splitlines()[-1])
    line(f"DDP step + vote, {args.ranks} ranks: blocking / started",
         votes["blocking"], votes["started"], "ms")
    line(f"DDP step, {args.ranks} ranks: blocking vote / none",
         votes["blocking"], votes["none"], "ms")


if __name__ == "__main__":
    main()
