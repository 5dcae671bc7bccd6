"""Load classification or prompt/response datasets from .csv or .jsonl files."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from fedpeft.data.records import ClassificationData, PromptResponseData
from fedpeft.errors import DataError

SUPPORTED_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl")


@dataclass(frozen=True)
class _Table:
    """Raw rows of one file, every value a string (or None when absent)."""

    path: Path
    columns: tuple[str, ...]
    rows: tuple[dict[str, str | None], ...]
    locations: tuple[str, ...]  # human-readable position of each row, e.g. "row 3 (line 4)"


def load_classification(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    *,
    label_names: tuple[str, ...] = (),
    task_column: str | None = None,
) -> ClassificationData:
    """Read texts and labels; integer labels are kept as ids, string labels are mapped in sorted order.

    ``label_names`` fixes the mapping instead (name i is id i): every site of a deployment must use the same ids,
    and a site whose file lacks a class would otherwise shift every id after it. With ``task_column`` each row's
    label becomes ``task:label`` (multi-task: one head per task).
    """
    table = _read_table(path)
    texts = _column(table, text_column, "data.text_column", strip=False)
    raw_labels = _column(table, label_column, "data.label_column", strip=True)
    if task_column:
        tasks = _column(table, task_column, "data.task_column", strip=True)
        raw_labels = [f"{task}:{label}" for task, label in zip(tasks, raw_labels, strict=True)]
    if label_names:
        labels = _labels_by_name(table, raw_labels, label_column, label_names)
    else:
        labels, label_names = _encode_labels(table, raw_labels, label_column)
    groups = _optional_column(table, group_column)
    return ClassificationData(
        texts=tuple(texts), labels=tuple(labels), label_names=label_names, groups=groups
    )


def load_prompt_response(
    path: str | Path,
    prompt_column: str = "prompt",
    response_column: str = "response",
    group_column: str | None = None,
) -> PromptResponseData:
    """Read prompt/response pairs for generative fine-tuning."""
    table = _read_table(path)
    prompts = _column(table, prompt_column, "data.prompt_column", strip=False)
    responses = _column(table, response_column, "data.response_column", strip=False)
    groups = _optional_column(table, group_column)
    return PromptResponseData(prompts=tuple(prompts), responses=tuple(responses), groups=groups)


def _read_table(path: str | Path) -> _Table:
    file = Path(path)
    if not file.is_file():
        problem = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise DataError(
            f"data file '{file}' {problem}; set data.source to an existing .csv/.jsonl file or to 'synthetic'"
        )
    suffix = file.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"data file '{file}' has unsupported suffix '{file.suffix}'; "
            f"supported suffixes are {', '.join(SUPPORTED_SUFFIXES)}: convert the file to one of them"
        )
    try:
        table = _read_csv(file) if suffix == ".csv" else _read_jsonl(file)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file '{file}' is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
            "re-save the file with UTF-8 encoding"
        ) from exc
    if not table.rows:
        raise DataError(f"data file '{file}' contains no data rows; add at least one row")
    return table


def _read_csv(file: Path) -> _Table:
    # utf-8-sig strips the byte-order mark that spreadsheet exports often prepend to the header.
    with file.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            columns = reader.fieldnames
            if not columns:
                raise DataError(
                    f"data file '{file}' is empty; add a header line with column names and data rows"
                )
            rows, locations = [], []
            for number, record in enumerate(reader, start=1):
                rows.append({name: record.get(name) for name in columns})
                locations.append(f"row {number} (line {reader.line_num})")
        except csv.Error as exc:
            raise DataError(
                f"data file '{file}' is not valid CSV at line {reader.line_num}: {exc}; "
                "fix the quoting on that line"
            ) from exc
    return _Table(file, tuple(columns), tuple(rows), tuple(locations))


def _read_jsonl(file: Path) -> _Table:
    rows: list[dict[str, str | None]] = []
    locations: list[str] = []
    columns: dict[str, None] = {}  # insertion-ordered set of keys seen in any row
    with file.open("r", encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = _parse_json_line(file, line, line_number)
            columns.update(dict.fromkeys(record))
            rows.append({key: _json_value_to_str(value) for key, value in record.items()})
            locations.append(f"line {line_number}")
    if not rows:
        raise DataError(f"data file '{file}' is empty; add one JSON object per line")
    full_rows = tuple({name: row.get(name) for name in columns} for row in rows)
    return _Table(file, tuple(columns), full_rows, tuple(locations))


def _parse_json_line(file: Path, line: str, line_number: int) -> dict[str, object]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"data file '{file}' line {line_number} is not valid JSON ({exc.msg}); "
            "write exactly one JSON object per line"
        ) from exc
    if not isinstance(record, dict):
        raise DataError(
            f"data file '{file}' line {line_number} is a JSON {type(record).__name__}, not an object; "
            'write one object per line, e.g. {"text": "...", "label": "..."}'
        )
    return record


def _json_value_to_str(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value)  # numbers/booleans keep their JSON spelling, e.g. 3 -> "3"


def _require_column(table: _Table, column: str, config_key: str) -> None:
    if column not in table.columns:
        available = ", ".join(repr(name) for name in table.columns)
        raise DataError(
            f"data file '{table.path}' has no column '{column}'; set {config_key} to one of the "
            f"available columns: {available}"
        )


def _column(table: _Table, column: str, config_key: str, strip: bool) -> list[str]:
    _require_column(table, column, config_key)
    values = []
    for row, location in zip(table.rows, table.locations, strict=True):
        value = row[column]
        if value is None or not value.strip():
            raise DataError(
                f"data file '{table.path}' {location}: column '{column}' is empty; "
                "fill in a value or remove the row"
            )
        values.append(value.strip() if strip else value)
    return values


def _optional_column(table: _Table, column: str | None) -> tuple[str, ...] | None:
    if column is None:
        return None
    return tuple(_column(table, column, "data.partition_column", strip=True))


def _encode_labels(
    table: _Table, raw: list[str], column: str
) -> tuple[list[int], tuple[str, ...]]:
    as_ints = [_parse_int(value) for value in raw]
    if all(value is not None for value in as_ints):
        ids = [int(value) for value in as_ints if value is not None]
        for value, location in zip(ids, table.locations, strict=True):
            if value < 0:
                raise DataError(
                    f"data file '{table.path}' {location}: label {value} in column '{column}' is "
                    "negative; use integer ids 0..K-1 or string label names"
                )
        _check_contiguous(table, ids, column)
        return ids, tuple(str(i) for i in range(max(ids) + 1))
    names = tuple(sorted(set(raw)))
    index = {name: i for i, name in enumerate(names)}
    return [index[value] for value in raw], names


def _check_contiguous(table: _Table, ids: list[int], column: str) -> None:
    """Integer labels are class ids 0..K-1: a gap would silently add a class for every id no row has (a 1001-class
    head for the labels 0, 1, 1000)."""
    used = sorted(set(ids))
    if used == list(range(len(used))):
        return
    missing = sorted(set(range(used[-1] + 1)) - set(used))
    shown = ", ".join(map(str, used[:8])) + (", ..." if len(used) > 8 else "")
    gap = ", ".join(map(str, missing[:5])) + (f", ... ({len(missing)} ids)" if len(missing) > 5 else "")
    raise DataError(
        f"data file '{table.path}': the integer labels in column '{column}' are {{{shown}}}, not 0..K-1: no row has "
        f"id {gap}, so the model would get a {used[-1] + 1}-class head for {len(used)} classes. Renumber the labels "
        f"0..{len(used) - 1}, write them as names (e.g. 'urgent'), or list every class in data.label_names (name i "
        "is id i; needed anyway when a site's file lacks a class)"
    )


def count_rows(path: str | Path) -> int:
    """The number of data rows of a .csv or .jsonl file (DataError when it cannot be read as one)."""
    return len(_read_table(path).rows)


def _labels_by_name(table: _Table, raw: list[str], column: str, names: tuple[str, ...]) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for value, location in zip(raw, table.locations, strict=True):
        if value not in index:
            raise DataError(
                f"data file '{table.path}' {location}: label {value!r} in column '{column}' is not one of "
                f"data.label_names {list(names)}; fix the label, or add it to data.label_names in the run config"
            )
        ids.append(index[value])
    return ids


def _parse_int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None
