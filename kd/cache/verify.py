"""Full integrity check of a cache (`kd cache verify`) and its summary (`kd cache info`).

`verify` hashes every part and every Zarr chunk against the manifest, checks each part's
schema, row count, (id, view) order and finiteness, that the files on disk are exactly the
ones the manifest lists, and that the Zarr `id` arrays equal the Parquet ids row for row.
It returns a list of problems, one line each; an empty list means intact.

What a row holds besides (id, view) and how a sample's rows are ordered depend on the task
that wrote the cache: the caller hands `verify` (and `format_info`) the task of a manifest
(`kd.tasks.for_manifest`), asked only what `RowRules` lists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd.cache import encoding as encodings
from kd.cache import sampling
from kd.cache.layout import (
    FEATURES,
    MANIFEST,
    SOFT_TARGETS,
    chunks_sha256,
    feature_path,
    lse_column,
    rows_per_sample,
    sample_columns,
    sample_starts,
)
from kd.cache.manifest import part_problem, read_manifest
from kd.cache.reader import fixed_list
from kd.cache.store import Store
from kd.errors import KDError


class RowRules(Protocol):
    """What `verify` and `format_info` ask the task of a cache (a `kd.tasks` module)."""

    ROW_COLUMNS: tuple[str, ...]  # its int32 columns between `view` and the soft targets

    def check_rows(self, path: str, table: pa.Table, manifest: dict[str, Any], views: int | None) -> list[str]:
        """The problems with the order of the rows of a part (`views`: rows per sample, None where it varies)."""

    def rows_description(self, summary: dict[str, Any]) -> str:
        """What one row of a token cache is (`info`'s summary), for `format_info`."""


def verify(root: str | Path, task_of: Callable[[dict[str, Any]], RowRules]) -> list[str]:
    try:
        store = Store(root)
        manifest = read_manifest(store)
    except KDError as exc:
        return [str(exc)]
    problems: list[str] = []
    if not manifest.get("complete"):
        problems.append(f"{root}: cache is incomplete (interrupted `kd label`); run `kd label` to finish it")
    for key in ("teacher", "num_classes", "top_k", "temperatures", "logit_dtype", "features", "views", "splits"):
        if key not in manifest:
            problems.append(f"{store.show(MANIFEST)}: missing key {key!r}")
    if problems:
        return problems
    listed = set()
    for split, info in manifest["splits"].items():
        problems += _verify_split(store, manifest, split, info, task_of(manifest))
        listed |= {p["path"] for p in info["parts"]}
    for extra in sorted(set(store.files(SOFT_TARGETS)) - listed):
        problems.append(f"{store.show(extra)}: file not listed in the manifest")
    for rel, digest in manifest.get("teacher_files", {}).items():
        if not store.is_file(store.safe(rel)):
            problems.append(f"{store.show(rel)}: the teacher's copy is missing")
        elif store.sha256(rel) != digest:
            problems.append(f"{store.show(rel)}: sha256 differs from the manifest (the teacher's copy changed)")
    return problems


def _verify_split(store: Store, manifest: dict[str, Any], split: str, info: dict[str, Any],
                  task: RowRules) -> list[str]:
    problems: list[str] = []
    views = rows_per_sample(manifest)
    part_rows = None if views is None else manifest["label"]["part_size"] * views
    expected_parts = math.ceil(info["samples"] / manifest["label"]["part_size"])
    rows = info["samples"] * views if views is not None else sum(p["rows"] for p in info["parts"])
    if len(info["parts"]) != expected_parts or info["rows"] != rows:
        problems.append(f"{store.show(MANIFEST)}: split {split} lists {len(info['parts'])} parts "
                        f"for {info['samples']} samples, expected {expected_parts}")
    ids_by_part = []
    next_row = 0
    for index, part in enumerate(info["parts"]):
        try:
            rel = store.safe(part["path"])
        except KDError as exc:
            problems.append(str(exc))
            continue
        if part["first_row"] != next_row or (part_rows and index < expected_parts - 1 and part["rows"] != part_rows):
            problems.append(f"{store.show(MANIFEST)}: part {part['path']} covers rows "
                            f"{part['first_row']}..{part['first_row'] + part['rows']}, expected to start at {next_row}")
        next_row = part["first_row"] + part["rows"]
        problem = part_problem(store, part)
        if problem:
            problems.append(problem)
            continue
        try:
            table = pq.read_table(store.full(rel), filesystem=store.fs)
        except (pa.ArrowException, OSError) as exc:
            problems.append(f"{store.show(rel)}: unreadable Parquet ({exc})")
            continue
        problems += _check_table(store.show(rel), table, manifest, part, views, task)
        ids_by_part.append(table["id"].to_numpy())
        for layer, digest in part.get("features", {}).items():
            got = chunks_sha256(store, manifest, split, layer, part["first_row"], part["rows"])
            if got.startswith("missing:"):
                problems.append(f"{store.show(got.removeprefix('missing:'))}: Zarr chunk missing")
            elif got != digest:
                problems.append(f"{store.show(feature_path(split, layer))}: chunks of rows {part['first_row']}.."
                                f"{part['first_row'] + part['rows']} differ from the manifest (corrupt or modified)")
    if manifest["features"] and ids_by_part and not any("Zarr" in p or "differ" in p for p in problems):
        problems += _check_alignment(store, manifest, split, info, np.concatenate(ids_by_part))
    return problems


def _check_table(path: str, table: pa.Table, manifest: dict[str, Any], part: dict[str, Any], views: int | None,
                 task: RowRules) -> list[str]:
    k = manifest["top_k"]
    encoding = encodings.of(manifest)
    stored = encodings.columns(encoding)
    expected = ["id", "view", *task.ROW_COLUMNS, *stored, "logit_max", *map(lse_column, manifest["temperatures"])]
    draws = (manifest.get("sampling") or {}).get("draws")
    if draws:
        expected += [name for t in manifest["temperatures"] for name in sample_columns(t)]
    if table.column_names != expected:
        return [f"{path}: columns {table.column_names}, expected {expected}"]
    if table.num_rows != part["rows"]:
        return [f"{path}: {table.num_rows} rows, the manifest says {part['rows']}"]
    problems = task.check_rows(path, table, manifest, views)
    ids = table["id"].to_numpy()
    if (len(np.unique(ids)) != sample_starts(ids).sum()
            or (views and not (ids.reshape(-1, views) == ids[::views, None]).all())):
        problems.append(f"{path}: rows of one sample are not together")
    columns = {name: fixed_list(table[name], k) for name in stored}
    if encoding["name"] == "compact":
        if (columns["topk_gap"][:, 1:] == 0).any():
            problems.append(f"{path}: topk_gap holds a 0 after the first entry (ids repeat)")
        if ((columns["topk_code"] == 0).sum(1) != 1).any():
            problems.append(f"{path}: topk_code has not exactly one 0 (the top entry) per row")
    idx, logits = encodings.decode(columns, encoding)
    if idx.size and (idx.min() < 0 or idx.max() >= manifest["num_classes"]):
        problems.append(f"{path}: topk_idx outside [0, {manifest['num_classes']})")
    logits = logits.astype(np.float32)
    floats = {"topk_logit": logits, "logit_max": table["logit_max"].to_numpy()}
    floats |= {name: table[name].to_numpy() for name in expected if name.startswith("lse_")}
    for name, values in floats.items():
        bad = ~np.isfinite(values).reshape(len(ids), -1).all(1)
        if bad.any():
            problems.append(f"{path}: NaN or Inf in {name} (ids {ids[bad][:5].tolist()})")
    if logits.size and (logits[:, 0] != 0).any():
        problems.append(f"{path}: topk_logit does not start at 0 (not max-shifted)")
    if draws:
        for t in manifest["temperatures"]:
            problems += _check_samples(path, table, t, draws, manifest["num_classes"], ids)
    return problems


def _check_samples(path: str, table: pa.Table, t: float, draws: int, num_classes: int, ids: np.ndarray) -> list[str]:
    """A temperature's sampled columns: counts >= 1 summing to the draws, classes in range and
    ascending (distinct), one count per class, a finite entropy >= 0."""
    idx_name, count_name, entropy_name = sample_columns(t)
    lengths = table[idx_name].combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, table[count_name].combine_chunks().value_lengths().to_numpy(zero_copy_only=False)):
        return [f"{path}: {idx_name} and {count_name} differ in length on some row"]
    if len(lengths) and (lengths.min() < 1 or lengths.max() > draws):
        return [f"{path}: {idx_name} holds rows of {lengths.min()}..{lengths.max()} classes, expected 1..{draws}"]
    classes, counts = sampling.from_arrow(table[idx_name], table[count_name], draws)
    kept = np.arange(draws) < lengths[:, None]
    problems = []
    if (counts.sum(1) != draws).any():
        bad = ids[counts.sum(1) != draws][:5].tolist()
        problems.append(f"{path}: {count_name} does not sum to label.sampling = {draws} (ids {bad})")
    if (counts[kept] < 1).any():
        problems.append(f"{path}: {count_name} holds a 0")
    if classes.size and (classes.max() >= num_classes):
        problems.append(f"{path}: {idx_name} outside [0, {num_classes})")
    if (np.diff(classes, axis=1)[kept[:, 1:]] <= 0).any():
        problems.append(f"{path}: {idx_name} not strictly ascending within a row (a class repeats)")
    entropy = table[entropy_name].to_numpy()
    if not (np.isfinite(entropy) & (entropy >= 0)).all():
        problems.append(f"{path}: {entropy_name} not a finite entropy >= 0 (ids {ids[~(entropy >= 0)][:5].tolist()})")
    return problems


