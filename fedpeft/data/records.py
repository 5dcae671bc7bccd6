"""In-memory datasets: immutable, validated columns of texts and targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedpeft.errors import DataError


def _check_groups(groups: tuple[str, ...] | None, num_rows: int, kind: str) -> None:
    if groups is not None and len(groups) != num_rows:
        raise DataError(
            f"{kind}: groups has {len(groups)} entries but there are {num_rows} rows; "
            "pass one group value per row or groups=None"
        )


def _check_indices(indices: Sequence[int], num_rows: int, kind: str) -> list[int]:
    picked = [int(i) for i in indices]
    bad = [i for i in picked if not 0 <= i < num_rows]
    if bad:
        raise DataError(
            f"{kind}.subset: index {bad[0]} is out of range for {num_rows} rows; "
            f"pass indices in 0..{num_rows - 1}"
        )
    return picked


@dataclass(frozen=True)
class ClassificationData:
    """Texts with integer label ids; label_names[i] is the name of id i."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(
                f"ClassificationData: {len(self.texts)} texts but {len(self.labels)} labels; "
                "pass exactly one label per text"
            )
        if not self.label_names:
            raise DataError("ClassificationData: label_names is empty; pass at least one label name")
        for row, label in enumerate(self.labels):
            if not 0 <= label < len(self.label_names):
                raise DataError(
                    f"ClassificationData: label {label} at row {row} is outside "
                    f"0..{len(self.label_names) - 1}; use ids that index label_names"
                )
        _check_groups(self.groups, len(self.texts), "ClassificationData")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> ClassificationData:
        picked = _check_indices(indices, len(self), "ClassificationData")
        return ClassificationData(
            texts=tuple(self.texts[i] for i in picked),
            labels=tuple(self.labels[i] for i in picked),
            label_names=self.label_names,
            groups=None if self.groups is None else tuple(self.groups[i] for i in picked),
        )

    def label_counts(self) -> list[int]:
        counts = [0] * len(self.label_names)
        for label in self.labels:
            counts[label] += 1
        return counts


@dataclass(frozen=True)
class PromptResponseData:
    """Prompt/response pairs for generative (causal LM) fine-tuning."""

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.responses):
            raise DataError(
                f"PromptResponseData: {len(self.prompts)} prompts but {len(self.responses)} "
                "responses; pass exactly one response per prompt"
            )
        _check_groups(self.groups, len(self.prompts), "PromptResponseData")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> PromptResponseData:
        picked = _check_indices(indices, len(self), "PromptResponseData")
        return PromptResponseData(
            prompts=tuple(self.prompts[i] for i in picked),
            responses=tuple(self.responses[i] for i in picked),
            groups=None if self.groups is None else tuple(self.groups[i] for i in picked),
        )
