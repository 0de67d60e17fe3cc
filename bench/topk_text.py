"""What k and the encoding cost on text: bytes per cached token and KL(full || decoded).

Runs after `dvc repro text_label` (the default text teacher and prepared pydoc): labels the
prepared splits with the teacher once per (k, encoding) into a scratch cache and reads what
`kd label` writes: the fidelity statistics (test split, every predicted token; computed by the
writer from the decoded values) and the soft-target Parquet bytes per row (all splits: every
column of the parts, id, position and lse included). Encodings: `topk` with float16 logits
(the default) and `compact`.

`--synthetic-vocab 32000` adds the same measure on synthetic language-model-like logits at
that vocabulary (no teacher has one here): each row is a Zipf prior over the ids (id 0 the most
frequent, as a BPE's early merges roughly are; a second run shuffles the ids) plus Gaussian
noise and 24 boosted tokens, calibrated at 4,096 tokens to the default teacher's test rows
(top-1/8/32/128 mass 0.26/0.54/0.70/0.83 and entropy 4.2 nats, against the teacher's
0.25/0.53/0.68/0.81 and 4.3 on 2,000 of its rows). The rows go
through the writer's own functions (`soft_targets`, `encoding.encode`, the part schema and
Parquet options) and the fidelity statistics of the decoded rows.

    python bench/topk_text.py --ks 8,32,128 --synthetic-vocab 32000
"""

from __future__ import annotations

import dataclasses
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import typer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"  # the example projects whose params and data a bench reads
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import stamp
from kd import config, tasks
from kd.cache import encoding as encodings
from kd.cache import label
from kd.cache.layout import ROW_GROUP_ROWS, temperature_key
from kd.cache.targets import fidelity_sums, part_schema, soft_targets
from kd.cli.label import load_teacher

ENCODINGS = ("topk", "compact")


def teacher_rows(ks: list[int], teacher_dir: Path, prepared: Path, params: Path) -> list[dict]:
    base = config.section(params, "label", config.LabelConfig)
    teacher = load_teacher(teacher_dir, None, None, base)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for k in ks:
            for encoding in ENCODINGS:
                cfg = dataclasses.replace(base, top_k=k, encoding=encoding)
                manifest = label(teacher, prepared, Path(scratch) / f"k{k}-{encoding}", cfg,
                                 task_inputs=tasks.inputs_for(prepared, teacher), progress=False)
                fidelity = manifest["fidelity"]["test"]
                parts = [p for s in manifest["splits"].values() for p in s["parts"]]
                rows.append({"k": k, "encoding": encoding, "teacher_next_token_accuracy": fidelity["teacher_accuracy"],
                             **{t: fidelity[t] for t in fidelity if t != "teacher_accuracy"},
                             "max_abs_error": manifest["encoding"].get("max_abs_error", 0.0),
                             "soft_target_bytes": sum(p["bytes"] for p in parts),
                             "rows": sum(p["rows"] for p in parts)})
    return rows


