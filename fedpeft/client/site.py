"""A site's runtime inside one process: the base model is loaded once and reused for every site and round.

A Ray actor of the simulation engine serves many virtual sites in turn, so the per-process cache holds one peft model
(whose trainable tensors are overwritten by each round's global adapter) and each site's encoded data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from fedpeft.client.batches import EncodedData, encode_classification, encode_prompt_response
from fedpeft.client.trainer import EvalResult, TrainResult, evaluate, train_local
from fedpeft.config import ModelConfig, PeftConfig, RunConfig
from fedpeft.data.records import ClassificationData
from fedpeft.data.sites import SiteData, num_labels, site_split
from fedpeft.models.adapter_state import AdapterState, get_adapter_state, set_adapter_state
from fedpeft.models.loader import load_base_model
from fedpeft.models.peft_model import wrap_with_peft


@dataclass(frozen=True)
class LocalRound:
    update: AdapterState  # new local adapter minus the received global adapter
    train: TrainResult


@functools.lru_cache(maxsize=2)
def shared_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, labels: int) -> tuple[Any, Any]:
    base, tokenizer = load_base_model(model_cfg, labels)
    return wrap_with_peft(base, peft_cfg, model_cfg.task), tokenizer


@functools.lru_cache(maxsize=256)
def encoded_site_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[EncodedData, EncodedData]:
    split = site_split(cfg, partition_id, num_partitions)
    _, tokenizer = shared_model(cfg.model, cfg.peft, num_labels(cfg))
    return _encode(split.train, tokenizer, cfg.model.max_length), _encode(split.eval, tokenizer, cfg.model.max_length)


def _encode(data: SiteData, tokenizer: Any, max_length: int) -> EncodedData:
    if isinstance(data, ClassificationData):
        return encode_classification(data.texts, data.labels, tokenizer, max_length)
    return encode_prompt_response(data.prompts, data.responses, tokenizer, max_length)


class Site:
    """Train or evaluate one site's data starting from a given global adapter."""

    def __init__(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.model, _ = shared_model(cfg.model, cfg.peft, num_labels(cfg))
        self.train_data, self.eval_data = encoded_site_data(cfg, partition_id, num_partitions)

    def load_global(self, global_state: AdapterState) -> None:
        set_adapter_state(self.model, global_state, source=f"global adapter received by site {self.partition_id}")

    def evaluate(self, global_state: AdapterState) -> EvalResult:
        self.load_global(global_state)
        return evaluate(self.model, self.eval_data, self.cfg.train.eval_batch_size, self.cfg.model.task)

    def train_round(self, global_state: AdapterState, server_round: int) -> LocalRound:
        self.load_global(global_state)
        seed = self.cfg.run.seed * 1_000_003 + server_round * 1009 + self.partition_id
        result = train_local(self.model, self.train_data, self.cfg.train, self.cfg.model.task, seed)
        trained = get_adapter_state(self.model)
        update = {name: trained[name] - global_state[name] for name in trained}
        return LocalRound(update, result)
