"""Reading the cache for a student: only the columns and arrays it asks for.

`Cache.open` reads the manifest and refuses an incomplete cache or one from a newer
schema. `check` is the cheap start-of-training check (part files present with their
recorded sizes and row counts, chunk files present, data fingerprints equal to the
prepared files); `kd cache verify` does the full, hashing check. `require` refuses a
temperature, feature or view the cache lacks, saying what to add to `label`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from kd.cache import encoding as encodings
from kd.cache import sampling
from kd.cache.layout import MANIFEST, SHARDS, chunk_files, feature_path, lse_column, rows_per_sample, sample_columns
from kd.cache.manifest import part_problem, read_manifest
from kd.cache.store import Store
from kd.errors import CacheError, CacheMissingError, StaleCacheError
from kd.prepared import data_fingerprint


@dataclass
class SoftTargets:
    """Cache rows of one split, in cache order (sample-major, views inside)."""

    ids: np.ndarray  # (R,) int64
    view: np.ndarray  # (R,) int32
    topk_idx: np.ndarray  # (R, k) int32
    topk_logit: np.ndarray  # (R, k) float16 or float32 (compact: float32, decoded), max-shifted
    lse: dict[float, np.ndarray]  # temperature -> (R,) float32
    # label.sampling, at the temperatures asked: T -> (sample_idx, sample_count), (R, N) int32 each,
    # each row's distinct drawn classes ascending, padded with count 0; and T -> (R,) entropy
    samples: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    entropy: dict[float, np.ndarray] = field(default_factory=dict)


class Cache:
    def __init__(self, store: Store, manifest: dict[str, Any]):
        self.store = store
        self.root = store.root  # a Path, or a URL string for object storage
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | Path) -> Cache:
        store = Store(root)
        if not store.is_file(MANIFEST) and store.files(SHARDS):
            raise CacheError(f"{root}: cache is incomplete (shards of a sharded `kd label` are still running or "
                             f"were interrupted); finish them, then run `kd cache merge {root}`")
        manifest = read_manifest(store)
        if not manifest.get("complete"):
            raise CacheError(f"{root}: cache is incomplete (an interrupted `kd label`?); run `kd label` to finish it")
        return cls(store, manifest)

    @property
    def views(self) -> int | None:
        """Rows per sample: 1 + the number of augmented views (images), or a block's predicted
        tokens (text: `position` 0..L-2); None where it varies (instruction data)."""
        return rows_per_sample(self.manifest)

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    def split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise CacheMissingError(f"{self.root}: the cache has no split {split!r} "
                                    f"(has: {', '.join(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    @property
    def draws(self) -> int | None:
        """Tokens drawn per row and temperature (`label.sampling`), None without sampled targets."""
        return (self.manifest.get("sampling") or {}).get("draws")

    def require(self, *, temperatures: list[float] = (), features: dict[str, tuple[str, ...]] | None = None,
                views: bool = False, samples: list[float] = (), who: str = "this student",
                rebuild: str = "`kd label`") -> None:
        """Refuse what the cache cannot give, naming what to add to params.yaml's `label`.

        features: teacher layer -> the modes that would serve (the first is the one to suggest);
        samples: the temperatures whose sampled targets are read.
        """
        if samples and not self.draws:
            raise CacheMissingError(
                f"{who} reads sampled targets (loss.soft.targets: sampled), but the cache at {self.root} holds "
                f"the top-{self.manifest['top_k']} only (label.sampling: null); set label.sampling (e.g. 32) in the "
                f"params file and run {rebuild}")
        cached_t = [float(t) for t in self.manifest["temperatures"]]
        for t in temperatures:
            if float(t) not in cached_t:
                raise CacheMissingError(
                    f"{who} needs temperature {t:g}, but the cache at {self.root} holds "
                    f"{self.manifest['temperatures']}; add {t:g} to label.temperatures (in the params file) "
                    f"and run {rebuild}")
        specs = {s["name"]: s["mode"] for s in self.manifest["features"]}
        for layer, modes in (features or {}).items():
            modes = (modes,) if isinstance(modes, str) else tuple(modes)
            if specs.get(layer) not in modes:
                held = f"holds it as {specs[layer]!r}" if layer in specs else "does not hold it"
                raise CacheMissingError(
                    f"{who} needs teacher layer {layer!r} in mode {' or '.join(map(repr, modes))}, but the cache at "
                    f"{self.root} {held}; set label.features.{layer}: {modes[0]} (in the params file) "
                    f"and run {rebuild}")
        if views and self.views == 1:
            raise CacheMissingError(
                f"{who} trains on augmented views, but the cache at {self.root} holds none; "
                f"set label.views in the params file (e.g. 4) and run {rebuild}")

    def feature_spec(self, layer: str) -> dict[str, Any]:
        return next(s for s in self.manifest["features"] if s["name"] == layer)

    def check(self, prepared: Path, splits: list[str], layers: list[str] = ()) -> None:
        """Integrity and staleness check before training: each Parquet part's size and sha256
        (soft targets are small), each needed Zarr chunk's presence, the data fingerprints.
        `kd cache verify` also hashes the Zarr chunks and checks schemas and alignment."""
        for split in splits:
            info = self.split(split)
            source = Path(prepared) / info["source"]
            if data_fingerprint(source) != info["data_fingerprint"]:
                raise StaleCacheError(
                    f"{self.root}: the cache was labeled from other data than {source} (data fingerprint differs); "
                    "run `kd label` again")
            for part in info["parts"]:
                problem = part_problem(self.store, part)
                if problem:
                    raise CacheError(f"{problem}; run `kd cache verify {self.root}`")
                for layer in ["id", *layers] if layers else []:
                    for chunk in chunk_files(self.manifest, split, layer, part["first_row"], part["rows"]):
                        if not self.store.is_file(chunk):
                            raise CacheError(f"{self.store.show(chunk)} is missing; run `kd cache verify {self.root}`")

    def soft_targets(self, split: str, temperatures: list[float], parts: list[int] | None = None,
                     samples: list[float] = ()) -> SoftTargets:
        """Rows of `split` (all, or those of the given consecutive parts), reading only id,
        view, top-k and the asked lse columns, and the sampled columns of the temperatures in
        `samples`; a compact top-k decoded (`encoding.decode`)."""
        info = self.split(split)
        chosen = info["parts"] if parts is None else [info["parts"][i] for i in parts]
        encoding = encodings.of(self.manifest)
        stored = encodings.columns(encoding)
        columns = ["id", "view", *stored, *[lse_column(t) for t in temperatures]]
        columns += [name for t in samples for name in sample_columns(t)]
        tables = [_read_part(self.store, self.store.safe(p["path"]), columns) for p in chosen]
        table = pa.concat_tables(tables).combine_chunks() if tables else None
        expected = sum(p["rows"] for p in chosen)
        if table is None or table.num_rows != expected:
            got = 0 if table is None else table.num_rows
            raise CacheError(f"{self.root}: split {split} has {got} rows in its parts, the manifest says {expected}")
        k = self.manifest["top_k"]
        topk_idx, topk_logit = encodings.decode({name: fixed_list(table[name], k) for name in stored}, encoding)
        return SoftTargets(
            ids=table["id"].to_numpy(),
            view=table["view"].to_numpy(),
            topk_idx=topk_idx,
            topk_logit=topk_logit,
            lse={float(t): table[lse_column(t)].to_numpy() for t in temperatures},
            samples={float(t): sampling.from_arrow(table[sample_columns(t)[0]], table[sample_columns(t)[1]],
                                                   self.draws) for t in samples},
            entropy={float(t): table[sample_columns(t)[2]].to_numpy() for t in samples},
        )

    def masks(self, split: str, parts: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A masked-LM cache's masking of `split` (all, or the given parts), row for row:
        (position, input_token), the token the teacher saw at each masked position ([MASK], a
        random one or itself)."""
        if self.manifest.get("text", {}).get("objective") != "masked":
            raise CacheError(f"{self.root}: not a masked language model's cache (no recorded masks)")
        info = self.split(split)
        chosen = info["parts"] if parts is None else [info["parts"][i] for i in parts]
        tables = [_read_part(self.store, self.store.safe(p["path"]), ["position", "input_token"]) for p in chosen]
        table = pa.concat_tables(tables).combine_chunks()
        return table["position"].to_numpy(), table["input_token"].to_numpy()

    def feature(self, split: str, layer: str) -> zarr.Array:
        """The Zarr array of one cached layer, rows aligned with `soft_targets(split)`."""
        self.split(split)
        return zarr.open_array(self.store.zarr(self.store.safe(feature_path(split, layer)), read_only=True), mode="r")


def _read_part(store: Store, rel: str, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(store.full(rel), columns=columns, filesystem=store.fs)
    except (pa.ArrowException, OSError) as exc:
        raise CacheError(f"{store.show(rel)}: unreadable Parquet part ({exc}); run `kd cache verify`") from None


def fixed_list(column: pa.ChunkedArray, k: int) -> np.ndarray:
    # A fixed_size_list<T>[k] column -> (R, k) numpy array without a per-row copy.
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
