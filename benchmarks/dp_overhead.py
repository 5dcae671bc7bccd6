"""DP-SGD step time over plain step time, same model, same batch, in one run.

    python benchmarks/dp_overhead.py                       # MiniLM + LoRA (all linear), batch 32 x 64 tokens, CPU
    python benchmarks/dp_overhead.py --model tiny-llama --batch 8 --steps 3   # smoke size
    python benchmarks/dp_overhead.py --llama 2048,22 --quantization nf4 --batch 8 --seq 256 --r 16 \
        --modes hooks,ghost                                  # ~1.1B QLoRA causal LM (on a GPU when there is one)
Prints a table and ends with a one-line summary of the DP / non-DP ratio per Opacus mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.data.synthetic import make_support_tickets
from fedpeft.methods import wrap_with_peft
from fedpeft.models.loader import load_base_model
from fedpeft.models.precision import bf16_autocast
from fedpeft.models.quantization import compute_device, guard_cpu_4bit, load_kwargs
from fedpeft.privacy.dp_sgd import DpSettings, make_private, private_loss
from fedpeft.training.batches import EncodedData, encode_classification
from fedpeft.training.trainer import batch_loss


def fresh_model(args: argparse.Namespace):
    if args.llama:
        return wrap_with_peft(load_llama(args), PeftConfig(r=args.r, alpha=2 * args.r, dropout=0.0), args.task), None
    base, tokenizer = load_base_model(ModelConfig(name=args.model, max_length=args.seq), 6)
    return wrap_with_peft(base, PeftConfig(r=args.r), "classification"), tokenizer


def load_llama(args: argparse.Namespace):
    """The saved random-init Llama, loaded the way a site loads its base (fedpeft's quantization arguments)."""
    from transformers import LlamaForCausalLM

    cfg = ModelConfig(name=args.path, task="causal-lm", quantization=args.quantization, compute_dtype="bf16")
    kwargs = load_kwargs(cfg)
    if kwargs:
        model = LlamaForCausalLM.from_pretrained(args.path, **kwargs)  # placed by its device_map
    else:
        model = LlamaForCausalLM.from_pretrained(args.path, dtype=torch.bfloat16).to(compute_device())
    guard_cpu_4bit(model)
    model.requires_grad_(False)
    return model


def save_llama(args: argparse.Namespace, path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (int(v) for v in args.llama.split(","))
    heads = max(hidden // 64, 1)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads)
    torch.manual_seed(0)
    with torch.device(compute_device()):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    print(f"random-init Llama: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)


def fixed_batch(args: argparse.Namespace, tokenizer) -> tuple[EncodedData, dict]:
    """Every row full length, so the batch really is batch x seq tokens."""
    if args.llama:
        ids = torch.randint(0, 32000, (args.batch, args.seq))
        encoded = EncodedData(ids, torch.ones_like(ids), ids.clone())
    else:
        data = make_support_tickets(args.batch, seed=1)
        encoded = encode_classification(data.texts, data.labels, tokenizer, args.seq)
    batch = {"input_ids": encoded.input_ids, "attention_mask": torch.ones_like(encoded.attention_mask),
             "labels": encoded.labels}
    return encoded, batch


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")


def timed_steps(private, batch, steps: int, task: str, autocast: bool = False) -> list[float]:
    """``private``: a fedpeft Private (DP), or a (model, optimizer) pair (no DP)."""
    model, optimizer = private if isinstance(private, tuple) else (private.module, private.optimizer)
    times = []
    with bf16_autocast(model, autocast) as forward_precision:
        for _ in range(steps + 2):
            start = time.perf_counter()
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with forward_precision():
                loss = batch_loss(model, batch, task)[0] if isinstance(private, tuple) else \
                    private_loss(private, batch, task)
            loss.backward()
            optimizer.step()
            synchronize()
            times.append(time.perf_counter() - start)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--llama", help="HIDDEN,LAYERS: a random-init Llama causal LM instead of --model")
    parser.add_argument("--quantization", default="none", help="for --llama: none (bf16 base) or nf4")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--modes", default="hooks,functorch,ghost")
    parser.add_argument("--autocast", action="store_true", help="forward passes under bf16 autocast (train.autocast)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.task = "causal-lm" if args.llama else "classification"
    with tempfile.TemporaryDirectory(prefix="fedpeft-dp-bench-") as path:
        args.path = path
        if args.llama:
            save_llama(args, path)
        rows, trainable = measure(args)
    describe = f"Llama {args.llama} {args.quantization}" if args.llama else args.model
    describe += ", bf16 autocast" if args.autocast else ""
    print(f"model {describe}, {trainable:,} trainable values, batch {args.batch} x {args.seq} tokens, "
          f"device {compute_device()}, torch threads {torch.get_num_threads()}")
    print(f"{'setting':<14} {'median step (s)':>16} {'vs no DP':>9} {'peak MiB':>10}")
    base = rows["no DP"][0]
    for name, (seconds, peak) in rows.items():
        print(f"{name:<14} {seconds:>16.3f} {seconds / base:>8.2f}x {peak:>10.1f}")
    ratios = ", ".join(f"{name} {seconds / base:.2f}x" for name, (seconds, _) in rows.items() if name != "no DP")
    print(f"summary: DP step / non-DP step: {ratios}")


def measure(args: argparse.Namespace) -> tuple[dict[str, tuple[float, float]], int]:
    """{setting: (median step seconds, peak GPU MiB)}, each DP mode on a fresh model."""
    model, tokenizer = fresh_model(args)
    encoded, batch = fixed_batch(args, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    reset_peak()
    plain = (model, torch.optim.AdamW(params, lr=1e-3))
    rows = {"no DP": (statistics.median(timed_steps(plain, batch, args.steps, args.task, args.autocast)), peak_mib())}
    del model, plain, params
    for mode in args.modes.split(","):
        model, _ = fresh_model(args)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        private = make_private(model, optimizer, encoded, args.batch, dp=DpSettings(1.0, 1.0, mode),
                               poisson_sampling=False)
        reset_peak()
        times = timed_steps(private, batch, args.steps, args.task, args.autocast)
        rows[f"DP {mode}"] = (statistics.median(times), peak_mib())
        private.module._close()
        del model, optimizer, private
    return rows, trainable


if __name__ == "__main__":
    main()
