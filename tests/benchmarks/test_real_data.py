"""benchmarks/real_data.py: the grouped split and macro-F1 (fast), and a tiny end-to-end run on a generated CSV in
banking77's format (slow: a real MiniLM, a 2-site Flower simulation)."""

from __future__ import annotations

import csv
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fedpeft.data.records import ClassificationData
from tests.benchmarks.scripts import load_script

real_data = load_script("real_data")
real_data_sets = sys.modules["real_data_sets"]
real_data_results = sys.modules["real_data_results"]


def test_macro_f1_matches_a_hand_computed_value():
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1, fn 0 -> 0.8; class 2: tp 0, fn 1 -> 0
    assert real_data.macro_f1([0, 0, 1, 1, 2], [0, 1, 1, 1, 0]) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert real_data.macro_f1([1, 1, 2], [1, 1, 2]) == 1.0


def test_dedup_drops_multilabel_texts_and_keeps_one_copy():
    data = ClassificationData(("a", "b", "a", "c", "b", "d"), (0, 1, 0, 2, 2, 1), ("x", "y", "z"))
    unique, dropped = real_data_sets.dedup_texts(data)
    assert dropped == 1  # "b" appears as y and z
    assert unique.texts == ("a", "c", "d") and unique.labels == (0, 2, 1) and unique.label_names == data.label_names


def test_split_by_text_keeps_duplicates_together_and_is_seeded():
    texts = tuple(f"t{i % 40}" for i in range(100))  # 40 groups, 2-3 copies each
    data = ClassificationData(texts, tuple(i % 40 % 3 for i in range(100)), ("a", "b", "c"))
    train, test = real_data_sets.split_by_text(data, 0.2, seed=0)
    assert not set(train.texts) & set(test.texts)
    assert len(set(train.texts)) == 32 and len(set(test.texts)) == 8  # int(0.8 * 40) groups train
    assert len(train) + len(test) == 100
    again, _ = real_data_sets.split_by_text(data, 0.2, seed=0)
    assert again.texts == train.texts


def test_subsample_is_stratified():
    labels = tuple([0] * 60 + [1] * 30 + [2] * 10)
    data = ClassificationData(tuple(f"t{i}" for i in range(100)), labels, ("a", "b", "c"))
    small = real_data_sets.subsample(data, 20, seed=0)
    assert len(small) == 20 and small.label_counts() == [12, 6, 2]


def test_results_log_reuses_rows_of_the_same_setup_only(tmp_path):
    log = tmp_path / "results.jsonl"
    args = real_data.parse_args(["--settings", "fedit,dp8", "--rounds", "2", "--results", str(log)])
    row = real_data.Row("fedit", "FedAvg", 0.5, 0.4, 12.0, 1024.0, None, "note", [0.1, 0.5])
    real_data_results.append_row(log, real_data_results.setup_of(args), real_data.asdict(row))
    assert real_data.earlier_rows(args) == {"fedit": row}
    other = real_data.parse_args(["--settings", "fedit", "--rounds", "3", "--results", str(log)])
    assert real_data.earlier_rows(other) == {}  # another setup: runs again
    real_data_results.append_row(log, real_data_results.setup_of(args), real_data.asdict(replace(row, accuracy=0.6)))
    assert real_data.earlier_rows(args)["fedit"].accuracy == 0.6  # the last line of a setting wins
    assert len(log.read_text().splitlines()) == 2  # appended, never rewritten


def test_results_log_names_the_file_and_line_of_a_bad_line(tmp_path):
    log = tmp_path / "results.jsonl"
    log.write_text('{"setup": {}, "row": {"name": "fedit"}, "measured": "t"}\nnot json\n')
    args = real_data.parse_args(["--results", str(log)])
    with pytest.raises(SystemExit, match=r"results\.jsonl, line 2: not a results line"):
        real_data.earlier_rows(args)


def test_results_log_lines_carry_the_schema_version(tmp_path):
    log = tmp_path / "results.jsonl"
    args = real_data.parse_args(["--settings", "fedit", "--results", str(log)])
    row = real_data.Row("fedit", "FedAvg", 0.5, 0.4, 12.0, 1024.0, None, "note", [0.1, 0.5])
    real_data_results.append_row(log, real_data_results.setup_of(args), real_data.asdict(row))
    assert json.loads(log.read_text())["schema_version"] == real_data_results.SCHEMA_VERSION == 1
    assert real_data.earlier_rows(args) == {"fedit": row}


