"""Writing the cache: the teacher runs once over every split, part by part.

For each split, samples are cut into parts of `part_size` samples; a part holds every view
of its samples (rows sample-major: sample 0 view 0..V, sample 1 view 0..V, ...). A part's
Parquet file is written under a temporary name and renamed when complete; its Zarr rows
fill whole chunks that no other part touches. After each part the manifest is rewritten
(atomically) with the part's sha256s and fidelity sums, so an interrupted `kd label`
resumes at the first missing part and ends with the same bytes as an uninterrupted run.
Memory holds one Parquet row group and one Zarr chunk per layer, whatever the split size.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from torch import nn
from tqdm import tqdm
from zarr.codecs import ZstdCodec

from pipeline import augment, data, features
from pipeline.cache.manifest import (FEATURES, SCHEMA_VERSION, feature_path, lse_column, part_path,
                                     part_problem, read_manifest, write_manifest)
from pipeline.config import SPLITS, LabelConfig, as_dict
from pipeline.errors import CacheError, ConfigError, InputError, MissingInputError
from pipeline.files import file_sha256

ROW_GROUP_ROWS = 16384
CHUNK_BYTES = 4 << 20  # target Zarr chunk size before compression
FLOAT16_MIN = float(np.finfo(np.float16).min)


@dataclass
class Teacher:
    """A loaded teacher and what identifies it."""

    model: nn.Module
    fingerprint: str
    config: dict[str, Any]


def soft_targets(logits: torch.Tensor, top_k: int, temperatures: list[float], dtype: str) -> dict[str, np.ndarray]:
    """The cache columns for a batch of logits (N, C): top-k of the max-shifted logits and lse per T."""
    logits = logits.float()
    logit_max = logits.max(dim=1).values
    shifted = logits - logit_max[:, None]
    topk_logit, topk_idx = shifted.topk(top_k, dim=1, sorted=True)
    if dtype == "float16":
        topk_logit = topk_logit.clamp(min=FLOAT16_MIN)  # never -inf in float16
    columns = {
        "topk_idx": topk_idx.to(torch.int32).numpy(),
        "topk_logit": topk_logit.to(getattr(torch, dtype)).numpy(),
        "logit_max": logit_max.numpy(),
    }
    for t in temperatures:
        columns[lse_column(t)] = torch.logsumexp(shifted / float(t), dim=1).numpy()
    return columns


def fidelity_sums(logits: torch.Tensor, cols: dict[str, np.ndarray], temperatures: list[float]) -> dict[str, float]:
    """Per-row sums for the fidelity statistics of one batch (view-0 rows only).

    kept mass = sum of the cached top-k probabilities; KL(full || cached) compares the
    teacher's full softmax with the cached top-k probabilities plus the tail mass spread
    evenly over the other classes (the least-informative completion of what is kept).
    """
    z = logits.float()
    num_classes = z.shape[1]
    idx = torch.tensor(cols["topk_idx"], dtype=torch.long)
    kept_logit = torch.tensor(cols["topk_logit"], dtype=torch.float32)
    k = idx.shape[1]
    sums: dict[str, float] = {}
    for t in temperatures:
        lse = torch.tensor(cols[lse_column(t)])
        p_full = torch.softmax(z / float(t), dim=1)
        p_kept = torch.exp(kept_logit / float(t) - lse[:, None])
        kept = p_kept.sum(1)
        tail = (1 - kept).clamp(min=0)
        approx = torch.full_like(p_full, 0.0)
        if k < num_classes:
            approx += (tail / (num_classes - k))[:, None]
        approx.scatter_(1, idx, p_kept)
        kl = torch.xlogy(p_full, p_full).sum(1) - torch.xlogy(p_full, approx.clamp(min=1e-30)).sum(1)
        name = lse_column(t).removeprefix("lse_")
        sums[f"kept_mass_{name}"] = float(kept.sum())
        sums[f"kl_{name}"] = float(kl.clamp(min=0).sum())
    return sums


def cache_key(teacher: Teacher, fingerprints: dict[str, str], cfg: LabelConfig) -> dict[str, Any]:
    """Everything that decides the cache's content. Same key -> same bytes."""
    return {
        "teacher": teacher.fingerprint,
        "data": fingerprints,
        "label": as_dict(cfg),
        "torch": torch.__version__.split("+")[0],
    }


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache directory; a second writer fails at once."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CacheError(f"{out}: another `kd label` is writing this cache (lock {out / '.lock'} is held)") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def label(teacher: Teacher, prepared: Path, out: Path, cfg: LabelConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the teacher over the prepared splits into the cache at `out`; resume if possible.

    Returns the final manifest. An intact cache with the same key is left as is.
    """
    splits = [s for s in SPLITS if (prepared / f"{s}.parquet").is_file()]
    for required in ("labeled", "test"):
        if required not in splits:
            raise MissingInputError(f"{prepared / f'{required}.parquet'}: not found (run `kd prepare`)")
    infos = {s: data.split_info(prepared / f"{s}.parquet") for s in splits}
    fingerprints = {s: data.data_fingerprint(prepared / f"{s}.parquet") for s in splits}
    key = cache_key(teacher, fingerprints, cfg)
    model = teacher.model.eval()
    input_shape = infos["labeled"]["input_shape"]
    num_classes, specs = plan(model, input_shape, cfg)  # every check before anything is touched
    with locked(out):
        manifest = _resume_or_start(out, key)
        if manifest.get("complete"):
            return manifest
        if manifest.get("num_classes") is None:
            _start(out, manifest, num_classes, specs, infos, fingerprints, cfg, teacher)
        total = sum(info["rows"] * (cfg.views + 1) for info in manifest["splits"].values())
        done = sum(p["rows"] for info in manifest["splits"].values() for p in info["parts"])
        bar = tqdm(total=total, initial=done, unit="rows", desc="kd label", disable=not progress)
        for split in splits:
            info = manifest["splits"][split]
            n_parts = math.ceil(infos[split]["rows"] / cfg.part_size)
            for index in range(len(info["parts"]), n_parts):
                part = _write_part(out, manifest, model, prepared / f"{split}.parquet", split, index,
                                   input_shape, cfg, bar)
                info["parts"].append(part)
                write_manifest(out, manifest)
        bar.close()
        _finish(manifest)
        write_manifest(out, manifest)
    return manifest


def _resume_or_start(out: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue from: the existing one if its key matches, else a new one."""
    try:
        existing = read_manifest(out)
    except (MissingInputError, CacheError, InputError):
        existing = None
    if existing is not None and existing.get("key") == key:
        if _parts_present(out, existing):
            return existing
    # Different teacher, data or parameters (or a damaged cache): start again from nothing.
    for name in ("soft_targets", FEATURES, "manifest.json"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return {"schema_version": SCHEMA_VERSION, "key": key, "complete": False}


def _parts_present(out: Path, manifest: dict[str, Any]) -> bool:
    """Every part the manifest lists is intact on disk, its Zarr chunks included."""
    for info in manifest.get("splits", {}).values():
        for part in info["parts"]:
            if part_problem(out, part) is not None:
                return False
            for layer, digest in part.get("features", {}).items():
                if chunks_sha256(out, manifest, part["split"], layer, part["first_row"], part["rows"]) != digest:
                    return False
    return True


def plan(model: nn.Module, input_shape: list[int], cfg: LabelConfig) -> tuple[int, list[dict[str, Any]]]:
    """The number of classes and the feature specs, from one probe forward pass.

    Raises ConfigError naming the `label` key for a layer the teacher lacks, a mode the
    layer cannot give, or a top_k larger than the number of classes.
    """
    probe = torch.zeros(1, *input_shape)
    specs = []
    with torch.no_grad():
        for layer in cfg.features:
            try:
                features.find_module(model, layer)
            except ConfigError as exc:
                raise ConfigError(f"label.features.{layer}: {exc}") from None
        with features.tap(model, list(cfg.features)) as captured:
            logits = model(probe)
        for layer, mode in cfg.features.items():
            try:
                shape = list(features.reduce(captured[layer], mode).shape[1:])
            except ConfigError as exc:
                raise ConfigError(f"label.features.{layer}: {exc}") from None
            specs.append({"name": layer, "mode": mode, "shape": shape, "dtype": "float16",
                          "source_shape": list(captured[layer].shape[1:])})
    num_classes = int(logits.shape[1])
    if cfg.top_k > num_classes:
        raise ConfigError(f"label.top_k: {cfg.top_k} is more than the teacher's {num_classes} classes")
    return num_classes, specs


def _start(out: Path, manifest: dict[str, Any], num_classes: int, specs: list[dict[str, Any]],
           infos: dict[str, dict], fingerprints: dict[str, str], cfg: LabelConfig, teacher: Teacher) -> None:
    """Fill the manifest's header and create the Zarr arrays."""
    input_shape = infos["labeled"]["input_shape"]
    manifest.update({
        "teacher": {"fingerprint": teacher.fingerprint, "config": teacher.config},
        "num_classes": num_classes,
        "input_shape": input_shape,
        "top_k": cfg.top_k,
        "temperatures": list(cfg.temperatures),
        "logit_dtype": cfg.logit_dtype,
        "features": specs,
        "views": {"count": cfg.views, "seed": cfg.view_seed,
                  "recipe": {"name": "shift", "max_shift": cfg.view_shift}},
        "label": as_dict(cfg),
        "splits": {},
    })
    part_rows = cfg.part_size * (cfg.views + 1)
    group = zarr.open_group(str(out / FEATURES), mode="w") if specs else None
    for split, info in infos.items():
        rows = info["rows"] * (cfg.views + 1)
        chunk_rows = {}
        if group is not None:
            arrays = [("id", [], "int64")] + [(s["name"], s["shape"], "float16") for s in specs]
            for name, shape, dtype in arrays:
                row_bytes = max(1, math.prod(shape)) * np.dtype(dtype).itemsize
                chunk_rows[name] = _chunk_rows(part_rows, row_bytes)
                group.create_array(f"{split}/{name}", shape=(rows, *shape), chunks=(chunk_rows[name], *shape),
                                   dtype=dtype, compressors=ZstdCodec(level=3), fill_value=0,
                                   config={"write_empty_chunks": True})
        manifest["splits"][split] = {
            "rows": rows, "samples": info["rows"], "data_fingerprint": fingerprints[split],
            "source": f"{split}.parquet", "chunk_rows": chunk_rows, "parts": [],
        }
    write_manifest(out, manifest)


def _chunk_rows(part_rows: int, row_bytes: int) -> int:
    """The largest divisor of part_rows whose chunk stays under CHUNK_BYTES: no chunk spans two parts."""
    limit = max(1, CHUNK_BYTES // row_bytes)
    return max(d for d in range(1, min(part_rows, limit) + 1) if part_rows % d == 0)


class _Rows:
    """Accumulates batches of rows and hands back full blocks of `block` rows."""

    def __init__(self, block: int):
        self.block, self.items, self.count = block, [], 0

    def add(self, item: Any, rows: int) -> None:
        self.items.append(item)
        self.count += rows

    def ready(self, final: bool) -> bool:
        return self.count >= self.block or (final and self.count > 0)

    def take(self) -> list[Any]:
        items, self.items, self.count = self.items, [], 0
        return items


def _write_part(out: Path, manifest: dict[str, Any], model: nn.Module, source: Path, split: str, index: int,
                input_shape: list[int], cfg: LabelConfig, bar: tqdm) -> dict[str, Any]:
    info = manifest["splits"][split]
    views = cfg.views + 1
    first_sample = index * cfg.part_size
    last_sample = min(first_sample + cfg.part_size, info["samples"])
    split_data = data.read_rows(source, first_sample, last_sample)
    if not np.isfinite(split_data.x).all():
        bad = split_data.ids[~np.isfinite(split_data.x).all(1)][:5].tolist()
        raise InputError(f"{source}: NaN or Inf in inputs (ids {bad})")
    first_row, n_rows = first_sample * views, (last_sample - first_sample) * views
    final = out / part_path(split, index)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    schema = _schema(cfg)
    specs = {s["name"]: s for s in manifest["features"]}
    group = zarr.open_group(str(out / FEATURES), mode="r+") if specs else None
    buffers = {name: _Rows(rows) for name, rows in info["chunk_rows"].items()}
    written = {name: first_row for name in buffers}
    soft = _Rows(ROW_GROUP_ROWS)
    sums: dict[str, float] = {}
    correct = labeled = 0
    try:
        with pq.ParquetWriter(str(tmp), schema, compression="zstd", write_statistics=False) as writer:
            for start in range(0, last_sample - first_sample, max(1, cfg.batch_size // views)):
                stop = min(start + max(1, cfg.batch_size // views), last_sample - first_sample)
                ids = np.repeat(split_data.ids[start:stop], views)
                view = np.tile(np.arange(views, dtype=np.int32), stop - start)
                x = torch.tensor(split_data.x[start:stop]).repeat_interleave(views, dim=0)
                x = augment.apply_views(x, ids, view, input_shape, cfg.view_seed, cfg.view_shift)
                with torch.no_grad(), features.tap(model, list(specs)) as captured:
                    logits = model(x.reshape(len(x), *input_shape)).float()
                    feats = {name: features.reduce(captured[name], s["mode"]).to(torch.float16).numpy()
                             for name, s in specs.items()}
                if not torch.isfinite(logits).all():
                    bad = ids[~torch.isfinite(logits).all(1).numpy()][:5].tolist()
                    raise CacheError(f"teacher produced NaN or Inf logits on {split} ids {bad}")
                cols = soft_targets(logits, cfg.top_k, cfg.temperatures, cfg.logit_dtype)
                v0 = view == 0
                for name, value in fidelity_sums(logits[torch.from_numpy(v0)],
                                                 {k: v[v0] for k, v in cols.items()}, cfg.temperatures).items():
                    sums[name] = sums.get(name, 0.0) + value
                y = split_data.y[start:stop]
                if (y >= 0).any():
                    labeled += int((y >= 0).sum())
                    correct += int((cols["topk_idx"][v0][:, 0] == y)[y >= 0].sum())
                soft.add(_table(schema, ids, view, cols), len(ids))
                if soft.ready(final=stop == last_sample - first_sample):
                    writer.write_table(pa.concat_tables(soft.take()), row_group_size=ROW_GROUP_ROWS)
                feats["id"] = ids
                last = stop == last_sample - first_sample
                for name, buffer in buffers.items():
                    buffer.add(feats[name], len(ids))
                    if buffer.ready(final=last):
                        block = np.concatenate(buffer.take())
                        group[f"{split}/{name}"][written[name]:written[name] + len(block)] = block
                        written[name] += len(block)
                bar.update(len(ids))
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # never leave a half-written part behind
        if isinstance(exc, OSError) and exc.filename is None:  # e.g. pyarrow's: name the part
            raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
        raise
    tmp.replace(final)
    part = {"split": split, "index": index, "path": part_path(split, index), "first_row": first_row,
            "rows": n_rows, "bytes": final.stat().st_size, "sha256": file_sha256(final), "labeled": labeled, "correct": correct,
            "fidelity_sums": sums}
    if specs:
        part["features"] = {name: chunks_sha256(out, manifest, split, name, first_row, n_rows)
                            for name in buffers}
    return part


def _schema(cfg: LabelConfig) -> pa.Schema:
    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("view", pa.int32(), nullable=False),
        pa.field("topk_idx", pa.list_(pa.int32(), cfg.top_k), nullable=False),
        pa.field("topk_logit", pa.list_(pa.from_numpy_dtype(np.dtype(cfg.logit_dtype)), cfg.top_k), nullable=False),
        pa.field("logit_max", pa.float32(), nullable=False),
    ]
    fields += [pa.field(lse_column(t), pa.float32(), nullable=False) for t in cfg.temperatures]
    return pa.schema(fields)


def _table(schema: pa.Schema, ids: np.ndarray, view: np.ndarray, cols: dict[str, np.ndarray]) -> pa.Table:
    k = cols["topk_idx"].shape[1]
    arrays = [
        pa.array(ids, pa.int64()),
        pa.array(view, pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(cols["topk_idx"].reshape(-1)), k),
        pa.FixedSizeListArray.from_arrays(pa.array(cols["topk_logit"].reshape(-1)), k),
        pa.array(cols["logit_max"], pa.float32()),
    ]
    arrays += [pa.array(cols[f.name], pa.float32()) for f in list(schema)[5:]]
    return pa.Table.from_arrays(arrays, schema=schema)


def chunk_files(out: Path, manifest: dict[str, Any], split: str, layer: str, first_row: int,
                rows: int) -> list[Path]:
    """The Zarr chunk files holding rows [first_row, first_row + rows) of one array."""
    chunk_rows = manifest["splits"][split]["chunk_rows"][layer]
    shape = next((s["shape"] for s in manifest["features"] if s["name"] == layer), [])
    base = out / feature_path(split, layer) / "c"
    first, last = first_row // chunk_rows, math.ceil((first_row + rows) / chunk_rows)
    return [base.joinpath(str(i), *["0"] * len(shape)) for i in range(first, last)]


def chunks_sha256(out: Path, manifest: dict[str, Any], split: str, layer: str, first_row: int, rows: int) -> str:
    """sha256 over the sha256s of the chunk files of one part's rows ("missing:<path>" if one is gone)."""
    digest = hashlib.sha256()
    for path in chunk_files(out, manifest, split, layer, first_row, rows):
        if not path.is_file():
            return "missing:" + str(path.relative_to(out))
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _finish(manifest: dict[str, Any]) -> None:
    """Aggregate the per-part sums into the manifest's fidelity statistics; mark complete."""
    fidelity = {}
    for split, info in manifest["splits"].items():
        totals: dict[str, float] = {}
        for part in info["parts"]:
            for name, value in part["fidelity_sums"].items():
                totals[name] = totals.get(name, 0.0) + value
        samples = info["samples"]
        stats: dict[str, Any] = {}
        for t in manifest["temperatures"]:
            name = lse_column(t).removeprefix("lse_")
            stats[name] = {"kept_mass": totals[f"kept_mass_{name}"] / samples,
                           "kl_full_to_cached": totals[f"kl_{name}"] / samples}
        labeled = sum(p["labeled"] for p in info["parts"])
        stats["teacher_accuracy"] = sum(p["correct"] for p in info["parts"]) / labeled if labeled else None
        fidelity[split] = stats
    manifest["fidelity"] = fidelity
    manifest["complete"] = True
