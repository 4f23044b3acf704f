"""`hpc-multires data convert --x FOLDER`: a folder of PNG/JPEG images -> a store.

Every image becomes one sample (C, H, W) of float32 values in [0, 1] (8-bit values / 255,
16-bit grey / 65535). A store holds one sample shape, so the images must share their
size; grey images among colour ones are stored as RGB (3 channels), an all-grey folder as
1 channel. Two layouts:

- **flat** (FOLDER/*.png): unlabelled images for the image tasks, in file-name order; each
  sample gets one label `none` = 0, which the image tasks ignore.
- **one sub-folder per class** (FOLDER/<class>/*.png): a classification store. The classes
  are the sub-folders' names in sorted order, class index i the i-th of them; each sample's
  one label `class` is its class index (not scaled), and the store's schema keeps the
  names (`class_names`), so metrics and reports name the classes. The samples are
  interleaved by class in proportion (each class's images in file-name order): any
  contiguous range of samples, such as the held-out tail of `data.val_fraction`, holds
  every class in its share, where class after class would leave the last ones alone in
  the validation set.

Names starting with "." are skipped, as are files that are not .png/.jpg/.jpeg. Images
beside class sub-folders (a mixed layout), a class sub-folder with no image or with
folders of its own, or a single class are one error line each. Every file is decoded once
before anything is written, so images of mixed sizes or a file that does not decode are
one line naming the files, with nothing written.
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


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                  and not p.name.startswith("."))


def _folders_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


def image_files(folder: Path) -> list[Path]:
    """The folder's PNG and JPEG files, in name order; a DataError if it holds none."""
    files = _images_in(folder)
    if not files:
        raise DataError(f"{folder} holds no .png, .jpg or .jpeg files; pass a folder of "
                        "images, or arrays as .npy/.npz")
    return files


def class_folders(folder: Path) -> dict[str, list[Path]] | None:
    """{class name: its images in name order}, classes in sorted order, for a folder with
    one sub-folder per class; None for a flat folder of images. A DataError for a layout
    that is neither, or a class without images."""
    subfolders = _folders_in(folder)
    if not subfolders:
        return None
    loose = _images_in(folder)
    if loose:
        raise DataError(
            f"{folder} holds both images ({_names(loose)}) and sub-folders "
            f"({_names(subfolders)}); put every image in the sub-folder of its class "
            "(labelled) or remove the sub-folders (unlabelled images); nothing was written")
    nested = [c for c in subfolders if _folders_in(c)]
    if nested:
        raise DataError(
            f"class folder(s) {_names(nested)} of {folder} hold folders of their own; give each "
            "class one folder of images (FOLDER/<class>/*.png); nothing was written")
    classes = {c.name: _images_in(c) for c in subfolders}
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty[:5])} of {folder} hold no .png, .jpg or .jpeg "
            "images; add images or remove the empty class folder(s); nothing was written")
    if len(classes) < 2:
        (name,) = classes
        raise DataError(
            f"{folder} has one class folder, {name}: a classification needs 2 classes or "
            "more; add a sub-folder per class, or put the images in FOLDER itself "
            "(unlabelled); nothing was written")
    return classes


def interleave(per_class: list[list[Path]]) -> list[tuple[Path, int]]:
    """(file, class index) of every image, the classes interleaved in proportion: image j
    of a class of n images comes at the fraction (j + 1/2) / n of the store, so every
    contiguous range of it holds each class in its share."""
    keyed = [((j + 0.5) / len(files), c, j, path) for c, files in enumerate(per_class)
             for j, path in enumerate(files)]
    return [(path, c) for _, c, _, path in sorted(keyed, key=lambda k: k[:3])]


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
    """Convert a folder of images (flat, or one sub-folder per class) to a store; returns
    the number of shards. Runs on any number of ranks (each checks every file first, then
    writes its own shards)."""
    classes = class_folders(folder)
    if classes is not None:
        return _convert_classes(folder, classes, out, samples_per_shard=samples_per_shard,
                                overwrite=overwrite, compression=compression)
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


def _convert_classes(folder: Path, classes: dict[str, list[Path]], out: Path, *,
                     samples_per_shard: int, overwrite: bool,
                     compression: str | None) -> int:
    names = tuple(classes)  # sorted: class_folders lists them so
    order = interleave(list(classes.values()))
    files = [path for path, _ in order]
    labels = np.array([c for _, c in order], np.float32)  # (N,) class indices
    channels, height, width = survey(files)
    return write_dataset(
        out, num_samples=len(files), samples_per_shard=samples_per_shard,
        sample_fn=lambda i: (pixels(files[i], channels), labels[i:i + 1]),
        sample_shape=(channels, height, width), x_dtype="float32", label_names=("class",),
        x_transform="none",
        prov=provenance("convert-images", folder=str(folder), images=len(files),
                        class_names=list(names),
                        images_per_class=[len(f) for f in classes.values()]),
        overwrite=overwrite, compression=compression, class_names=names)
