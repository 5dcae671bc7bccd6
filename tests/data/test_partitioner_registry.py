from __future__ import annotations

import pytest

from fedpeft.config import DataConfig
from fedpeft.data import ClassificationData, PromptResponseData
from fedpeft.data.partition import (
    Partitioner,
    build_partitioner,
    partition_by_column,
    partition_dirichlet,
    partition_iid,
    partitioner_class,
    register_partitioner,
    registered_partitioners,
)
from fedpeft.data.sites import load_dataset, partition_rows
from fedpeft.errors import DataError

LABELS = tuple(i % 3 for i in range(60))
GROUPS = tuple(f"site-{i % 4}" for i in range(60))
CLASSIFICATION = ClassificationData(texts=tuple(f"t{i}" for i in range(60)), labels=LABELS,
                                    label_names=("a", "b", "c"), groups=GROUPS)
PROMPTS = PromptResponseData(prompts=tuple(f"p{i}" for i in range(60)), responses=tuple(f"r{i}" for i in range(60)))


def test_the_registry_lists_iid_dirichlet_column_in_order():
    registry = registered_partitioners()
    assert list(registry) == ["iid", "dirichlet", "column"]
    assert all(issubclass(cls, Partitioner) and cls.name == name for name, cls in registry.items())


def test_only_the_column_partitioner_needs_a_group_column():
    assert {name for name, cls in registered_partitioners().items() if cls.needs_group_column} == {"column"}


@pytest.mark.parametrize("call", [lambda: partitioner_class("random"), lambda: build_partitioner("random"),
                                  lambda: partition_rows(CLASSIFICATION, DataConfig(partitioner="random"), 3, 0)])
def test_an_unknown_partitioner_is_named_with_the_registered_ones(call):
    with pytest.raises(DataError, match=r"data.partitioner = 'random' is unknown; use one of "
                                        r"\['iid', 'dirichlet', 'column'\]"):
        call()


def test_partition_rows_dispatches_to_the_partition_functions():
    def rows(name: str, num_partitions: int) -> list[list[int]]:
        data = DataConfig(partitioner=name, partition_column="site", dirichlet_alpha=0.7)
        return partition_rows(CLASSIFICATION, data, num_partitions, 5)

    assert rows("iid", 3) == partition_iid(60, 3, 5)
    assert rows("dirichlet", 3) == partition_dirichlet(LABELS, 3, 0.7, 5, min_partition_size=2)
    assert rows("column", 4) == partition_by_column(GROUPS, 4)


def test_dirichlet_needs_a_classification_task():
    with pytest.raises(DataError, match="needs a classification task; use 'iid' or 'column'"):
        build_partitioner("dirichlet").partition(PROMPTS, 3, 0, DataConfig())
    assert build_partitioner("iid").partition(PROMPTS, 3, 0, DataConfig()) == partition_iid(60, 3, 0)


def test_a_name_cannot_be_registered_twice():
    class Duplicate(Partitioner):
        name = "iid"

        def partition(self, dataset, num_partitions, seed, data):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="'iid' is registered twice"):
        register_partitioner(Duplicate)
    assert registered_partitioners()["iid"] is not Duplicate


def test_a_group_column_partitioner_refuses_synthetic_data_and_names_the_others():
    data = DataConfig(partitioner="column", partition_column="hospital")
    with pytest.raises(DataError, match=r"'column' needs a data file with a site-id column.*\['iid', 'dirichlet'\]"):
        load_dataset(data, "classification", 0)
