"""Tests for fedpeft.data.loaders and the record types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.data import (
    ClassificationData,
    PromptResponseData,
    load_classification,
    load_prompt_response,
)
from fedpeft.errors import DataError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_csv_string_labels_sorted_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\nhello,spam\nworld,ham\nagain,spam\n")
    data = load_classification(path)
    assert data.texts == ("hello", "world", "again")
    assert data.label_names == ("ham", "spam")
    assert data.labels == (1, 0, 1)
    assert data.groups is None
    assert data.label_counts() == [1, 2]


def test_fixed_label_names_keep_ids_stable_when_a_site_lacks_a_class(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\nhello,spam\nagain,spam\n")
    data = load_classification(path, label_names=("ham", "spam", "phish"))
    assert data.label_names == ("ham", "spam", "phish") and data.labels == (1, 1)
    with pytest.raises(DataError, match=r"label 'spam' in column 'label' is not one of data.label_names \['ham'\]"):
        load_classification(path, label_names=("ham",))


def test_csv_int_labels_kept_as_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,2\nb,0\nc,1\n")
    data = load_classification(path)
    assert data.labels == (2, 0, 1)
    assert data.label_names == ("0", "1", "2")


def test_csv_quoted_commas_and_newlines(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", 'label,text\nx,"one, two"\ny,"multi\nline"\n')
    data = load_classification(path)
    assert data.texts == ("one, two", "multi\nline")


def test_csv_custom_columns_and_groups(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "msg,y,site\na,1,h2\nb,0,h1\n")
    data = load_classification(path, text_column="msg", label_column="y", group_column="site")
    assert data.groups == ("h2", "h1")
    sub = data.subset([1])
    assert sub.texts == ("b",) and sub.groups == ("h1",) and sub.label_names == data.label_names


def test_jsonl_round_trip_int_and_string_labels(tmp_path: Path) -> None:
    ints = _jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    assert load_classification(ints).labels == (1, 0)
    strs = _jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    data = load_classification(strs)
    assert data.label_names == ("neg", "pos") and data.labels == (1, 0)


def test_jsonl_prompt_response_with_groups(tmp_path: Path) -> None:
    rows = [{"prompt": "p1", "response": "r1", "site": "a"}, {"prompt": "p2", "response": "r2", "site": "b"}]
    data = load_prompt_response(_jsonl(tmp_path / "d.jsonl", rows), group_column="site")
    assert data.prompts == ("p1", "p2") and data.responses == ("r1", "r2")
    assert data.groups == ("a", "b")
    assert len(data.subset([0])) == 1


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    assert len(load_classification(path)) == 2


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError) as err:
        load_classification(missing)
    assert str(err.value) == (
        f"data file '{missing}' does not exist; set data.source to an existing "
        ".csv/.jsonl file or to 'synthetic'"
    )


def test_unknown_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.parquet", "x")
    with pytest.raises(DataError, match=r"'\.parquet'.*\.csv, \.jsonl"):
        load_classification(path)


def test_missing_column_names_column_key_and_available(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,category\na,b\n")
    with pytest.raises(DataError) as err:
        load_classification(path)
    message = str(err.value)
    assert "'label'" in message and "data.label_column" in message
    assert "'text', 'category'" in message and str(path) in message


def test_missing_prompt_column(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "response": "r"}])
    with pytest.raises(DataError, match=r"'prompt'.*data\.prompt_column.*'question', 'response'"):
        load_prompt_response(path)


@pytest.mark.parametrize(("name", "content"), [("e.csv", ""), ("e.jsonl", ""), ("e2.jsonl", "\n\n")])
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    with pytest.raises(DataError, match="empty"):
        load_classification(_write(tmp_path / name, content))


def test_header_only_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data rows"):
        load_classification(_write(tmp_path / "h.csv", "text,label\n"))


def test_empty_cell_reports_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,x\nb,\nc,y\n")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): column 'label' is empty"):
        load_classification(path)


def test_null_value_in_jsonl_reports_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": null, "label": 0}\n')
    with pytest.raises(DataError, match=r"line 2: column 'text' is empty"):
        load_classification(path)


def test_bad_json_line_number(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", label: 0}\n')
    with pytest.raises(DataError, match=r"line 3 is not valid JSON"):
        load_classification(path)


def test_json_line_not_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '["text", "label"]\n')
    with pytest.raises(DataError, match=r"line 1 is a JSON list"):
        load_classification(path)


def test_negative_int_label(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,-1\nb,0\n")
    with pytest.raises(DataError, match=r"row 1 .*negative"):
        load_classification(path)


def test_empty_group_value(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label,site\na,x,h1\nb,y,\n")
    with pytest.raises(DataError, match=r"row 2 .*'site' is empty"):
        load_classification(path, group_column="site")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ncaf\u00e9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_classification(path)


def test_records_validate() -> None:
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        ClassificationData(texts=("a", "b"), labels=(0,), label_names=("x",))
    with pytest.raises(DataError, match="label 3 at row 0"):
        ClassificationData(texts=("a",), labels=(3,), label_names=("x", "y"))
    with pytest.raises(DataError, match="groups has 1 entries"):
        PromptResponseData(prompts=("a", "b"), responses=("c", "d"), groups=("g",))
    data = ClassificationData(texts=("a",), labels=(0,), label_names=("x",))
    with pytest.raises(DataError, match="index 5 is out of range"):
        data.subset([5])
