"""Multi-task sites: one shared adapter and one classification head per task.

A site may hold several tasks (a hospital triaging notes by department *and* by urgency). Their labels share one
label space with names ``task:label``; the heads are blocks of rows of the one classifier, and an example of task t
is scored only against task t's labels (the other tasks' logits are left out of its softmax and its prediction).
That is exactly one linear head per task, and it keeps every tensor's shape fixed, so the heads aggregate across
sites or stay local (``peft.head``) like any single head, under DP-SGD and secure aggregation alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedpeft.errors import DataError

TASK_SEPARATOR = ":"


def task_of_labels(label_names: Sequence[str]) -> list[int]:
    """Task index of each label, tasks numbered in order of first appearance of their ``task:`` prefix."""
    tasks: dict[str, int] = {}
    out = []
    for name in label_names:
        task, separator, label = name.partition(TASK_SEPARATOR)
        if not separator or not task or not label:
            raise DataError(f"multi-task label {name!r} is not 'task{TASK_SEPARATOR}label'; with data.task_column "
                            "every entry of data.label_names must name its task, e.g. 'urgency:high'")
        out.append(tasks.setdefault(task, len(tasks)))
    return out


def attach_task_heads(model: Any, label_names: Sequence[str] | None) -> None:
    """Give ``model`` the label -> task map its losses and predictions use (None: a single task)."""
    import torch

    model.fedpeft_label_tasks = None if label_names is None else torch.tensor(task_of_labels(label_names))


def label_tasks(model: Any) -> Any:
    """The model's label -> task map, also through Opacus' GradSampleModule wrapper (None: a single task)."""
    return getattr(getattr(model, "_module", model), "fedpeft_label_tasks", None)


def within_own_task(model: Any, logits: Any, labels: Any) -> Any:
    """The logits a loss or prediction may use: on a multi-task model each row's own task's only, else all."""
    tasks = label_tasks(model)
    return logits if tasks is None else restrict_to_task(logits, labels, tasks)


def restrict_to_task(logits: Any, labels: Any, tasks: Any) -> Any:
    """Each row's logits with the other tasks' labels at -inf: out of its softmax, its gradient and its argmax."""
    tasks = tasks.to(logits.device)
    same_task = tasks[labels].unsqueeze(1) == tasks.unsqueeze(0)
    return logits.masked_fill(~same_task, float("-inf"))
