"""The tasks the toolkit solves, behind one seam (:class:`~breastfusion.tasks.base.Task`).

``get(cfg.task)`` returns the task a configuration names; ``for_bundle(meta)`` the task whose networks a bundle
holds. A new task (mammography, a whole-slide cohort) is one module in this package with a task object, listed
in ``TASKS`` below: copy ``ultrasound.py`` (an image per case) or ``histology.py`` (stacks of tiles per case).
"""

from __future__ import annotations

from breastfusion.errors import ConfigError
from breastfusion.tasks.base import RunResult, Task
from breastfusion.tasks.histology import HISTOLOGY
from breastfusion.tasks.ultrasound import ULTRASOUND

TASKS: dict[str, Task] = {t.name: t for t in (ULTRASOUND, HISTOLOGY)}


def names() -> list[str]:
    return list(TASKS)


def get(name: str) -> Task:
    """The task named ``name`` (a configuration's ``task:``)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"task: '{name}' is not a task of this toolkit; known: {', '.join(TASKS)}.") from None


def for_bundle(meta: dict) -> Task:
    """The task whose network kind bundle metadata ``meta`` holds."""
    from breastfusion.models.registry import kind_name, network_kind

    network_kind(meta)  # an unknown kind is refused with the upgrade message
    kind = kind_name(meta)
    return next(t for t in TASKS.values() if kind in t.network_kinds)


__all__ = ["TASKS", "RunResult", "Task", "for_bundle", "get", "names"]
