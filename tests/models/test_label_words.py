"""Label-word classification: each class's logit is the LM's own log-probability of its word after the prompt."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import ModelConfig
from fedpeft.errors import ModelError
from fedpeft.models.builtin import build_tiny_llama
from fedpeft.models.label_words import LabelWordClassifier, prompt_tokens, wrap_label_words
from fedpeft.models.loader import load_base_model
from fedpeft.training.batches import encode_classification

TEMPLATE = "{text}\nAnswer:"
TEXTS = ("my invoice is wrong", "i cannot log in to my account since yesterday", "book a visit")


@pytest.fixture(scope="module")
def tiny_lm():
    lm, tokenizer = build_tiny_llama("causal-lm", 1, seed=7)
    lm.eval()
    return lm, tokenizer


def _by_hand(lm, tokenizer, text: str, word: str) -> float:
    """log P(" " + word | prompt) from one unpadded forward pass over the prompt and the word, token by token."""
    prompt = tokenizer(text)["input_ids"][:-1] + tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"]
    word_ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + word_ids])
    with torch.no_grad():
        log_probs = lm(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(log_probs[len(prompt) - 1 + j, t]) for j, t in enumerate(word_ids))


def _logits(model, tokenizer, texts):
    data = encode_classification(texts, (0,) * len(texts), tokenizer, max_length=32)
    with torch.no_grad():
        return model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits


def test_each_class_logit_is_the_lm_log_probability_of_its_word_summed_over_its_tokens(tiny_lm):
    lm, tokenizer = tiny_lm
    words = ["billing", "account access", "appointments"]  # "account access" is two tokens: a second pass
    assert [len(w) for w in prompt_tokens(tokenizer, TEMPLATE, words).words] == [1, 2, 1]
    model = wrap_label_words(lm, tokenizer, template=TEMPLATE, words=words, num_labels=3)
    logits = _logits(model, tokenizer, TEXTS)  # rows of different lengths: padding must not change a row
    expected = torch.tensor([[_by_hand(lm, tokenizer, t, w) for w in words] for t in TEXTS])
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_the_prediction_is_the_class_whose_word_the_lm_prefers(tiny_lm):
    lm, tokenizer = tiny_lm
    text = TEXTS[1]
    candidates = ["billing", "access", "doctor", "password", "refund", "morning"]
    preference = {w: _by_hand(lm, tokenizer, text, w) for w in candidates}
    liked, disliked = max(preference, key=preference.get), min(preference, key=preference.get)
    for words in ([liked, disliked], [disliked, liked]):  # whichever class id the preferred word has
        model = wrap_label_words(lm, tokenizer, template=TEMPLATE, words=words, num_labels=2)
        assert int(_logits(model, tokenizer, (text,)).argmax(-1)) == words.index(liked)


def test_a_row_scores_the_same_alone_and_in_a_padded_batch(tiny_lm):
    lm, tokenizer = tiny_lm
    model = wrap_label_words(lm, tokenizer, template=TEMPLATE, words=["billing", "account access"],
                             num_labels=2)
    together = _logits(model, tokenizer, TEXTS)
    alone = torch.cat([_logits(model, tokenizer, (t,)) for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("words", "classes", "message"), [
    ((), 2, "needs one word per class"),
    (("billing", "access", "visits"), 2, "has 3 words"),
    (("billing", "billing "), 2, "same tokens"),
])
def test_unusable_label_words_are_refused_with_the_key_and_the_fix(tiny_lm, words, classes, message):
    lm, tokenizer = tiny_lm
    with pytest.raises(ModelError, match=message):
        wrap_label_words(lm, tokenizer, template=TEMPLATE, words=words, num_labels=classes)


def test_the_loader_builds_a_frozen_label_word_classifier_without_a_head():
    cfg = ModelConfig(name="tiny-llama", classifier="label-words", label_words=("billing", "access"),
                      quantization="none")
    model, _ = load_base_model(cfg, 2)
    assert isinstance(model, LabelWordClassifier)
    assert type(model.lm).__name__ == "LlamaForCausalLM"  # the LM head scores; no "score" head was built
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.model_type == "llama"  # peft's default LoRA targets come from the wrapped LM