def test_results_log_lines_without_a_schema_version_still_load(tmp_path):
    log = tmp_path / "results.jsonl"
    args = real_data.parse_args(["--settings", "fedit", "--results", str(log)])
    row = real_data.Row("fedit", "FedAvg", 0.5, 0.4, 12.0, 1024.0, None, "note", [0.1, 0.5])
    old = {"setup": real_data_results.setup_of(args), "row": real_data.asdict(row), "measured": "t"}
    log.write_text(json.dumps(old) + "\n")
    assert real_data.earlier_rows(args) == {"fedit": row}


def test_results_log_line_from_a_newer_version_is_refused_with_the_fix(tmp_path):
    from fedpeft.errors import DataError

    log = tmp_path / "results.jsonl"
    log.write_text('{"setup": {}, "row": {"name": "fedit"}, "measured": "t"}\n{"schema_version": 2, "rows": []}\n')
    args = real_data.parse_args(["--results", str(log)])
    with pytest.raises(DataError) as info:
        real_data.earlier_rows(args)
    message = str(info.value)
    assert f"results log {log} (line 2) was written by a newer fedpeft (schema_version 2)" in message
    assert "reads schema_version 1 and older" in message and "upgrade fedpeft" in message


def _write_fake_banking77(root: Path) -> None:
    names = ["card_arrival", "lost_or_stolen_card", "top_up_failed", "exchange_rate"]
    words = {"card_arrival": "card arrive post", "lost_or_stolen_card": "lost stolen wallet",
             "top_up_failed": "top up failed", "exchange_rate": "exchange rate currency"}
    rng = random.Random(0)
    folder = root / "banking77"
    folder.mkdir(parents=True)
    (folder / "categories.json").write_text(json.dumps(names))
    for split, count in (("train", 80), ("test", 40)):
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "category"])
            for i in range(count):
                name = names[i % len(names)]
                writer.writerow([f"{split} {i}: my {words[name]} question {rng.randint(0, 999)}", name])


@pytest.mark.slow
def test_tiny_run_prints_table_and_summary(tmp_path, capsys):
    _write_fake_banking77(tmp_path / "data")
    plot = tmp_path / "plot.png"
    rows = real_data.main(["--data-dir", str(tmp_path / "data"), "--settings", "fedit,centralized", "--sites", "2",
                           "--rounds", "1", "--max-train", "60", "--max-test", "30", "--max-length", "16",
                           "--out", str(tmp_path / "runs"), "--plot", str(plot)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [r.name for r in rows] == ["fedit", "centralized"]
    assert any(line.startswith("fedit ") for line in lines) and any(line.startswith("centralized ") for line in lines)
    assert lines[-1].startswith("summary: fedit / centralized accuracy = ")
    fed = rows[0]
    assert 0.0 <= fed.accuracy <= 1.0 and 0.0 <= fed.macro_f1 <= 1.0 and fed.bytes_per_round > 0
    assert len(fed.curve) == 2  # rounds 0 and 1 from metrics.jsonl
    assert plot.stat().st_size > 0


@pytest.mark.slow
def test_a_stopped_comparison_resumes_from_its_results_log(tmp_path, capsys):
    _write_fake_banking77(tmp_path / "data")
    log = tmp_path / "results.jsonl"
    common = ["--data-dir", str(tmp_path / "data"), "--sites", "2", "--rounds", "1", "--max-train", "60",
              "--max-test", "30", "--max-length", "16", "--results", str(log)]
    first = real_data.main(common + ["--settings", "centralized", "--out", str(tmp_path / "runs1")])
    both = real_data.main(common + ["--settings", "centralized,fedit", "--out", str(tmp_path / "runs2")])
    out = capsys.readouterr().out
    assert "centralized: reusing the row measured" in out
    assert both[0] == first[0]  # taken from the log, not trained again
    assert [path.name for path in (tmp_path / "runs2").iterdir()] == ["banking77-fedit"]  # only fedit ran
    assert [json.loads(line)["row"]["name"] for line in log.read_text().splitlines()] == ["centralized", "fedit"]
