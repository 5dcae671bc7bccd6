"""Use an exported model offline: classify texts (`fedpeft predict`) and score a labelled file (`fedpeft evaluate`).

Works on both kinds of export (``fedpeft.runs.export``): a merged model directory (transformers loads it; its
``config.json`` has ``id2label``) and an adapter directory of any method, loaded on fedpeft's own copy of the base
(no Hub access). ``peft_loadable`` gives peft's ``AutoPeftModel...from_pretrained`` an adapter whose base resolves
on this machine, without changing the export.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedpeft.config import ModelConfig
from fedpeft.errors import DataError, ModelError
from fedpeft.models.saved import METHOD_FILE
from fedpeft.runs.checkpoint import ADAPTER_CONFIG
from fedpeft.runs.export import EXPORT_INFO_FILE

PREDICT_BATCH = 32


@dataclass
class Exported:
    model: Any
    tokenizer: Any
    label_names: list[str]
    max_length: int
    info: dict[str, Any] = field(default_factory=dict)


def export_info(directory: str | Path) -> dict[str, Any]:
    """The export's ``fedpeft_export.json``, or what a plain transformers model directory says about itself."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"'{directory}' is not a directory; pass the directory `fedpeft export` wrote")
    path = directory / EXPORT_INFO_FILE
    if path.is_file():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    if (directory / ADAPTER_CONFIG).is_file():
        raise ModelError(f"'{directory}' is an adapter without {EXPORT_INFO_FILE} (not written by `fedpeft export`, "
                         "or by an older fedpeft): export it again with `fedpeft export RUN_DIR --out DIR`")
    if (directory / "config.json").is_file():
        return {"merged": True, "task": "classification"}
    raise ModelError(f"'{directory}' holds neither a fedpeft export nor a transformers model (no {EXPORT_INFO_FILE}, "
                     "no config.json); pass the directory `fedpeft export` wrote")


def load_exported(directory: str | Path) -> Exported:
    """The exported model ready to classify, its tokenizer and its class names in id order (offline)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    info = export_info(directory)
    if info.get("task", "classification") != "classification":
        raise ModelError(f"'{directory}' is a {info.get('task')} export; fedpeft predict / evaluate classify texts, "
                         "so they need a model.task = 'classification' run")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = str(info.get("truncation_side") or "right")  # as the run cut its texts
    if info.get("multitask"):
        raise ModelError(f"'{directory}' is a multi-task model (one head per task, labels 'task:label'); fedpeft "
                         "predict / evaluate score single-task models only")
    names = list(info.get("label_names") or [])
    if info.get("merged"):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(directory), local_files_only=True)
        if not names:
            id2label = model.config.id2label or {}
            names = [str(id2label[i]) for i in sorted(id2label)]
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        from fedpeft.methods import load_saved_adapter
        from fedpeft.models.loader import load_base_model

        classes = len(names) or int(info.get("num_labels") or 0)
        base, _ = load_base_model(_base_config(info), classes)
        model = load_saved_adapter(base, directory)
        names = names or [str(i) for i in range(classes)]
    model.eval()
    return Exported(model, tokenizer, names, int(info.get("max_length") or 128), info)


def _base_config(info: dict[str, Any]) -> ModelConfig:
    """The base as the export's run built it: with a head, or as a label-word classifier (its prompt and words)."""
    name = info["base_model"]["fedpeft_name"]
    if info.get("classifier") != "label-words":
        return ModelConfig(name=name, task="classification", quantization="none")
    words = tuple(str(word) for word in info.get("label_words") or ())
    if not words or "prompt_template" not in info:
        raise ModelError(f"the export classifies through label words but its {EXPORT_INFO_FILE} lacks "
                         "prompt_template / label_words; export the run again with this fedpeft")
    return ModelConfig(name=name, task="classification", quantization="none", classifier="label-words",
                       prompt_template=str(info["prompt_template"]), label_words=words)


