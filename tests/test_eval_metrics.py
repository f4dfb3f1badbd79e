"""Metric functions against values computed by hand."""

import math

import pytest

from bignlp_jax.evaluate import metrics


def test_accuracy():
    assert metrics.accuracy(["a", "b", "a", "c"], ["a", "b", "b", "b"]) == 0.5
    assert metrics.accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        metrics.accuracy(["a"], [])


def test_macro_f1_by_hand():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    # a: tp 2, predicted 2, actual 3 -> 4/5; b: tp 1, pred 2, actual 2 -> 1/2;
    # c: tp 1, pred 2, actual 1 -> 2/3
    expected = (4 / 5 + 1 / 2 + 2 / 3) / 3
    assert metrics.macro_f1(preds, refs) == pytest.approx(expected)
    # a class in the label set never predicted nor present is left out; one present but never
    # predicted counts as 0
    assert metrics.macro_f1(preds, refs, labels=["a", "b", "c", "d"]) == pytest.approx(expected)
    assert metrics.macro_f1(["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)


def test_majority_baseline_uses_training_labels():
    train = ["x", "y", "y", "z", "y", "x"]
    assert metrics.majority_label(train) == "y"
    assert metrics.majority_label(["p", "q", "q", "p"]) == "p"  # tie: first seen
    assert metrics.majority_baseline_accuracy(train, ["x", "x", "y", "z"]) == 0.25


def test_exact_match_and_bleu():
    assert metrics.exact_match([" the cat ", "a dog"], ["the cat", "the dog"]) == 0.5
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    # 4 words, reference 6: unigram..4-gram precisions 4/4, 3/3, 2/2, 1/1, brevity e^(1-6/4)
    assert metrics.bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(
        100 * math.exp(1 - 6 / 4), abs=1e-3)
    assert metrics.bleu(["dog"], ["the cat sat"]) == pytest.approx(0.0)


def test_perplexity():
    assert metrics.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert math.isnan(metrics.perplexity(1.0, 0))
