"""The task registry: ``model.task`` names -> task classes. A leaf: it imports no task.

Each task module registers its class with ``register_task``. ``ptm_ray/tasks/__init__.py`` imports the
built-in task modules, one line each, and Python runs that package file before any module inside it, so a
lookup through this module always sees every built-in task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from ptm_ray.tasks.base import Task

__all__ = ["register_task", "task_for", "task_names"]

_TASKS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_task(cls: T) -> T:
    """Make ``model.task=<cls.name>`` use the task class ``cls`` (usable as a class decorator)."""
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Every registered task name."""
    return sorted(_TASKS)


def task_for(name: str) -> "Task":
    """The task called ``name`` (``model.task``, also stored in every checkpoint)."""
    if name not in _TASKS:
        raise ValueError(f"model.task={name!r} is not a known task; known: {', '.join(task_names())}")
    return _TASKS[name]()
