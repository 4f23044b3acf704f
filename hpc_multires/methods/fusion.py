"""Fusion operators: pure functions from state dicts to a state dict.

A stage that starts from earlier stages (`init = "fuse"`) gets its weights from one of
these. Each takes the new stage's freshly initialised state dict as `target`, so any
entry the operator does not fill keeps a fresh initialisation, and returns a new dict
(the inputs are not modified).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hpc_multires.errors import ConfigError

StateDict = dict[str, torch.Tensor]


def transfer(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> StateDict:
    """`target` with every entry whose name and shape match copied from `source`.

    The multi-resolution transfer of conv and norm layers: convolutions do not care about
    the input size, so they carry over; a dense layer whose input size changed keeps its
    fresh weights.
    """
    out = {k: v.clone() for k, v in target.items()}
    for name, value in source.items():
        if name in out and out[name].shape == value.shape:
            out[name] = value.detach().clone()
    return out


def prolong_dense(weight: torch.Tensor, feature_shape: Sequence[int],
                  fine_spatial: Sequence[int], sampled: bool = False,
                  factor: int | None = None) -> torch.Tensor:
    """A dense weight on flattened (C, *S) features -> the same layer on (C, *S') features.

    weight: (out, C * prod(S)). Along each axis the features' resolution factor is f (2 for
    one pyramid level); fine position j covers the same stretch of the sample as coarse
    position j // f and takes its weight divided by f. When S' = f S exactly, the fine layer
    gives the coarse output on a nearest-neighbour upsampled input. When pooling floored an
    odd length (12 coarse positions for 25 fine ones), positions stay aligned in time or
    space and the fine positions past the coarse map's end reuse its last weight.

    factor: the resolution factor between the two pyramid levels, 2^(source level - target
    level). The network may take part or all of it out before this layer (model.coarse_pools
    = "drop", model.stem_level), so along each axis f is the power of two dividing `factor`
    with S' // f == S; floors make S' / S no guide (3 positions for 15 is f = 4, not 5), and
    for S >= 1 there is only one such f. None: f = round(S' / S), right only when nothing
    was floored.

    sampled: the fine features hold the coarse ones at every f-th position (a
    level-consistent network, `hpc_multires.models.scale`), so fine position j * f takes
    coarse position j's weight whole and the positions in between take 0: the fine layer
    gives the coarse output exactly on such features.
    """
    c, *spatial = feature_shape
    w = weight.reshape(weight.shape[0], c, *spatial)  # (out, C, *S)
    scale = 1.0
    for axis, (coarse, fine) in enumerate(zip(spatial, fine_spatial, strict=True), start=2):
        f = max(1, round(fine / coarse)) if factor is None else \
            _axis_factor(coarse, fine, factor)
        if sampled:
            shape = list(w.shape)
            shape[axis] = fine
            spread = w.new_zeros(shape)
            n = min(coarse, (fine + f - 1) // f)  # coarse positions that fit
            spread.narrow(axis, 0, (n - 1) * f + 1)[
                (slice(None),) * axis + (slice(None, None, f),)] = w.narrow(axis, 0, n)
            w = spread
            continue
        index = (torch.arange(fine) // f).clamp(max=coarse - 1)  # fine -> coarse position
        w = w.index_select(axis, index)  # (out, C, ..., S'_axis, ...)
        scale /= f
    return (w * scale).reshape(weight.shape[0], -1)


def _axis_factor(coarse: int, fine: int, factor: int) -> int:
    """The power of two f dividing `factor` with fine // f == coarse (see prolong_dense)."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"factor = {factor}: give the resolution factor between the levels, "
                         "2^(source level - target level)")
    f = 1
    while f <= factor:
        if fine // f == coarse:
            return f
        f *= 2
    raise ValueError(f"{coarse} coarse positions cannot become {fine} fine ones at a "
                     f"resolution factor of {factor}: the models differ in more than their "
                     "input resolution")


def prolong_kernel(weight: torch.Tensor, factor: int) -> torch.Tensor:
    """A conv weight (out, in, *K) -> (out, in, *(K * factor)) for a mesh-free stem.

    Each tap is repeated `factor` times along each spatial axis and divided by the number
    of copies, factor^d. Applied with stride `factor` (and `factor` times the padding) to a
    fine input, the new kernel gives what the old one gives on that input averaged over
    factor^d points (the next pyramid levels down): the stem computes the same function.
    """
    w = weight
    for axis in range(2, weight.dim()):
        w = w.repeat_interleave(factor, dim=axis)
    return w / factor ** (weight.dim() - 2)