def predict_ids(exported: Exported, texts: Sequence[str], batch_size: int = PREDICT_BATCH) -> list[int]:
    """Predicted class id of each text, in order."""
    import torch

    from fedpeft.training.probe import backbone, pooled_features

    model = exported.model
    device = next(model.parameters()).device
    out: list[int] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = exported.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                     max_length=exported.max_length, return_tensors="pt")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            if hasattr(model, "probe") and hasattr(model, "base"):  # probe / probe-lora: a head on pooled features
                logits = pooled_features(backbone(model.base), ids, mask) @ model.probe.weight.T
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            out += [int(i) for i in logits.argmax(-1).cpu()]
    return out


def predict_texts(exported: Exported, texts: Sequence[str], batch_size: int = PREDICT_BATCH) -> list[str]:
    """Predicted class name of each text, in order."""
    return [exported.label_names[i] for i in predict_ids(exported, texts, batch_size)]


# ---- input and output files ----

def read_rows(source: str, text_column: str) -> list[dict[str, Any]]:
    """Rows of a .csv / .jsonl file, or of stdin ('-': one text per line, or JSON lines), each with ``text_column``."""
    if source == "-":
        return _stdin_rows(sys.stdin, text_column)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"input file '{source}' does not exist; give a .csv or .jsonl file, or '-' for stdin")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows: list[dict[str, Any]] = [dict(row) for row in csv.DictReader(f)]
    elif suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(dict(json.loads(line)))
                except (ValueError, TypeError):
                    raise DataError(f"input file '{source}' line {number} is not a JSON object") from None
    else:
        raise DataError(f"input file '{source}' is neither .csv nor .jsonl; convert it, or pipe texts on stdin")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get(text_column), str):
            have = ", ".join(map(str, row)) or "none"
            raise DataError(f"input file '{source}' row {number} has no text in column {text_column!r} (columns: "
                            f"{have}); pick the column with --text-column")
    return rows


def _stdin_rows(stream: TextIO, text_column: str) -> list[dict[str, Any]]:
    rows = []
    for line in stream.read().splitlines():
        if not line.strip():
            continue
        row = None
        if line.lstrip().startswith("{"):
            with contextlib.suppress(ValueError):
                row = json.loads(line)
        rows.append(row if isinstance(row, dict) and text_column in row else {text_column: line})
    return rows


def write_predictions(rows: list[dict[str, Any]], labels: list[str], out: str | None) -> None:
    """Each row with its ``prediction``: to a .csv / .jsonl file, or one label per line on stdout."""
    if out is None:
        for label in labels:
            print(label)
        return
    path = Path(out).expanduser()
    written = [{**row, "prediction": label} for row, label in zip(rows, labels, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in written), encoding="utf-8")
    elif path.suffix.lower() == ".csv":
        columns = list(dict.fromkeys(key for row in written for key in row))
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(written)
    else:
        raise DataError(f"--out '{out}' is neither .csv nor .jsonl")


# ---- scores ----

@dataclass(frozen=True)
class Scores:
    rows: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # name -> support, predicted, correct, precision, recall, f1

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "accuracy": self.accuracy, "macro_f1": self.macro_f1, "per_class": self.per_class}

    def lines(self) -> list[str]:
        out = [f"rows {self.rows}  accuracy {self.accuracy:.4f}  macro-F1 {self.macro_f1:.4f}",
               f"{'class':<24} {'support':>8} {'predicted':>9} {'correct':>8} {'precision':>9} {'recall':>7} "
               f"{'f1':>6}"]
        for name, c in self.per_class.items():
            out.append(f"{name:<24} {int(c['support']):>8} {int(c['predicted']):>9} {int(c['correct']):>8} "
                       f"{c['precision']:>9.4f} {c['recall']:>7.4f} {c['f1']:>6.4f}")
        return out


def score(true: Sequence[int], predicted: Sequence[int], label_names: Sequence[str]) -> Scores:
    """Accuracy; macro-F1 over the classes that occur in the labels or the predictions (as scikit-learn's
    ``f1_score(average='macro')``); per-class counts for every class of the model."""
    rows = len(true)
    correct = sum(t == p for t, p in zip(true, predicted, strict=True))
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for i, name in enumerate(label_names):
        support = sum(t == i for t in true)
        guessed = sum(p == i for p in predicted)
        hit = sum(t == i and p == i for t, p in zip(true, predicted, strict=True))
        precision = hit / guessed if guessed else 0.0
        recall = hit / support if support else 0.0
        f1 = 2 * hit / (support + guessed) if support + guessed else 0.0
        per_class[name] = {"support": support, "predicted": guessed, "correct": hit, "precision": precision,
                           "recall": recall, "f1": f1}
        if support or guessed:
            f1s.append(f1)
    return Scores(rows, correct / rows if rows else math.nan, sum(f1s) / len(f1s) if f1s else math.nan, per_class)


