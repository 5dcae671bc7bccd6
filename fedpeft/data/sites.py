"""From a run's data settings to one site's train and held-out split (deterministic for a given seed)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from fedpeft.config import DataConfig, RunConfig
from fedpeft.data.loaders import load_classification, load_prompt_response
from fedpeft.data.partition import partition_by_column, partition_dirichlet, partition_iid, train_eval_split
from fedpeft.data.records import ClassificationData, PromptResponseData
from fedpeft.data.synthetic import make_multitask_tickets, make_prompt_response, make_support_tickets
from fedpeft.errors import DataError

SiteData = ClassificationData | PromptResponseData
SYNTHETIC_SOURCES = ("synthetic", "synthetic-multitask")  # generated here; anything else is a file path


@dataclass(frozen=True)
class SiteSplit:
    train: SiteData
    eval: SiteData


def load_dataset(data: DataConfig, task: str, seed: int) -> SiteData:
    return _load_dataset_cached(data, task, seed)


@functools.lru_cache(maxsize=4)
def _load_dataset_cached(data: DataConfig, task: str, seed: int) -> SiteData:
    group_column = data.partition_column or None if data.partitioner == "column" else None
    if data.source in SYNTHETIC_SOURCES:
        if group_column:
            raise DataError("data.partitioner = 'column' needs a data file with a site-id column; the synthetic "
                            "data has none. Use data.partitioner = 'dirichlet' or 'iid'")
        if task == "classification":
            make = make_multitask_tickets if data.source == "synthetic-multitask" else make_support_tickets
            return make(data.synthetic_examples, seed)
        return make_prompt_response(data.synthetic_examples, seed)
    path = Path(data.source).expanduser()
    if task == "classification":
        return load_classification(path, data.text_column, data.label_column, group_column, data.label_names,
                                   data.task_column or None)
    return load_prompt_response(path, data.prompt_column, data.response_column, group_column)


def partition_rows(dataset: SiteData, data: DataConfig, num_partitions: int, seed: int) -> list[list[int]]:
    if data.partitioner == "iid":
        return partition_iid(len(dataset), num_partitions, seed)
    if data.partitioner == "column":
        return partition_by_column(dataset.groups or (), num_partitions)
    if not isinstance(dataset, ClassificationData):
        raise DataError("data.partitioner = 'dirichlet' skews labels and needs a classification task; use 'iid' or "
                        "'column' for causal-lm data")
    return partition_dirichlet(dataset.labels, num_partitions, data.dirichlet_alpha, seed, min_partition_size=2)


def site_split(cfg: RunConfig, partition_id: int, num_partitions: int) -> SiteSplit:
    """The train and held-out rows of site ``partition_id`` out of ``num_partitions``."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition id {partition_id} is outside 0..{num_partitions - 1}")
    dataset = load_dataset(cfg.data, cfg.model.task, cfg.run.seed)
    rows = partition_rows(dataset, cfg.data, num_partitions, cfg.run.seed)[partition_id]
    train_rows, eval_rows = train_eval_split(rows, cfg.data.eval_fraction, cfg.run.seed + partition_id)
    return SiteSplit(dataset.subset(train_rows), dataset.subset(eval_rows))


def is_multitask(data: DataConfig) -> bool:
    """One head per task (fedpeft.models.task_heads): a task column, or the synthetic multi-task tickets."""
    return bool(data.task_column) or data.source == "synthetic-multitask"


def label_names(cfg: RunConfig) -> tuple[str, ...]:
    """The federation's class names in id order: configured, else read from the data."""
    return cfg.data.label_names or load_dataset(cfg.data, cfg.model.task, cfg.run.seed).label_names


def num_labels(cfg: RunConfig) -> int:
    """Number of classes (0 for causal-lm), known wherever the data can be read."""
    if cfg.model.task != "classification":
        return 0
    if cfg.model.num_labels:
        return cfg.model.num_labels
    if cfg.data.label_names:
        return len(cfg.data.label_names)
    dataset = load_dataset(cfg.data, cfg.model.task, cfg.run.seed)
    return len(dataset.label_names)
