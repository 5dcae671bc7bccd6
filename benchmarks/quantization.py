"""4-bit vs 16/32-bit frozen base: bytes of the quantized linear weights and LoRA training step time.

Prints a table and ends with one summary line of the key ratios, all measured in this run.
    python benchmarks/quantization.py                 # small Llama (hidden 512, 4 layers), CPU
    python benchmarks/quantization.py --hidden 2048 --layers 22 --device cuda   # ~1.1B on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from fedpeft.config import PeftConfig
from fedpeft.models.peft_model import wrap_with_peft
from fedpeft.models.quantization import guard_cpu_4bit

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(path: str, setting: str, device: str) -> LlamaForCausalLM:
    dmap = {"": 0} if device == "cuda" else {"": "cpu"}
    if setting in ("fp32", "bf16"):
        dtype = torch.float32 if setting == "fp32" else torch.bfloat16
        return LlamaForCausalLM.from_pretrained(path, dtype=dtype, device_map=dmap)
    compute = torch.bfloat16 if setting.endswith("bf16") else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["lm_head"])
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, device_map=dmap)
    guard_cpu_4bit(model)
    return model


def linear_weight_bytes(model: torch.nn.Module) -> int:
    total = 0
    for name, module in model.named_modules():
        if name.endswith(PROJECTIONS):
            weight = module.weight
            total += weight.numel() * weight.element_size()
            state = getattr(weight, "quant_state", None)
            if state is not None:
                total += state.absmax.numel() * state.absmax.element_size()
                if state.state2 is not None:
                    total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 16 * 4
    return total


def step_times(model: torch.nn.Module, args: argparse.Namespace) -> list[float]:
    peft_model = wrap_with_peft(model, PeftConfig(r=16, alpha=32, dropout=0.0), "causal-lm")
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (args.batch, args.seq), device=args.device)
    times = []
    for _ in range(args.steps + 2):
        start = time.perf_counter()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[2:]  # first steps warm up kernels and allocator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="fp32,bf16,nf4-fp32,nf4-bf16")
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=max(args.hidden // 64, 1))
    rows = {}
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
        for setting in args.settings.split(","):
            model = build(path, setting, args.device)
            rows[setting] = (linear_weight_bytes(model), statistics.median(step_times(model, args)))
            del model
    print(f"{'setting':<10} {'linear weight bytes':>20} {'median step (s)':>16}")
    for setting, (size, step) in rows.items():
        print(f"{setting:<10} {size:>20,} {step:>16.3f}")
    if "bf16" in rows and "nf4-fp32" in rows:
        print(f"summary: nf4 weights {rows['nf4-fp32'][0] / rows['bf16'][0]:.2f}x bf16 bytes, "
              f"{rows['nf4-fp32'][0] / rows['fp32'][0]:.2f}x fp32; step time nf4-fp32 "
              f"{rows['nf4-fp32'][1] / rows['fp32'][1]:.2f}x fp32, nf4-bf16 {rows['nf4-bf16'][1] / rows['fp32'][1]:.2f}x"
              " fp32")


if __name__ == "__main__":
    main()
