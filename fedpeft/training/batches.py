"""Turn site data into padded tensors and batches, for both tasks.

Causal-LM supervised fine-tuning masks the loss to the response tokens: prompt positions carry label -100.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedData:
    input_ids: Any  # (N, L) long, right-padded
    attention_mask: Any  # (N, L) long
    labels: Any  # (N,) class ids, or (N, L) token ids with IGNORE_INDEX outside the response

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode_classification(texts: tuple[str, ...], labels: tuple[int, ...], tokenizer: Any,
                          max_length: int) -> EncodedData:
    import torch

    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return EncodedData(enc["input_ids"], enc["attention_mask"], torch.tensor(labels, dtype=torch.long))


def encode_prompt_response(prompts: tuple[str, ...], responses: tuple[str, ...], tokenizer: Any,
                           max_length: int) -> EncodedData:
    """[BOS] prompt [SEP] response [EOS]; the prompt is truncated first so the response survives (its end is kept
    when the tokenizer's ``truncation_side`` is "left", as ``model.truncation_side`` sets it)."""
    import torch

    rows = [_encode_pair(p, r, tokenizer, max_length) for p, r in zip(prompts, responses, strict=True)]
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), max_length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE_INDEX, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return EncodedData(ids, mask, labels)


def _encode_pair(prompt: str, response: str, tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
    head = [start] if start is not None else []
    separator = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
    room = max_length - len(head) - len(separator) - len(response_ids)
    if room < 1:
        response_ids = response_ids[: max(1, max_length - len(head) - len(separator) - 1)]
        room = max_length - len(head) - len(separator) - len(response_ids)
    kept = prompt_ids[max(0, len(prompt_ids) - room):] if tokenizer.truncation_side == "left" else prompt_ids[:room]
    context = head + kept + separator
    return context + response_ids, [IGNORE_INDEX] * len(context) + response_ids


def iterate_batches(data: EncodedData, batch_size: int, generator: Any | None = None) -> Iterator[dict[str, Any]]:
    """Batches in shuffled order (when a generator is given), padding trimmed to each batch's longest row."""
    import torch

    order = torch.randperm(len(data), generator=generator) if generator is not None else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        index = order[start: start + batch_size]
        yield trim_batch(data.input_ids[index], data.attention_mask[index], data.labels[index])


def trim_batch(input_ids: Any, attention_mask: Any, labels: Any) -> dict[str, Any]:
    """Drop the padding columns that no row of this batch uses (rows are right-padded)."""
    width = max(int(attention_mask.sum(dim=1).max()), 1) if len(attention_mask) else 1
    return {"input_ids": input_ids[:, :width], "attention_mask": attention_mask[:, :width],
            "labels": labels[:, :width] if labels.dim() == 2 else labels}
