"""Writing the cache: the teacher runs once over every split, part by part.

For each split, samples are cut into parts of `part_size` samples; a part holds every view
of its samples (rows sample-major: sample 0 view 0..V, sample 1 view 0..V, ...). A part's
Parquet file is written under a temporary name and renamed when complete; its Zarr rows
fill whole chunks that no other part touches. After each part the manifest is rewritten
(atomically) with the part's sha256s and fidelity sums, so an interrupted `kd label`
resumes at the first missing part and ends with the same bytes as an uninterrupted run.
Memory holds one Parquet row group and one Zarr chunk per layer, whatever the split size.

Parts are independent, so labeling shards: shard I of N labels parts I, I + N, ... (counted
over every split) and keeps its progress in its own record; when all are done, `merge`
writes the manifest a single process would have written. The cache may be a local
directory or an object-store URL (see `store`).
"""

from __future__ import annotations

import dataclasses
import json
import math
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

from kd import features, tasks
from kd.cache import encoding as encodings
from kd.cache import sampling
from kd.cache.layout import (FEATURES, MANIFEST, ROW_GROUP_ROWS, SHARDS, SOFT_TARGETS, TEACHER_COPY, chunk_rows,
                                   chunks_sha256, feature_arrays, feature_path, lse_column, part_path, sample_columns,
                                   shard_record, temperature_key)
from kd.cache.manifest import SCHEMA_VERSION, part_problem, read_manifest
from kd.cache.store import Store
from kd.config import PART_ROWS, SPLITS, LabelConfig, as_dict, view_recipe
from kd.errors import CacheError, ConfigError, InputError, MissingInputError, StaleCacheError
from kd.prepared import data_fingerprint

FLOAT16_MIN = float(np.finfo(np.float16).min)


@dataclass
class Teacher:
    """A loaded teacher and what identifies it."""

    model: nn.Module
    fingerprint: str
    config: dict[str, Any]
    directory: Path | None = None  # where its files are (for `label.keep_teacher`)
    files: tuple[str, ...] = ("model.safetensors", "config.json")  # what `label.keep_teacher` copies


def soft_targets(logits: torch.Tensor, top_k: int, temperatures: list[float], dtype: str) -> dict[str, np.ndarray]:
    """The cache columns for a batch of logits (N, C): top-k of the max-shifted logits and lse per T
    (as the `topk` encoding stores them; `encoding.encode` turns them into another's)."""
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
    teacher's full softmax p with the cached top-k probabilities q plus the tail mass spread
    evenly over the other classes (the least-informative completion of what is kept). In
    closed form, without building q over the vocabulary: KL = sum p log p - sum_kept p log q -
    (1 - sum_kept p) log(tail / (C - k)), where sum p log p = sum p z / T - logsumexp(z / T).
    """
    z = logits.float()
    num_classes = z.shape[1]
    idx = torch.tensor(cols["topk_idx"], dtype=torch.long)
    kept_logit = torch.tensor(cols["topk_logit"], dtype=torch.float32)
    k = idx.shape[1]
    sums: dict[str, float] = {}
    for t in temperatures:
        lse = torch.tensor(cols[lse_column(t)])
        scaled = z / float(t)
        full_lse = torch.logsumexp(scaled, dim=1)
        p_full = scaled.sub_(full_lse[:, None]).exp_()  # the one (N, C) buffer: z / T, then p
        neg_entropy = torch.einsum("nc,nc->n", p_full, z) / float(t) - full_lse
        log_q = kept_logit / float(t) - lse[:, None]  # the cached top-k log-probabilities
        kept = torch.exp(log_q).sum(1)
        p_at_kept = p_full.gather(1, idx)
        kl = neg_entropy - (p_at_kept * log_q).sum(1)
        if k < num_classes:
            tail = ((1 - kept).clamp(min=0) / (num_classes - k)).clamp(min=1e-30)
            kl -= (1 - p_at_kept.sum(1)).clamp(min=0) * torch.log(tail)
        name = temperature_key(t)
        sums[f"kept_mass_{name}"] = float(kept.sum())
        sums[f"kl_{name}"] = float(kl.clamp(min=0).sum())
    return sums


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


def locked(out: str | Path, name: str = ".lock"):
    """Hold an exclusive lock on the cache (local disks); a second writer fails at once."""
    return Store(out).lock(name)


def label(teacher: Teacher, prepared: Path, out: str | Path, cfg: LabelConfig, *, progress: bool = True,
          shard: int = 0, num_shards: int = 1) -> dict[str, Any] | None:
    """Run the teacher over the prepared splits into the cache at `out`; resume if possible.

    With `num_shards` > 1, only parts number shard, shard + N, ... (counted over all splits)
    are labeled, and the shard's progress goes to its own record; the shard that finds every
    record complete merges them into the manifest (see `merge`), which is then exactly what
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
    inputs = tasks.for_prepared(prepared, teacher.config.get("objective")).Inputs(prepared, splits, cfg)
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
            done = _finished(store, key, num_shards)
            if done is not None:
                return done
            manifest = _resume_shard(store, record, key)
        else:
            manifest = _resume_or_start(store, key)
            if manifest.get("complete"):
                return manifest
        if manifest.get("num_classes") is None:
            header = _header(teacher, num_classes, specs, inputs, offsets, fingerprints, cfg)
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
            _finish(manifest)
            store.write_json(MANIFEST, manifest)
            return manifest
        manifest["complete"] = True
        store.write_json(record, manifest)
    return merge(store.root, num_shards, missing_ok=True)


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
    for split, info in manifest["splits"].items():
        for part in info["parts"]:
            problem = part_problem(store, part)
            if problem:
                raise CacheError(f"{problem}; run that shard's `kd label` again")
    manifest["complete"] = False
    _finish(manifest)
    store.write_json(MANIFEST, manifest, shared=True)
    store.delete(SHARDS)
    return manifest


