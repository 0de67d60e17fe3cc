"""The cache's manifest: what produced the cache, and which parts are complete.

Layout of a cache directory (see the README for the column-level schema):

    manifest.json
    soft_targets/split=<split>/part-<n>.parquet
    features.zarr/<split>/<layer>, features.zarr/<split>/id
    shards/shard-<i>-of-<n>.json   (only while a sharded `kd label` runs)

The manifest is data, never code: every path in it is checked to stay inside the cache
before it is opened. A sharded `kd label` keeps one progress record per shard, shaped like
the manifest but listing that shard's parts only; merging them gives the manifest.
"""

from __future__ import annotations

from typing import Any

from pipeline.cache.store import Store
from pipeline.errors import CacheError, MissingInputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.zarr"
SHARDS = "shards"
TEACHER_COPY = "teacher"  # label.keep_teacher: the teacher's weights and config, for students that start from them


def lse_column(temperature: float) -> str:
    """`lse_t4` for 4 or 4.0, `lse_t2_5` for 2.5: the temperature as written in params."""
    t = float(temperature)
    text = str(int(t)) if t.is_integer() else repr(t)
    return "lse_t" + text.replace(".", "_")


def part_path(split: str, index: int) -> str:
    return f"soft_targets/split={split}/part-{index:05d}.parquet"


def feature_path(split: str, layer: str) -> str:
    return f"{FEATURES}/{split}/{layer}"


def rows_per_sample(manifest: dict[str, Any]) -> int:
    """Cache rows per prepared sample: 1 + its augmented views, a block's predicted tokens, or
    its masked positions in every masking (view) of it."""
    text = manifest.get("text")
    return (text["positions"] if text else 1) * (manifest["views"]["count"] + 1)


def shard_record(shard: int, num_shards: int) -> str:
    return f"{SHARDS}/shard-{shard:05d}-of-{num_shards:05d}.json"


def read_manifest(store: Store, name: str = MANIFEST) -> dict[str, Any]:
    """The manifest (or a shard's progress record, `name`) of the cache in `store`, checked:
    a known schema version and part paths that stay inside the cache."""
    if not store.is_file(name):
        hint = " (run `kd label` to build it)" if name == MANIFEST else ""
        raise MissingInputError(f"{store.show(name)}: cache manifest not found{hint}")
    manifest = store.read_json(name)
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise CacheError(f"{store.show(name)}: not a cache manifest (no schema_version)")
    version = manifest["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CacheError(
            f"{store.show(name)}: schema_version {version!r} is newer than this kd understands ({SCHEMA_VERSION}); upgrade kd"
        )
    for split, info in manifest.get("splits", {}).items():
        for part in info.get("parts", []):
            store.safe(part.get("path", ""), name)
    return manifest


def part_problem(store: Store, part: dict[str, Any]) -> str | None:
    """What is wrong with one Parquet part the manifest lists, or None if it is intact:
    missing, a size or a sha256 other than recorded. (Training, resuming and verify all ask.)"""
    rel = store.safe(part["path"])
    size = store.size(rel)
    if size is None:
        return f"{store.show(rel)}: listed in the manifest but missing"
    if size != part["bytes"]:
        return f"{store.show(rel)}: {size} bytes, the manifest says {part['bytes']}"
    if store.sha256(rel) != part["sha256"]:
        return f"{store.show(rel)}: sha256 differs from the manifest (corrupt or modified)"
    return None
