"""Tests for the synthetic classification images (hpc_multires.data.synth.classes) and
`data synth classes`.

The hard case is the point of the generator: no quarter of an image decides its class.
It is checked on the elements an image is drawn from (`layout`), with the rule that
classifies from them (orientation vote of the patches, count of bright discs against a
threshold): right for nearly every whole image, for under two thirds of the quarters; and
on the pixels, with a trivial classifier of two image statistics. Thresholds
sit well inside the values measured when they were set (noted beside each assertion).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from hpc_multires.data.synth import classes as cl

Region = tuple[tuple[float, float], tuple[float, float]]


def quarters(size: int) -> list[Region]:
    h = size / 2
    return [((a, a + h), (b, b + h)) for a in (0, h) for b in (0, h)]


def inside(points: np.ndarray, region: Region) -> np.ndarray:
    (y0, y1), (x0, x1) = region
    return (points[:, 0] >= y0) & (points[:, 0] < y1) & (points[:, 1] >= x0) & \
        (points[:, 1] < x1)


def rule(lay: cl.Layout, region: Region, classes: int, threshold: int) -> int:
    """The class that the elements centred in `region` vote for: the orientation most of
    its patches are nearest to, the "many" level if it holds `threshold` bright discs."""
    t = cl.orientations(classes)
    angles = lay.patches[inside(lay.patches, region), 2]
    votes = np.bincount(np.rint(angles / (math.pi / t)).astype(int) % t, minlength=t)
    many = int(inside(lay.discs, region).sum() >= threshold)
    return min(2 * int(votes.argmax()) + many, classes - 1)


@pytest.mark.parametrize(("size", "classes", "channels"), [(32, 2, 1), (64, 4, 3), (96, 7, 1)])
def test_shapes_range_and_class(size: int, classes: int, channels: int) -> None:
    for i in range(classes + 1):
        x, y = cl.generate(i, 0, size, classes, channels)
        assert x.shape == (channels, size, size) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.05
        assert y.dtype == np.float32 and y.tolist() == [i % classes]  # balanced: index mod K


def test_deterministic_in_seed_and_index_alone() -> None:
    a, _ = cl.generate(5, 7, 32, 4, 3)
    np.random.seed(123)  # global state must not matter
    b, _ = cl.generate(5, 7, 32, 4, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, cl.generate(5, 8, 32, 4, 3)[0])
    assert not np.array_equal(a, cl.generate(9, 7, 32, 4, 3)[0])


def test_class_names_sort_in_class_order() -> None:
    for k in range(2, cl.MAX_CLASSES + 1):
        names = cl.class_names(k)
        assert len(set(names)) == k and list(names) == sorted(names)
    assert cl.class_names(4) == ("o000-few", "o000-many", "o090-few", "o090-many")


def test_layout_follows_the_class() -> None:
    """The class sets the disc count range and the orientation of the on-class patches."""
    for i in range(40):
        lay = cl.layout(i, 1, 64, 6)
        angle, level = cl.class_factors(lay.cls, 6)
        low, high = cl.COUNT_LEVELS[level]
        assert low <= len(lay.discs) <= high
        on = lay.patches[lay.patches[:, 4] == 1, 2]
        gap = np.abs((on - angle + np.pi / 2) % np.pi - np.pi / 2)  # circular, mod 180 deg
        assert (gap < np.deg2rad(5 * cl.JITTER_DEG)).all()


def test_no_quarter_decides_the_class() -> None:
    """The hard case: from a quarter's elements the class is right at best 0.63-0.65 of the
    time (measured with K = 4, chance 0.25), from the whole image's nearly always (0.97)."""
    size, classes = 64, 4
    lays = [cl.layout(i, 0, size, classes) for i in range(800)]
    whole = np.mean([rule(lay, ((0, size), (0, size)), classes, 8) == lay.cls
                     for lay in lays])
    by_quarter = [np.mean([rule(lay, q, classes, threshold) == lay.cls for lay in lays])
                  for threshold in (1, 2, 3) for q in quarters(size)]
    best_quarter = max(by_quarter)  # the best threshold for a quarter's count, and quarter
    assert whole > 0.9
    assert 1 / classes + 0.15 < best_quarter < whole - 0.2


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Two statistics of each image (..., H, W): the log ratio of horizontal to vertical
    gradient energy (the stripes' orientation) and the share of bright pixels (the discs);
    (..., 2)."""
    gy, gx = np.gradient(images, axis=(-2, -1))
    ratio = np.log((gx**2).mean((-2, -1)) / (gy**2).mean((-2, -1)))
    return np.stack([ratio, (images > 0.75).mean((-2, -1))], -1)


def nearest_centroid(train: np.ndarray, labels: np.ndarray, test: np.ndarray,
                     classes: int) -> np.ndarray:
    """The class whose mean standardised training features are nearest: (M,)."""
    mu, sd = train.mean(0), train.std(0)
    centroids = np.stack([((train[labels == k] - mu) / sd).mean(0) for k in range(classes)])
    return np.square(((test - mu) / sd)[:, None] - centroids[None]).sum(-1).argmin(1)


def test_a_pixel_statistic_of_a_quarter_says_less_than_of_the_whole() -> None:
    """The hard case from the pixels: a trivial classifier (nearest class centroid of two
    image statistics, fitted on 400 images, scored on 200) is right for 0.71 of the whole
    images and 0.52-0.56 of the quarters (measured; chance 0.25)."""
    size, classes, n = 64, 4, 600
    pairs = [cl.generate(i, 5, size, classes) for i in range(n)]
    x = np.stack([p[0][0] for p in pairs])  # (N, S, S)
    y = np.array([int(p[1][0]) for p in pairs])
    train, test = slice(0, 400), slice(400, n)

    def accuracy(images: np.ndarray) -> float:
        f = pixel_features(images)
        return float((nearest_centroid(f[train], y[train], f[test], classes) == y[test])
                     .mean())

    whole = accuracy(x)
    h = size // 2
    by_quarter = [accuracy(x[:, a:a + h, b:b + h]) for a in (0, h) for b in (0, h)]
    assert whole > 0.6
    assert 1 / classes + 0.1 < min(by_quarter) and max(by_quarter) < whole - 0.07


def test_class_evidence_lands_in_every_quarter() -> None:
    """Across samples every quarter holds patches of the class orientation and bright
    discs, in about a quarter's share: no quarter is where the evidence is."""
    size = 64
    lays = [cl.layout(i, 2, size, 4) for i in range(400)]
    on_class = np.concatenate([lay.patches[lay.patches[:, 4] == 1] for lay in lays])
    discs = np.concatenate([lay.discs for lay in lays])
    for q in quarters(size):
        assert 0.2 < inside(on_class, q).mean() < 0.3  # 0.24 to 0.27 measured
        assert 0.2 < inside(discs, q).mean() < 0.3


def test_count_levels_show_in_the_pixels() -> None:
    """The discs are in the image: the "many" level has more bright pixels than "few"
    (the image's own statistic, not the layout's)."""
    bright = {0: [], 1: []}
    for i in range(40):
        x, y = cl.generate(i, 3, 64, 2)
        image = x[0]
        bright[int(y[0])].append(float((image > np.median(image) + 0.2).mean()))
    assert np.mean(bright[1]) > 1.4 * np.mean(bright[0])  # 1.76 measured


@pytest.mark.parametrize(("args", "match"), [
    (["--classes", "1"], "classes must be 2 to 16"),
    (["--size", "30"], "even integer >= 32"),
    (["--channels", "2"], "channels must be 1 .grey. or 3"),
    (["--bins", "100"], "--bins does not apply to `data synth classes`")])
def test_cli_refuses_bad_options_in_one_line(cli_in_process, tmp_path, args: list[str],
                                             match: str) -> None:
    r = cli_in_process(["data", "synth", "classes", "--out", str(tmp_path / "d"),
                        "--samples", "2", *args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert re.search(match, r.stderr), r.stderr


def test_classes_option_is_only_for_classes(cli_in_process, tmp_path) -> None:
    r = cli_in_process(["data", "synth", "images", "--out", str(tmp_path / "d"),
                        "--samples", "2", "--classes", "3"])
    assert r.returncode == 2 and "--classes does not apply to `data synth images`" in r.stderr


@pytest.mark.mpi
def test_same_dataset_on_any_rank_count(tmp_path) -> None:
    from conftest import synth_on_one_and_two_ranks

    stores = synth_on_one_and_two_ranks(
        tmp_path, ["data", "synth", "classes", "--samples", "10", "--size", "32", "--classes",
                   "5", "--samples-per-shard", "3", "--seed", "3"], samples=10)
    for store in stores:
        assert store.schema.class_names == cl.class_names(5)
        assert store.schema.label_names == ("class",)
        np.testing.assert_array_equal(store.labels()[:, 0], np.arange(10) % 5)


def test_inspect_lists_the_classes(cli_in_process, tmp_path) -> None:
    out = tmp_path / "d"
    r = cli_in_process(["data", "synth", "classes", "--out", str(out), "--samples", "6",
                        "--size", "32", "--classes", "3"])
    assert r.returncode == 0, r.stderr
    r = cli_in_process(["data", "inspect", str(out)])
    assert r.returncode == 0, r.stderr
    assert "classes   3, samples per class: 0 o000-few (2), 1 o000-many (2), 2 o090-few (2)" \
        in r.stdout
    assert "outside [-1, 1]" not in r.stdout  # class indices are not scaled labels
