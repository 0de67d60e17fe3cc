"""Resuming and sharding `kd label`: the progress records, their merge, and the locks.

A single `kd label` keeps its progress in the manifest itself (`complete` false until the last
part), and `resume_or_start` continues it if its key still matches, else clears the cache.
Shard I of N keeps its own record (`layout.shard_record`, shaped like the manifest but listing
its parts only) under its own lock; `merge` combines the records into the manifest once all are
complete, the one a single process writes. Every part a record lists is checked intact
(`parts_present`) before it is trusted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kd.cache.layout import FEATURES, MANIFEST, SHARDS, SOFT_TARGETS, TEACHER_COPY, chunks_sha256, shard_record
from kd.cache.manifest import SCHEMA_VERSION, part_problem, read_manifest
from kd.cache.store import Store
from kd.cache.targets import finish
from kd.errors import CacheError, InputError, MissingInputError, StaleCacheError


def locked(out: str | Path, name: str = ".lock"):
    """Hold an exclusive lock on the cache (local disks); a second writer fails at once."""
    return Store(out).lock(name)


def resume_or_start(store: Store, key: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue from: the existing one if its key matches, else a new one."""
    try:
        existing = read_manifest(store)
    except (MissingInputError, CacheError, InputError):
        existing = None
    if existing is not None and existing.get("key") == key:
        if parts_present(store, existing):
            return existing
    # Different teacher, data or parameters (or a damaged cache): start again from nothing.
    for name in (SOFT_TARGETS, FEATURES, SHARDS, TEACHER_COPY, MANIFEST):
        store.delete(name)
    return {"schema_version": SCHEMA_VERSION, "key": key, "complete": False}


def resume_shard(store: Store, record: str, key: dict[str, Any]) -> dict[str, Any]:
    """This shard's progress record to continue from, or a new one."""
    try:
        existing = read_manifest(store, record)
    except (MissingInputError, CacheError, InputError):
        existing = None
    if existing is not None and existing.get("key") == key and parts_present(store, existing):
        return existing
    return {"schema_version": SCHEMA_VERSION, "key": key, "complete": False}


def parts_present(store: Store, manifest: dict[str, Any]) -> bool:
    """Every part the manifest lists is intact, its Zarr chunks included."""
    for info in manifest.get("splits", {}).values():
        for part in info["parts"]:
            if part_problem(store, part) is not None:
                return False
            for layer, digest in part.get("features", {}).items():
                if chunks_sha256(store, manifest, part["split"], layer, part["first_row"], part["rows"]) != digest:
                    return False
    return True


def finished(store: Store, key: dict[str, Any], num_shards: int) -> dict[str, Any] | None:
    """The manifest if the cache is already complete with this key; refuses another cache's
    leftovers, which a shard cannot remove while other shards may be writing."""
    try:
        existing = read_manifest(store)
    except (MissingInputError, CacheError, InputError):
        existing = None
    if existing is not None and existing.get("complete") and existing.get("key") == key \
            and parts_present(store, existing):
        return existing
    if existing is not None:
        raise StaleCacheError(f"{store.show()}: holds a cache of another teacher, data or parameters (or a damaged "
                              "one); a shard does not remove it while others may be writing: remove it, or label "
                              "into another --out")
    for rel in store.files(SHARDS):
        if not rel.endswith(f"-of-{num_shards:05d}.json"):
            raise StaleCacheError(f"{store.show(rel)}: a shard of a run with another --num-shards; remove "
                                  f"{store.show()} or label into another --out")
        other = store.read_json(rel)
        if isinstance(other, dict) and other.get("key") != key:
            raise StaleCacheError(f"{store.show(rel)}: a shard of another teacher, data or parameters; remove "
                                  f"{store.show()} or label into another --out")
    return None


def merge(out: str | Path, num_shards: int | None = None, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """Combine the records of a sharded `kd label` into the manifest, once every shard is done.

    The manifest lists every part in order and aggregates the same per-part sums, so it is
    byte for byte what a single process writes. Safe to run twice at once (both write the
    same manifest, atomically). With `missing_ok`, returns None instead of raising while
    some shard is not finished.
    """
    store = Store(out)
    names = [rel for rel in store.files(SHARDS) if rel.endswith(".json")]
    if not names:
        if (merged := _merged(store)) is not None:
            return merged
        raise MissingInputError(f"{store.show(SHARDS)}: no shard records to merge (run `kd label --shard I "
                                "--num-shards N` first)")
    counts = {int(rel.rsplit("-of-", 1)[1].removesuffix(".json")) for rel in names}
    if len(counts) > 1 or (num_shards is not None and counts != {num_shards}):
        raise CacheError(f"{store.show(SHARDS)}: records of other shard counts ({', '.join(names)}); "
                         "remove the cache and label it again with one --num-shards")
    num_shards = counts.pop()
    records, waiting = [], []
    for i in range(num_shards):
        try:
            record = read_manifest(store, shard_record(i, num_shards))
        except MissingInputError:
            record = None
        if record is None or not record.get("complete"):
            waiting.append(i)
        records.append(record)
    if waiting:
        if (merged := _merged(store)) is not None:
            return merged  # another shard merged while these records were read
        if missing_ok:
            return None
        raise CacheError(f"{store.show(SHARDS)}: shards {', '.join(map(str, waiting))} of {num_shards} are not "
                         "finished; run `kd label --shard I --num-shards N` for each, then merge")
    keys = {json.dumps(r["key"], sort_keys=True) for r in records}
    if len(keys) > 1:
        raise StaleCacheError(f"{store.show(SHARDS)}: the shards were labeled by different teachers, data or "
                              "parameters; remove the cache and label it again")
    manifest = records[0]
    for split, info in manifest["splits"].items():
        parts = [p for r in records for p in r["splits"][split]["parts"]]
        info["parts"] = sorted(parts, key=lambda p: p["index"])
        expected = math.ceil(info["samples"] / manifest["label"]["part_size"])
        if [p["index"] for p in info["parts"]] != list(range(expected)):
            raise CacheError(f"{store.show(SHARDS)}: split {split} has parts {[p['index'] for p in info['parts']]} "
                             f"across the shards, expected 0..{expected - 1}")
    for info in manifest["splits"].values():
        for part in info["parts"]:
            problem = part_problem(store, part)
            if problem:
                raise CacheError(f"{problem}; run that shard's `kd label` again")
    manifest["complete"] = False
    finish(manifest)
    store.write_json(MANIFEST, manifest, shared=True)
    store.delete(SHARDS)
    return manifest


def _merged(store: Store) -> dict[str, Any] | None:
    """The manifest if the cache is complete (already merged), else None."""
    if not store.is_file(MANIFEST):
        return None
    manifest = read_manifest(store)
    return manifest if manifest.get("complete") else None
