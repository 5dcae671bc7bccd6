"""The real datasets of benchmarks/real_data.py, read from ``--data-dir`` (never copied): banking77 and
medical-abstracts, de-duplicated and split as shared/REFERENCE.md does (see real_data.py's docstring)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.data.loaders import load_classification
from fedpeft.data.records import ClassificationData

DATASETS = ("banking77", "medical-abstracts")


def dedup_texts(data: ClassificationData) -> tuple[ClassificationData, int]:
    """One row per distinct text; a text seen under more than one label (multi-label) is dropped.

    Returns the data and the number of dropped multi-label texts.
    """
    labels_of: dict[str, set[int]] = {}
    for text, label in zip(data.texts, data.labels, strict=True):
        labels_of.setdefault(text, set()).add(label)
    keep = [t for t, labels in labels_of.items() if len(labels) == 1]  # dicts keep first-appearance order
    dropped = len(labels_of) - len(keep)
    return ClassificationData(tuple(keep), tuple(next(iter(labels_of[t])) for t in keep), data.label_names), dropped


def split_by_text(data: ClassificationData, test_fraction: float,
                  seed: int) -> tuple[ClassificationData, ClassificationData]:
    """Train/test split by group of identical texts: the first int((1 - f) * groups) of a seeded permutation of
    the groups train, the rest test; a duplicated text never crosses the split."""
    groups: dict[str, list[int]] = {}
    for row, text in enumerate(data.texts):
        groups.setdefault(text, []).append(row)
    keys = list(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_train = int((1 - test_fraction) * len(keys))
    train = sorted(row for i in order[:n_train] for row in groups[keys[i]])
    test = sorted(row for i in order[n_train:] for row in groups[keys[i]])
    return data.subset(train), data.subset(test)


def subsample(data: ClassificationData, limit: int, seed: int) -> ClassificationData:
    """At most ``limit`` rows, stratified: each class keeps its share (rows ranked by position within a shuffled
    class, so the first ``limit`` hold every class in proportion)."""
    if not limit or limit >= len(data):
        return data
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    key = np.empty(len(data))
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        key[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return data.subset(sorted(int(i) for i in np.argsort(key, kind="stable")[:limit]))


def load_banking77(root: Path) -> tuple[ClassificationData, ClassificationData, str]:
    names = tuple(json.loads((root / "categories.json").read_text(encoding="utf-8")))
    train = load_classification(root / "train.csv", "text", "category", label_names=names)
    test = load_classification(root / "test.csv", "text", "category", label_names=names)
    train, dropped = dedup_texts(train)
    overlap = set(train.texts) & set(test.texts)
    if overlap:
        train = train.subset([i for i, t in enumerate(train.texts) if t not in overlap])
    return train, test, f"train.csv -> sites, test.csv = test ({dropped} multi-label, {len(overlap)} overlapping)"


def load_medical(root: Path, seed: int) -> tuple[ClassificationData, ClassificationData, str]:
    with (root / "medical_tc_labels.csv").open(encoding="utf-8", newline="") as handle:
        named = [(r["condition_label"].strip(), r["condition_name"].strip()) for r in csv.DictReader(handle)]
    codes, names = zip(*named, strict=True)
    rows = load_classification(root / "medical_tc_test.csv", "medical_abstract", "condition_label",
                               label_names=tuple(codes))
    unique, dropped = dedup_texts(rows)
    train, test = split_by_text(ClassificationData(unique.texts, unique.labels, tuple(names)), 0.2, seed)
    return train, test, (f"{len(rows)} rows -> {len(unique)} unique texts ({dropped} multi-label dropped) -> "
                         f"80/20 by text, seed {seed}")


def prepare(args: argparse.Namespace) -> tuple[ClassificationData, ClassificationData, str]:
    root = Path(args.data_dir) / args.dataset
    if args.dataset == "banking77":
        train, test, how = load_banking77(root)
    else:
        train, test, how = load_medical(root, 0)  # REFERENCE.md's split: seed 0, whatever --seed says
    full = (len(train), len(test))
    train, test = subsample(train, args.max_train, args.seed), subsample(test, args.max_test, args.seed)
    return train, test, f"{how}; {len(train)}/{full[0]} train, {len(test)}/{full[1]} test rows used"


def write_csv(data: ClassificationData, path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((text, data.label_names[label]) for text, label in zip(data.texts, data.labels, strict=True))


def macro_f1(y_true: Any, y_pred: Any) -> float:
    """Unweighted mean of the per-class F1 = 2TP / (2TP + FP + FN) over the classes present in either array."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for cls in np.union1d(y_true, y_pred):
        tp = int(np.sum((y_true == cls) & (y_pred == cls)))
        fp = int(np.sum((y_true != cls) & (y_pred == cls)))
        fn = int(np.sum((y_true == cls) & (y_pred != cls)))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")
