"""DP-SGD step time over plain step time, same model, same batch, in one run.

    python benchmarks/dp_overhead.py                       # MiniLM + LoRA (all linear), batch 32 x 64 tokens, CPU
    python benchmarks/dp_overhead.py --model tiny-llama --batch 8 --steps 3   # smoke size
Prints a table and ends with a one-line summary of the DP / non-DP ratio per Opacus mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fedpeft.client.batches import encode_classification
from fedpeft.client.trainer import batch_loss
from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.data.synthetic import make_support_tickets
from fedpeft.models.loader import load_base_model
from fedpeft.models.peft_model import wrap_with_peft
from fedpeft.privacy.dp_sgd import DpSettings, make_private, private_loss


def fresh_model(args: argparse.Namespace):
    base, tokenizer = load_base_model(ModelConfig(name=args.model, max_length=args.seq), 6)
    return wrap_with_peft(base, PeftConfig(r=8), "classification"), tokenizer


def timed_steps(private, batch, steps: int) -> list[float]:
    """``private``: a fedpeft Private (DP), or a (model, optimizer) pair (no DP)."""
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        if isinstance(private, tuple):
            model, optimizer = private
            model.train()
            optimizer.zero_grad(set_to_none=True)
            batch_loss(model, batch, "classification")[0].backward()
        else:
            optimizer = private.optimizer
            private.module.train()
            optimizer.zero_grad(set_to_none=True)
            private_loss(private, batch, "classification").backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--modes", default="hooks,functorch,ghost")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = make_support_tickets(args.batch, seed=1)
    model, tokenizer = fresh_model(args)
    encoded = encode_classification(data.texts, data.labels, tokenizer, args.seq)
    # Fixed length: every row padded to --seq, so the batch really is batch x seq tokens.
    batch = {"input_ids": encoded.input_ids, "attention_mask": torch.ones_like(encoded.attention_mask),
             "labels": encoded.labels}
    params = [p for p in model.parameters() if p.requires_grad]
    rows = {"no DP": statistics.median(timed_steps((model, torch.optim.AdamW(params, lr=1e-3)), batch, args.steps))}
    for mode in args.modes.split(","):
        model, _ = fresh_model(args)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        private = make_private(model, optimizer, encoded, args.batch, DpSettings(1.0, 1.0, mode),
                               poisson_sampling=False)
        rows[f"DP {mode}"] = statistics.median(timed_steps(private, batch, args.steps))
        private.module._close()
    trainable = sum(p.numel() for p in params)
    print(f"model {args.model}, {trainable:,} trainable values, batch {args.batch} x {args.seq} tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'setting':<14} {'median step (s)':>16} {'vs no DP':>9}")
    for name, seconds in rows.items():
        print(f"{name:<14} {seconds:>16.3f} {seconds / rows['no DP']:>8.2f}x")
    ratios = ", ".join(f"{name} {seconds / rows['no DP']:.2f}x" for name, seconds in rows.items() if name != "no DP")
    print(f"summary: DP step / non-DP step: {ratios}")


if __name__ == "__main__":
    main()