def synthetic_logits(rows: int, vocab: int, seed: int, shuffled: bool) -> torch.Tensor:
    """(rows, vocab) language-model-like logits: Zipf prior + noise + a few boosted tokens."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(vocab, generator=g) if shuffled else torch.arange(vocab)
    prior = -1.0 * torch.log1p(rank.float())
    z = prior + 1.7 * torch.randn(rows, vocab, generator=g)
    boosted = torch.randint(0, vocab, (rows, 24), generator=g)
    z.scatter_add_(1, boosted, 3.5 + 3.0 * torch.rand(rows, 24, generator=g))
    return z


def synthetic_rows(ks: list[int], vocab: int, shuffled: bool, temperatures: list[float], block: int = 127,
                   blocks: int = 64) -> list[dict]:
    """The writer's columns for synthetic logits, written as a part is, for each (k, encoding)."""
    logits = synthetic_logits(block * blocks, vocab, 0, shuffled)
    out = []
    for k in ks:
        for name in ENCODINGS:
            cfg = config.LabelConfig(top_k=k, temperatures=temperatures, encoding=name)
            encoding = encodings.header(name)
            computed = soft_targets(logits, k, temperatures, "float16" if name == "topk" else "float32")
            stored = encodings.encode(computed, encoding)
            decoded = dict(computed, **dict(zip(("topk_idx", "topk_logit"), encodings.decode(stored, encoding))))
            sums = fidelity_sums(logits, decoded, temperatures)
            schema = part_schema(cfg, ("position",), vocab)
            columns = {"id": np.repeat(np.arange(blocks), block), "view": np.zeros(len(logits), np.int32),
                       "position": np.tile(np.arange(block), blocks), **computed, **stored}
            arrays = [pa.FixedSizeListArray.from_arrays(pa.array(columns[f.name].reshape(-1), f.type.value_type), k)
                      if pa.types.is_fixed_size_list(f.type) else pa.array(columns[f.name], f.type) for f in schema]
            table = pa.Table.from_arrays(arrays, schema=schema)
            buffer = io.BytesIO()
            with pq.ParquetWriter(buffer, schema, compression="zstd", write_statistics=False,
                                  **encodings.writer_options(encoding, schema)) as writer:
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            n = len(logits)
            topk_only = {c: columns[c] for c in encodings.columns(encoding)}
            out.append({"k": k, "encoding": name, "vocab": vocab, "shuffled_ids": shuffled,
                        **{temperature_key(t): {
                            "kept_mass": sums[f"kept_mass_{temperature_key(t)}"] / n,
                            "kl_full_to_cached": sums[f"kl_{temperature_key(t)}"] / n}
                           for t in temperatures},
                        "soft_target_bytes": len(buffer.getvalue()), "rows": n,
                        "topk_column_bytes": _column_bytes(topk_only, encoding, schema)})
    return out


def _column_bytes(columns: dict[str, np.ndarray], encoding: dict, schema: pa.Schema) -> int:
    """The Parquet bytes of the top-k columns alone (the per-row id, lse, ... excluded)."""
    fields = [schema.field(name) for name in columns]
    table = pa.Table.from_arrays([pa.FixedSizeListArray.from_arrays(pa.array(columns[f.name].reshape(-1),
                                                                             f.type.value_type), f.type.list_size)
                                  for f in fields], schema=pa.schema(fields))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", write_statistics=False, row_group_size=ROW_GROUP_ROWS,
                   **encodings.writer_options(encoding, table.schema))
    return len(buffer.getvalue())


def table(rows: list[dict]) -> str:
    temps = [t for t in rows[0] if t.startswith("t") and isinstance(rows[0][t], dict)]
    lines = ["| k | encoding | " + " | ".join(f"kept mass ({t}) | KL(full \\|\\| decoded) ({t})" for t in temps)
             + " | bytes per row | bytes per kept entry |",
             "|---:|---|" + "---:|" * (2 * len(temps) + 2)]
    for r in rows:
        cells = [f"{r[t]['kept_mass']:.4f} | {r[t]['kl_full_to_cached']:.4f}" for t in temps]
        per_row = r["soft_target_bytes"] / r["rows"]
        lines.append(f"| {r['k']} | {r['encoding']} | " + " | ".join(cells)
                     + f" | {per_row:.0f} | {per_row / r['k']:.2f} |")
    return "\n".join(lines)


def main(ks: str = "8,32,128", teacher_dir: Path = EXAMPLES / "text/data/teacher",
         prepared: Path = EXAMPLES / "text/data/prepared", params: Path = EXAMPLES / "text" / "params.yaml",
         synthetic_vocab: int = typer.Option(0, help="Also measure synthetic LM-like logits at this vocabulary."),
         out: Path = REPO / "bench/results_topk_text.json") -> None:
    k_list = list(map(int, ks.split(",")))
    result = {"split": "test", "rows": teacher_rows(k_list, teacher_dir, prepared, params)}
    print("default text teacher (test split; bytes: all splits)\n" + table(result["rows"]))
    if synthetic_vocab:
        temperatures = config.section(params, "label", config.LabelConfig).temperatures
        result["synthetic"] = []
        for shuffled in (False, True):
            rows = synthetic_rows(k_list, synthetic_vocab, shuffled, temperatures)
            result["synthetic"] += rows
            print(f"\nsynthetic, vocabulary {synthetic_vocab}, ids {'shuffled' if shuffled else 'by frequency'}\n"
                  + table(rows))
            for r in rows:
                alone = r["topk_column_bytes"] / r["rows"] / r["k"]
                print(f"  k={r['k']} {r['encoding']}: top-k columns alone {alone:.2f} bytes per kept entry")
    stamp.write(out, result)


if __name__ == "__main__":
    typer.run(main)
