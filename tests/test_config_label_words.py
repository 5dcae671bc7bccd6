"""Config rules of label-word classification: each refusal names the key, the value and the fix."""

from __future__ import annotations

import pytest

from fedpeft.composition import from_flat, from_mapping
from fedpeft.config import RunConfig, resolve_quantization
from fedpeft.errors import ConfigError


def _cfg(model=None, **sections):
    return from_mapping({"model": {"name": "tiny-llama", "classifier": "label-words", **(model or {})}, **sections})


def test_the_default_classifier_is_the_head_and_label_words_default_to_the_configured_class_names():
    assert RunConfig().model.classifier == "head"
    cfg = _cfg(data={"label_names": ["billing", "access"]})
    assert cfg.model.label_words == ("billing", "access")
    assert resolve_quantization(cfg.model) == "nf4", "auto: a causal LM base is 4-bit, also when it classifies"
    again = from_flat(cfg.to_flat())  # what the server sends the sites
    assert again.model.label_words == ("billing", "access") and again.model.prompt_template == "{text}\nAnswer:"


@pytest.mark.parametrize(("model", "sections", "key", "fix"), [
    ({"classifier": "words"}, {}, "model.classifier", "use one of ['head', 'label-words']"),
    ({"task": "causal-lm", "label_words": ["a", "b"]}, {}, "model.classifier", "leave model.classifier = 'head'"),
    ({"name": "minilm", "label_words": ["a", "b"]}, {}, "model.classifier", "encoder without an LM head"),
    ({"label_words": ["a", "b"], "prompt_template": "Answer:"}, {}, "model.prompt_template", "exactly once"),
    ({"label_words": ["a", "b"], "prompt_template": "{text} Answer: "}, {}, "model.prompt_template",
     "without a space"),
    ({}, {}, "model.label_words", "or set data.label_names"),
    ({"label_words": ["billing", "billing"]}, {}, "model.label_words", "its own non-empty word"),
    ({"label_words": ["billing", "access", "visits"]}, {"data": {"label_names": ["x", "y"]}}, "model.label_words",
     "data.label_names (2 classes)"),
    ({"label_words": ["billing", "access"], "num_labels": 3}, {}, "model.label_words", "model.num_labels is 3"),
    ({"label_words": ["billing", "access"]}, {"peft": {"head": "local"}}, "peft.head", "no head to keep local"),
    ({"label_words": ["billing", "access"]}, {"peft": {"method": "prompt-tuning"}}, "peft.method",
     "cannot classify through label words"),
    ({"label_words": ["billing", "access"]}, {"peft": {"method": "probe"}}, "peft.method",
     "cannot classify through label words"),
])
def test_unusable_label_word_settings_are_refused_before_anything_runs(model, sections, key, fix):
    with pytest.raises(ConfigError, match=key) as err:
        _cfg(model, **sections)
    assert fix in str(err.value)


def test_label_words_without_the_label_words_classifier_are_refused():
    with pytest.raises(ConfigError, match="model.label_words.*only with model.classifier = 'label-words'"):
        from_mapping({"model": {"name": "tiny-llama", "label_words": ["a", "b"]}})
