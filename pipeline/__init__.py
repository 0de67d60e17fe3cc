"""kd: offline knowledge distillation.

The library behind the `kd` command. `tasks` (one module per task: image classification,
causal LM, masked LM) is asked everything that depends on the kind of model; around it:
dataset sources (`sources`) and the prepared format (`prepared`), the teacher-output cache
(`cache`), a student's rows (`loader`), loss methods (`methods`) over the pure losses
(`losses`), the one training loop (`training`), evaluation (`metrics`) and the report
(`report`). Stage modules in `stages/` are thin Typer commands over these functions; the
README's "How the code is laid out" follows one cache row through them.
"""
