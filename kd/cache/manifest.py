"""The cache's manifest: what produced the cache, and which parts are complete.

The layout of a cache directory is in `layout` (the column-level schema in the README).

The manifest is data, never code: every path in it is checked to stay inside the cache
before it is opened. A sharded `kd label` keeps one progress record per shard, shaped like
the manifest but listing that shard's parts only; merging them gives the manifest.
"""

from __future__ import annotations

from typing import Any

from kd.cache.layout import MANIFEST
from kd.cache.store import Store
from kd.errors import CacheError, MissingInputError

SCHEMA_VERSION = 3  # the newest this kd reads: 1 = topk encoding, 2 = compact (`encoding.SCHEMA_VERSIONS`),
# 3 = with sampled targets (`sampling.SCHEMA_VERSION`)


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
            f"{store.show(name)}: schema_version {version!r} is newer than this kd understands "
            f"({SCHEMA_VERSION}); upgrade kd"
        )
    for info in manifest.get("splits", {}).values():
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
