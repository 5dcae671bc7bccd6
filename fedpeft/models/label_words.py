"""Classification through label words: a causal LM scores each class's word after a prompt, on its own LM head.

The text goes into ``model.prompt_template`` (``"{text}\\nAnswer:"``) and class c's logit is
log P(" " + word_c | prompt) under the LM: the **sum** of the log-probabilities of the word's tokens, each given
the prompt and the word's earlier tokens. The sum is the word's log-likelihood, so a softmax over the classes is
the LM's own distribution restricted to the label words and cross-entropy trains exactly the pretraining objective
on the right word; a per-token mean has no such reading (it rewards a long word for its easy continuation tokens).
Nothing new and random is added (no head): the adapter is all that trains and travels.

The model keeps taking what a sequence classifier takes (the text's tokens as ``encode_classification`` makes
them) and returns ``(batch, classes)`` logits, so training, evaluation, prediction and DP-SGD use it unchanged.
Each row's logits depend on that row alone (left padding with explicit positions, no batch statistics), so the
loss is per example and Opacus' per-sample gradients are exact. Single-token words need one forward pass; a
multi-token word needs one more pass per distinct word prefix, each over the same rows (Opacus sums a module's
per-sample gradients over its calls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.errors import ModelError

TEXT_FIELD = "{text}"
WORD_SEPARATOR = " "  # a label word is scored as it follows the prompt: after one space (a word-initial token)


@dataclass(frozen=True)
class PromptTokens:
    lead: int  # special tokens the tokenizer puts before a text (kept in front of the prompt, e.g. BOS / [CLS])
    trail: int  # special tokens it puts after a text (dropped: the prompt goes on after the text)
    prefix: tuple[int, ...]  # the template before {text}
    suffix: tuple[int, ...]  # the template after {text}
    words: tuple[tuple[int, ...], ...]  # each class's word, in class-id order


def prompt_tokens(tokenizer: Any, template: str, words: Sequence[str]) -> PromptTokens:
    before, _, after = template.partition(TEXT_FIELD)
    word_ids = tuple(_plain_ids(tokenizer, WORD_SEPARATOR + word) for word in words)
    for word, ids in zip(words, word_ids, strict=True):
        if not ids:
            raise ModelError(f"model.label_words: {word!r} has no tokens for this tokenizer; use a real word")
    if len(set(word_ids)) < len(word_ids):
        raise ModelError(f"model.label_words {list(words)}: two classes have the same tokens, so the model cannot "
                         "tell them apart; give each class a different word")
    lead, trail = _special_tokens_around_text(tokenizer)
    return PromptTokens(lead, trail, _plain_ids(tokenizer, before), _plain_ids(tokenizer, after), word_ids)


def _plain_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()


def _special_tokens_around_text(tokenizer: Any) -> tuple[int, int]:
    """How many special tokens the tokenizer adds before and after a text (BERT: 1 and 1; GPT-2 style: 0 and 0)."""
    probe = "text"
    plain = list(_plain_ids(tokenizer, probe))
    full = list(tokenizer(probe)["input_ids"])
    for lead in range(len(full) - len(plain) + 1):
        if full[lead: lead + len(plain)] == plain:
            return lead, len(full) - lead - len(plain)
    raise ModelError(f"label words: cannot find where {type(tokenizer).__name__} puts a text among its special "
                     "tokens; use model.classifier = 'head'")


class LabelWordClassifier(torch.nn.Module):
    """A frozen causal LM as a classifier of texts: ``forward(input_ids, attention_mask).logits`` is (rows, classes).

    Attributes it does not have itself (``config``, ``get_input_embeddings``, quantization flags) are the LM's, so
    peft and the loader treat it as the LM it wraps.
    """

    def __init__(self, lm: Any, prompt: PromptTokens) -> None:
        super().__init__()
        self.lm = lm
        self.prompt = prompt

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "lm":  # not set yet (during __init__ or unpickling): no delegation loop
                raise
            return getattr(self.lm, name)

    def forward(self, input_ids: Any, attention_mask: Any, **_: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=label_word_logits(self.lm, input_ids, attention_mask, self.prompt))


def label_word_logits(lm: Any, input_ids: Any, attention_mask: Any, prompt: PromptTokens) -> Any:
    """``(rows, classes)``: log P(word_c | prompt(text_i)), summed over the word's tokens, in fp32."""
    scores: list[Any] = [None] * len(prompt.words)
    for context, classes in _by_context(prompt.words).items():
        ids, mask = _prompt_rows(input_ids, attention_mask, prompt, context)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding must not shift a row's positions
        # Only the last len(context) + 1 positions predict the word's tokens: the full-vocabulary logits of the
        # other positions are never computed (a 49k vocabulary makes them most of a step's memory).
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions,
                    logits_to_keep=len(context) + 1).logits
        log_probs = logits.float().log_softmax(-1)
        for c in classes:
            word = torch.tensor(prompt.words[c], device=log_probs.device)
            picked = log_probs[:, -len(word):, :].gather(2, word.view(1, -1, 1).expand(len(ids), -1, 1))
            scores[c] = picked.sum(dim=(1, 2))
    return torch.stack(scores, dim=1)


def _by_context(words: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Classes grouped by the word tokens fed after the prompt (all but the last): one forward pass per group."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for c, word in enumerate(words):
        groups.setdefault(word[:-1], []).append(c)
    return groups


def _prompt_rows(input_ids: Any, attention_mask: Any, prompt: PromptTokens,
                 context: tuple[int, ...]) -> tuple[Any, Any]:
    """Each row as [lead specials] prefix text suffix context, left-padded so that every row ends together."""
    device = input_ids.device
    prefix, suffix = (torch.tensor(part, dtype=input_ids.dtype, device=device)
                      for part in (prompt.prefix, prompt.suffix + context))
    rows = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        tokens = ids[mask.bool()]  # either padding side
        text = tokens[prompt.lead: len(tokens) - prompt.trail]
        rows.append(torch.cat([tokens[: prompt.lead], prefix, text, suffix]))
    width = max(len(row) for row in rows)
    out = torch.zeros((len(rows), width), dtype=input_ids.dtype, device=device)
    out_mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype, device=device)
    for i, row in enumerate(rows):
        out[i, width - len(row):] = row
        out_mask[i, width - len(row):] = 1
    return out, out_mask


def wrap_label_words(lm: Any, tokenizer: Any, *, template: str, words: Sequence[str], num_labels: int) -> Any:
    """The frozen causal LM ``lm`` as a label-word classifier of ``num_labels`` classes."""
    if not words:
        raise ModelError("model.classifier = 'label-words' needs one word per class: set model.label_words (in "
                         "class-id order), or data.label_names, whose names then serve as the words")
    if len(words) != num_labels:
        raise ModelError(f"model.label_words has {len(words)} words {list(words)} but the data has {num_labels} "
                         "classes; give one word per class, in class-id order")
    return LabelWordClassifier(lm, prompt_tokens(tokenizer, template, words))
