"""4-bit vs 16/32-bit frozen base: bytes of the quantized linear weights, LoRA step time and peak training memory.

Prints a table and ends with one summary line of the key ratios, all measured in this run.
    python benchmarks/quantization.py                 # small Llama (hidden 512, 4 layers), CPU
    python benchmarks/quantization.py --hidden 2048 --layers 22 --vocab 32000 --batch 8 --seq 256 --device cuda  # 1.2B
A setting ending in "+gc" trains with gradient checkpointing (e.g. --settings bf16,nf4-bf16,bf16+gc,nf4-bf16+gc);
"+ac" (last) runs forward under bf16 autocast with peft's fp32 input cast off (e.g. bf16+ac,nf4-bf16+ac).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.methods import wrap_with_peft
from fedpeft.models.precision import bf16_autocast
from fedpeft.models.quantization import guard_cpu_4bit, load_kwargs

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(path: str, setting: str, device: str) -> LlamaForCausalLM:
    """fp32 / bf16: the unquantized base in that dtype. nf4-*: fedpeft's own loading arguments for the base."""
    dmap = {"": 0} if device == "cuda" else {"": "cpu"}
    setting = setting.removesuffix("+ac").removesuffix("+gc")
    if setting in ("fp32", "bf16"):
        dtype = torch.float32 if setting == "fp32" else torch.bfloat16
        return LlamaForCausalLM.from_pretrained(path, dtype=dtype, device_map=dmap)
    cfg = ModelConfig(task="causal-lm", quantization="nf4", compute_dtype=setting.split("-")[1])
    model = LlamaForCausalLM.from_pretrained(path, **load_kwargs(cfg))
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
    autocast = args.one.endswith("+ac") if args.one else False  # what train.autocast does in fedpeft's trainer
    times = []
    with bf16_autocast(peft_model, autocast) as forward_precision:
        for _ in range(args.steps + 2):
            start = time.perf_counter()
            with forward_precision():
                loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times[2:]  # first steps warm up kernels and allocator


def peak_training_bytes(model: torch.nn.Module, args: argparse.Namespace) -> tuple[float, int]:
    """(median step seconds, peak memory of training above the loaded model's footprint's baseline).

    CUDA: torch's allocator peak. CPU: the process's resident high-water mark (VmHWM), reset after loading so that
    the transient load of the fp32 checkpoint does not count, measured above the RSS before the model was loaded.
    """
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step = statistics.median(step_times(model, args))
        return step, torch.cuda.max_memory_allocated()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    step = statistics.median(step_times(model, args))
    return step, _proc_status_kib("VmHWM") * 1024 - args.baseline_rss


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_one(args: argparse.Namespace) -> dict:
    """Measure one setting in this (fresh) process."""
    args.baseline_rss = _proc_status_kib("VmRSS") * 1024
    model = build(args.path, args.one, args.device)
    if args.one.removesuffix("+ac").endswith("+gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    size = linear_weight_bytes(model)
    step, peak = peak_training_bytes(model, args)
    return {"setting": args.one, "bytes": size, "step": step, "peak": peak}


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    heads = max(args.hidden // 64, 1)
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                       num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads)


def run_all(args: argparse.Namespace, argv: list[str]) -> dict[str, dict]:
    """Each setting in its own process, so that one setting's memory cannot inflate the next one's peak."""
    rows = {}
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        with torch.device(args.device):  # random init of a 1B model is minutes on a CPU, a second on a GPU
            LlamaForCausalLM(llama_config(args)).save_pretrained(path)
        for setting in args.settings.split(","):
            proc = subprocess.run([sys.executable, __file__, *argv, "--one", setting, "--path", path],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"setting {setting} failed:\n{proc.stderr[-3000:]}")
            rows[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="fp32,bf16,nf4-fp32,nf4-bf16")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return
    rows = run_all(args, argv)
    tokens = args.batch * args.seq
    print(f"{'setting':<12} {'linear weight bytes':>20} {'median step (s)':>16} {'tokens/s':>10} "
          f"{'peak train MiB':>15}")
    for setting, row in rows.items():
        print(f"{setting:<12} {row['bytes']:>20,} {row['step']:>16.3f} {tokens / row['step']:>10,.0f} "
              f"{row['peak'] / 2**20:>15.1f}")
    print(summary_line(rows))


def summary_line(rows: dict[str, dict]) -> str:
    parts = []
    nf4 = next((row for name, row in rows.items() if name.startswith("nf4")), None)
    if nf4 is not None and "bf16" in rows:
        parts.append(f"nf4 weights {nf4['bytes'] / rows['bf16']['bytes']:.2f}x bf16 bytes")
    if {"bf16", "nf4-bf16"} <= rows.keys():
        parts.append(f"nf4-bf16 peak {rows['nf4-bf16']['peak'] / rows['bf16']['peak']:.2f}x bf16 LoRA peak, "
                     f"step {rows['nf4-bf16']['step'] / rows['bf16']['step']:.2f}x bf16")
    if {"bf16+ac", "nf4-bf16+ac"} <= rows.keys():
        parts.append(f"with bf16 autocast nf4-bf16 peak "
                     f"{rows['nf4-bf16+ac']['peak'] / rows['bf16+ac']['peak']:.2f}x bf16 LoRA peak, "
                     f"step {rows['nf4-bf16+ac']['step'] / rows['bf16+ac']['step']:.2f}x bf16")
    if {"bf16+gc", "nf4-bf16+gc"} <= rows.keys():
        parts.append(f"with gradient checkpointing nf4-bf16 peak "
                     f"{rows['nf4-bf16+gc']['peak'] / rows['bf16+gc']['peak']:.2f}x bf16 LoRA peak, "
                     f"step {rows['nf4-bf16+gc']['step'] / rows['bf16+gc']['step']:.2f}x bf16")
    if {"fp32", "nf4-fp32"} <= rows.keys():
        parts.append(f"nf4-fp32 step {rows['nf4-fp32']['step'] / rows['fp32']['step']:.2f}x fp32")
    return "summary: " + "; ".join(parts)


if __name__ == "__main__":
    main()
