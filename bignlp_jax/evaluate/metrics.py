"""Metric functions on plain Python values (no JAX): tested against hand-computed numbers.

Classification: accuracy, macro-F1 (mean of per-class F1 over the label set, so a class that is
never predicted counts as F1 = 0), majority-class baseline. Text-to-text: exact match (after
stripping surrounding whitespace) and corpus BLEU (sacrebleu, its default 13a tokenisation).
Language modelling: perplexity = exp(mean token negative log-likelihood).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from bignlp_jax.errors import UserError


def accuracy(predictions: Sequence, references: Sequence) -> float:
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: Sequence, references: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean over `labels` (default: every label seen in either list) of per-class F1.

    F1 of a class with no true and no predicted examples is left out of the mean (it is
    undefined); a class with examples but no correct prediction counts as 0."""
    _check_lengths(predictions, references)
    labels = list(labels) if labels is not None else sorted(set(predictions) | set(references),
                                                              key=str)
    scores = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        predicted = sum(p == label for p in predictions)
        actual = sum(r == label for r in references)
        if predicted == 0 and actual == 0:
            continue
        # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (predicted + actual); no 0/0 once either > 0
        scores.append(2 * tp / (predicted + actual))
    return sum(scores) / len(scores) if scores else 0.0


def majority_label(train_labels: Sequence):
    """The most frequent label (ties: the one seen first)."""
    if not train_labels:
        raise ValueError("majority_label needs at least one training label")
    counts = Counter(train_labels)
    best = max(counts.values())
    return next(label for label in train_labels if counts[label] == best)


def majority_baseline_accuracy(train_labels: Sequence, references: Sequence) -> float:
    """Accuracy on `references` of always predicting the most frequent TRAINING label."""
    label = majority_label(train_labels)
    return accuracy([label] * len(references), references)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with one reference per prediction, sacrebleu defaults."""
    try:
        import sacrebleu  # the `bleu` extra: only text-to-text tasks score BLEU
    except ImportError:
        raise UserError("BLEU needs sacrebleu, which is not installed\n"
                        "  fix: pip install 'bignlp_jax[bleu]'") from None

    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def perplexity(loss_sum: float, token_count: float) -> float:
    """exp(loss_sum / token_count); capped at exp(80) instead of overflowing."""
    if token_count <= 0:
        return float("nan")
    return math.exp(min(loss_sum / token_count, 80.0))


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
