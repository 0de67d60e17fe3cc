"""The root `kd` command: joins the stage commands.

    kd prepare | teacher | generate | label | assistants | distill NAME | eval NAME | report | cache info/verify
"""

import typer

from stages import assistants, cache, distill, eval as eval_stage, generate, label, prepare, report, teacher

app = typer.Typer(
    name="kd",
    help="Offline knowledge distillation: label once with the teacher, train students from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("prepare")(prepare.main)
app.command("teacher")(teacher.main)
app.command("generate")(generate.main)
app.command("label")(label.main)
app.command("assistants")(assistants.main)
app.command("distill")(distill.main)
app.command("eval")(eval_stage.main)
app.command("report")(report.main)
app.add_typer(cache.app, name="cache")

if __name__ == "__main__":
    app()
