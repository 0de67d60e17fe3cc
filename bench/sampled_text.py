"""Sampled targets against the top-k at equal bytes: bytes per cached token and KL(full || decoded).

Runs after `dvc repro text_label` (the default text teacher and prepared pydoc). The teacher
runs once over the test split (every predicted token); each configuration's columns are then
made by the writer's own functions (`targets.soft_targets`, `encoding.encode`, `sampling.draw`,
`targets.part_schema`, `targets.part_table`) and written as one Parquet part is (zstd, the
encoding's options), so the bytes are what `kd label` would write for those rows (every
column: id, view, position, logit_max and lse at T=1 included). The configurations, all at T=1:

- float16 top-k and compact top-k at each k;
- sampled targets (`label.top_k: 1` plus `label.sampling: N`) with N chosen so the part takes
  about as many bytes as each top-k one (the largest N at or under its bytes, by bisection:
  the first n of N draws of a row are its draws for n, so one set of draws serves every N).

KL(full || decoded) and the kept mass are the writer's fidelity statistics: for the top-k, of
the decoded top-k with the tail spread evenly; for the draws, of the draws' distribution with
Good-Turing's unseen mass spread evenly (`kd/cache/sampling.py`), and the teacher's mass
on the drawn tokens.

    python bench/sampled_text.py --ks 8,32,128
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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
from kd.cache import sampling
from kd.cache.layout import ROW_GROUP_ROWS, sample_columns
from kd.cache.targets import fidelity_sums, part_schema, part_table, soft_targets
from kd.cli.label import load_teacher

T = 1.0


def teacher_logits(teacher_dir: Path, prepared: Path) -> tuple[torch.Tensor, SimpleNamespace]:
    """The teacher's logits on every predicted test token (R, V), with the rows' ids and positions."""
    cfg = config.LabelConfig(temperatures=[T])
    teacher = load_teacher(teacher_dir, None, None, cfg)
    inputs = tasks.inputs_for(prepared, teacher)(prepared, ["labeled", "test"], cfg)
    rows = inputs.read(prepared / "test.parquet", 0, inputs.samples("test"))
    batches = [inputs.batch(teacher.model.eval(), rows, start, min(start + 16, inputs.samples("test")), {})
               for start in range(0, inputs.samples("test"), 16)]
    meta = SimpleNamespace(ids=np.concatenate([b.ids for b in batches]), view=np.concatenate([b.view for b in batches]),
                           position=np.concatenate([b.position for b in batches]), input_token=None)
    return torch.cat([b.logits for b in batches]), meta


def part_bytes(cfg: config.LabelConfig, meta: SimpleNamespace, cols: dict[str, np.ndarray], num_classes: int) -> int:
    """The bytes of one Parquet part holding these rows, written as the writer writes one."""
    schema = part_schema(cfg, ("position",), num_classes)
    encoding = encodings.header(cfg.encoding)
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, schema, compression="zstd", write_statistics=False,
                          **encodings.writer_options(encoding, schema)) as writer:
        writer.write_table(part_table(schema, meta, cols), row_group_size=ROW_GROUP_ROWS)
    return len(buffer.getvalue())


def topk_row(logits: torch.Tensor, meta: SimpleNamespace, k: int, name: str) -> dict:
    cfg = config.LabelConfig(top_k=k, temperatures=[T], encoding=name)
    encoding = encodings.header(name)
    computed = soft_targets(logits, k, [T], "float16" if name == "topk" else "float32")
    stored = encodings.encode(computed, encoding)
    decoded = dict(computed, **dict(zip(("topk_idx", "topk_logit"), encodings.decode(stored, encoding))))
    sums = fidelity_sums(logits, decoded, [T])
    n = len(logits)
    return {"targets": "topk" if name == "topk" else "compact", "k": k,
            "bytes_per_token": part_bytes(cfg, meta, {**computed, **stored}, logits.shape[1]) / n,
            "kept_mass": sums["kept_mass_t1"] / n, "kl_full_to_decoded": sums["kl_t1"] / n}


class Sampled:
    """Sampled targets of every N up to `most`, from one set of draws."""

    def __init__(self, logits: torch.Tensor, meta: SimpleNamespace, most: int):
        self.logits, self.meta = logits, meta
        keys = sampling.row_keys(0, meta.ids, meta.view, meta.position, T)
        self.drawn, self.entropy = sampling.draws_in_order(logits, most, T, keys)
        self.top1 = soft_targets(logits, 1, [T], "float16")
        self.cache: dict[int, dict] = {}

    def row(self, draws: int) -> dict:
        if draws not in self.cache:
            idx, count = sampling.distinct(self.drawn[:, :draws])
            names = sample_columns(T)
            cols = {**self.top1, names[0]: idx, names[1]: count, names[2]: self.entropy}
            cfg = config.LabelConfig(top_k=1, temperatures=[T], sampling=draws)
            sums = sampling.fidelity_sums(self.logits, idx, count, self.entropy, T, "t1")
            n = len(self.logits)
            self.cache[draws] = {"targets": "sampled", "draws": draws,
                                 "bytes_per_token": part_bytes(cfg, self.meta, cols, self.logits.shape[1]) / n,
                                 "distinct_per_token": float((count > 0).sum() / n),
                                 "sampled_mass": sums["sampled_mass_t1"] / n,
                                 "kl_full_to_decoded": sums["kl_sampled_t1"] / n}
        return self.cache[draws]

    def at_most(self, budget: float, most: int) -> dict:
        """The largest N whose part takes at most `budget` bytes per token (bytes grow with N)."""
        low, high = 1, most
        while low < high:
            middle = (low + high + 1) // 2
            if self.row(middle)["bytes_per_token"] <= budget:
                low = middle
            else:
                high = middle - 1
        return self.row(low)


def table(rows: list[dict]) -> str:
    lines = ["| targets | k or N | bytes per token | KL(full \\|\\| decoded) (T=1) | kept / drawn mass (T=1) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        size = r["k"] if "k" in r else r["draws"]
        mass = r.get("kept_mass", r.get("sampled_mass"))
        lines.append(f"| {r['targets']} | {size} | {r['bytes_per_token']:.1f} | {r['kl_full_to_decoded']:.4f} | "
                     f"{mass:.4f} |")
    return "\n".join(lines)


def main(ks: str = "8,32,128", teacher_dir: Path = EXAMPLES / "text/data/teacher",
         prepared: Path = EXAMPLES / "text/data/prepared", most: int = typer.Option(1024, help="The most draws tried."),
         out: Path = REPO / "bench/results_sampled_text.json") -> None:
    torch.set_num_threads(1)
    logits, meta = teacher_logits(teacher_dir, prepared)
    sampled = Sampled(logits, meta, most)
    rows = []
    for k in map(int, ks.split(",")):
        for name in ("topk", "compact"):
            top = topk_row(logits, meta, k, name)
            rows += [top, {**sampled.at_most(top["bytes_per_token"], most), "equal_bytes_to": f"{name} k={k}"}]
    result = {"split": "test", "tokens": len(logits), "vocab": int(logits.shape[1]), "temperature": T, "rows": rows}
    print(f"default text teacher, test split ({len(logits)} tokens), T=1\n" + table(rows))
    stamp.write(out, result)


if __name__ == "__main__":
    typer.run(main)
