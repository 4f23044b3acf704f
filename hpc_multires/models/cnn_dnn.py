"""The CNN-DNN of domain decomposition (arXiv 2302.06564): local CNNs, one per sub-domain
of the input, and a dense network that combines their outputs; architecture only.

The local CNNs are the ordinary models (`build_model`) built for a sub-domain's shape.
`Aggregator` is the dense network; `MeanAggregate` and `VoteAggregate` the alternatives
without weights; `CNNDNN` the whole model on one process (the reference the distributed
coherent model is checked against, and what a trained run can be evaluated as).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Aggregator(nn.Module):
    """The dense network on the local outputs: (b, S, P) -> (b, P). With `probabilities`
    (classification) it reads each local CNN's class probabilities, not its logits."""

    def __init__(self, subdomains: int, outputs: int, hidden: Sequence[int],
                 probabilities: bool = False) -> None:
        super().__init__()
        self.probabilities = probabilities
        layers: list[nn.Module] = []
        width = subdomains * outputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        # outputs: (b, S, P) -> (b, S * P) -> (b, P)
        if self.probabilities:
            outputs = outputs.softmax(dim=2)
        out: torch.Tensor = self.net(outputs.flatten(1))
        return out


class MeanAggregate(nn.Module):
    """The mean of the local outputs (regression), or of their class probabilities,
    as log-probabilities (classification): (b, S, P) -> (b, P)."""

    def __init__(self, probabilities: bool = False) -> None:
        super().__init__()
        self.probabilities = probabilities

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        if not self.probabilities:
            return outputs.mean(dim=1)
        return outputs.softmax(dim=2).mean(dim=1).clamp_min(1e-12).log()


class VoteAggregate(nn.Module):
    """A majority vote of the local classes: (b, S, K) -> (b, K) vote shares as
    log-probabilities; a tie goes to the class of highest mean probability."""

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        k = outputs.shape[2]
        votes = nn.functional.one_hot(outputs.argmax(dim=2), k).sum(dim=1).to(outputs.dtype)
        shares = (votes + 1e-3 * outputs.softmax(dim=2).mean(dim=1)) / outputs.shape[1]
        return shares.clamp_min(1e-12).log()


class PickLocal(nn.Module):
    """One local CNN's own output from the gathered ones: (b, S, P) -> (b, P)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs[:, self.index]


class CNNDNN(nn.Module):
    """Local CNNs on their sub-domains of the whole sample, combined by `aggregator`:
    x (b, C, *spatial) -> (b, P). `regions`: each local CNN's spatial slices."""

    def __init__(self, locals_: Sequence[nn.Module], aggregator: nn.Module,
                 regions: Sequence[tuple[slice, ...]]) -> None:
        super().__init__()
        self.locals = nn.ModuleList(locals_)
        self.aggregator = aggregator
        self.regions = [tuple(r) for r in regions]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([cnn(x[(slice(None), slice(None), *region)])
                               for cnn, region in zip(self.locals, self.regions, strict=True)],
                              dim=1)  # (b, S, P)
        out: torch.Tensor = self.aggregator(outputs)
        return out
