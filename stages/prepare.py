"""`kd prepare`: load a dataset and write the labeled / unlabeled / test splits.

Reads the `prepare` section of params.yaml (each key can be overridden by the option of the same
name) and writes `data/prepared/{labeled,unlabeled,test}.parquet`, plus
`unlabeled_truth.parquet` when the unlabeled rows' labels are known. The work is in
`pipeline.data`; see its docstring for the file format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from pipeline import config, data
from pipeline.config import PrepareConfig
from stages.common import PARAMS_OPTION, clean_errors, override


@clean_errors
def main(
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="mnist5k, digits, mnist1d, or a Parquet file with id, x and optional y."
    ),
    input_shape: Optional[str] = typer.Option(
        None, "--input-shape", help="Shape of one input, e.g. 1,28,28 (needed for a Parquet file without it)."
    ),
    labeled: Optional[int] = typer.Option(None, "--labeled", help="Rows in the labeled split."),
    unlabeled: Optional[int] = typer.Option(None, "--unlabeled", help="Rows in the unlabeled (transfer) split."),
    test: Optional[int] = typer.Option(None, "--test", help="Rows in the test split."),
    samples: Optional[int] = typer.Option(None, "--samples", help="mnist1d only: how many digits to generate."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the split."),
    params: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("data/prepared"), "--out", help="Directory to write the splits to."),
) -> None:
    """Split a dataset into labeled / unlabeled / test Parquet files."""
    cfg = config.section(params, "prepare", PrepareConfig)
    shape = data.parse_shape(input_shape) if input_shape is not None else None
    cfg = override(cfg, dataset=dataset, input_shape=shape, labeled=labeled, unlabeled=unlabeled,
                   test=test, samples=samples, seed=seed)
    prepared = data.prepare(cfg, out)
    for name, split in prepared.splits.items():
        known = prepared.truth if name == "unlabeled" and prepared.truth is not None else split.y[split.y >= 0]
        note = " (truth in unlabeled_truth.parquet)" if name == "unlabeled" and prepared.truth is not None else ""
        typer.echo(
            f"{name:<9} {len(split.ids):>7} rows  {int((split.y >= 0).sum()):>7} labeled  "
            f"{len(np.unique(known)):>3} classes  -> {prepared.paths[name]}{note}"
        )
