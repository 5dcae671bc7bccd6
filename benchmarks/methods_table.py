"""Each PEFT method on one base: trainable fraction, bytes a site uploads per round, DP and secure-aggregation support.

    python benchmarks/methods_table.py                          # MiniLM (the quick-start base), printed
    python benchmarks/methods_table.py --write docs/methods.md  # also replace the generated table in the doc
    python benchmarks/methods_table.py --accuracy               # + quick-start accuracy per method (slow: a
                                                                #   5-site simulation each)
    python benchmarks/methods_table.py --accuracy --reuse-accuracy --write docs/methods.md
                                                                # simulate only rows the doc has no accuracy for
    python benchmarks/methods_table.py --model tiny-llama       # smoke size
Ends with a one-line summary: the smallest and largest upload relative to LoRA's.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from fedpeft.config import ModelConfig, PeftConfig, from_mapping
from fedpeft.errors import ConfigError, ModelError
from fedpeft.models.adapter_state import get_wire_state
from fedpeft.models.loader import load_base_model
from fedpeft.models.peft_model import wrap_with_peft

VARIANTS = {  # row name -> [peft] settings
    "LoRA r=8 (default)": {"method": "lora"},
    "LoRA r=8, FFA (A frozen)": {"method": "lora", "lora_mode": "ffa"},
    "LoRA r=8 + rsLoRA": {"method": "lora", "use_rslora": True},
    "DoRA r=8": {"method": "lora", "use_dora": True},
    "AdaLoRA r=12 pruned to 8 on average": {"method": "adalora"},
    "IA3": {"method": "ia3"},
    "prompt tuning (16 tokens)": {"method": "prompt-tuning"},
    "P-tuning (16 tokens)": {"method": "p-tuning"},
    "prefix tuning (16 tokens)": {"method": "prefix-tuning"},
    "P-tuning v2 (16 tokens)": {"method": "p-tuning-v2"},
    "bottleneck adapter r=8": {"method": "bottleneck"},
    "BitFit (biases + head)": {"method": "bitfit"},
    "layer freezing (top 2 blocks + head)": {"method": "freeze"},
    "full fine-tuning": {"method": "full"},
}
BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"


def supports(peft: dict, model: str, section: dict) -> bool:
    try:
        from_mapping({"model": {"name": model}, "peft": peft, **section})
        return True
    except ConfigError:
        return False


def measure(model: str, peft: dict) -> tuple[int, int]:
    base, _ = load_base_model(ModelConfig(name=model), 6)
    total = sum(p.numel() for p in base.parameters())
    wire = get_wire_state(wrap_with_peft(base, PeftConfig(**peft), "classification"))
    return sum(t.numel() for t in wire.values()), total


def accuracy(model: str, peft: dict, out: str) -> float:
    from fedpeft.simulations.engine import simulate

    cfg = from_mapping({"model": {"name": model}, "peft": peft, "run": {"name": "methods", "out_dir": out}})
    return float(simulate(cfg).summary["final_accuracy"])


def table(model: str, with_accuracy: bool, out: str, known: dict[str, str]) -> tuple[str, dict[str, int]]:
    """The markdown table; ``known``: accuracies (as printed) to reuse by row name instead of simulating."""
    header = "| method | trainable values | of the model | upload per round (fp32) | DP-SGD | secure aggregation |"
    rows = [header + (" quick-start accuracy |" if with_accuracy else ""),
            "|---|---:|---:|---:|:-:|:-:|" + ("---:|" if with_accuracy else "")]
    sizes = {}
    for name, peft in VARIANTS.items():
        try:
            values, total = measure(model, peft)
        except ModelError as err:  # e.g. BitFit on a base without biases
            rows.append(f"| {name} | not for {model}: {str(err).split(': ', 1)[-1]} |")
            print(rows[-1], flush=True)
            continue
        sizes[name] = values
        dp = supports(peft, model, {"privacy": {"dp": True}})
        secure = supports(peft, model, {"federation": {"secure_aggregation": True}})
        row = (f"| {name} | {values:,} | {values / total:.3%} | {values * 4 / 1024:,.1f} KiB |"
               f" {'yes' if dp else 'no'} | {'yes' if secure else 'no'} |")
        if with_accuracy:
            row += f" {known[name] if name in known else format(accuracy(model, peft, out), '.3f')} |"
        rows.append(row)
        print(row, flush=True)
    return "\n".join(rows), sizes


def accuracies_in(doc: Path) -> dict[str, str]:
    """Row name -> accuracy cell of the generated table already in ``doc`` (rows without one are left out)."""
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text:
        return {}
    block = text[text.index(BEGIN):text.index(END)]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines() if line.startswith("| ")]
    return {row[0]: row[6] for row in cells[1:] if len(row) == 7 and re.fullmatch(r"[0-9.]+", row[6])}


def write_into(doc: Path, text: str, command: str) -> None:
    block = f"{BEGIN}\n<!-- generated by `{command}`; do not edit by hand -->\n{text}\n{END}"
    current = doc.read_text(encoding="utf-8")
    if BEGIN not in current:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers to replace")
    doc.write_text(re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, current, flags=re.DOTALL),
                   encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--write", help="a markdown file with the table markers to update")
    parser.add_argument("--out", default="runs/methods", help="where --accuracy runs write")
    parser.add_argument("--reuse-accuracy", action="store_true",
                        help="keep the accuracies already in --write's table; simulate only the rows it lacks")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    known = accuracies_in(Path(args.write)) if args.reuse_accuracy and args.write else {}
    text, sizes = table(args.model, args.accuracy, args.out, known)
    if args.write:
        command = "python benchmarks/methods_table.py" + (" --accuracy" if args.accuracy else "") + \
            (f" --model {args.model}" if args.model != "minilm" else "") + f" --write {args.write}"
        write_into(Path(args.write), text, command)
    lora = sizes["LoRA r=8 (default)"]
    small, large = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    print(f"summary: upload per round relative to LoRA r=8: smallest {small} {sizes[small] / lora:.3f}x, "
          f"largest {large} {sizes[large] / lora:.3f}x ({args.model})")


if __name__ == "__main__":
    main()
