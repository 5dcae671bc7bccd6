"""From a run's data settings to one site's train and held-out split (deterministic for a given seed)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from fedpeft.config import DataConfig, RunConfig
from fedpeft.data.loaders import load_classification, load_prompt_response
from fedpeft.data.partition import build_partitioner, partitioner_class, registered_partitioners, train_eval_split
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
    needs_groups = partitioner_class(data.partitioner).needs_group_column
    group_column = data.partition_column or None if needs_groups else None
    if data.source in SYNTHETIC_SOURCES:
        if group_column:
            others = [name for name, cls in registered_partitioners().items() if not cls.needs_group_column]
            raise DataError(f"data.partitioner = {data.partitioner!r} needs a data file with a site-id column; the "
                            f"synthetic data has none. Use data.partitioner = one of {others}")
        if task == "classification":
            make = make_multitask_tickets if data.source == "synthetic-multitask" else make_support_tickets
            return make(data.synthetic_examples, seed)
        return make_prompt_response(data.synthetic_examples, seed)
    path = Path(data.source).expanduser()
    if task == "classification":
        return load_classification(path, data.text_column, data.label_column, group_column,
                                   label_names=data.label_names, task_column=data.task_column or None)
    return load_prompt_response(path, data.prompt_column, data.response_column, group_column)


def column_site_names(cfg: RunConfig) -> dict[str, str]:
    """Site index -> the partition column's value it stands for (the column partitioner's sites are the column's
    distinct values in sorted order); {} for any other partitioner, or when the data file is not here."""
    if not partitioner_class(cfg.data.partitioner).needs_group_column or cfg.data.source in SYNTHETIC_SOURCES:
        return {}
    if not Path(cfg.data.source).expanduser().is_file():
        return {}
    values = sorted({str(v) for v in load_dataset(cfg.data, cfg.model.task, cfg.run.seed).groups or ()})
    return {str(index): value for index, value in enumerate(values)}


def partition_rows(dataset: SiteData, data: DataConfig, num_partitions: int, seed: int) -> list[list[int]]:
    return build_partitioner(data.partitioner).partition(dataset, num_partitions, seed, data)


def site_split(cfg: RunConfig, partition_id: int, num_partitions: int) -> SiteSplit:
    """The train and held-out rows of site ``partition_id`` out of ``num_partitions``."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition id {partition_id} is outside 0..{num_partitions - 1}")
    dataset = load_dataset(cfg.data, cfg.model.task, cfg.run.seed)
    rows = partition_rows(dataset, cfg.data, num_partitions, cfg.run.seed)[partition_id]
    try:
        train_rows, eval_rows = train_eval_split(rows, cfg.data.eval_fraction, cfg.run.seed + partition_id)
    except DataError:  # no training row left
        raise _too_few_rows(cfg, partition_id, num_partitions, rows=len(rows), part="training row") from None
    if not eval_rows:
        raise _too_few_rows(cfg, partition_id, num_partitions, rows=len(rows), part="held-out row")
    return SiteSplit(dataset.subset(train_rows), dataset.subset(eval_rows))


def _too_few_rows(cfg: RunConfig, partition_id: int, num_partitions: int, *, rows: int, part: str) -> DataError:
    """A site needs a row to train on and a held-out row to be evaluated on (an empty split fails every round)."""
    fraction = cfg.data.eval_fraction
    if num_partitions == 1:  # a deployed site reads its own whole file
        who = f"this site (data file '{cfg.data.source}')"
        fix = "give the site's data file more rows"
    else:
        who = f"site {partition_id} of {num_partitions}"
        fix = (f"give the federation more data (data.source / data.synthetic_examples), fewer sites "
               f"(federation.num_sites = {num_partitions}), or a partitioner that gives every site rows")
    return DataError(
        f"{who} holds {rows} row(s): with data.eval_fraction = {fraction:g} that leaves it no {part} "
        f"(a site needs at least one row to train on and one held out to be evaluated on, so at least 2); {fix}, "
        "or set data.eval_fraction so that both parts keep a row"
    )


def is_multitask(data: DataConfig) -> bool:
    """One head per task (fedpeft.models.task_heads): a task column, or the synthetic multi-task tickets."""
    return bool(data.task_column) or data.source == "synthetic-multitask"


def label_names(cfg: RunConfig) -> tuple[str, ...]:
    """The federation's class names in id order: configured, else read from the data."""
    return cfg.data.label_names or _classification_data(cfg).label_names


def num_labels(cfg: RunConfig) -> int:
    """Number of classes (0 for causal-lm), known wherever the data can be read."""
    if cfg.model.task != "classification":
        return 0
    if cfg.model.num_labels:
        return cfg.model.num_labels
    if cfg.data.label_names:
        return len(cfg.data.label_names)
    return len(_classification_data(cfg).label_names)


def _classification_data(cfg: RunConfig) -> ClassificationData:
    dataset = load_dataset(cfg.data, cfg.model.task, cfg.run.seed)
    # Class names are asked for only where model.task = 'classification' (config checks: multi-task heads need it)
    assert isinstance(dataset, ClassificationData), f"model.task = {cfg.model.task!r} data has no classes"
    return dataset
