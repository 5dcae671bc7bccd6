"""Data that would make a run silently wrong is refused before training, naming the file or site, the value and
the fix (issue #18 §4): gapped integer labels, and a site too small for a training and a held-out row."""

from __future__ import annotations

import pytest

from fedpeft.composition import from_mapping
from fedpeft.data import load_classification
from fedpeft.data.sites import site_split
from fedpeft.errors import DataError


def test_integer_labels_with_a_gap_are_refused_not_made_into_a_huge_head(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0\nb,1\nc,1000\n")
    with pytest.raises(DataError) as info:
        load_classification(path)
    message = str(info.value)
    assert str(path) in message and "'label'" in message and "{0, 1, 1000}" in message
    assert "1001-class head for 3 classes" in message and "0..2" in message and "data.label_names" in message
    # Named classes fix the ids instead: the same file with data.label_names is read as asked.
    names = tuple(str(i) for i in (0, 1, 1000))
    assert load_classification(path, label_names=names).labels == (0, 1, 2)


def test_a_one_row_site_is_refused_before_training_naming_the_site_rows_and_fix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(5)))
    cfg = from_mapping({"data": {"source": str(path), "partitioner": "iid"}, "federation": {"num_sites": 5}})
    with pytest.raises(DataError) as info:
        site_split(cfg, 0, 5)
    message = str(info.value)
    assert "site 0 of 5 holds 1 row(s)" in message and "no held-out row" in message
    assert "federation.num_sites" in message and "data.eval_fraction" in message
    # A deployed site reads its own file (partition 0 of 1): the message names the file, not a partition.
    (tmp_path / "one.csv").write_text("text,label\nonly,a\n")
    cfg = from_mapping({"data": {"source": str(tmp_path / "one.csv"), "partitioner": "iid"}})
    with pytest.raises(DataError, match=r"this site \(data file '.*one\.csv'\) holds 1 row\(s\)"):
        site_split(cfg, 0, 1)


def test_a_directory_given_as_the_data_file_or_the_config_says_so(tmp_path):
    from fedpeft.config import parse_toml
    from fedpeft.data.loaders import _read_table
    from fedpeft.errors import ConfigError, DataError

    with pytest.raises(DataError, match="is a directory, not a file"):
        _read_table(tmp_path)
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        parse_toml(tmp_path)
