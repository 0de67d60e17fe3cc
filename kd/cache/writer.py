"""Writing the cache: the teacher runs once over every split, part by part.

For each split, samples are cut into parts of `part_size` samples; a part holds every view
of its samples (rows sample-major: sample 0 view 0..V, sample 1 view 0..V, ...). A part's
Parquet file is written under a temporary name and renamed when complete; its Zarr rows
fill whole chunks that no other part touches. After each part the manifest is rewritten
(atomically) with the part's sha256s and fidelity sums, so an interrupted `kd label`
resumes at the first missing part and ends with the same bytes as an uninterrupted run.
Memory holds one Parquet row group and one Zarr chunk per layer, whatever the split size.

Parts are independent, so labeling shards: shard I of N labels parts I, I + N, ... (counted
over every split) and keeps its progress in its own record; when all are done, `shards.merge`
writes the manifest a single process would have written. The cache may be a local
directory or an object-store URL (see `store`).

The writer knows no task: the caller hands it the task's `Inputs` (`batch`), which turn
prepared samples into teacher inputs and `Batch`es of rows and may score the teacher once (the
manifest's `teacher_scores`); `targets` makes their columns and statistics; `shards` resumes and
merges.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from torch import nn
from tqdm import tqdm
from zarr.codecs import ZstdCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from kd import augment, features
from kd.cache import encoding as encodings
from kd.cache import sampling
from kd.cache.batch import Inputs
from kd.cache.layout import (
    FEATURES,
    MANIFEST,
    ROW_GROUP_ROWS,
    TEACHER_COPY,
    chunk_rows,
    chunks_sha256,
    feature_arrays,
    feature_path,
    part_path,
    shard_record,
)
from kd.cache.shards import finished, merge, resume_or_start, resume_shard
from kd.cache.store import Store
from kd.cache.targets import Tally, batch_columns, finish, finite_rows, part_schema, part_table
from kd.config import PART_ROWS, SPLITS, LabelConfig, as_dict
from kd.errors import CacheError, ConfigError, MissingInputError, StaleCacheError
from kd.prepared import data_fingerprint


@dataclass
class Teacher:
    """A loaded teacher and what identifies it."""

    model: nn.Module
    fingerprint: str
    config: dict[str, Any]
    directory: Path | None = None  # where its files are (for `label.keep_teacher`)
    files: tuple[str, ...] = ("model.safetensors", "config.json")  # what `label.keep_teacher` copies


def cache_key(teacher: Teacher, fingerprints: dict[str, str], cfg: LabelConfig) -> dict[str, Any]:
    """Everything that decides the cache's content. Same key -> same bytes. (Without sampling,
    its keys are left out: the key of a cache written before `label.sampling` existed.)"""
    label = as_dict(cfg)
    if cfg.sampling is None:
        del label["sampling"], label["sampling_seed"]
    return {
        "teacher": teacher.fingerprint,
        "data": fingerprints,
        "label": label,
        "torch": torch.__version__.split("+")[0],
    }


def label(teacher: Teacher, prepared: Path, out: str | Path, cfg: LabelConfig, *,
          task_inputs: Callable[[Path, list[str], LabelConfig], Inputs], progress: bool = True,
          shard: int = 0, num_shards: int = 1) -> dict[str, Any] | None:
    """Run the teacher over the prepared splits into the cache at `out`; resume if possible.

    `task_inputs` is the `Inputs` class of the prepared data's task (`kd.tasks.inputs_for`):
    built for the splits found, it reads the samples and gives the teacher's rows (`batch`).

    With `num_shards` > 1, only parts number shard, shard + N, ... (counted over all splits)
    are labeled, and the shard's progress goes to its own record; the shard that finds every
    record complete merges them into the manifest (`shards.merge`), which is then exactly what
    a single process writes. Returns the final manifest, or None while other shards are
    still running. An intact cache with the same key is left as is.
    """
    if not 0 <= shard < num_shards:
        raise ConfigError(f"--shard {shard} must be in [0, {num_shards}) for --num-shards {num_shards}")
    store = Store(out)
    splits = [s for s in SPLITS if (prepared / f"{s}.parquet").is_file()]
    for required in ("labeled", "test"):
        if required not in splits:
            raise MissingInputError(f"{prepared / f'{required}.parquet'}: not found (run `kd prepare`)")
    inputs = task_inputs(prepared, splits, cfg)
    inputs.check_teacher(teacher, prepared)
    if cfg.part_size is None:  # the cache's key and manifest record the size it resolves to
        cfg = dataclasses.replace(cfg, part_size=max(1, PART_ROWS // inputs.per_sample))
    fingerprints = {s: data_fingerprint(prepared / f"{s}.parquet") for s in splits}
    key = cache_key(teacher, fingerprints, cfg)
    model = teacher.model.eval()
    num_classes, specs = plan(model, inputs, cfg)  # every check before anything is touched
    # the first cache row of each sample of each split (and the split's row count last)
    offsets = {s: np.concatenate([[0], np.cumsum(inputs.row_counts(s))]) for s in splits}
    if specs and any(len(np.unique(np.diff(offsets[s]))) > 1 for s in splits):
        raise ConfigError(f"label.features: {', '.join(cfg.features)}: caching hidden states needs the same number "
                          "of rows in every sample, and instruction data has one row per response token; set "
                          "label.features to {}")
    sharded = num_shards > 1
    record = shard_record(shard, num_shards) if sharded else MANIFEST
    with store.lock(f".lock-{shard}-of-{num_shards}" if sharded else ".lock"):
        if sharded:
            done = finished(store, key, num_shards)
            if done is not None:
                return done
            manifest = resume_shard(store, record, key)
        else:
            manifest = resume_or_start(store, key)
            if manifest.get("complete"):
                return manifest
        if manifest.get("num_classes") is None:
            header = _header(teacher, num_classes, specs, inputs, offsets, fingerprints, cfg)
            # the task's scores of the teacher, measured once (a resumed run keeps them); by shard 0
            # alone, whose record the merged manifest keeps. None at all: no key, as before them.
            scores = inputs.teacher_scores(model) if shard == 0 else {}
            if scores:
                header["teacher_scores"] = scores
            if cfg.keep_teacher:
                header["teacher_files"] = _keep_teacher(store, teacher)
            manifest.update(header)
            store.write_json(record, manifest)
        _create_arrays(store, manifest, cfg)
        units = [(split, index) for split in splits
                 for index in range(math.ceil(inputs.samples(split) / cfg.part_size))][shard::num_shards]
        have = {(p["split"], p["index"]) for info in manifest["splits"].values() for p in info["parts"]}
        total = sum(int(offsets[s][min((i + 1) * cfg.part_size, inputs.samples(s))] - offsets[s][i * cfg.part_size])
                    for s, i in units)
        done_rows = sum(p["rows"] for info in manifest["splits"].values() for p in info["parts"])
        desc = f"kd label (shard {shard} of {num_shards})" if sharded else "kd label"
        if have:  # said even without a progress bar: the run continues an interrupted one
            print(f"{desc}: resuming {store.show()} after {len(have)} of {len(units)} parts ({done_rows} rows) "
                  "already written and verified", file=sys.stderr)
        bar = tqdm(total=total, initial=done_rows, unit="rows", desc=desc, disable=not progress)
        for split, index in units:
            if (split, index) in have:
                continue
            part = _write_part(store, manifest, model, inputs, prepared / f"{split}.parquet", split, index, cfg, bar,
                               offsets[split])
            manifest["splits"][split]["parts"].append(part)
            store.write_json(record, manifest)
        bar.close()
        if not sharded:
            finish(manifest)
            store.write_json(MANIFEST, manifest)
            return manifest
        manifest["complete"] = True
        store.write_json(record, manifest)
    return merge(store.root, num_shards, missing_ok=True)


def _keep_teacher(store: Store, teacher: Teacher) -> dict[str, str]:
    """Copy the teacher's weights and config into `teacher/` of the cache (for students that
    start from its layers, as DistilBERT's did); relative path -> sha256, for the manifest."""
    if teacher.directory is None:
        raise ConfigError("label.keep_teacher: the teacher was not loaded from a directory")
    kept = {}
    for name in teacher.files:
        source = Path(teacher.directory) / name
        rel = f"{TEACHER_COPY}/{name}"
        with store.writing(rel) as tmp, store.fs.open_output_stream(tmp) as handle, open(source, "rb") as src:
            while block := src.read(1 << 20):
                handle.write(block)
        kept[rel] = store.sha256(rel)
    return kept


