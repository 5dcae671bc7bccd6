"""Tests for the synthetic quick-start generators."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import pytest

from fedpeft.data import SUPPORT_LABELS, make_prompt_response, make_support_tickets
from fedpeft.errors import DataError

WORD = re.compile(r"[a-z']+")


def _words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def test_support_labels_are_topic_times_urgency() -> None:
    assert len(SUPPORT_LABELS) == 6
    assert "billing-urgent" in SUPPORT_LABELS and "appointments-routine" in SUPPORT_LABELS


def test_tickets_deterministic_per_seed() -> None:
    assert make_support_tickets(200, seed=3) == make_support_tickets(200, seed=3)
    assert make_support_tickets(200, seed=3).texts != make_support_tickets(200, seed=4).texts


def test_tickets_all_labels_present_and_balanced() -> None:
    data = make_support_tickets(601, seed=0)
    assert len(data) == 601
    assert data.label_names == SUPPORT_LABELS
    counts = data.label_counts()
    assert min(counts) >= 100 and max(counts) - min(counts) <= 1


def test_tickets_are_varied() -> None:
    texts = make_support_tickets(600, seed=0).texts
    assert len(set(texts)) > 0.95 * len(texts)


def test_no_single_word_determines_the_label() -> None:
    data = make_support_tickets(1200, seed=0)
    by_word: dict[str, Counter[int]] = defaultdict(Counter)
    for text, label in zip(data.texts, data.labels, strict=True):
        for word in _words(text):
            by_word[word][label] += 1
    frequent = {w: c for w, c in by_word.items() if sum(c.values()) >= 0.02 * len(data)}
    purity = {w: max(c.values()) / sum(c.values()) for w, c in frequent.items()}
    worst = max(purity, key=purity.get)
    # A word tied to one (topic, urgency) pair would score ~1.0; one factor alone caps near 0.5.
    assert purity[worst] < 0.8, (worst, purity[worst])


def test_each_factor_has_a_signal() -> None:
    data = make_support_tickets(1200, seed=0)
    topic_of = [SUPPORT_LABELS[y].split("-")[0] for y in data.labels]
    by_word: dict[str, Counter[str]] = defaultdict(Counter)
    for text, topic in zip(data.texts, topic_of, strict=True):
        for word in _words(text):
            by_word[word][topic] += 1
    topic_pure = [w for w, c in by_word.items() if sum(c.values()) >= 24 and len(c) == 1]
    assert {by_word[w].most_common(1)[0][0] for w in topic_pure} == {"billing", "access", "appointments"}


def test_learnable_from_both_factors_together() -> None:
    train, test = make_support_tickets(1200, seed=0), make_support_tickets(300, seed=1)
    accuracy = _naive_bayes_accuracy(train.texts, train.labels, test.texts, test.labels)
    assert accuracy > 0.85


def _naive_bayes_accuracy(train_x, train_y, test_x, test_y) -> float:
    vocab = {w for t in train_x for w in _words(t)}
    counts = [Counter() for _ in SUPPORT_LABELS]
    priors = Counter(train_y)
    for text, y in zip(train_x, train_y, strict=True):
        counts[y].update(_words(text))
    correct = 0
    for text, y in zip(test_x, test_y, strict=True):
        words = _words(text) & vocab
        scores = [
            math.log(priors[c]) + sum(math.log((counts[c][w] + 1) / (priors[c] + 2)) for w in words)
            for c in range(len(SUPPORT_LABELS))
        ]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == y)
    return correct / len(test_y)


def test_prompt_response_deterministic_and_well_formed() -> None:
    first, again = make_prompt_response(90, seed=5), make_prompt_response(90, seed=5)
    assert first == again
    assert first.prompts != make_prompt_response(90, seed=6).prompts
    allowed = {"urgent", "routine", "billing", "account access", "appointments"} | set(SUPPORT_LABELS)
    assert set(first.responses) <= allowed
    assert {"urgent", "billing", "billing-urgent"} & set(first.responses)
    assert all(p.strip() for p in first.prompts)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_invalid_num_examples(bad) -> None:
    with pytest.raises(DataError, match="num_examples"):
        make_support_tickets(bad)
    with pytest.raises(DataError, match="num_examples"):
        make_prompt_response(bad)
