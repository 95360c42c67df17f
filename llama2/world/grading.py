"""The helpfulness-grader registry: one noiseless grader per task family (Llama 2 §3.2.1 raters).

Task modules register their grader with `@register_grader("task")`; `grade_helpfulness` dispatches
on `record["task"]`. This module imports no task module at import time, so every task module can
import it without cycles; on first use it imports the known providers, which register themselves.
"""
from __future__ import annotations

import importlib
from typing import Callable, NamedTuple


class Grade(NamedTuple):
    """A helpfulness verdict: `score` in [0, 1] and the reasons that lowered (or set) it."""

    score: float
    reasons: tuple[str, ...] = ()


Grader = Callable[[dict, str], Grade]

GRADERS: dict[str, Grader] = {}

# Modules whose import registers graders (they import this module, so it cannot import them first).
PROVIDERS = ("llama2.world.tasks", "llama2.world.safety_grading")


class UnknownTaskError(ValueError):
    """A record whose `task` has no registered grader."""


def register_grader(task: str) -> Callable[[Grader], Grader]:
    """Decorator: make `fn(record, response) -> Grade` the grader of `task`."""

    def wrap(fn: Grader) -> Grader:
        if GRADERS.get(task, fn) is not fn:
            raise ValueError(f"task {task!r} already has a grader ({GRADERS[task].__module__})")
        GRADERS[task] = fn
        return fn

    return wrap


def load_providers() -> None:
    """Import every known provider once, so that their graders are registered."""
    for name in PROVIDERS:
        importlib.import_module(name)


def grade_helpfulness(record: dict, response: str) -> Grade:
    """Noiseless helpfulness of `response` to the prompt `record`, dispatched on its task."""
    task = record.get("task")
    if task not in GRADERS:
        load_providers()
    if task not in GRADERS:
        known = ", ".join(sorted(GRADERS)) or "none"
        raise UnknownTaskError(f"record {record.get('id')!r}: no grader for task {task!r} (known: {known})")
    return GRADERS[task](record, response)
