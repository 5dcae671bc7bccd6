from __future__ import annotations

import pytest

from fedpeft.composition import from_mapping
from fedpeft.data.sites import num_labels, site_split
from fedpeft.errors import DataError


def _cfg(**data):
    return from_mapping({"data": data, "federation": {"num_sites": 3}})


def test_sites_get_disjoint_deterministic_splits_covering_the_data():
    cfg = _cfg(synthetic_examples=300)
    splits = [site_split(cfg, pid, 3) for pid in range(3)]
    texts = [t for s in splits for t in s.train.texts + s.eval.texts]
    assert len(texts) == 300
    assert all(len(s.eval) > 0 and len(s.train) > len(s.eval) for s in splits)
    assert site_split(cfg, 1, 3) == splits[1]
    assert num_labels(cfg) == 6


def test_missing_data_file_names_the_file_and_the_key(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data.source"):
        site_split(_cfg(source=str(tmp_path / "sites.csv")), 0, 3)


def test_absent_label_column_names_the_column_and_the_key(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,category\n" + "".join(f"row {i},a\n" for i in range(30)))
    with pytest.raises(DataError, match="no column 'label'.*data.label_column.*category"):
        site_split(_cfg(source=str(path)), 0, 3)


def test_empty_partition_is_an_error_not_a_silent_empty_site(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfirst,a\nsecond,b\n")
    with pytest.raises(DataError, match="partition|rows"):
        site_split(_cfg(source=str(path), partitioner="iid"), 0, 3)


def test_column_partitioner_needs_a_file_with_a_site_column():
    with pytest.raises(DataError, match="site-id column"):
        site_split(_cfg(partitioner="column", partition_column="hospital"), 0, 3)


def test_column_partitioner_uses_the_natural_site_id(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [f'{{"text": "note {i}", "label": "{i % 2}", "hospital": "h{i % 3}"}}\n' for i in range(60)]
    path.write_text("".join(rows))
    cfg = _cfg(source=str(path), partitioner="column", partition_column="hospital")
    for pid in range(3):
        split = site_split(cfg, pid, 3)
        assert set(split.train.groups) | set(split.eval.groups) == {f"h{pid}"}
