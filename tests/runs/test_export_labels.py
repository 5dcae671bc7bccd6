"""An export says what it predicts: labels in the run directory and the export, a portable base name, peft loads it."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.cli import main as cli_main
from fedpeft.composition import from_mapping
from fedpeft.runs.checkpoint import save_global_adapter
from fedpeft.runs.export import MODEL_INFO_FILE, labels_info, write_model_info
from fedpeft.runs.run_dir import prepare_run_dir
from fedpeft.server.initial import initial_adapter

LABELS = ["billing", "outage", "refund"]


def make_run(tmp_path, model="minilm", method="lora", labels=LABELS, model_options=None, **data):
    """A run directory as the server leaves it: config, model_info.json and a trained (here: perturbed) adapter."""
    cfg = from_mapping({"model": {"name": model, "task": "classification", "max_length": 32, **(model_options or {})},
                        "peft": {"method": method, "r": 4},
                        "data": {"label_names": list(labels), **data} if labels else data,
                        "run": {"out_dir": str(tmp_path / "runs"), "name": "r"}})
    initial = initial_adapter(cfg)
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in initial.wire.items()}
    run_dir = prepare_run_dir(cfg)
    write_model_info(run_dir, cfg)
    save_global_adapter(run_dir, 1, initial.saved_format(state), initial.peft_config)
    return cfg, run_dir


def test_the_run_directory_records_labels_and_a_portable_base(tmp_path):
    _, run_dir = make_run(tmp_path)
    info = json.loads((run_dir / MODEL_INFO_FILE).read_text())
    assert info["label_names"] == LABELS and info["label_source"] == "data.label_names"
    assert info["base_model"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "site-packages" not in json.dumps(info)


def test_labels_come_from_the_label_column_or_say_there_are_none(tmp_path):
    named = tmp_path / "named.csv"
    named.write_text("text,label\na,urgent\nb,low\nc,urgent\n")
    ints = tmp_path / "ints.csv"
    ints.write_text("text,label\na,0\nb,1\nc,2\n")
    info = labels_info(from_mapping({"data": {"source": str(named)}}))
    assert info["label_names"] == ["low", "urgent"] and "column 'label'" in info["label_source"]
    info = labels_info(from_mapping({"data": {"source": str(ints)}}))
    assert info["integer_labels"] and "no class names" in info["label_source"]
    synthetic = labels_info(from_mapping({"data": {"source": "synthetic"}}))
    assert len(synthetic["label_names"]) > 2 and "synthetic" in synthetic["label_source"]
    unreadable = labels_info(from_mapping({"data": {"source": str(tmp_path / "no.csv")}}))
    assert unreadable["label_names"] == [] and unreadable["label_source"].startswith("unknown")
    assert labels_info(from_mapping({"data": {"source": "synthetic-multitask"}})).get("multitask")


def test_a_lora_adapter_export_loads_with_peft_offline_and_carries_its_labels(tmp_path, monkeypatch):
    from peft import AutoPeftModelForSequenceClassification

    from fedpeft.runs.predict import load_exported, peft_loadable, predict_ids

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, run_dir = make_run(tmp_path)
    out = tmp_path / "adapter"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    info = json.loads((out / "fedpeft_export.json").read_text())
    assert info["label_names"] == LABELS and info["peft_loadable"] is True
    assert "peft_loadable" in (out / "README.md").read_text()
    with peft_loadable(out) as path:
        model = AutoPeftModelForSequenceClassification.from_pretrained(path)
    assert model.config.id2label == dict(enumerate(LABELS))
    exported = load_exported(out)
    texts = ["my invoice is wrong", "the service is down", "give me my money back"]
    enc = exported.tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        direct = model(**enc).logits.argmax(-1).tolist()
    assert direct == predict_ids(exported, texts)


def test_the_merged_export_has_id2label_and_export_refuses_to_overwrite(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    _, run_dir = make_run(tmp_path, model="tiny-llama")
    out = tmp_path / "merged"
    assert cli_main(["export", str(run_dir), "--out", str(out), "--merge"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    assert config["label2id"] == {name: i for i, name in enumerate(LABELS)}
    assert AutoModelForSequenceClassification.from_pretrained(str(out)).config.id2label[2] == "refund"
    capsys.readouterr()
    assert cli_main(["export", str(run_dir), "--out", str(out), "--merge"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    (out / "marker").write_text("old")
    assert cli_main(["export", str(run_dir), "--out", str(out), "--force"]) == 0
    assert not (out / "marker").exists() and (out / "adapter_model.safetensors").is_file()
    assert cli_main(["export", str(run_dir), "--out", str(run_dir.parent), "--force"]) == 2
    assert "run directory" in capsys.readouterr().err and (run_dir / "run_config.json").is_file()


def test_a_probe_export_says_peft_cannot_load_it(tmp_path):
    from fedpeft.errors import ModelError
    from fedpeft.runs.predict import load_exported, peft_loadable, predict_texts

    _, run_dir = make_run(tmp_path, model="tiny-llama", method="probe")
    out = tmp_path / "probe"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    info = json.loads((out / "fedpeft_export.json").read_text())
    assert info["peft_loadable"] is False and "not a peft adapter" in info["peft_note"]
    assert "peft alone cannot load it" in (out / "README.md").read_text()
    with pytest.raises(ModelError, match="peft cannot load"), peft_loadable(out):
        pass
    assert set(predict_texts(load_exported(out), ["a", "b c"])) <= set(LABELS)
    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "m"), "--merge"]) == 2