def label_ids(values: Sequence[Any], label_names: Sequence[str], source: str, column: str) -> list[int]:
    """Each row's label as a class id: a class name, or an integer id 0..K-1."""
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    for number, value in enumerate(values, start=1):
        text = "" if value is None else str(value).strip()
        if text in index:
            ids.append(index[text])
            continue
        try:
            as_int = int(text)
        except ValueError:
            as_int = -1
        if not 0 <= as_int < len(label_names):
            raise DataError(f"'{source}' row {number}: label {text!r} in column {column!r} is neither one of the "
                            f"model's classes {list(label_names)} nor an id 0..{len(label_names) - 1}")
        ids.append(as_int)
    return ids


def evaluate_rows(exported: Exported, rows: list[dict[str, Any]], *, text_column: str, label_column: str,
                  source: str) -> Scores:
    if not rows:
        raise DataError(f"'{source}' has no rows to score")
    missing = next((n for n, row in enumerate(rows, start=1) if label_column not in row), None)
    if missing is not None:
        raise DataError(f"'{source}' row {missing} has no column {label_column!r}; pick it with --label-column")
    true = label_ids([row[label_column] for row in rows], exported.label_names, source, label_column)
    predicted = predict_ids(exported, [row[text_column] for row in rows])
    return score(true, predicted, exported.label_names)


# ---- peft's own loader ----

@contextlib.contextmanager
def peft_loadable(directory: str | Path) -> Iterator[str]:
    """A view of an adapter export whose ``base_model_name_or_path`` is this machine's copy of the base, with the
    labels in the base's config: ``AutoPeftModelForSequenceClassification.from_pretrained(path)`` then loads it
    offline, with ``id2label``. The export is not changed; the view (links and two small files) is removed on exit.
    """
    directory = Path(directory).resolve()
    info = export_info(directory)
    if info.get("merged"):
        raise ModelError(f"'{directory}' is a merged model: load it with transformers' "
                         "AutoModelForSequenceClassification.from_pretrained, no peft needed")
    base_info = info["base_model"]
    if (directory / METHOD_FILE).is_file() or not (directory / ADAPTER_CONFIG).is_file():
        raise ModelError(f"peft cannot load '{directory}': {info.get('peft_note')}. Use `fedpeft predict` / "
                         "`fedpeft evaluate`, or fedpeft.runs.predict.load_exported")
    with tempfile.TemporaryDirectory(prefix="fedpeft-peft-") as tmp:
        view, base = Path(tmp) / "adapter", Path(tmp) / "base"
        view.mkdir()
        _materialise_base(base_info["fedpeft_name"], base, info)
        for item in directory.iterdir():
            if item.name != ADAPTER_CONFIG:
                (view / item.name).symlink_to(item)
        config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = str(base)
        (view / ADAPTER_CONFIG).write_text(json.dumps(config), encoding="utf-8")
        yield str(view)


def _materialise_base(name: str, target: Path, info: dict[str, Any]) -> None:
    """The base as a model directory at ``target``: its files linked, its config.json with the export's labels."""
    names = list(info.get("label_names") or []) or [str(i) for i in range(int(info.get("num_labels") or 0))]
    if name == "tiny-llama":
        from fedpeft.models.loader import load_base_model

        task = info.get("task", "classification")
        model, _ = load_base_model(ModelConfig(name=name, task=task, quantization="none"), len(names))
        model.save_pretrained(str(target))
    else:
        from fedpeft.models.loader import resolve_model_path

        source = resolve_model_path(name).resolve()
        target.mkdir()
        for item in source.iterdir():
            if item.name != "config.json":
                (target / item.name).symlink_to(item)
        (target / "config.json").write_text((source / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    if names:
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
        config["id2label"] = {str(i): label for i, label in enumerate(names)}
        config["label2id"] = {label: i for i, label in enumerate(names)}
        (target / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