def _merged(store: Store) -> dict[str, Any] | None:
    """The manifest if the cache is complete (already merged), else None."""
    if not store.is_file(MANIFEST):
        return None
    manifest = read_manifest(store)
    return manifest if manifest.get("complete") else None


def _finished(store: Store, key: dict[str, Any], num_shards: int) -> dict[str, Any] | None:
    """The manifest if the cache is already complete with this key; refuses another cache's
    leftovers, which a shard cannot remove while other shards may be writing."""
    try:
        existing = read_manifest(store)
    except (MissingInputError, CacheError, InputError):
        existing = None
    if existing is not None and existing.get("complete") and existing.get("key") == key \
            and _parts_present(store, existing):
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


def _resume_shard(store: Store, record: str, key: dict[str, Any]) -> dict[str, Any]:
    """This shard's progress record to continue from, or a new one."""
    try:
        existing = read_manifest(store, record)
    except (MissingInputError, CacheError, InputError):
        existing = None
    if existing is not None and existing.get("key") == key and _parts_present(store, existing):
        return existing
    return {"schema_version": SCHEMA_VERSION, "key": key, "complete": False}


def _resume_or_start(store: Store, key: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue from: the existing one if its key matches, else a new one."""
    try:
        existing = read_manifest(store)
    except (MissingInputError, CacheError, InputError):
        existing = None
    if existing is not None and existing.get("key") == key:
        if _parts_present(store, existing):
            return existing
    # Different teacher, data or parameters (or a damaged cache): start again from nothing.
    for name in (SOFT_TARGETS, FEATURES, SHARDS, TEACHER_COPY, MANIFEST):
        store.delete(name)
    return {"schema_version": SCHEMA_VERSION, "key": key, "complete": False}


def _parts_present(store: Store, manifest: dict[str, Any]) -> bool:
    """Every part the manifest lists is intact, its Zarr chunks included."""
    for info in manifest.get("splits", {}).values():
        for part in info["parts"]:
            if part_problem(store, part) is not None:
                return False
            for layer, digest in part.get("features", {}).items():
                if chunks_sha256(store, manifest, part["split"], layer, part["first_row"], part["rows"]) != digest:
                    return False
    return True


def plan(model: nn.Module, inputs: Any, cfg: LabelConfig) -> tuple[int, list[dict[str, Any]]]:
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


def _header(teacher: Teacher, num_classes: int, specs: list[dict[str, Any]], inputs: Any,
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
        "views": {"count": cfg.views, "seed": cfg.view_seed, "recipe": view_recipe(cfg, cfg.view_shift)},
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


def _write_part(store: Store, manifest: dict[str, Any], model: nn.Module, inputs: Any, source: Path,
                split: str, index: int, cfg: LabelConfig, bar: tqdm, offsets: np.ndarray) -> dict[str, Any]:
    info = manifest["splits"][split]
    per_sample = inputs.per_sample
    first_sample = index * cfg.part_size
    last_sample = min(first_sample + cfg.part_size, info["samples"])
    rows = inputs.read(source, first_sample, last_sample)
    first_row = int(offsets[first_sample])
    n_rows = int(offsets[last_sample]) - first_row
    rel = part_path(split, index)
    encoding = encodings.of(manifest)
    schema = _schema(cfg, inputs.row_columns, manifest["num_classes"])
    specs = {s["name"]: s for s in manifest["features"]}
    group = zarr.open_group(store.zarr(FEATURES), mode="r+") if specs else None
    buffers = {name: _Rows(rows) for name, rows in info["chunk_rows"].items()}
    written = {name: first_row for name in buffers}
    soft = _Rows(ROW_GROUP_ROWS)
    sums: dict[str, float] = {}
    correct = labeled = scored_rows = 0
    nll = 0.0  # the teacher's cross-entropy on the rows whose truth is known
    error = 0.0  # the largest |decoded - computed| shifted logit written (compact)
    step = max(1, cfg.batch_size // per_sample)
    try:
        with store.writing(rel) as tmp, pq.ParquetWriter(tmp, schema, filesystem=store.fs, compression="zstd",
                                                          write_statistics=False,
                                                          **encodings.writer_options(encoding, schema)) as writer:
            for start in range(0, last_sample - first_sample, step):
                stop = min(start + step, last_sample - first_sample)
                batch = inputs.batch(model, rows, start, stop, specs)
                logits = batch.logits
                if not torch.isfinite(logits).all():
                    bad = list(dict.fromkeys(batch.ids[~torch.isfinite(logits).all(1).numpy()].tolist()))[:5]
                    raise CacheError(f"teacher produced NaN or Inf logits on {split} ids {bad}")
                computed = soft_targets(logits, cfg.top_k, cfg.temperatures,
                                        cfg.logit_dtype if encoding["name"] == "topk" else "float32")
                stored = encodings.encode(computed, encoding)
                # What a student will read: every statistic below is of the decoded values.
                cols = dict(computed, **dict(zip(("topk_idx", "topk_logit"), encodings.decode(stored, encoding))))
                if encoding["name"] != "topk":
                    error = max(error, _largest_error(computed, cols))
                scored = batch.scored
                scored_rows += int(scored.sum())
                scored_logits = logits[torch.from_numpy(scored)]
                batch_sums = fidelity_sums(scored_logits, {k: v[scored] for k, v in cols.items()}, cfg.temperatures)
                if cfg.sampling:
                    drawn = _draw(logits, batch, cfg)
                    cols |= drawn
                    for t in cfg.temperatures:
                        idx, count, entropy = sample_columns(t)
                        # logsumexp(z / T) from the columns already computed: logit_max / T + lse
                        normaliser = torch.from_numpy(cols["logit_max"][scored] / float(t) + cols[lse_column(t)][scored])
                        batch_sums |= sampling.fidelity_sums(scored_logits, drawn[idx][scored],
                                                             drawn[count][scored], drawn[entropy][scored], t,
                                                             temperature_key(t), normaliser)
                for name, value in batch_sums.items():
                    sums[name] = sums.get(name, 0.0) + value
                truth = batch.truth[scored]
                if (truth >= 0).any():
                    known = torch.from_numpy(truth >= 0)
                    labeled += int(known.sum())
                    correct += int((cols["topk_idx"][scored][:, 0] == truth)[truth >= 0].sum())
                    nll += float(torch.nn.functional.cross_entropy(
                        scored_logits[known], torch.from_numpy(truth)[known].long(), reduction="sum"))
                soft.add(_table(schema, batch, {**cols, **stored}), len(batch.ids))
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
            "bytes": store.size(rel), "sha256": store.sha256(rel), "labeled": labeled, "correct": correct,
            "scored": scored_rows, "nll": nll, "fidelity_sums": sums}
    if encoding["name"] != "topk":
        part["max_abs_error"] = error
    if specs:
        part["features"] = {name: chunks_sha256(store, manifest, split, name, first_row, n_rows)
                            for name in buffers}
    return part


def _draw(logits: torch.Tensor, batch: tasks.Batch, cfg: LabelConfig) -> dict[str, np.ndarray]:
    """The sampled columns of a batch (`label.sampling`), padded (R, N), per temperature."""
    cols = {}
    for t in cfg.temperatures:
        keys = sampling.row_keys(cfg.sampling_seed, batch.ids, batch.view, batch.position, t)
        idx, count, entropy = sample_columns(t)
        cols[idx], cols[count], cols[entropy] = sampling.draw(logits, cfg.sampling, t, keys)
    return cols


def _largest_error(computed: dict[str, np.ndarray], decoded: dict[str, np.ndarray]) -> float:
    """The largest |decoded - computed| shifted logit of a batch (rows matched by class id)."""
    if not computed["topk_idx"].size:
        return 0.0
    order = np.argsort(decoded["topk_idx"], axis=1, kind="stable")
    wanted = np.argsort(computed["topk_idx"], axis=1, kind="stable")
    return float(np.abs(np.take_along_axis(decoded["topk_logit"], order, 1)
                        - np.take_along_axis(computed["topk_logit"].astype(np.float32), wanted, 1)).max())


def _schema(cfg: LabelConfig, row_columns: tuple[str, ...] = (), num_classes: int | None = None) -> pa.Schema:
    """The soft-target columns, after the task's own int32 row columns (`ROW_COLUMNS`: a token
    row's `position`, a masked row's `input_token`); the top-k as `label.encoding` stores it
    (compact: its id type needs `num_classes`)."""
    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("view", pa.int32(), nullable=False),
        *[pa.field(name, pa.int32(), nullable=False) for name in row_columns],
        *encodings.fields(encodings.header(cfg.encoding), cfg.top_k, cfg.logit_dtype, num_classes),
        pa.field("logit_max", pa.float32(), nullable=False),
    ]
    fields += [pa.field(lse_column(t), pa.float32(), nullable=False) for t in cfg.temperatures]
    if cfg.sampling:
        fields += sampling.fields(cfg.temperatures, cfg.sampling, encodings.id_type(num_classes))
    return pa.schema(fields)


def _table(schema: pa.Schema, batch: tasks.Batch, cols: dict[str, np.ndarray]) -> pa.Table:
    k = cols["topk_idx"].shape[1]
    arrays = [pa.array(batch.ids, pa.int64()), pa.array(batch.view, pa.int32())]
    if batch.position is not None:
        arrays.append(pa.array(batch.position, pa.int32()))
    if batch.input_token is not None:
        arrays.append(pa.array(batch.input_token, pa.int32()))
    arrays += [pa.FixedSizeListArray.from_arrays(pa.array(cols[f.name].reshape(-1), f.type.value_type), k)
               for f in schema if f.name.startswith("topk_")]
    arrays.append(pa.array(cols["logit_max"], pa.float32()))
    arrays += [pa.array(cols[f.name], pa.float32()) for f in schema if f.name.startswith("lse_")]
    for f in schema:
        if f.name.startswith("sample_idx_"):
            count = schema.field(f.name.replace("sample_idx_", "sample_count_"))
            arrays += sampling.to_arrow(cols[f.name], cols[count.name], f.type.value_type, count.type.value_type)
        elif f.name.startswith("entropy_"):
            arrays.append(pa.array(cols[f.name], pa.float32()))
    return pa.Table.from_arrays(arrays, schema=schema)


def _finish(manifest: dict[str, Any]) -> None:
    """Aggregate the per-part sums into the manifest's fidelity statistics; mark complete."""
    fidelity = {}
    for split, info in manifest["splits"].items():
        totals: dict[str, float] = {}
        for part in info["parts"]:
            for name, value in part["fidelity_sums"].items():
                totals[name] = totals.get(name, 0.0) + value
        samples = sum(p["scored"] for p in info["parts"])  # rows scored: view 0 / every predicted token
        stats: dict[str, Any] = {}
        for t in manifest["temperatures"]:
            name = temperature_key(t)
            stats[name] = {"kept_mass": totals[f"kept_mass_{name}"] / samples,
                           "kl_full_to_cached": totals[f"kl_{name}"] / samples}
            if f"kl_sampled_{name}" in totals:  # label.sampling: the draws' own statistics
                stats[name] |= {"sampled_mass": totals[f"sampled_mass_{name}"] / samples,
                                "kl_full_to_sampled": totals[f"kl_sampled_{name}"] / samples}
        labeled = sum(p["labeled"] for p in info["parts"])
        stats["teacher_accuracy"] = sum(p["correct"] for p in info["parts"]) / labeled if labeled else None
        stats["teacher_loss"] = sum(p["nll"] for p in info["parts"]) / labeled if labeled else None
        fidelity[split] = stats
    manifest["fidelity"] = fidelity
    if encodings.of(manifest)["name"] != "topk":
        manifest["encoding"]["max_abs_error"] = max(p["max_abs_error"] for i in manifest["splits"].values()
                                                    for p in i["parts"])
    manifest["complete"] = True
