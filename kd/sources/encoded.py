"""Encoded images in, uint8 pixels out: an image folder or a Parquet file of encoded images.

    folder/<class>/<image>                         every image labeled by its folder
    folder/{train,test,unlabeled}/<class>/<image>  preset splits (unlabeled/ may also hold
                                                   images directly, without class folders)
    file.parquet: `image` (encoded bytes, or a struct with `bytes` and `path` as Hugging Face
                  `datasets` writes; a row without bytes is read from its path, relative to
                  the file), `label` (integers or names; null or -1 = unlabeled), optional
                  `split` (train | test | unlabeled) and `id`

Images are PNG, JPEG or WebP, decoded by Pillow: all grayscale -> 1 channel, else RGB (alpha
dropped); resized to `prepare.image_size` (bilinear, aspect not kept) or else all of one size.
Class ids are the sorted folder names, the `ClassLabel` names a Hugging Face Parquet records,
the sorted label names, or the integer labels as they are. `sources.images` splits and writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd.errors import ConfigError, InputError
from kd.prepared import metadata, open_parquet

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PRESETS = ("train", "test", "unlabeled")  # the split names a source may give
MAX_NAMED = 5  # how many offending ids an error message lists


class Images(NamedTuple):
    ids: np.ndarray  # (N,) int64
    x: np.ndarray  # (N, C*H*W) uint8, channel-first
    y: np.ndarray  # (N,) int64, -1 where unlabeled
    input_shape: list[int]  # [C, H, W]
    classes: list[str]  # class id -> name
    preset: np.ndarray | None  # (N,) str: the split each row's source names, or None


def is_image_folder(dataset: str) -> bool:
    return Path(dataset).is_dir()


def has_image_column(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        return "image" in pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return False


def load_folder(root: Path, image_size: list[int] | None) -> Images:
    """A class folder (`<class>/*`) or preset splits (`train|test|unlabeled/<class>/*`)."""
    entries = sorted(p.name for p in root.iterdir() if p.is_dir())
    preset = [e for e in entries if e in PRESETS]
    if preset and "train" not in preset:
        raise InputError(f"{root}: has {', '.join(preset)}/ but no train/ (preset splits are train/<class>/, "
                         "test/<class>/ and optionally unlabeled/)")
    if preset and set(entries) - set(PRESETS):
        raise InputError(f"{root}: mixes split folders ({', '.join(preset)}) with other folders "
                         f"({', '.join(sorted(set(entries) - set(PRESETS)))}); use one layout")
    files: list[tuple[Path, str | None, str | None]] = []  # (file, class name or None, split or None)
    if preset:
        for split in preset:
            for path in _images(root / split, flat_ok=split == "unlabeled"):
                name = None if path.parent == root / split else path.parent.name
                files.append((path, None if split == "unlabeled" else name, split))
    else:
        for path in _images(root, flat_ok=False):
            files.append((path, path.parent.name, None))
    if not files:
        raise InputError(f"{root}: no images ({', '.join(SUFFIXES)}) in class folders")
    classes = sorted({name for _, name, split in files if name is not None})
    index = {name: i for i, name in enumerate(classes)}
    y = np.array([-1 if name is None else index[name] for _, name, _ in files], np.int64)
    x, shape = decode([p.read_bytes() for p, _, _ in files], [str(p) for p, _, _ in files], image_size)
    splits = np.array([s for _, _, s in files]) if preset else None
    return Images(np.arange(len(files), dtype=np.int64), x, y, shape, classes, splits)


def _images(folder: Path, flat_ok: bool) -> list[Path]:
    """The image files of `folder/<class>/` (and of `folder/` itself where `flat_ok`), sorted."""
    found, others = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        depth = len(path.relative_to(folder).parts)
        if path.suffix.lower() in SUFFIXES and (depth == 2 or (depth == 1 and flat_ok)):
            found.append(path)
        else:
            others.append(path)
    if others:
        where = "in class folders" + (" or directly" if flat_ok else "")
        raise InputError(f"{others[0]}: not an image {where} ({', '.join(SUFFIXES)} expected); "
                         f"{len(others)} such file(s) under {folder}")
    return found


def load_parquet(path: Path, image_size: list[int] | None) -> Images:
    """A Parquet file with an encoded `image` column and a `label` column (+ `split`, `id`)."""
    table = open_parquet(path, missing="dataset file not found (prepare.dataset / --dataset)").read()
    if table.num_rows == 0:
        raise InputError(f"{path}: the dataset has no rows")
    if "label" not in table.column_names:
        raise InputError(f"{path}: no column 'label' beside 'image' (found {', '.join(table.column_names)}); "
                         "null labels mark unlabeled rows")
    ids = _ids(table, path)
    blobs = _encoded(table.column("image").combine_chunks(), ids, path)
    y, classes = _labels(table, ids, path)
    preset = None
    if "split" in table.column_names:
        column = table.column("split")
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or column.null_count:
            raise InputError(f"{path}: column 'split' must hold one of {', '.join(PRESETS)} per row "
                             f"(type {column.type}, {column.null_count} nulls)")
        preset = np.array(column.to_pylist())
        unknown = sorted(set(preset.tolist()) - set(PRESETS))
        if unknown:
            raise InputError(f"{path}: column 'split' holds {unknown}; expected {', '.join(PRESETS)} "
                             "(rename or drop the other splits' rows)")
    names = [f"{path} row {i} (id {ids[i]})" for i in range(len(ids))]
    x, shape = decode(blobs, names, image_size)
    return Images(ids, x, y, shape, classes, preset)


def _encoded(image: pa.Array, ids: np.ndarray, path: Path) -> list[bytes]:
    """Each row's encoded image: its bytes, or, where Hugging Face `datasets` stored only a path
    (`Image()` cast from paths, `load_dataset("imagefolder")`), the file's bytes. A relative path
    is taken relative to the Parquet file's folder."""
    paths = None
    if pa.types.is_struct(image.type):
        if image.type.get_field_index("bytes") < 0:
            raise InputError(f"{path}: column 'image' is a struct without 'bytes' ({image.type})")
        if image.type.get_field_index("path") >= 0:
            paths = pc.struct_field(image, "path").to_pylist()
        image = pc.struct_field(image, "bytes")
    if not (pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type)):
        raise InputError(f"{path}: column 'image' must hold encoded bytes or a struct with 'bytes', got {image.type}")
    blobs = image.to_pylist()
    missing = [row for row, blob in enumerate(blobs) if blob is None and not (paths and paths[row])]
    if missing:
        raise InputError(f"{path}: column 'image' has neither bytes nor a path in {len(missing)} rows, "
                         f"{name_ids(ids[missing])}")
    for row, blob in enumerate(blobs):
        if blob is None:
            file = path.parent / paths[row]  # an absolute path stays as it is
            try:
                blobs[row] = file.read_bytes()
            except OSError as exc:
                raise InputError(f"{path}: row {row} (id {ids[row]}) names image {file}, which cannot be read "
                                 f"({exc.strerror})") from None
    return blobs


