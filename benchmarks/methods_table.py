"""Each PEFT method on one base: trainable fraction, bytes a site uploads per round, DP and secure-aggregation support.

    python benchmarks/methods_table.py                          # MiniLM (the quick-start base), printed
    python benchmarks/methods_table.py --write docs/methods.md  # also replace the generated table in the doc
    python benchmarks/methods_table.py --accuracy               # + quick-start accuracy per method (slow: a
                                                                #   5-site simulation each)
    python benchmarks/methods_table.py --accuracy --reuse-accuracy --write docs/methods.md
                                                                # simulate only rows the doc has no accuracy for
    python benchmarks/methods_table.py --model tiny-llama       # smoke size
    python benchmarks/methods_table.py --rates 1e-4,1e-3,1e-2 --reuse-accuracy --write docs/methods.md
                                                                # + the learning-rate sweep table (a simulation
                                                                #   per method and rate; 1e-3 reuses the main table)
Ends with a one-line summary: the smallest and largest upload relative to LoRA's (and, with --rates, the best
method after tuning).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Collection
from pathlib import Path

from fedpeft.composition import from_mapping
from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.errors import ConfigError, ModelError
from fedpeft.methods import registered_methods, wrap_with_peft
from fedpeft.models.adapter_state import get_wire_state
from fedpeft.models.loader import load_base_model

# The rows come from the method registry: each registered method gets its rows here (variants of one method are
# rows of their own), and a method added to fedpeft/methods/ without rows here still gets one, named by its summary.
VARIANTS_OF: dict[str, list[tuple[str, dict]]] = {  # method -> [(row name, extra [peft] settings)]
    "lora": [("LoRA r=8 (default)", {}), ("LoRA r=8, FFA (A frozen)", {"lora_mode": "ffa"}),
             ("LoRA r=8 + rsLoRA", {"use_rslora": True}), ("DoRA r=8", {"use_dora": True})],
    "adalora": [("AdaLoRA r=12 pruned to 8 on average", {})],
    "ia3": [("IA3", {})],
    "prompt-tuning": [("prompt tuning (16 tokens)", {})],
    "p-tuning": [("P-tuning (16 tokens)", {})],
    "prefix-tuning": [("prefix tuning (16 tokens)", {})],
    "p-tuning-v2": [("P-tuning v2 (16 tokens)", {})],
    "bottleneck": [("bottleneck adapter r=8", {})],
    "bitfit": [("BitFit (biases + head)", {})],
    "freeze": [("layer freezing (top 2 blocks + head)", {})],
    "full": [("full fine-tuning", {})],
    "probe-lora": [("probe, then LoRA r=8 FFA under it (LP-FT)", {"lora_mode": "ffa"})],
}


def variants() -> dict[str, dict]:
    """Row name -> [peft] settings, for every registered method."""
    rows: dict[str, dict] = {}
    for name, method in registered_methods().items():
        for label, extra in VARIANTS_OF.get(name, [(f"{name}: {method.summary}", {})]):
            rows[label] = {"method": name, **extra}
    return rows


VARIANTS = variants()
BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"
SWEEP_BEGIN, SWEEP_END = "<!-- methods-rates:begin -->", "<!-- methods-rates:end -->"
DEFAULT_RATE = 1e-3  # train.learning_rate's default: the main table's accuracy column


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


def accuracy(model: str, peft: dict, out: str, rate: float = DEFAULT_RATE) -> float:
    from fedpeft.simulations.engine import simulate

    cfg = from_mapping({"model": {"name": model}, "peft": peft, "train": {"learning_rate": rate},
                        "run": {"name": "methods", "out_dir": out}})
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


def sweep(model: str, rates: list[float], out: str, known: dict[tuple[str, str], str],
          methods: Collection[str]) -> tuple[str, dict]:
    """Quick-start accuracy of each of ``methods`` (rows the base can take, as measured by ``table``) at every
    rate; ``known``: (row, rate) cells to reuse."""
    rows = ["| method | " + " | ".join(f"lr = {r:g}" for r in rates) + " | best |",
            "|---|" + "---:|" * (len(rates) + 1)]
    best: dict[str, tuple[float, float]] = {}
    for name, peft in VARIANTS.items():
        if name not in methods or not supports(peft, model, {}):
            continue
        cells = []
        for rate in rates:
            cell = known.get((name, f"{rate:g}")) or format(accuracy(model, peft, out, rate), ".3f")
            cells.append(cell)
            if name not in best or float(cell) > best[name][0]:
                best[name] = (float(cell), rate)
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {best[name][0]:.3f} at {best[name][1]:g} |")
        print(rows[-1], flush=True)
    return "\n".join(rows), best


def table_cells(doc: Path, begin: str, end: str) -> list[list[str]]:
    """The rows (as cell lists, header first) of the generated table between ``begin`` and ``end`` in ``doc``."""
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    if begin not in text:
        return []
    block = text[text.index(begin):text.index(end)]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines() if line.startswith("| ")]


def accuracies_in(doc: Path) -> dict[str, str]:
    """Row name -> accuracy cell of the generated table already in ``doc`` (rows without one are left out)."""
    cells = table_cells(doc, BEGIN, END)
    return {row[0]: row[6] for row in cells[1:] if len(row) == 7 and re.fullmatch(r"[0-9.]+", row[6])}


def sweep_cells_in(doc: Path) -> dict[tuple[str, str], str]:
    """(row name, rate) -> accuracy of the sweep table already in ``doc``; the default rate from the main table."""
    known = {(name, f"{DEFAULT_RATE:g}"): cell for name, cell in accuracies_in(doc).items()}
    cells = table_cells(doc, SWEEP_BEGIN, SWEEP_END)
    if cells:
        rates = [h.removeprefix("lr = ") for h in cells[0][1:-1]]
        for row in cells[1:]:
            known.update({(row[0], rate): cell for rate, cell in zip(rates, row[1:-1], strict=False)
                          if re.fullmatch(r"[0-9.]+", cell)})
    return known


def write_into(doc: Path, text: str, command: str, begin: str = BEGIN, end: str = END) -> None:
    block = f"{begin}\n<!-- generated by `{command}`; do not edit by hand -->\n{text}\n{end}"
    current = doc.read_text(encoding="utf-8")
    if begin not in current:
        raise SystemExit(f"{doc} has no {begin} ... {end} markers to replace")
    doc.write_text(re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, current, flags=re.DOTALL),
                   encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--write", help="a markdown file with the table markers to update")
    parser.add_argument("--out", default="runs/methods", help="where --accuracy runs write")
    parser.add_argument("--reuse-accuracy", action="store_true",
                        help="keep the accuracies already in --write's table; simulate only the rows it lacks")
    parser.add_argument("--rates", help="comma list of train.learning_rate values: also sweep every method over them")
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
    tuned = ""
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
        known_cells = sweep_cells_in(Path(args.write)) if args.reuse_accuracy and args.write else {}
        text, best = sweep(args.model, rates, args.out, known_cells, sizes)
        if args.write:
            write_into(Path(args.write), text, f"python benchmarks/methods_table.py --rates {args.rates} "
                       f"--write {args.write}", SWEEP_BEGIN, SWEEP_END)
        top = max(best, key=lambda name: best[name][0])
        tuned = f"; best after tuning: {top} {best[top][0]:.3f} at lr {best[top][1]:g}"
    print(f"summary: upload per round relative to LoRA r=8: smallest {small} {sizes[small] / lora:.3f}x, "
          f"largest {large} {sizes[large] / lora:.3f}x ({args.model}){tuned}")


if __name__ == "__main__":
    main()