def _check_alignment(store: Store, manifest: dict[str, Any], split: str, info: dict[str, Any],
                     parquet_ids: np.ndarray) -> list[str]:
    import zarr

    problems = []
    ids = f"{FEATURES}/{split}/id"
    try:
        zarr_ids = zarr.open_array(store.zarr(ids, read_only=True), mode="r")[:]
    except Exception as exc:  # any failure to open is a finding, not a crash
        return [f"{store.show(ids)}: unreadable ({exc})"]
    if not np.array_equal(zarr_ids, parquet_ids):
        problems.append(f"{store.show(f'{FEATURES}/{split}')}: Zarr ids are not aligned row for row with the "
                        "Parquet parts")
    for spec in manifest["features"]:
        rel = feature_path(split, spec["name"])
        try:
            shape = zarr.open_array(store.zarr(rel, read_only=True), mode="r").shape
        except Exception as exc:
            problems.append(f"{store.show(rel)}: unreadable ({exc})")
            continue
        if list(shape) != [info["rows"], *spec["shape"]]:
            problems.append(f"{store.show(rel)}: shape {list(shape)}, "
                            f"expected {[info['rows'], *spec['shape']]}")
    return problems


def in_order(path: str, table: pa.Table, column: str, per_sample: int) -> list[str]:
    """The problem, if any, with `column` not counting 0..per_sample-1 within every sample."""
    inner = table[column].to_numpy()
    if np.array_equal(inner, np.tile(np.arange(per_sample), len(inner) // per_sample)):
        return []
    return [f"{path}: {column} column out of order (expected 0..{per_sample - 1} per sample)"]


def info(root: str | Path) -> dict[str, Any]:
    """A summary of the cache for humans and machines (no hashing)."""
    store = Store(root)
    manifest = read_manifest(store)
    size = store.total_bytes()
    teacher = manifest.get("teacher", {})
    return {
        "path": str(root),
        "schema_version": manifest["schema_version"],
        "complete": manifest.get("complete", False),
        "teacher": {"fingerprint": teacher.get("fingerprint"), "arch": teacher.get("config", {}).get("arch"),
                    "params": teacher.get("config", {}).get("params")},
        "num_classes": manifest.get("num_classes"),
        "top_k": manifest.get("top_k"),
        "temperatures": manifest.get("temperatures"),
        "logit_dtype": manifest.get("logit_dtype"),
        "views": manifest.get("views"),
        "text": manifest.get("text"),
        "features": manifest.get("features"),
        "encoding": encodings.of(manifest),
        "sampling": manifest.get("sampling"),
        "splits": {s: {"samples": i["samples"], "rows": i["rows"], "parts": len(i["parts"]),
                       "bytes_per_row": _bytes_per_row(i["parts"])}
                   for s, i in manifest.get("splits", {}).items()},
        "fidelity": manifest.get("fidelity"),
        "bytes": size,
    }


def _bytes_per_row(parts: list[dict[str, Any]]) -> float:
    """The soft targets' Parquet bytes per written row (the features' Zarr arrays not counted)."""
    rows = sum(p["rows"] for p in parts)
    return sum(p["bytes"] for p in parts) / rows if rows else 0.0


def format_info(summary: dict[str, Any], task_of: Callable[[dict[str, Any]], RowRules]) -> str:
    """`info`'s summary for humans; `task_of` as for `verify` (a token cache's rows line)."""
    lines = [
        f"cache {summary['path']} (schema {summary['schema_version']}"
        f"{'' if summary['complete'] else ', INCOMPLETE'}, {summary['bytes'] / 1e6:.1f} MB)",
        f"teacher  {summary['teacher']['arch']} ({summary['teacher']['params']} params) "
        f"sha256 {str(summary['teacher']['fingerprint'])[:16]}",
        f"soft     top-{summary['top_k']} of {summary['num_classes']} classes, "
        + (summary["logit_dtype"] if summary["encoding"]["name"] == "topk" else encodings.describe(summary["encoding"]))
        + f", temperatures {summary['temperatures']}",
        f"views    {summary['views']['count']} augmented per sample ({summary['views']['recipe']['name']}, "
        + "".join(f"{k} {v}, " for k, v in summary["views"]["recipe"].items() if k != "name")
        + f"seed {summary['views']['seed']})",
    ]
    if summary.get("text"):  # a token cache: what one row is replaces the views line
        lines[3] = "rows     " + task_of(summary).rows_description(summary)
    if summary.get("sampling"):
        lines[2] += (f"; {summary['sampling']['draws']} tokens drawn from the teacher per row and temperature "
                     f"(seed {summary['sampling']['seed']})")
    for spec in summary["features"] or []:
        lines.append(f"feature  {spec['name']}: {spec['mode']} {spec['shape']} {spec['dtype']}")
    for split, s in summary["splits"].items():
        line = (f"split    {split}: {s['samples']} samples, {s['rows']} rows, {s['parts']} parts, "
                f"{s['bytes_per_row']:.1f} B/row")
        fid = (summary.get("fidelity") or {}).get(split)
        if fid:
            acc = fid.get("teacher_accuracy")
            per_t = [f"{t}: kept {v['kept_mass']:.4f}, KL {v['kl_full_to_cached']:.2e}"
                     + (f", drawn {v['sampled_mass']:.4f}, KL {v['kl_full_to_sampled']:.2e}"
                        if "sampled_mass" in v else "")
                     for t, v in fid.items() if isinstance(v, dict)]
            line += f"; teacher acc {acc:.4f}" if acc is not None else ""
            line += f", loss {fid['teacher_loss']:.4f}" if fid.get("teacher_loss") is not None else ""
            line += "; " + "; ".join(per_t)
        lines.append(line)
    return "\n".join(lines)
