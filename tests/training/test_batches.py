from __future__ import annotations

import torch

from fedpeft.models.builtin import minilm_path
from fedpeft.training.batches import IGNORE_INDEX, encode_prompt_response, iterate_batches


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def test_causal_lm_loss_is_masked_to_the_response_tokens():
    tok = _tokenizer()
    data = encode_prompt_response(("classify the urgency of this ticket",), ("urgent",), tok, max_length=32)
    labels, ids = data.labels[0], data.input_ids[0]
    scored = labels != IGNORE_INDEX
    response_ids = tok("urgent", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert labels[scored].tolist() == response_ids
    assert ids[scored].tolist() == response_ids
    assert int(data.attention_mask[0].sum()) == int(scored.nonzero().max()) + 1


def test_long_prompts_are_truncated_so_the_response_survives():
    tok = _tokenizer()
    data = encode_prompt_response(("word " * 200,), ("routine",), tok, max_length=16)
    assert data.input_ids.shape == (1, 16)
    assert (data.labels[0] != IGNORE_INDEX).sum() == len(tok("routine", add_special_tokens=False)["input_ids"]) + 1


def test_batches_trim_padding_and_shuffle_deterministically():
    tok = _tokenizer()
    data = encode_prompt_response(("a", "b c d", "e"), ("x", "y", "z"), tok, max_length=32)
    batches = list(iterate_batches(data, 2, torch.Generator().manual_seed(0)))
    again = list(iterate_batches(data, 2, torch.Generator().manual_seed(0)))
    assert [b["input_ids"].tolist() for b in batches] == [b["input_ids"].tolist() for b in again]
    assert sum(len(b["input_ids"]) for b in batches) == 3
    assert all(b["input_ids"].shape[1] < 32 for b in batches)