def _kernel_factor(coarse: torch.Size, fine: torch.Size) -> int | None:
    """The factor f with fine = coarse * f on every kernel axis (f > 1), else None."""
    if len(coarse) < 3 or len(coarse) != len(fine) or coarse[:2] != fine[:2]:
        return None
    if any(c <= 0 or f % c for c, f in zip(coarse[2:], fine[2:], strict=True)):
        return None
    factors = {f // c for c, f in zip(coarse[2:], fine[2:], strict=True)}
    if len(factors) != 1:
        return None
    factor = factors.pop()
    return factor if factor > 1 else None


def prolong(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
            dense_layers: Mapping[str, tuple[Sequence[int], Sequence[int]]],
            sampled: bool = False, factor: int | None = None) -> StateDict:
    """`transfer`, then each dense weight in `dense_layers` (name -> (coarse (C, *S) input
    shape, fine spatial S')) prolonged instead of re-initialised, and each conv weight whose
    kernel is an integer multiple of the source's per axis (a mesh-free stem, or the first
    convolution of a level-consistent network, on a finer level; see `prolong_kernel`)
    resampled. `sampled`: the target is a level-consistent network; `factor`: 2^(source
    level - target level) (see `prolong_dense`)."""
    out = transfer(source, target)
    for name, value in source.items():
        if name in out and name not in dense_layers:
            taps = _kernel_factor(value.shape, out[name].shape)
            if taps is not None:
                out[name] = prolong_kernel(value.detach(), taps)
    for name, (feature_shape, fine_spatial) in dense_layers.items():
        fine = prolong_dense(source[name], feature_shape, fine_spatial, sampled, factor)
        if fine.shape != out[name].shape:
            raise ValueError(f"prolonging {name} gives {tuple(fine.shape)}, the target layer "
                             f"is {tuple(out[name].shape)}: the models differ in more than "
                             "their input resolution")
        out[name] = fine
    return out


def average(sources: Sequence[Mapping[str, torch.Tensor]], target: Mapping[str, torch.Tensor],
            weights: Sequence[float] | None = None) -> StateDict:
    """Weighted mean of models, layer by layer, over the sources whose entry matches the
    target's shape (a dense layer that differs in size is averaged over those that fit)."""
    w = [1.0] * len(sources) if not weights else [float(x) for x in weights]
    if len(w) != len(sources) or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"need one non-negative weight per source, got {weights}")
    out = {k: v.clone() for k, v in target.items()}
    for name, fresh in target.items():
        fits = [(src[name], wi) for src, wi in zip(sources, w, strict=True)
                if name in src and src[name].shape == fresh.shape and wi > 0]
        if not fits:
            continue
        if not fresh.is_floating_point():  # counters such as BatchNorm's: take the first
            out[name] = fits[0][0].clone()
            continue
        total = sum(wi for _, wi in fits)
        acc = torch.zeros(fresh.shape, dtype=torch.float64)
        for t, wi in fits:
            acc += t.detach().double() * (wi / total)
        out[name] = acc.to(fresh.dtype)
    return out


def layer_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Parameterised layers in state-dict order: "features.0", "features.3", "head.1", ..."""
    return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in state))


SIDE_BRANCHES = ("detail",)
"""Modules beside the layer stack rather than in it: the stem's full-resolution branch
(model.stem_detail), which a model on a finer level than the stem's has and a coarser one
does not, and which comes first in the state dict."""


def bottom_layer_names(bottom: Mapping[str, torch.Tensor],
                       target: Mapping[str, torch.Tensor]) -> list[str]:
    """The layers `bottom_layers` counts, bottom first: the target's layers that the bottom
    model has too, side branches left out (those come from the top model)."""
    have = set(layer_names(bottom))
    return [name for name in layer_names(target)
            if name in have and name.split(".", 1)[0] not in SIDE_BRANCHES]


def check_bottom_layers(bottom: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                        bottom_layers: int, stage: str = "") -> list[str]:
    """The layers bottom-top takes from `bottom`; a ConfigError naming `stage` and the range
    to use when the bottom model has fewer than `bottom_layers` of the target's layers.
    Cheap on freshly built models, so a plan can be checked before any stage trains."""
    layers = bottom_layer_names(bottom, target)
    if not 0 < bottom_layers <= len(layers):
        where = f"stage {stage!r}: " if stage else ""
        raise ConfigError(f"{where}bottom_layers = {bottom_layers}, but the bottom model has "
                          f"{len(layers)} layers the fused model takes ({', '.join(layers)}); "
                          f"use 1 to {len(layers)}")
    return layers[:bottom_layers]


def bottom_top(bottom: Mapping[str, torch.Tensor], top: Mapping[str, torch.Tensor],
               target: Mapping[str, torch.Tensor], bottom_layers: int) -> StateDict:
    """The first `bottom_layers` layers of `bottom` (counted as in `bottom_layer_names`),
    the rest from `top` (each where the shape matches the target; what does not fit stays
    freshly initialised)."""
    lower = set(check_bottom_layers(bottom, target, bottom_layers))
    pick_bottom = {k: v for k, v in bottom.items() if k.rsplit(".", 1)[0] in lower}
    pick_top = {k: v for k, v in top.items() if k.rsplit(".", 1)[0] not in lower}
    return transfer({**pick_top, **pick_bottom}, target)


def shrink(fused: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor],
           keep: float) -> StateDict:
    """keep * fused + (1 - keep) * fresh for every float entry; other entries as fused.

    A fused start pulled part of the way back to a fresh initialisation (shrink and
    perturb): a warm start that sits deep in the coarse models' solution can be slow to
    learn what only the finer level shows; mixing in fresh weights trades part of the head
    start for that. keep = 1 returns the fused model unchanged.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep = {keep}: use a value between 0 and 1")
    if keep == 1.0:
        return dict(fused)
    return {k: keep * v + (1.0 - keep) * fresh[k] if v.is_floating_point() else v.clone()
            for k, v in fused.items()}


def fuse(fusion: str, sources: Sequence[Mapping[str, torch.Tensor]],
         target: Mapping[str, torch.Tensor], *, weights: Sequence[float] = (),
         bottom_layers: int = 0,
         dense_layers: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
         sampled: bool = False, factor: int | None = None) -> StateDict:
    """Dispatch on the fusion operator's name (a stage's `fusion` setting). `factor`: for
    prolong, 2^(level of the first source - level of the target)."""
    if fusion == "transfer":
        return transfer(sources[0], target)
    if fusion == "prolong":
        return prolong(sources[0], target, dense_layers or {}, sampled, factor)
    if fusion == "average":
        return average(sources, target, weights or None)
    if fusion == "bottom-top":
        return bottom_top(sources[0], sources[1], target, bottom_layers)
    raise ValueError(f"unknown fusion operator {fusion!r}")
