"""Preparing datasets: a source in, the prepared format (`kd.prepared`) out.

    images.py      image datasets: loaded, checked, split by class, written as image splits
    image_sets.py  the built-in image datasets (mnist5k, digits, mnist1d, shapes)
    arrays.py      a user Parquet file with id, x and y
    encoded.py     encoded images: an image folder or a Parquet file with an `image` column
    shapes.py      the rendered shapes dataset, written as an image folder
    splits.py      labeled / unlabeled / test, stratified by class (and the order text is dealt in)
    text.py        pydoc, a .txt file or a Parquet text column: dealt by document, a BPE
                   tokenizer trained, cut into token blocks

`prepare(cfg, out)` is `kd prepare`: it hands `cfg.dataset` to the one that reads it.
"""

from __future__ import annotations

from pathlib import Path

from kd.config import PrepareConfig
from kd.sources import images, text


def prepare(cfg: PrepareConfig, out: Path) -> images.Prepared | text.TextPrepared:
    """Load, check, split and write `cfg.dataset` to `out` (replaced as a whole when done).

    Text datasets (pydoc, a .txt file, a Parquet file with a text column) go to `text.prepare`,
    everything else to `images.prepare`.
    """
    if text.is_text(cfg):
        return text.prepare(cfg, out)
    return images.prepare(cfg, out)
