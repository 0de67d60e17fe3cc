"""`kd prepare`: load a dataset and write the labeled / unlabeled / test splits.

Reads the `prepare` section of params.yaml (each key can be overridden by the option of the same
name) and writes `data/prepared/{labeled,unlabeled,test}.parquet`, plus
`unlabeled_truth.parquet` when the unlabeled rows' labels are known. The work is in
`kd.sources` (the file format is `kd.prepared`). Text datasets (pydoc, a .txt
file, a .jsonl or Parquet file with a text column, or with prompt and response columns or a
chat column) are written as token blocks plus the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kd.cli.common import PARAMS_OPTION, clean_errors, json_option, numbers_option, override


@clean_errors
def main(
    dataset: str | None = typer.Option(
        None, "--dataset", help="mnist5k, digits, mnist1d, shapes, pydoc, an image folder (<class>/* or "
        "train|test|unlabeled/<class>/*), a Parquet file with id, x and optional y (or an encoded image column "
        "with label and optional split, or a text column), a .txt file or a .jsonl file (prepare.text_column)."
    ),
    input_shape: str | None = typer.Option(
        None, "--input-shape", help="Shape of one input, e.g. 1,28,28 (needed for a Parquet file without it)."
    ),
    image_size: str | None = typer.Option(None, "--image-size", help="Encoded images: resize to SIZE or H,W."),
    channels: int | None = typer.Option(None, "--channels", help="Images: convert to 1 or 3 channels (what the "
                                        "model's first layer wants; default: prepare.channels, null = as they are)."),
    mean: str | None = typer.Option(None, "--mean", help="Encoded images: per-channel mean of pixel/255, e.g. "
                                    "0.5,0.5,0.5 (default: the labeled split's)."),
    std: str | None = typer.Option(None, "--std", help="Encoded images: per-channel std of pixel/255 (with --mean)."),
    store: str | None = typer.Option(None, "--store", help="Encoded images: how pixels are written, `pixels` "
                                     "(uint8 x) or `png` (one lossless PNG file per row, the smaller)."),
    labeled: int | None = typer.Option(None, "--labeled", help="Rows (text: blocks) in the labeled split "
                                       "(default: prepare.labeled; images 1000, text every block)."),
    unlabeled: int | None = typer.Option(None, "--unlabeled", help="Rows (text: blocks) in the unlabeled (transfer) "
                                         "split (default: prepare.unlabeled; images 3000, text every block)."),
    test: int | None = typer.Option(None, "--test", help="Rows (text: blocks) in the test split (default: "
                                    "prepare.test; images 1000, text every block)."),
    samples: int | None = typer.Option(None, "--samples", help="mnist1d and addition only: how many digits (sums) to "
                                       "generate."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the split."),
    text_column: str | None = typer.Option(None, "--text-column", help="Text: the Parquet column (or JSON Lines field) "
                                           "of documents."),
    prompt_column: str | None = typer.Option(None, "--prompt-column", help="Instruction data: the prompts' column "
                                             "(with --response-column; only responses are predicted)."),
    response_column: str | None = typer.Option(None, "--response-column", help="Instruction data: the responses' "
                                               "column."),
    messages_column: str | None = typer.Option(None, "--messages-column", help="Chat data: a column of [{role, "
                                               "content}] lists, rendered with the tokenizer's chat template; "
                                               "the assistant turns are predicted."),
    shares: str | None = typer.Option(
        None, "--shares", help='Text: each split\'s share of the characters, e.g. '
                               '\'{"labeled": 0.8, "unlabeled": 0.1, "test": 0.1}\'.'
    ),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Text: a local Hugging Face model or "
                                         "tokenizer directory to tokenize with (default: train a BPE)."),
    keep: str | None = typer.Option(None, "--keep", help="Text: a regex; keep only the documents whose first line "
                                    "it matches, after they are dealt to the splits (a task's subset)."),
    vocab_size: int | None = typer.Option(None, "--vocab-size", help="Text: tokenizer entries (of the trained BPE)."),
    block_size: int | None = typer.Option(None, "--block-size", help="Text: tokens per block."),
    params: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("data/prepared"), "--out", help="Directory to write the splits to."),
) -> None:
    """Split a dataset into labeled / unlabeled / test Parquet files."""
    import dataclasses

    import numpy as np

    from kd import config, sources
    from kd.config import PrepareConfig, Shares
    cfg = config.section(params, "prepare", PrepareConfig)
    shape = sources.images.parse_shape(input_shape) if input_shape is not None else None
    parsed = json_option("--shares", shares)
    size = sources.images.parse_shape(image_size, "--image-size") if image_size is not None else None
    cfg = override(cfg, dataset=dataset, input_shape=shape, image_size=size, channels=channels,
                   mean=numbers_option("--mean", mean), std=numbers_option("--std", std), store=store,
                   labeled=labeled, unlabeled=unlabeled, test=test, samples=samples, seed=seed,
                   text_column=text_column, tokenizer=tokenizer, prompt_column=prompt_column, keep=keep,
                   response_column=response_column, messages_column=messages_column, vocab_size=vocab_size,
                   block_size=block_size,
                   shares=None if parsed is None else config.from_mapping(Shares, parsed, "--shares"))
    if sources.text.is_text(cfg):  # text sizes the params file and options leave out: every block
        given = config.load_params(params).get("prepare") or {}
        sizes = {"labeled": labeled, "unlabeled": unlabeled, "test": test}
        cfg = dataclasses.replace(cfg, **{k: None for k, v in sizes.items() if v is None and k not in given})
    prepared = sources.prepare(cfg, out)
    if isinstance(prepared, sources.text.TextPrepared):
        for name, blocks in prepared.blocks.items():
            if prepared.masks is None:
                what = f"{prepared.documents[name]:>5} documents"
            else:
                what = (f"{prepared.documents[name]:>5} examples, {int(prepared.masks[name][:, 1:].sum()):>7} response "
                        "tokens")
            typer.echo(f"{name:<9} {len(blocks):>7} blocks of {blocks.shape[1]} tokens  {what}  -> "
                       f"{prepared.paths[name]}")
        for where, reasons in prepared.dropped.items():
            if reasons:
                counts = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in reasons.items())
                typer.echo(f"dropped   {counts} ({'before dealing' if where == 'source' else where})")
        kind = "byte-level BPE" if cfg.tokenizer is None else f"from {cfg.tokenizer}"
        typer.echo(f"tokenizer {prepared.vocab_size:>7} entries ({kind})  -> {prepared.tokenizer}")
        return
    if prepared.classes is not None:
        typer.echo(f"classes   {', '.join(prepared.classes)}")
    for name, split in prepared.splits.items():
        known = prepared.truth if name == "unlabeled" and prepared.truth is not None else split.y[split.y >= 0]
        note = " (truth in unlabeled_truth.parquet)" if name == "unlabeled" and prepared.truth is not None else ""
        typer.echo(
            f"{name:<9} {len(split.ids):>7} rows  {int((split.y >= 0).sum()):>7} labeled  "
            f"{len(np.unique(known)):>3} classes  -> {prepared.paths[name]}{note}"
        )
