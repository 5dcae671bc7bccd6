"""A label-words run exports as an adapter that knows its prompt and words; `fedpeft predict` scores with them."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.cli import main as cli_main
from fedpeft.errors import ModelError
from fedpeft.runs.export import EXPORT_INFO_FILE, export_run
from fedpeft.runs.predict import load_exported, predict_texts
from tests.runs.test_export_labels import make_run

LABELS = ["ham", "spam"]
WORDS = ["no", "yes"]
TEMPLATE = 'SMS: "{text}"\nIs this spam? Answer:'
TEXTS = ["win a free prize now", "see you at lunch", "call me back", "urgent: claim your reward"]


@pytest.fixture
def run_dir(tmp_path):
    """A label-words run as the server leaves it, its LoRA adapter moved off zero so the words' scores differ."""
    cfg, directory = make_run(tmp_path, model="tiny-llama", labels=LABELS, model_options={
        "classifier": "label-words", "quantization": "none", "prompt_template": TEMPLATE, "label_words": WORDS})
    return directory, cfg


def test_the_export_carries_the_prompt_and_words_and_predicts_as_the_trained_model_does(run_dir, tmp_path):
    from fedpeft.methods import load_saved_adapter
    from fedpeft.models.loader import load_base_model

    directory, cfg = run_dir
    out = export_run(directory, tmp_path / "export")
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert info["classifier"] == "label-words" and info["label_words"] == WORDS
    assert info["prompt_template"] == TEMPLATE and info["peft_loadable"] is False

    base, tokenizer = load_base_model(cfg.model, len(LABELS))
    model = load_saved_adapter(base, directory / "adapters" / "round-0001").eval()
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        expected = [LABELS[i] for i in model(**enc).logits.argmax(-1)]
    assert predict_texts(load_exported(out), TEXTS) == expected


def test_predict_and_evaluate_work_on_a_label_words_export_and_merge_is_refused(run_dir, tmp_path, capsys):
    directory, _ = run_dir
    with pytest.raises(ModelError, match="label words.*cannot be merged.*without --merge"):
        export_run(directory, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged").exists(), "nothing half-written"

    assert cli_main(["export", str(directory), "--out", str(tmp_path / "export")]) == 0
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("text,label\n" + "".join(f"{t},{LABELS[i % 2]}\n" for i, t in enumerate(TEXTS)))
    capsys.readouterr()
    assert cli_main(["predict", str(tmp_path / "export"), "--input", str(labelled)]) == 0
    assert set(capsys.readouterr().out.split()) <= set(LABELS)
    assert cli_main(["evaluate", str(tmp_path / "export"), "--input", str(labelled)]) == 0
    assert "accuracy" in capsys.readouterr().out
