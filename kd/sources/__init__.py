"""Preparing datasets: a source in, the prepared format (`kd.prepared`) out.

    builtin.py     the built-in datasets and `SOURCES`, the one lookup from a dataset name to the
                   function that makes it, with its kind (images, image_folder, documents, examples)
    images.py      image datasets: loaded, checked, split by class, written as image splits
    arrays.py      a user Parquet file with id, x and y
    encoded.py     encoded images: an image folder or a Parquet file with an `image` column
    shapes.py      the rendered shapes dataset, written as an image folder
    splits.py      labeled / unlabeled / test, stratified by class (and the order text is dealt in)
    text.py        text (a built-in of kind documents or examples, a .txt, .jsonl or Parquet
                   file): dealt by document, a BPE tokenizer trained, cut into token blocks

`prepare(cfg, out)` is `kd prepare`: it hands `cfg.dataset` to the one that reads it.

Adding a dataset, say `mine` (image arrays; the other kinds as in `builtin.py`'s table):
1. Write `kd/sources/mine.py` with one function `make(cfg: PrepareConfig) -> Split`: every row
   of the dataset as a `kd.prepared.images.Split` (unique int64 ids, x (N, D) float32, y (N,)
   int64 with -1 for an unknown label, the input shape, the number of classes), read or made
   here, never downloaded; `cfg` gives the `prepare` keys (e.g. `samples`, `seed`).
2. Add one line to `SOURCES` in `kd/sources/builtin.py`: `"mine": Builtin("images", mine.make)`
   (and its import).
3. `kd prepare --dataset mine` (or `prepare.dataset: mine` in params.yaml) checks its rows,
   splits them by class into labeled / unlabeled / test and writes them, as for digits.
4. From there every command reads it as any prepared image data: `kd teacher`, `kd label`,
   `kd distill`.
"""

from __future__ import annotations

from pathlib import Path

from kd.config import PrepareConfig
from kd.sources import images, text
from kd.sources.builtin import SOURCES, Builtin

__all__ = ["SOURCES", "Builtin", "prepare"]


def prepare(cfg: PrepareConfig, out: Path) -> images.Prepared | text.TextPrepared:
    """Load, check, split and write `cfg.dataset` to `out` (replaced as a whole when done).

    Text datasets (a built-in of kind documents or examples, a .txt or .jsonl file, a Parquet
    file with a text column) go to `text.prepare`, everything else to `images.prepare`.
    """
    if text.is_text(cfg):
        return text.prepare(cfg, out)
    return images.prepare(cfg, out)