def plan(model: nn.Module, inputs: Inputs, cfg: LabelConfig) -> tuple[int, list[dict[str, Any]]]:
    """The number of classes and the feature specs, from one probe forward pass.

    Raises ConfigError naming the `label` key for a layer the teacher lacks, a mode the
    layer cannot give, or a top_k larger than the number of classes.
    """
    probe = inputs.probe()
    with torch.no_grad():
        for layer in cfg.features:
            try:
                features.find_module(model, layer)
            except ConfigError as exc:
                raise ConfigError(f"label.features.{layer}: {exc}") from None
        with features.tap(model, list(cfg.features)) as captured:
            logits = inputs.logits(model, probe)
        specs = [inputs.feature_spec(layer, mode, captured[layer]) for layer, mode in cfg.features.items()]
    num_classes = int(logits.shape[1])
    if cfg.top_k > num_classes:
        raise ConfigError(f"label.top_k: {cfg.top_k} is more than the teacher's {num_classes} classes")
    return num_classes, specs


def _header(teacher: Teacher, num_classes: int, specs: list[dict[str, Any]], inputs: Inputs,
            offsets: dict[str, np.ndarray], fingerprints: dict[str, str], cfg: LabelConfig) -> dict[str, Any]:
    """Everything the manifest says besides its parts: what produced the cache, and the layout."""
    part_rows = cfg.part_size * inputs.per_sample  # (with features every sample has per_sample rows)
    splits = {}
    for split in fingerprints:
        rows_per_chunk = {}
        if specs:
            for name, shape, dtype in feature_arrays(specs):
                rows_per_chunk[name] = chunk_rows(part_rows, max(1, math.prod(shape)) * np.dtype(dtype).itemsize)
        samples = inputs.samples(split)
        splits[split] = {
            "rows": int(offsets[split][-1]), "samples": samples, "data_fingerprint": fingerprints[split],
            "source": f"{split}.parquet", "chunk_rows": rows_per_chunk, "parts": [],
        }
    return {
        "teacher": {"fingerprint": teacher.fingerprint, "config": teacher.config},
        "num_classes": num_classes,
        **inputs.header(),
        "top_k": cfg.top_k,
        "temperatures": list(cfg.temperatures),
        "logit_dtype": cfg.logit_dtype,
        "encoding": encodings.header(cfg.encoding),
        "schema_version": sampling.SCHEMA_VERSION if cfg.sampling else encodings.SCHEMA_VERSIONS[cfg.encoding],
        "sampling": None if cfg.sampling is None else {"draws": cfg.sampling, "seed": cfg.sampling_seed},
        "features": specs,
        "views": {"count": cfg.views, "seed": cfg.view_seed, "recipe": augment.from_config(cfg, cfg.view_shift)},
        "label": as_dict(cfg),
        "splits": splits,
    }


