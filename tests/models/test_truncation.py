"""model.truncation_side: which end of a text longer than model.max_length the run keeps, everywhere it encodes."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.config import ModelConfig
from fedpeft.errors import ConfigError
from fedpeft.models.loader import load_base_model
from fedpeft.training.batches import IGNORE_INDEX, encode_classification, encode_prompt_response

FILLER = " ".join(["the study enrolled patients"] * 40)  # far past max_length
WORDS = ("yes", "no")


def _label_word_model(side: str):
    cfg = ModelConfig(name="tiny-llama", classifier="label-words", label_words=WORDS, quantization="none",
                      max_length=24, truncation_side=side)
    model, tokenizer = load_base_model(cfg, 2)
    return model.eval(), tokenizer, cfg.max_length


def _scores(side: str, texts: tuple[str, ...]) -> torch.Tensor:
    model, tokenizer, max_length = _label_word_model(side)
    data = encode_classification(texts, (0,) * len(texts), tokenizer, max_length)
    with torch.no_grad():
        return model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits


def test_the_loader_sets_the_tokenizers_truncation_side():
    for side in ("right", "left"):
        assert _label_word_model(side)[1].truncation_side == side


def test_left_truncation_keeps_a_long_texts_end_and_right_its_beginning():
    differ_at_start = ("mice " + FILLER + " results were negative", "humans " + FILLER + " results were negative")
    differ_at_end = (FILLER + " results were negative", FILLER + " results were positive")
    left_start, left_end = _scores("left", differ_at_start), _scores("left", differ_at_end)
    torch.testing.assert_close(left_start[0], left_start[1])  # the beginning was cut: same scores
    assert not torch.allclose(left_end[0], left_end[1])  # the end was kept: the model sees the difference
    right_start, right_end = _scores("right", differ_at_start), _scores("right", differ_at_end)
    assert not torch.allclose(right_start[0], right_start[1])
    torch.testing.assert_close(right_end[0], right_end[1])


def test_a_causal_lm_prompt_keeps_its_end_under_left_truncation_and_the_response_survives():
    _, tokenizer, _ = _label_word_model("left")
    end = tokenizer("conclusion", add_special_tokens=False)["input_ids"]
    start = tokenizer("background", add_special_tokens=False)["input_ids"]
    data = encode_prompt_response(("background " + FILLER + " conclusion",), ("routine",), tokenizer, max_length=16)
    ids = data.input_ids[0].tolist()
    assert set(end) <= set(ids) and not set(start) & set(ids)
    response = tokenizer("routine", add_special_tokens=False)["input_ids"]
    assert (data.labels[0] != IGNORE_INDEX).sum() == len(response) + 1  # and its end token


def test_an_unknown_truncation_side_is_refused_with_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"model\.truncation_side.*'middle'.*\['right', 'left'\]"):
        from_mapping({"model": {"truncation_side": "middle"}})


def test_an_export_records_the_side_and_predict_encodes_with_it(tmp_path):
    from fedpeft.runs.export import EXPORT_INFO_FILE, export_run
    from fedpeft.runs.predict import load_exported
    from tests.runs.test_export_labels import make_run

    _, directory = make_run(tmp_path, model="tiny-llama", labels=["ham", "spam"], model_options={
        "classifier": "label-words", "quantization": "none", "label_words": ["no", "yes"],
        "truncation_side": "left"})
    out = export_run(directory, tmp_path / "export")
    assert json.loads((out / EXPORT_INFO_FILE).read_text())["truncation_side"] == "left"
    assert load_exported(out).tokenizer.truncation_side == "left"
