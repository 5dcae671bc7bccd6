"""A frozen base quantized to 4 (or 8) bits with bitsandbytes, through transformers' BitsAndBytesConfig.

Only the linear layers of the blocks are quantized; embeddings, norms and the task head stay in their own dtype
(no blanket fp32 up-cast as peft's ``prepare_model_for_kbit_training`` does: it raised QLoRA's peak memory above
16-bit LoRA in our measurement).  The adapter trains in fp32 on top.
"""

from __future__ import annotations

from typing import Any

from fedpeft.config import ModelConfig, resolve_quantization
from fedpeft.errors import ModelError

# Heads stay unquantized: they are trained (modules_to_save) or produce the logits.
UNQUANTIZED_MODULES = ["lm_head", "score", "classifier"]


def bnb_config(cfg: ModelConfig) -> Any | None:
    """The BitsAndBytesConfig for ``cfg``, or None for an unquantized base."""
    scheme = resolve_quantization(cfg)
    if scheme == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ModelError(f"model.quantization = {scheme!r} needs bitsandbytes (pip install bitsandbytes); "
                         "or set model.quantization = 'none'") from err
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    dtype = torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              llm_int8_skip_modules=UNQUANTIZED_MODULES)


def load_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments for the configured base: quantization, placement, and a lean dtype.

    With bf16 compute, the parts that stay unquantized (embeddings, norms, lm_head) load in bf16 too, so that the
    residual stream and the activations kept for backward are bf16 rather than fp32; the adapter still trains in
    fp32 (peft up-casts adapter weights; ``wrap_with_peft`` does the same for a trained head).
    """
    quantization = bnb_config(cfg)
    if quantization is None:
        return {}
    kwargs: dict[str, Any] = {"quantization_config": quantization, "device_map": device_map()}
    if cfg.compute_dtype == "bf16":
        import torch

        kwargs["dtype"] = torch.bfloat16
    return kwargs


def compute_device() -> str:
    """cuda when this process sees a GPU (hide it with CUDA_VISIBLE_DEVICES="" to train on the CPU), else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_map() -> dict[str, Any]:
    return {"": 0} if compute_device() == "cuda" else {"": "cpu"}


def guard_cpu_4bit(model: Any) -> int:
    """Keep bitsandbytes from silently corrupting LoRA gradients on CPUs with AVX512-BF16.

    bitsandbytes 0.50 repacks a Linear4bit's weight for a fast CPU inference kernel the first time it runs an
    eval-mode forward without grad; from then on the input gradient through that layer is dropped (LoRA gradients
    came out with cosine 0.02 against the fp32 reference). Sites evaluate the received adapter before training,
    so this would hit every round. Disabling the repacking path keeps gradients exact. Returns the layers guarded.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def quantize_built_model(model: Any, kwargs: dict[str, Any]) -> Any:
    """Quantize a model built in memory (the tiny test model) by a save/load round trip through a temp dir."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fedpeft-quantize-") as tmp:
        model.save_pretrained(tmp)
        quantized = type(model).from_pretrained(tmp, **kwargs)
    # Not the deleted temp dir: peft records the base's name in saved adapters (and looks for a config there).
    quantized.config.name_or_path = model.config.name_or_path
    quantized.name_or_path = model.config.name_or_path
    return quantized
