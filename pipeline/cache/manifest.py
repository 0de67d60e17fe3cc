"""The cache's manifest: what produced the cache, and which parts are complete.

Layout of a cache directory (see the README for the column-level schema):

    manifest.json
    soft_targets/split=<split>/part-<n>.parquet
    features.zarr/<split>/<layer>, features.zarr/<split>/id

The manifest is data, never code: every path in it is checked to stay inside the cache
directory before it is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import CacheError, MissingInputError
from pipeline.files import file_sha256, read_json, write_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.zarr"


def lse_column(temperature: float) -> str:
    """`lse_t4` for 4 or 4.0, `lse_t2_5` for 2.5: the temperature as written in params."""
    t = float(temperature)
    text = str(int(t)) if t.is_integer() else repr(t)
    return "lse_t" + text.replace(".", "_")


def part_path(split: str, index: int) -> str:
    return f"soft_targets/split={split}/part-{index:05d}.parquet"


def feature_path(split: str, layer: str) -> str:
    return f"{FEATURES}/{split}/{layer}"


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        hint = " (run `kd label` to build it)" if Path(root).is_dir() or not Path(root).exists() else ""
        raise MissingInputError(f"{path}: cache manifest not found{hint}")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise CacheError(f"{path}: not a cache manifest (no schema_version)")
    version = manifest["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CacheError(
            f"{path}: schema_version {version!r} is newer than this kd understands ({SCHEMA_VERSION}); upgrade kd"
        )
    for split, info in manifest.get("splits", {}).items():
        for part in info.get("parts", []):
            safe_path(root, part.get("path", ""))
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(Path(root) / MANIFEST, manifest)


def safe_path(root: Path, relative: str) -> Path:
    """`root / relative`, refusing absolute paths, `..` and symlinks that leave the cache."""
    root = Path(root)
    rel = Path(relative)
    if not relative or rel.is_absolute() or ".." in rel.parts:
        raise CacheError(f"{root / MANIFEST}: part path {relative!r} is not inside the cache")
    full = root / rel
    if full.exists() and not full.resolve().is_relative_to(root.resolve()):
        raise CacheError(f"{root / MANIFEST}: part path {relative!r} is a link leaving the cache")
    return full


def part_problem(root: Path, part: dict[str, Any]) -> str | None:
    """What is wrong on disk with one Parquet part the manifest lists, or None if it is intact:
    missing, a size or a sha256 other than recorded. (Training, resuming and verify all ask.)"""
    path = safe_path(root, part["path"])
    if not path.is_file():
        return f"{path}: listed in the manifest but missing"
    size = path.stat().st_size
    if size != part["bytes"]:
        return f"{path}: {size} bytes, the manifest says {part['bytes']}"
    if file_sha256(path) != part["sha256"]:
        return f"{path}: sha256 differs from the manifest (corrupt or modified)"
    return None
