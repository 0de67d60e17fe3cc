"""kd: offline knowledge distillation.

The library behind the `kd` command: data preparation (`data`), architectures (`models`),
the teacher-output cache (`cache`), losses (`losses`), the training loop (`training`),
evaluation (`metrics`) and the report (`report`). Stage modules in `stages/` are thin
Typer commands over these functions.
"""