def _create_arrays(store: Store, manifest: dict[str, Any], cfg: LabelConfig) -> None:
    """Create the Zarr arrays the manifest's features need, keeping any that already exist
    with the same layout (shards of one cache create them side by side)."""
    specs = manifest["features"]
    if not specs:
        return
    with store.lock(".lock-arrays", wait=True):  # shards starting together would race to create them
        try:
            group = zarr.open_group(store.zarr(FEATURES), mode="a")
        except ContainsGroupError:  # on object storage, which has no lock: created meanwhile
            group = zarr.open_group(store.zarr(FEATURES), mode="r+")
        for split, info in manifest["splits"].items():
            for name, shape, dtype in feature_arrays(specs):
                wanted = (info["rows"], *shape)
                chunks = (info["chunk_rows"][name], *shape)
                try:
                    group.create_array(f"{split}/{name}", shape=wanted, chunks=chunks, dtype=dtype,
                                       compressors=ZstdCodec(level=3), fill_value=0,
                                       config={"write_empty_chunks": True})
                except ContainsArrayError:
                    existing = group[f"{split}/{name}"]
                    if existing.shape != wanted or existing.chunks != chunks or existing.dtype != np.dtype(dtype):
                        raise StaleCacheError(f"{store.show(feature_path(split, name))}: an array of another "
                                              f"cache (shape {existing.shape}, expected {wanted}); remove "
                                              f"{store.show()}") from None


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