def _ids(table: pa.Table, path: Path) -> np.ndarray:
    if "id" not in table.column_names:
        return np.arange(table.num_rows, dtype=np.int64)
    column = table.column("id")
    if not pa.types.is_integer(column.type) or column.null_count:
        raise InputError(f"{path}: column 'id' must hold integers without nulls, got {column.type} "
                         f"with {column.null_count} nulls")
    return column.to_numpy().astype(np.int64)


def _labels(table: pa.Table, ids: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    """(N,) int64 class ids (-1 where null) and the class names."""
    column = table.column("label")
    present = pc.is_valid(column).to_numpy(zero_copy_only=False)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = np.array(column.to_pylist(), dtype=object)
        classes = sorted(set(values[present].tolist()))
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[v] if v is not None else -1 for v in values], np.int64), classes
    if not pa.types.is_integer(column.type):
        raise InputError(f"{path}: column 'label' must hold integer class ids or class names, got {column.type}")
    y = pc.fill_null(column, -1).to_numpy().astype(np.int64)
    if (y < -1).any():
        raise InputError(f"{path}: labels must be >= 0, or -1 or null for unlabeled; {name_ids(ids[y < -1])} "
                         "have other negative labels")
    present &= y >= 0  # -1: unlabeled, as Hugging Face `datasets`' ClassLabel writes it
    names = _classlabel_names(table.schema)
    if names is not None:
        if present.any() and y[present].max() >= len(names):
            raise InputError(f"{path}: label {int(y[present].max())} is past the {len(names)} ClassLabel names "
                             "in the file's Hugging Face metadata")
        return y, names
    count = int(y[present].max()) + 1 if present.any() else 0
    return y, [str(i) for i in range(count)]


def _classlabel_names(schema: pa.Schema) -> list[str] | None:
    """The `label` ClassLabel names that Hugging Face `datasets` writes into the metadata."""
    try:
        features = json.loads(metadata(schema).get("huggingface", "{}")).get("info", {}).get("features", {})
        names = features.get("label", {}).get("names")
    except (json.JSONDecodeError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def decode(blobs: list[bytes], names: list[str], image_size: list[int] | None) -> tuple[np.ndarray, list[int]]:
    """(N, C*H*W) uint8 channel-first pixels and [C, H, W] from encoded images."""
    from PIL import Image, UnidentifiedImageError

    def open_image(row: int) -> Image.Image:
        try:
            return Image.open(io.BytesIO(blobs[row]))  # reads the header only
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{names[row]}: not a readable image ({exc})") from None

    headers = [(image.mode, image.size) for image in map(open_image, range(len(blobs)))]
    gray = all(mode in ("1", "L", "I;16", "I", "F") for mode, _ in headers)
    if image_size is None:
        first = headers[0][1]
        other = next((i for i, (_, size) in enumerate(headers) if size != first), None)
        if other is not None:
            size = headers[other][1]
            raise ConfigError(f"{names[other]}: {size[0]}x{size[1]} differs from {names[0]}'s {first[0]}x{first[1]} "
                              "(width x height); set prepare.image_size to resize them all")
        width, height = first
    else:
        height, width = image_size
    channels = 1 if gray else 3
    x = np.empty((len(blobs), channels * height * width), np.uint8)
    for row in range(len(blobs)):  # decoded one at a time: only the uint8 pixels are kept
        try:
            image = open_image(row).convert("L" if gray else "RGB")
        except OSError as exc:
            raise InputError(f"{names[row]}: not a readable image ({exc})") from None
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, np.uint8).reshape(height, width, channels)
        x[row] = pixels.transpose(2, 0, 1).reshape(-1)  # HWC -> CHW
    return x, [channels, height, width]


def name_ids(ids: np.ndarray) -> str:
    """How an error names offending rows: "ids 3, 7, 9" (the first MAX_NAMED, then how many more)."""
    shown = ", ".join(str(int(i)) for i in ids[:MAX_NAMED])
    return f"ids {shown}" + (f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else "")
