"""`fedpeft predict` and `fedpeft evaluate` on an exported model (merged or adapter), offline."""

from __future__ import annotations

import csv
import io
import json

import pytest

from fedpeft.cli import main as cli_main
from tests.runs.test_export_labels import LABELS, make_run

ROWS = [("my invoice is wrong", "billing"), ("the site is down again", "outage"), ("refund please", "refund"),
        ("charged twice this month", "billing"), ("cannot log in, error 503", "outage"), ("money back now", "refund"),
        ("billing address change", "billing"), ("outage in the north region", "outage")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    _, run_dir = make_run(tmp, model="tiny-llama")
    assert cli_main(["export", str(run_dir), "--out", str(tmp / "adapter")]) == 0
    assert cli_main(["export", str(run_dir), "--out", str(tmp / "merged"), "--merge"]) == 0
    labelled = tmp / "test.csv"
    with labelled.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "label"])
        writer.writerows((i, text, label) for i, (text, label) in enumerate(ROWS))
    return tmp


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_predict_writes_one_label_per_row(exports, kind, tmp_path, capsys, monkeypatch):
    out = tmp_path / "predictions.csv"
    assert cli_main(["predict", str(exports / kind), "--input", str(exports / "test.csv"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [row["id"] for row in rows] == [str(i) for i in range(len(ROWS))]
    assert all(row["prediction"] in LABELS for row in rows)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(text + "\n" for text, _ in ROWS)))
    assert cli_main(["predict", str(exports / kind)]) == 0
    assert capsys.readouterr().out.splitlines() == [row["prediction"] for row in rows]


def test_evaluate_prints_the_accuracy_and_macro_f1_of_a_direct_computation(exports, capsys):
    from sklearn.metrics import accuracy_score, f1_score

    from fedpeft.runs.predict import load_exported, predict_texts

    predicted = predict_texts(load_exported(exports / "adapter"), [text for text, _ in ROWS])
    true = [label for _, label in ROWS]
    capsys.readouterr()
    assert cli_main(["evaluate", str(exports / "merged"), "--input", str(exports / "test.csv"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["accuracy"] == pytest.approx(accuracy_score(true, predicted))
    assert scores["macro_f1"] == pytest.approx(f1_score(true, predicted, average="macro"))
    assert {name: c["support"] for name, c in scores["per_class"].items()} == {"billing": 3, "outage": 3,
                                                                               "refund": 2}
    assert cli_main(["evaluate", str(exports / "adapter"), "--input", str(exports / "test.csv")]) == 0
    text = capsys.readouterr().out
    assert f"accuracy {scores['accuracy']:.4f}" in text and "macro-F1" in text and "refund" in text


def test_bad_inputs_are_named(exports, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,nonsense\n")
    assert cli_main(["evaluate", str(exports / "adapter"), "--input", str(bad)]) == 2
    assert "neither one of the model's classes" in capsys.readouterr().err
    assert cli_main(["predict", str(tmp_path), "--input", str(bad)]) == 2
    assert "neither a fedpeft export nor a transformers model" in capsys.readouterr().err
    assert cli_main(["predict", str(exports / "adapter"), "--input", str(bad), "--text-column", "body"]) == 2
    assert "--text-column" in capsys.readouterr().err


@pytest.mark.slow
def test_a_simulated_run_records_its_label_column_and_its_export_scores_a_file(tmp_path, capsys):
    """End to end: a 1-round tiny federation on a file with string labels, exported, then evaluated."""
    from fedpeft.composition import from_mapping
    from fedpeft.runs.export import MODEL_INFO_FILE
    from fedpeft.simulations.engine import simulate

    data = tmp_path / "tickets.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(ROWS * 4)
    cfg = from_mapping({"model": {"name": "tiny-llama", "max_length": 16}, "peft": {"method": "lora", "r": 2},
                        "federation": {"rounds": 1, "num_sites": 2}, "data": {"source": str(data)},
                        "run": {"out_dir": str(tmp_path / "runs"), "name": "labels"}})
    result = simulate(cfg)
    info = json.loads((result.run_dir / MODEL_INFO_FILE).read_text())
    assert info["label_names"] == sorted(LABELS) and "column 'label'" in info["label_source"]
    assert cli_main(["export", str(result.run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    capsys.readouterr()
    assert cli_main(["evaluate", str(tmp_path / "merged"), "--input", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == len(ROWS) * 4