def _write_part(store: Store, manifest: dict[str, Any], model: nn.Module, inputs: Inputs, source: Path,
                split: str, index: int, cfg: LabelConfig, bar: tqdm, offsets: np.ndarray) -> dict[str, Any]:
    """Label part `index` of `split` (its Parquet file and its rows of the Zarr arrays); its manifest entry."""
    info = manifest["splits"][split]
    per_sample = inputs.per_sample
    first_sample = index * cfg.part_size
    last_sample = min(first_sample + cfg.part_size, info["samples"])
    rows = inputs.read(source, first_sample, last_sample)
    first_row = int(offsets[first_sample])
    n_rows = int(offsets[last_sample]) - first_row
    rel = part_path(split, index)
    encoding = encodings.of(manifest)
    schema = part_schema(cfg, inputs.row_columns, manifest["num_classes"])
    specs = {s["name"]: s for s in manifest["features"]}
    group = zarr.open_group(store.zarr(FEATURES), mode="r+") if specs else None
    buffers = {name: _Rows(rows) for name, rows in info["chunk_rows"].items()}
    written = {name: first_row for name in buffers}
    soft = _Rows(ROW_GROUP_ROWS)
    tally = Tally()
    step = max(1, cfg.batch_size // per_sample)
    try:
        with store.writing(rel) as tmp, pq.ParquetWriter(tmp, schema, filesystem=store.fs, compression="zstd",
                                                          write_statistics=False,
                                                          **encodings.writer_options(encoding, schema)) as writer:
            for start in range(0, last_sample - first_sample, step):
                stop = min(start + step, last_sample - first_sample)
                batch = inputs.batch(model, rows, start, stop, specs)
                finite = finite_rows(batch.logits)
                if not finite.all():
                    bad = list(dict.fromkeys(batch.ids[~finite.numpy()].tolist()))[:5]
                    raise CacheError(f"teacher produced NaN or Inf logits on {split} ids {bad}")
                soft.add(part_table(schema, batch, batch_columns(batch, cfg, encoding, tally)), len(batch.ids))
                last = stop == last_sample - first_sample
                if soft.ready(final=last):
                    writer.write_table(pa.concat_tables(soft.take()), row_group_size=ROW_GROUP_ROWS)
                feats = {**batch.features, "id": batch.ids}
                for name, buffer in buffers.items():
                    buffer.add(feats[name], len(batch.ids))
                    if buffer.ready(final=last):
                        block = np.concatenate(buffer.take())
                        group[f"{split}/{name}"][written[name]:written[name] + len(block)] = block
                        written[name] += len(block)
                bar.update(len(batch.ids))
    except OSError as exc:  # the temporary file is gone already (`Store.writing`)
        if exc.filename is None:  # e.g. pyarrow's: name the part
            raise OSError(exc.errno, exc.strerror or str(exc), store.show(rel)) from exc
        raise
    part = {"split": split, "index": index, "path": rel, "first_row": first_row, "rows": n_rows,
            "bytes": store.size(rel), "sha256": store.sha256(rel), "labeled": tally.labeled, "correct": tally.correct,
            "scored": tally.scored, "nll": tally.nll, "fidelity_sums": tally.sums}
    if encoding["name"] != "topk":
        part["max_abs_error"] = tally.error
    if specs:
        part["features"] = {name: chunks_sha256(store, manifest, split, name, first_row, n_rows)
                            for name in buffers}
    return part
