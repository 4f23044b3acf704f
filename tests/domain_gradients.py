"""Run under mpiexec by tests/test_domain_mpi.py: the coherent CNN-DNN's gradients on each
rank against the same model on one process.

Every rank builds the same local CNNs and aggregator (one seed) and, as the one-process
reference, the whole CNNDNN on the whole batch: its loss and gradients. Then each rank
runs its own part (`CoherentPart`: its sub-domain's local CNN on its replica's share of
the batch, the outputs gathered differentiably over the replica's ranks), backward, and
`reduce_gradients`; its local CNN's and the aggregator's gradients must equal the
reference's. Prints one line "OK rank R" per rank; argv: the grid, e.g. 2,2,1.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from hpc_multires.comm import dist as comm_dist
from hpc_multires.methods.domain import CoherentPart, process_grid, subdomains
from hpc_multires.models.cnn_dnn import CNNDNN, Aggregator
from hpc_multires.models.cosmoflow import CosmoFlow


def main() -> None:
    grid = tuple(int(g) for g in sys.argv[1].split(","))
    comm = comm_dist.init(60)
    pg = process_grid(comm.world_size, grid)
    parts = subdomains((8, 8, 8), grid)
    torch.manual_seed(0)
    locals_ = [CosmoFlow(in_channels=2, spatial=parts[0].shape, num_outputs=3, width=0.125,
                         depth=1, head="gap", fc_sizes=(8,)) for _ in parts]
    aggregator = Aggregator(len(parts), 3, [6])
    reference = CNNDNN(locals_, aggregator, [p.region() for p in parts])
    batch = 4 * pg.replicas
    x, y = torch.randn(batch, 2, 8, 8, 8), torch.rand(batch, 3) - 0.5
    torch.nn.functional.mse_loss(reference(x), y).backward()
    want = {n: p.grad.clone() for n, p in reference.named_parameters()}

    d, r = pg.subdomain_of(comm.rank), pg.replica_of(comm.rank)
    groups = {}
    for ranks in [pg.subdomain_ranks(i) for i in range(pg.subdomains)] + \
            [pg.replica_ranks(i) for i in range(pg.replicas)]:
        groups[ranks] = None if len(ranks) == comm.world_size else dist.new_group(list(ranks))
    reference.zero_grad()
    part = CoherentPart(reference.locals[d], reference.aggregator, grid=pg, rank=comm.rank,
                        replica_group=groups[pg.replica_ranks(r)],
                        subdomain_group=groups[pg.subdomain_ranks(d)])
    share = slice(r * 4, (r + 1) * 4)  # the replica's samples
    mine = x[share][(slice(None), slice(None), *parts[d].region())]
    torch.nn.functional.mse_loss(part(mine), y[share]).backward()
    part.reduce_gradients()
    got = {f"locals.{d}.{n}": p.grad for n, p in part.local.named_parameters()}
    got |= {f"aggregator.{n}": p.grad for n, p in part.aggregator.named_parameters()}
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"rank {comm.rank} {name}: {m}")
    assert any(float(g.abs().max()) > 0 for g in got.values())
    print(f"OK rank {comm.rank} checked {len(got)} gradients", flush=True)
    comm_dist.shutdown(comm)


if __name__ == "__main__":
    main()
