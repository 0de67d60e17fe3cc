"""Every task module satisfies `kd.tasks.Task`: each member the stages ask for, as declared."""

from __future__ import annotations

import importlib
import inspect

import pytest

from kd import tasks
from kd.cache import batch

pytestmark = pytest.mark.unit

BUILTIN = {"str": str, "tuple": tuple}  # what an attribute annotated so must be


def protocol_members(protocol: type) -> tuple[dict[str, str], dict[str, inspect.Signature]]:
    """(attribute -> its annotation, method -> its signature without `self`) of a Protocol."""
    methods = {name: value for name, value in vars(protocol).items()
               if inspect.isfunction(value) and not name.startswith("__")}
    signatures = {}
    for name, function in methods.items():
        signature = inspect.signature(function)
        signatures[name] = signature.replace(parameters=list(signature.parameters.values())[1:])
    return dict(protocol.__annotations__), signatures


def test_the_protocol_lists_what_the_stages_ask():
    attributes, methods = protocol_members(tasks.Task)
    assert set(attributes) == {"NAME", "TWIN_LOSS", "ROW_COLUMNS", "Inputs"}
    assert {"check", "rows", "twin_rows", "twin_decided_by", "build", "student_shapes", "save", "load", "evaluate",
            "summary", "check_rows", "rows_description", "train_teacher", "load_teacher"} == set(methods)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_each_task_module_provides_every_member(name):
    module = importlib.import_module(tasks.TASKS[name])
    assert tasks.get(name) is module
    assert isinstance(module, tasks.Task)
    assert module.NAME == name
    attributes, methods = protocol_members(tasks.Task)
    for attribute, annotation in attributes.items():
        value = getattr(module, attribute)
        kind = BUILTIN.get(annotation.split("[")[0])
        assert isinstance(value, kind) if kind else callable(value), f"{name}.{attribute}: {value!r} ({annotation})"
    assert all(isinstance(column, str) for column in module.ROW_COLUMNS)
    for method, declared in methods.items():
        function = getattr(module, method)
        assert callable(function), f"{name}.{method} is not callable"
        found = inspect.signature(function)
        assert [(p.name, p.kind) for p in found.parameters.values()] == \
            [(p.name, p.kind) for p in declared.parameters.values()], f"{name}.{method}{found} vs {declared}"


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_each_task_s_inputs_answer_what_the_writer_asks(name):
    inputs = tasks.get(name).Inputs
    assert inspect.isclass(inputs)
    assert inputs.row_columns == tasks.get(name).ROW_COLUMNS
    _, methods = protocol_members(batch.Inputs)
    for method, declared in methods.items():
        found = inspect.signature(getattr(inputs, method))
        assert len(found.parameters) == len(declared.parameters) + 1, f"{name}.Inputs.{method}{found}"  # + self
