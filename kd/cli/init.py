"""`kd init DIR`: write a ready DVC project of one template into DIR (`kd.project`).

DIR gets `dvc.yaml` (the template's stages), `params.yaml` (every key with its default and what
it means), `datasets/` and `models/`, `.gitignore`, `.dvcignore`, and `git init` + `dvc init`
where it is not inside a git repository; `dvc repro` there runs the template end to end on a
built-in dataset. The options put your own pieces into params.yaml.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kd.cli.common import clean_errors


@clean_errors
def main(
    directory: Path = typer.Argument(..., metavar="DIR", help="The project's directory (created if missing)."),
    template: str = typer.Option("image", "--template", "-t", help="image (classifiers), text (a causal LM on "
                                 "plain text), instruction (prompt/response pairs), masked (a BERT-style LM) or "
                                 "generate (students of the teacher's own answers)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Your data (a file or folder, best under "
                                       "DIR/datasets/) or a built-in name: prepare.dataset. With the "
                                       "instruction and generate templates, a file of `prompt` and `response` "
                                       "columns (prepare.block_size 256)."),
    teacher: str | None = typer.Option(None, "--teacher", help="A model directory (Hugging Face, or one `kd "
                                       "teacher` wrote) that `kd label` runs instead of training a teacher: "
                                       "paths.teacher; language models also cut the text with its tokenizer."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="A tokenizer or model directory to cut the "
                                         "text with: prepare.tokenizer (default: the teacher's, or a new BPE)."),
    student_arch: str | None = typer.Option(None, "--student-arch", help="Image: every student's architecture "
                                            "(mlp, cnn, models.<module>:<factory>), arch_kwargs emptied."),
    student_init: str | None = typer.Option(None, "--student-init", help="Language models: a pretrained "
                                            "directory every student starts from (its init and arch)."),
    set_: list[str] | None = typer.Option(None, "--set", help="KEY=VALUE (YAML) into params.yaml, e.g. "
                                          "teacher.epochs=5 or students.*.repeats=3 (every student); repeatable."),
    git: bool = typer.Option(True, "--git/--no-git", help="git init + dvc init where DIR is in no git repository."),
) -> None:
    """Write a ready DVC project (dvc.yaml, params.yaml, datasets/, models/) into DIR."""
    from kd.project import Pieces, init_project

    pieces = Pieces(dataset=dataset, teacher=teacher, tokenizer=tokenizer, student_arch=student_arch,
                    student_init=student_init, settings=list(set_ or []))
    for line in init_project(directory, template, pieces, version_control=git):
        typer.echo(line)
    typer.echo(f"next: cd {directory} && dvc repro && git add -A && git commit -m 'first run'; then compare runs "
               "with `dvc exp run -S students.NAME.KEY=VALUE` and `dvc exp show`")
