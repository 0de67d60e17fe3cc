"""The benchmark cases of the bench issue, one function each; every one returns a dict with
`ratios` (name -> `timing.ratio` record: value, target, met) and `details` (the raw figures).

All of them call the real library (`kd.cache.label`, `kd.tasks.image.rows`,
`kd.distill.train_model` / `student_terms`, `kd.training.fit`, `Cache.soft_targets`)
on data written by `kd.sources.prepare` and a random-weight teacher of the default
architecture (params.yaml `teacher`): weights do not change the cost of a forward pass. The
scale case (4) lives in `bench/scale.py`, because it runs the `kd` commands in fresh processes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import statistics
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
from zarr.codecs import ZstdCodec

from bench.timing import interleave, medians, paired_ratio, ratio, seconds
from kd import config, features, losses, sources
from kd.cache import Cache, Teacher, label, layout, lse_column, targets
from kd.cache.batch import Batch
from kd.config import SPLITS, LabelConfig, PrepareConfig, StudentConfig, TeacherConfig
from kd.distill import train_model
from kd.errors import CacheMissingError
from kd.loader import SampleSet, needed_temperatures
from kd.methods import Built, Shapes, student_layers, student_terms
from kd.prepared import images
from kd.tasks import image as image_task
from kd.tasks.image import image_set, probe_shapes
from kd.tasks.image_models import build, fingerprint, load_model, save_model
from kd.training import fit

# --- the shared workspace ---------------------------------------------------------------------


@dataclass
class Workspace:
    """Scratch data every default case shares: mnist5k prepared, a teacher, and its cache."""

    root: Path
    params: Path
    prepared: Path
    teacher: Teacher
    label_cfg: LabelConfig  # params.yaml's `label` section
    cache: Path  # `prepared` labeled with `label_cfg`


def prepare_default(out: Path, params: Path, rows: int) -> Path:
    """params.yaml's `prepare` (mnist5k by default) scaled to `rows` samples in all, same proportions."""
    cfg = config.section(params, "prepare", PrepareConfig)
    total = cfg.labeled + cfg.unlabeled + cfg.test
    labeled, test = max(10, rows * cfg.labeled // total), max(10, rows * cfg.test // total)
    cfg = dataclasses.replace(cfg, labeled=labeled, test=test, unlabeled=max(10, rows - labeled - test))
    sources.prepare(cfg, out)
    return out


def make_teacher(directory: Path, params: Path, input_shape: list[int], num_classes: int,
                 arch: str | None = None, arch_kwargs: dict | None = None) -> Teacher:
    """A random-weight teacher (default: params.yaml's `teacher` architecture), saved and loaded
    back as `kd label` loads one."""
    tcfg = config.section(params, "teacher", TeacherConfig)
    arch, arch_kwargs = arch or tcfg.arch, tcfg.arch_kwargs if arch_kwargs is None else arch_kwargs
    torch.manual_seed(tcfg.seed)
    model = build(arch, arch_kwargs, input_shape, num_classes)
    save_model(directory, model, {"arch": arch, "arch_kwargs": arch_kwargs, "input_shape": list(input_shape),
                                  "num_classes": num_classes})
    model, saved = load_model(directory)
    return Teacher(model, fingerprint(directory), saved)


def workspace(root: Path, params: Path, rows: int) -> Workspace:
    prepared = prepare_default(root / "prepared", params, rows)
    info = images.split_info(prepared / "labeled.parquet")
    teacher = make_teacher(root / "teacher", params, info["input_shape"], info["num_classes"])
    label_cfg = config.section(params, "label", LabelConfig)
    label(teacher, prepared, root / "cache", label_cfg, task_inputs=image_task.Inputs, progress=False)
    return Workspace(root, params, prepared, teacher, label_cfg, root / "cache")


# --- case 1: labeling overhead ----------------------------------------------------------------


def labeling_overhead(ws: Workspace, rows: int, repeats: int) -> dict[str, Any]:
    """Wall time of `label` over `rows` samples / the bare teacher forward over the same batches."""
    prepared = prepare_default(ws.root / "label_prepared", ws.params, rows)
    splits = [images.read_split(prepared / f"{s}.parquet") for s in SPLITS]
    inputs = [torch.tensor(s.x).reshape(len(s.x), *s.input_shape) for s in splits]
    batch = ws.label_cfg.batch_size
    model = ws.teacher.model.eval()
    full_layers = [layer for layer, mode in ws.label_cfg.features.items() if mode == "full"] or ["stages.1"]
    variants = {
        "features_off": dataclasses.replace(ws.label_cfg, features={}),
        "full_feature_map": dataclasses.replace(ws.label_cfg, features={full_layers[0]: "full"}),
        "default_label_section": ws.label_cfg,
    }

    def bare() -> float:
        def run():
            with torch.no_grad():
                for x in inputs:
                    for start in range(0, len(x), batch):
                        model(x[start:start + batch])
        return seconds(run)

    def labeling(cfg: LabelConfig) -> Callable[[], float]:
        def run() -> float:
            out = ws.root / "label_out"
            shutil.rmtree(out, ignore_errors=True)
            return seconds(lambda: label(ws.teacher, prepared, out, cfg, task_inputs=image_task.Inputs, progress=False))
        return run

    times = interleave({"bare_forward": bare, **{name: labeling(cfg) for name, cfg in variants.items()}}, repeats)
    samples = sum(len(s.ids) for s in splits)
    mid = medians(times)
    return {
        "ratios": {
            "features_off": ratio(paired_ratio(times, "features_off", "bare_forward"), 1.10,
                                  what="`label`, no features / bare teacher forward"),
            "full_feature_map": ratio(paired_ratio(times, "full_feature_map", "bare_forward"), 1.25,
                                      what=f"`label` caching {full_layers[0]} full / bare teacher forward"),
            "default_label_section": ratio(paired_ratio(times, "default_label_section", "bare_forward"),
                                           what="`label` with params.yaml's features / bare forward"),
        },
        "details": {"rows": samples, "batch_size": batch, "full_layer": full_layers[0],
                    "median_seconds": mid, "rows_per_second": {k: samples / v for k, v in mid.items()},
                    "features": {k: v.features for k, v in variants.items()}},
    }


# --- case 2: a student from the cache ---------------------------------------------------------


@dataclass
class OnlineSet:
    """Online KD: the same rows, with the teacher run inside the training loop on every batch.

    Adds `teacher_logits` (B, C) and `teacher.<layer>` (the layer reduced by its cache mode) to
    each batch; with `pseudo`, rows flagged `pseudo` get the teacher's argmax as their label.
    """

    base: SampleSet
    teacher: nn.Module
    layers: dict[str, str]
    pseudo_threshold: float | None = None

    def __len__(self) -> int:
        return len(self.base)

    def batches(self, epoch: int, batch_size: int, seed: int, views: str = "none", shard=None):
        for batch in self.base.batches(epoch, batch_size, seed, views, shard):
            with torch.no_grad(), features.tap(self.teacher, list(self.layers)) as captured:
                logits = self.teacher(batch["x"])
                batch["teacher_logits"] = logits
                for layer, mode in self.layers.items():
                    batch[f"teacher.{layer}"] = features.reduce(captured[layer], mode)
                if self.pseudo_threshold is not None:
                    p = logits.softmax(1).max(1)
                    keep = batch["pseudo"] & (p.values >= self.pseudo_threshold)
                    batch["label"] = torch.where(keep, p.indices, batch["label"])
            yield batch


def _train(cfg: StudentConfig, dataset, input_shape: list[int], num_classes: int,
           teacher_specs: dict[str, dict], soft: Callable | str | None) -> float:
    """`distill.train_model` with the soft term swapped for `soft(cfg) -> term` (or dropped:
    soft="drop"); -> mean epoch seconds."""
    torch.manual_seed(cfg.seed)
    model = build(cfg.arch, cfg.arch_kwargs, input_shape, num_classes)
    built: Built = student_terms(cfg, Shapes(probe_shapes(model, input_shape, student_layers(cfg)), teacher_specs))
    if soft == "drop":  # the data path alone: cached batches, every term but the soft one
        del built.terms["soft"]
    elif soft is not None and cfg.loss.soft is not None:
        built.terms["soft"] = (cfg.loss.soft.weight, soft(cfg))
    for module in built.modules:
        module.train()
    log = fit(model, dataset, built.terms, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay, seed=cfg.seed, taps=built.taps, extra_modules=built.modules,
              progress=False)
    return statistics.fmean(row["seconds"] for row in log)


def _library_train(cfg, dataset, cache, prepared, teacher_specs) -> float:
    """Mean epoch seconds of `distill.train_model`, the code path of `kd distill` (teacher_specs
    None: the baseline twin's hard-label-only training)."""
    _, log = train_model(image_task, cfg, cache, prepared, dataset, "bench", False, teacher_specs)
    return statistics.fmean(row["seconds"] for row in log)


def _online_soft(cfg: StudentConfig):
    temperature = cfg.loss.soft.temperature

    def term(batch, out):
        return losses.soft_target_loss(out["logits"], batch["teacher_logits"], temperature)
    return term


def _true_labels(prepared: Path, cache: Cache, cfg: StudentConfig, ids: np.ndarray) -> torch.Tensor:
    """Each transfer row's true label (labeled y, unlabeled truth); the teacher's top-1 where unknown."""
    known_ids, known_y = [], []
    for name in ("labeled.parquet", images.TRUTH_FILE):
        if (prepared / name).is_file():
            table = pq.read_table(prepared / name, columns=["id", "y"])
            known_ids.append(table["id"].to_numpy())
            known_y.append(table["y"].to_numpy())
    known_ids, known_y = np.concatenate(known_ids), np.concatenate(known_y)
    order = np.argsort(known_ids)
    at = np.clip(np.searchsorted(known_ids[order], ids), 0, len(order) - 1)
    found = known_ids[order][at] == ids
    top1 = np.concatenate([cache.soft_targets(s, []).topk_idx[::cache.views, 0] for s in cfg.transfer])
    return torch.from_numpy(np.where(found, known_y[order][at], top1).astype(np.int64))


def student_from_cache(ws: Workspace, students: list[str], repeats: int, online_repeats: int,
                       epochs: int) -> dict[str, Any]:
    """Per student: epoch time from the cache / epoch time on in-memory hard labels, plus the
    streaming reader, the data path alone and the speedup over online KD."""
    cache = Cache.open(ws.cache)
    ratios: dict[str, Any] = {}
    details: dict[str, Any] = {"epochs_per_measurement": epochs, "skipped": {}}
    for name in students:
        cfg = dataclasses.replace(config.student(ws.params, name), epochs=epochs, repeats=1)
        if cfg.assistant is not None:
            details["skipped"][name] = (f"learns from assistant {cfg.assistant!r}'s cache "
                                        "(same cost as its teacher-cache twin)")
            continue
        layers = cfg.loss.teacher_layers(cfg.where)
        try:
            cache.require(temperatures=needed_temperatures(cfg), features=layers, views=cfg.views, who=name)
        except CacheMissingError as exc:  # a student the default `label` section does not serve
            details["skipped"][name] = str(exc)
            continue
        teacher_specs = {layer: cache.feature_spec(layer) for layer in layers}
        shape, classes = cache.manifest["input_shape"], cache.num_classes

        loaded: dict[str, Any] = {}
        load_seconds = seconds(lambda: (
            cache.check(ws.prepared, cfg.transfer, list(layers)),
            loaded.setdefault("set", image_task.rows(cache, ws.prepared, cfg, memory_mb=2048))))
        cached = loaded["set"]
        streaming = image_task.rows(cache, ws.prepared, cfg, memory_mb=1e-3)  # any budget below the set: streamed
        hard = image_set(cached.inputs["x"], cached.ids, shape,
                         {"label": _true_labels(ws.prepared, cache, cfg, cached.ids)})
        pseudo = np.concatenate([np.full(cache.split(s)["rows"], s == "unlabeled") for s in cfg.transfer])
        own_labels = cached.targets["label"].clone()
        hard_cfg = cfg.loss.hard
        if hard_cfg is not None and hard_cfg.pseudo:
            own_labels[torch.from_numpy(pseudo)] = -1  # online: the teacher gives these inside the loop
        online = OnlineSet(
            image_set(cached.inputs["x"], cached.ids, shape,
                      {"label": own_labels, "pseudo": torch.from_numpy(pseudo)}),
            ws.teacher.model.eval(), {layer: spec["mode"] for layer, spec in teacher_specs.items()},
            hard_cfg.threshold if hard_cfg is not None and hard_cfg.pseudo else None)

        sides = {
            "cache": lambda: _library_train(cfg, cached, cache, ws.prepared, teacher_specs),
            "hard_labels": lambda: _library_train(cfg, hard, cache, ws.prepared, None),
            "cache_streaming": lambda: _library_train(cfg, streaming, cache, ws.prepared, teacher_specs),
        }
        if cfg.loss.soft is not None:
            sides["cache_without_soft"] = lambda: _train(cfg, cached, shape, classes, teacher_specs, "drop")
        times = interleave(sides, repeats)
        online_times = interleave({
            "online": lambda: _train(cfg, online, shape, classes, teacher_specs,
                                     _online_soft if cfg.loss.soft is not None else None),
            "cache": sides["cache"]}, online_repeats)

        terms = [f.name for f in dataclasses.fields(cfg.loss) if getattr(cfg.loss, f.name) is not None]
        # the target is for soft + hard students; feature terms add work of their own
        target = 1.10 if set(terms) <= {"soft", "hard"} else None
        ratios[name] = ratio(paired_ratio(times, "cache", "hard_labels"), target,
                             what=f"epoch from the cache ({' + '.join(terms)}) / epoch on in-memory hard labels")
        ratios[f"{name}.streaming"] = ratio(paired_ratio(times, "cache_streaming", "hard_labels"),
                                            what="same, cache streamed from disk every epoch (StreamingSet)")
        if "cache_without_soft" in sides:
            ratios[f"{name}.without_soft_term"] = ratio(
                paired_ratio(times, "cache_without_soft", "hard_labels"),
                what="floor: cached batches and every term but the soft one (the data path's share)")
        ratios[f"{name}.speedup_vs_online"] = ratio(paired_ratio(online_times, "online", "cache"), better="higher",
                                                    what="online KD epoch (teacher in the loop) / epoch from cache")
        hard_epoch = medians(times)["hard_labels"]
        ratios[f"{name}.load_in_epochs"] = ratio(load_seconds / hard_epoch,
                                                 what="one-time check + read of the cache, in hard-label epochs")
        details[name] = {"rows": len(cached), "steps_per_epoch": math.ceil(len(cached) / cfg.batch_size),
                         "median_epoch_seconds": {**medians(times), "online": medians(online_times)["online"]},
                         "load_seconds": load_seconds, "terms": terms}
    return {"ratios": ratios, "details": details}


# --- case 3: cache size -----------------------------------------------------------------------


def _parquet_bytes(path: Path, table: pa.Table) -> tuple[int, int]:
    """Write `table` with the writer's settings; -> (file bytes, column-chunk bytes without the footer)."""
    with pq.ParquetWriter(str(path), table.schema, compression="zstd", write_statistics=False) as out:
        out.write_table(table, row_group_size=layout.ROW_GROUP_ROWS)
    meta = pq.ParquetFile(path).metadata
    chunks = sum(meta.row_group(g).column(c).total_compressed_size
                 for g in range(meta.num_row_groups) for c in range(meta.num_columns))
    return path.stat().st_size, chunks


def _zarr_bytes(root: Path, name: str, block: np.ndarray) -> int:
    """Chunk bytes of `block` written as the writer writes a feature array (Zstd 3, whole-row chunks)."""
    row_bytes = max(1, math.prod(block.shape[1:])) * block.dtype.itemsize
    group = zarr.open_group(str(root), mode="a")
    array = group.create_array(name, shape=block.shape, chunks=(layout.chunk_rows(len(block), row_bytes),
                                                                *block.shape[1:]),
                               dtype=block.dtype, compressors=ZstdCodec(level=3), fill_value=0,
                               config={"write_empty_chunks": True})
    array[:] = block
    return sum(f.stat().st_size for f in (root / name / "c").rglob("*") if f.is_file())


def cache_size(ws: Workspace, rows: int) -> dict[str, Any]:
    """Bytes per row of soft targets (k x dtype) and of each feature mode, against full float32."""
    source = images.read_split(ws.prepared / "unlabeled.parquet")
    x = torch.tensor(source.x[:rows]).reshape(-1, *source.input_shape)
    ids = source.ids[:rows]
    model = ws.teacher.model.eval()
    layers = [n for n, _ in model.named_modules() if re.fullmatch(r"stages\.\d+|embed", n)]
    activations: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    chunks = []
    with torch.no_grad(), features.tap(model, layers) as captured:
        for i in range(0, len(x), 256):
            chunks.append(model(x[i:i + 256]).float())
            for layer in layers:
                activations[layer].append(captured[layer])
    logits = torch.cat(chunks)
    n, classes = logits.shape
    temperatures = ws.label_cfg.temperatures
    scratch = ws.root / "sizes"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    view = np.zeros(n, np.int32)

    # the full-logits baseline: id, view and the float32 logits, same Parquet settings
    full_table = pa.table({"id": pa.array(ids, pa.int64()), "view": pa.array(view, pa.int32()),
                           "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.numpy().reshape(-1)), classes)})
    full_file, full_chunks = _parquet_bytes(scratch / "full.parquet", full_table)
    soft: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for k in (1, 3, 5, 10):
        if k > classes:
            continue
        for dtype in ("float16", "float32"):
            cfg = dataclasses.replace(ws.label_cfg, top_k=k, logit_dtype=dtype, features={})
            cols = targets.soft_targets(logits, k, temperatures, dtype)
            schema = targets.part_schema(cfg)
            rows = Batch(ids, view, None, logits, {}, np.full(len(ids), -1), view == 0)
            table = targets.part_table(schema, rows, cols)
            file_bytes, chunk_bytes = _parquet_bytes(scratch / f"k{k}_{dtype}.parquet", table)
            raw = sum(f.type.byte_width if not pa.types.is_fixed_size_list(f.type)
                      else f.type.list_size * f.type.value_type.byte_width for f in schema)
            soft[f"k{k}_{dtype}"] = {"file_bytes_per_row": file_bytes / n, "data_bytes_per_row": chunk_bytes / n,
                                     "uncompressed_bytes_per_row": raw}
            ratios[f"soft_k{k}_{dtype}"] = ratio(file_bytes / full_file,
                                                 what=f"top-{k} {dtype} soft targets / full float32 logits (on disk)")
    real = Cache.open(ws.cache).split("unlabeled")
    real_bytes = sum(p["bytes"] for p in real["parts"]) / real["rows"]

    feats: dict[str, Any] = {}
    for layer in layers:
        act = torch.cat(activations[layer])
        full32 = act.numpy().astype(np.float32)
        raw32 = math.prod(act.shape[1:]) * 4
        compressed32 = _zarr_bytes(scratch / "f.zarr", f"{layer}.float32", full32) / n
        entry = {"source_shape": list(act.shape[1:]), "full_float32_raw_bytes_per_row": raw32,
                 "full_float32_zstd_bytes_per_row": compressed32}
        for mode in ("full", "pooled", "attention"):
            if mode == "attention" and act.dim() < 3 or mode == "pooled" and act.dim() < 3:
                continue  # a vector layer: pooled == full, no attention map
            block = features.reduce(act, mode).to(torch.float16).numpy()
            stored = _zarr_bytes(scratch / "f.zarr", f"{layer}.{mode}", block) / n
            entry[mode] = {"shape": list(block.shape[1:]), "bytes_per_row": stored,
                           "uncompressed_bytes_per_row": block[0].nbytes}
            ratios[f"{layer}.{mode}"] = ratio(stored / raw32,
                                              what=f"{layer} cached {mode} (float16, zstd) / raw float32 activation")
        feats[layer] = entry
    shutil.rmtree(scratch, ignore_errors=True)
    return {"ratios": ratios, "details": {
        "rows": n, "classes": classes, "temperatures": temperatures,
        "full_logits": {"file_bytes_per_row": full_file / n, "data_bytes_per_row": full_chunks / n,
                        "uncompressed_bytes_per_row": 8 + 4 + 4 * classes},
        "soft_targets": soft, "real_cache_unlabeled_bytes_per_row": real_bytes,
        "real_cache_settings": {"top_k": ws.label_cfg.top_k, "logit_dtype": ws.label_cfg.logit_dtype},
        "features": feats,
        "note": "random-weight teacher: a trained teacher's logits and activations compress differently",
    }}


# --- case 5: reader throughput ----------------------------------------------------------------


def reader_workspace(root: Path, params: Path, rows: int) -> tuple[Path, Path, Teacher]:
    """A cache big enough to time a reader: `rows` random 40-d samples (a Parquet file through
    `prepare`) labeled by a small random MLP with the default `label` section minus features."""
    rng = np.random.default_rng(0)
    source = root / "reader_source.parquet"
    root.mkdir(parents=True, exist_ok=True)
    split = images.Split(np.arange(rows, dtype=np.int64), rng.standard_normal((rows, 40), np.float32),
                         rng.integers(0, 10, rows), [40], 10)
    images.write_split(source, split, dataset="bench-random")
    labeled = test = max(10, rows // 10)
    prepared = root / "reader_prepared"
    sources.prepare(PrepareConfig(dataset=str(source), labeled=labeled, test=test, unlabeled=rows - labeled - test),
                    prepared)
    teacher = make_teacher(root / "reader_teacher", params, [40], 10, arch="mlp", arch_kwargs={"hidden": [32]})
    cfg = dataclasses.replace(config.section(params, "label", LabelConfig), features={})
    label(teacher, prepared, root / "reader_cache", cfg, task_inputs=image_task.Inputs, progress=False)
    return prepared, root / "reader_cache", teacher


def reader_throughput(ws: Workspace, rows: int, repeats: int, student: str = "mlp_soft") -> dict[str, Any]:
    """rows/s of `Cache.soft_targets` for a student's columns / rows/s of pyarrow reading the same."""
    prepared, root, _ = reader_workspace(ws.root, ws.params, rows)
    cache = Cache.open(root)
    cfg = config.student(ws.params, student)
    temperatures = needed_temperatures(cfg)
    columns = ["id", "view", "topk_idx", "topk_logit", *[lse_column(t) for t in temperatures]]
    parts = {s: [root / p["path"] for p in cache.split(s)["parts"]] for s in cfg.transfer}
    total = sum(cache.split(s)["rows"] for s in cfg.transfer)

    def reader() -> float:
        return seconds(lambda: [cache.soft_targets(s, temperatures) for s in cfg.transfer])

    def raw() -> float:
        return seconds(lambda: [pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])
                                for paths in parts.values()])

    def raw_numpy() -> float:
        def run():
            for paths in parts.values():
                table = pa.concat_tables([pq.read_table(p, columns=columns) for p in paths]).combine_chunks()
                [table[c].combine_chunks().flatten().to_numpy() if pa.types.is_fixed_size_list(table[c].type)
                 else table[c].to_numpy() for c in columns]
        return seconds(run)

    def student_set() -> float:
        return seconds(lambda: image_task.rows(cache, prepared, cfg, memory_mb=2048))

    def raw_student_columns() -> float:  # the same cache columns plus the prepared x and y, raw
        def run():
            raw()
            for s in cfg.transfer:
                pq.read_table(prepared / f"{s}.parquet", columns=["id", "x", "y"])
        return seconds(run)

    def streamed_epoch() -> float:
        streaming = image_task.rows(cache, prepared, cfg, memory_mb=1e-3)
        return seconds(lambda: sum(1 for _ in streaming.batches(0, 4096, 0)))

    times = interleave({"reader": reader, "pyarrow": raw, "pyarrow_numpy": raw_numpy, "transfer_set": student_set,
                        "pyarrow_with_inputs": raw_student_columns, "streamed_epoch": streamed_epoch}, repeats)
    check = seconds(lambda: cache.check(prepared, cfg.transfer))
    mid = medians(times)
    return {
        "ratios": {
            "soft_targets": ratio(paired_ratio(times, "pyarrow", "reader"), 0.8, better="higher",
                                  what=f"rows/s of Cache.soft_targets ({student}'s columns) / pyarrow read_table"),
            "soft_targets_vs_numpy": ratio(paired_ratio(times, "pyarrow_numpy", "reader"), better="higher",
                                           what="same, pyarrow side also converting to numpy"),
            "transfer_set": ratio(paired_ratio(times, "pyarrow_with_inputs", "transfer_set"), better="higher",
                                  what="rows/s of loader.transfer_set (in memory) / pyarrow reading its columns"),
            "streamed_epoch": ratio(paired_ratio(times, "pyarrow_with_inputs", "streamed_epoch"), better="higher",
                                    what="rows/s of a StreamingSet epoch (batches only) / pyarrow, same columns"),
        },
        "details": {"rows": total, "columns": columns, "parts": sum(len(p) for p in parts.values()),
                    "median_seconds": mid, "rows_per_second": {k: total / v for k, v in mid.items()},
                    "check_seconds": check, "check_rows_per_second": total / check,
                    "note": "random inputs labeled by a small random MLP: the reader's cost does not depend "
                            "on the teacher"},
    }
