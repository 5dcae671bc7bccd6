"""Split row indices across federated sites (IID, Dirichlet label skew, or a natural site column).

Every partitioner returns disjoint, individually sorted index lists whose union is all rows.

Each partitioner is one small registered class (``register_partitioner``), as aggregation rules are: the registry
is the one list of ``data.partitioner`` choices, and what a partitioner needs from the data (labels, a site-id column)
is said by its class, so loading and dispatch never name a partitioner. The ``partition_*`` functions below are the
math, usable on their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedpeft.data.records import ClassificationData, PromptResponseData
from fedpeft.errors import DataError
from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import DataConfig

MAX_DIRICHLET_TRIES = 100
DIRICHLET_MIN_PARTITION_SIZE = 2  # a site needs a row to train on and one to hold out

_PARTITIONERS: Registry[Partitioner] = Registry("partitioner", "data.partitioner", DataError)


class Partitioner(ABC):
    """One way of splitting a dataset's rows across ``num_partitions`` sites."""

    name: ClassVar[str]
    needs_group_column: ClassVar[bool] = False  # True: the data must be loaded with data.partition_column's values

    @abstractmethod
    def partition(
        self, dataset: ClassificationData | PromptResponseData, num_partitions: int, seed: int, data: DataConfig
    ) -> list[list[int]]:
        """Disjoint, sorted row lists, one per site, covering every row of ``dataset``."""


def register_partitioner(cls: type[Partitioner]) -> type[Partitioner]:
    return _PARTITIONERS.register(cls)


def registered_partitioners() -> dict[str, type[Partitioner]]:
    return _PARTITIONERS.all()


def partitioner_class(name: str) -> type[Partitioner]:
    """The registered class of ``name``, for what it needs from the data before any instance exists."""
    return _PARTITIONERS.get(name)


def build_partitioner(name: str) -> Partitioner:
    return partitioner_class(name)()


@register_partitioner
class IID(Partitioner):
    """Near-equal random shares: the no-skew baseline."""

    name = "iid"

    def partition(
        self, dataset: ClassificationData | PromptResponseData, num_partitions: int, seed: int, data: DataConfig
    ) -> list[list[int]]:
        return partition_iid(len(dataset), num_partitions, seed)


@register_partitioner
class Dirichlet(Partitioner):
    """Label skew by Dirichlet(data.dirichlet_alpha), to simulate sites that see different classes."""

    name = "dirichlet"

    def partition(
        self, dataset: ClassificationData | PromptResponseData, num_partitions: int, seed: int, data: DataConfig
    ) -> list[list[int]]:
        if not isinstance(dataset, ClassificationData):
            raise DataError("data.partitioner = 'dirichlet' skews labels and needs a classification task; use 'iid' "
                            "or 'column' for causal-lm data")
        return partition_dirichlet(dataset.labels, num_partitions, data.dirichlet_alpha, seed,
                                   min_partition_size=DIRICHLET_MIN_PARTITION_SIZE)


@register_partitioner
class Column(Partitioner):
    """The data's own site ids (data.partition_column, e.g. a hospital id): real, not simulated, heterogeneity."""

    name = "column"
    needs_group_column = True

    def partition(
        self, dataset: ClassificationData | PromptResponseData, num_partitions: int, seed: int, data: DataConfig
    ) -> list[list[int]]:
        return partition_by_column(dataset.groups or (), num_partitions)


def partition_iid(num_items: int, num_partitions: int, seed: int) -> list[list[int]]:
    """Shuffle all rows and deal them into near-equal partitions."""
    _check_num_partitions(num_partitions)
    if num_items < num_partitions:
        raise DataError(
            f"num_items={num_items} is smaller than num_partitions={num_partitions}; "
            "add data or lower federation.num_sites so every site gets at least one row"
        )
    order = np.random.default_rng(seed).permutation(num_items)
    partitions = [sorted(int(i) for i in chunk) for chunk in np.array_split(order, num_partitions)]
    _check_nonempty(partitions, "lower federation.num_sites or add data")
    return partitions


