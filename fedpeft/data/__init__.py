"""Datasets for fedpeft: records, file loaders, synthetic quick-start data and site partitioners."""

from fedpeft.data.loaders import SUPPORTED_SUFFIXES, load_classification, load_prompt_response
from fedpeft.data.partition import (
    label_skew,
    partition_by_column,
    partition_dirichlet,
    partition_iid,
    train_eval_split,
)
from fedpeft.data.records import ClassificationData, PromptResponseData
from fedpeft.data.synthetic import SUPPORT_LABELS, make_prompt_response, make_support_tickets

__all__ = [
    "SUPPORTED_SUFFIXES",
    "SUPPORT_LABELS",
    "ClassificationData",
    "PromptResponseData",
    "label_skew",
    "load_classification",
    "load_prompt_response",
    "make_prompt_response",
    "make_support_tickets",
    "partition_by_column",
    "partition_dirichlet",
    "partition_iid",
    "train_eval_split",
]
