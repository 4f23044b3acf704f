"""`hpc-multires data convert --x FOLDER`: a folder of PNG/JPEG images -> a store.

Every image becomes one sample (C, H, W) of float32 values in [0, 1] (8-bit values / 255,
16-bit grey / 65535), in file-name order, for the image tasks. A store holds one sample
shape, so the images must share their size; grey images among colour ones are stored as
RGB (3 channels), an all-grey folder as 1 channel. Image folders carry no labels: each
sample gets one label `none` = 0, which the image tasks ignore.

Every file is decoded once before anything is written, so a folder with images of mixed
sizes or a file that does not decode is one line naming the files, with nothing written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpc_multires.data.store import provenance
from hpc_multires.data.writer import write_dataset
from hpc_multires.errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L")


def image_files(folder: Path) -> list[Path]:
    """The folder's PNG and JPEG files, in name order; a DataError if it holds none."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{folder} holds no .png, .jpg or .jpeg files; pass a folder of "
                        "images, or arrays as .npy/.npz")
    return files


def _open(path: Path):  # type: ignore[no-untyped-def]
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not half way through writing
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read {path} as an image ({e}); remove or replace it, nothing "
                        "was written") from None
    return image


def pixels(path: Path, channels: int) -> np.ndarray:
    """One image as float32 (C, H, W) in [0, 1]."""
    image = _open(path)
    if channels == 1 and image.mode in SIXTEEN_BIT:
        x = np.asarray(image, dtype=np.float32) / 65535.0
    elif channels == 1 and image.mode == "F":
        x = np.asarray(image, dtype=np.float32)
    else:
        x = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.float32) / 255.0
    x = np.clip(x, 0.0, 1.0)
    return x[None] if x.ndim == 2 else np.ascontiguousarray(x.transpose(2, 0, 1))


def survey(files: list[Path]) -> tuple[int, int, int]:
    """(channels, height, width) the images share; a DataError naming the first two files
    that differ in size, or the first that does not decode."""
    sizes: dict[tuple[int, int], Path] = {}
    colour = False
    for path in files:
        image = _open(path)
        sizes.setdefault(image.size, path)
        colour = colour or image.mode not in GREY_MODES
        if len(sizes) > 1:
            (w0, h0), first = next(iter(sizes.items()))
            w1, h1 = image.size
            raise DataError(
                f"the images differ in size: {first.name} is {w0}x{h0}, {path.name} is "
                f"{w1}x{h1} (width x height); a store holds one sample shape: resize or crop "
                "them to one size first; nothing was written")
    (width, height), = sizes
    return (3 if colour else 1), height, width


def convert_images(folder: Path, out: Path, *, samples_per_shard: int = 64,
                   overwrite: bool = False, compression: str | None = None) -> int:
    """Convert a folder of images to a store; returns the number of shards. Runs on any
    number of ranks (each checks every file first, then writes its own shards)."""
    files = image_files(folder)
    channels, height, width = survey(files)
    return write_dataset(
        out, num_samples=len(files), samples_per_shard=samples_per_shard,
        sample_fn=lambda i: (pixels(files[i], channels), np.zeros(1, np.float32)),
        sample_shape=(channels, height, width), x_dtype="float32", label_names=("none",),
        x_transform="none",
        prov=provenance("convert-images", folder=str(folder), images=len(files),
                        first=files[0].name, last=files[-1].name),
        overwrite=overwrite, compression=compression)