def partition_dirichlet(
    labels: Sequence[int],
    num_partitions: int,
    alpha: float,
    seed: int,
    *,
    min_partition_size: int = 1,
) -> list[list[int]]:
    """Label-skewed split: each class is spread over partitions by Dirichlet(alpha) proportions.

    Small alpha gives each site few classes; large alpha approaches IID.
    """
    label_array = _check_labels(labels)
    _check_num_partitions(num_partitions)
    if not alpha > 0:
        raise DataError(f"alpha={alpha} is invalid; set the Dirichlet alpha to a number > 0 (e.g. 0.5)")
    if min_partition_size < 1:
        raise DataError(
            f"min_partition_size={min_partition_size} is invalid; set it to at least 1 "
            "so no site is left without data"
        )
    if len(label_array) < num_partitions * min_partition_size:
        raise DataError(
            f"{len(label_array)} rows cannot give {num_partitions} partitions at least "
            f"{min_partition_size} rows each; add data, lower num_partitions or min_partition_size"
        )
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_TRIES):
        partitions = _dirichlet_draw(label_array, num_partitions, alpha, rng)
        if min(len(p) for p in partitions) >= min_partition_size:
            return partitions
    raise DataError(
        f"Dirichlet partitioning with alpha={alpha} left some of the {num_partitions} partitions "
        f"with fewer than {min_partition_size} rows after {MAX_DIRICHLET_TRIES} tries; "
        "raise alpha, lower num_partitions or add data"
    )


def _dirichlet_draw(
    labels: np.ndarray, num_partitions: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.extend(int(i) for i in chunk)
    return [sorted(p) for p in parts]


def partition_by_column(groups: Sequence[str], num_partitions: int | None = None) -> list[list[int]]:
    """One partition per distinct group value (e.g. hospital id), in sorted order of the values."""
    if len(groups) == 0:
        raise DataError(
            "the partition column is empty; set data.partition_column to a column with one site id per row"
        )
    by_value: dict[str, list[int]] = {}
    for row, value in enumerate(groups):
        by_value.setdefault(str(value), []).append(row)
    values = sorted(by_value)
    if num_partitions is not None and num_partitions != len(values):
        shown = ", ".join(repr(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise DataError(
            f"the group column has {len(values)} distinct values ({shown}) but num_partitions is "
            f"{num_partitions}; set federation.num_sites to {len(values)}, or leave it out of the config file "
            "(the column's values then decide it), or use another data.partitioner"
        )
    return [by_value[v] for v in values]


def train_eval_split(
    indices: Sequence[int], eval_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Shuffle `indices` and hold out round(eval_fraction * n) of them (at least 1 when possible)."""
    if not 0 <= eval_fraction < 1:
        raise DataError(
            f"eval_fraction={eval_fraction} is invalid; set it to a number in [0, 1), e.g. 0.2"
        )
    n = len(indices)
    n_eval = round(eval_fraction * n)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    if n - n_eval < 1:
        raise DataError(
            f"splitting {n} rows with eval_fraction={eval_fraction} leaves no training rows; "
            "lower eval_fraction or give this site more data"
        )
    order = np.random.default_rng(seed).permutation(n)
    items = [int(i) for i in indices]
    eval_part = sorted(items[i] for i in order[:n_eval])
    train_part = sorted(items[i] for i in order[n_eval:])
    return train_part, eval_part


def label_skew(labels: Sequence[int], partitions: Sequence[Sequence[int]]) -> float:
    """Mean total-variation distance between each partition's label mix and the global one (0 = IID)."""
    label_array = _check_labels(labels)
    if len(partitions) == 0:
        raise DataError("label_skew got no partitions; pass at least one partition")
    _check_nonempty(partitions, "drop empty partitions before measuring skew")
    num_classes = int(label_array.max()) + 1
    global_dist = np.bincount(label_array, minlength=num_classes) / len(label_array)
    distances = []
    for part in partitions:
        counts = np.bincount(label_array[np.asarray(part, dtype=int)], minlength=num_classes)
        distances.append(0.5 * np.abs(counts / counts.sum() - global_dist).sum())
    return float(np.mean(distances))


def _check_num_partitions(num_partitions: int) -> None:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise DataError(
            f"num_partitions={num_partitions!r} is invalid; set the number of sites to an integer >= 1"
        )


def _check_labels(labels: Sequence[int]) -> np.ndarray:
    if len(labels) == 0:
        raise DataError("labels is empty; load a dataset with at least one row")
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0:
        raise DataError("labels must be non-negative integer ids; encode labels as 0..K-1")
    return array.astype(np.int64)


def _check_nonempty(partitions: Sequence[Sequence[int]], fix: str) -> None:
    for k, part in enumerate(partitions):
        if len(part) == 0:
            raise DataError(f"partition {k} is empty; {fix}")
