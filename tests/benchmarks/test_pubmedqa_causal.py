"""benchmarks/pubmedqa_causal.py: the PubMedQA JSON -> prompt/response conversion and the split by the test ids (fast),
and a smoke run on a tiny made-up file in PubMedQA's format (slow). No PubMedQA text is used here."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "pubmedqa_causal.py"
DECISIONS = ("yes", "no", "maybe")


def load_script():
    spec = importlib.util.spec_from_file_location("pubmedqa_causal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_item(i: int) -> dict:
    return {"QUESTION": f"Does treatment {i} shorten recovery? ", "CONTEXTS": [f"Background {i}.", f" Results {i}. "],
            "LABELS": ["BACKGROUND", "RESULTS"], "MESHES": ["Humans"], "YEAR": "2001",
            "reasoning_required_pred": "yes", "reasoning_free_pred": "yes",
            "final_decision": DECISIONS[i % 3], "LONG_ANSWER": f" Treatment {i} helped somewhat. "}


def write_fake_pqal(folder: Path, n: int, test: list[int]) -> None:
    items = {str(1000 + i): fake_item(i) for i in range(n)}
    (folder / "ori_pqal.json").write_text(json.dumps(items))
    (folder / "test_ground_truth.json").write_text(json.dumps({str(1000 + i): DECISIONS[i % 3] for i in test}))


def test_item_becomes_question_then_context_prompt_and_decision_then_long_answer_response():
    pair = load_script().to_pair("1004", fake_item(4))
    assert pair == {"id": "1004", "decision": "no", "response": "no. Treatment 4 helped somewhat.",
                    "prompt": "Question: Does treatment 4 shorten recovery?\nContext: Background 4. Results 4.\n"
                              "Answer (yes, no or maybe):"}


def test_unknown_decision_is_refused():
    item = {**fake_item(0), "final_decision": "perhaps"}
    with pytest.raises(ValueError, match="perhaps"):
        load_script().to_pair("1000", item)


def test_split_keeps_the_test_ids_out_of_training_and_caps_training_rows(tmp_path):
    script = load_script()
    write_fake_pqal(tmp_path, 10, test=[1, 4, 7])
    items, test_ids = script.load_pqal(tmp_path)
    train, test = script.split_rows(items, test_ids)
    assert [r["id"] for r in test] == ["1001", "1004", "1007"]
    assert [r["id"] for r in train] == ["1000", "1002", "1003", "1005", "1006", "1008", "1009"]
    assert [r["decision"] for r in test] == ["no", "no", "no"]
    capped, _ = script.split_rows(items, test_ids, max_train=2)
    assert [r["id"] for r in capped] == ["1000", "1002"]
    rows = [json.loads(line) for line in script.write_jsonl(train, tmp_path / "t.jsonl").read_text().splitlines()]
    assert rows[0] == {"prompt": train[0]["prompt"], "response": train[0]["response"]}  # nothing else travels


def test_test_ids_missing_from_the_items_are_an_error(tmp_path):
    write_fake_pqal(tmp_path, 3, test=[1])
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"999": "yes"}))
    with pytest.raises(SystemExit, match="not in ori_pqal.json"):
        load_script().load_pqal(tmp_path)


@pytest.mark.slow
def test_pubmedqa_causal_runs_on_a_tiny_file_and_scores_the_test_decisions(tmp_path):
    write_fake_pqal(tmp_path, 16, test=[0, 5, 10, 15])
    plot = tmp_path / "loss.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path), "--sites", "2", "--rounds", "2",
                           "--max-length", "48", "--score", "--plot", str(plot)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    header = lines.index(next(line for line in lines if line.split()[:3] == ["round", "train", "loss"]))
    rows = [line.split() for line in lines[header + 1: header + 4]]
    assert [row[0] for row in rows] == ["0", "1", "2"] and rows[0][1] == "-"
    assert all(float(row[2]) > 0 for row in rows)  # held-out loss every round
    assert any(line.startswith("decision accuracy on 4 test questions") for line in lines)
    assert plot.is_file() and plot.stat().st_size > 0
    assert re.match(r"summary: held-out loss round 0 [\d.]+ -> round 2 [\d.]+ \([+-][\d.]+%\); train loss round 1 "
                    r"[\d.]+ -> round 2 [\d.]+; test decision accuracy [\d.]+ \(majority [\d.]+\)$", lines[-1])
