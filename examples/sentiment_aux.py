"""A tiny auxiliary preference model for the quickstart: a word-list sentiment judge.

``vrpo score --aux examples/sentiment_aux.py:prefer_positive`` calls it with whole batches:
``prefer_positive(prompts, responses_a, responses_b) -> [N]`` probabilities that a is
preferred to b. vrpo antisymmetrises it (it already is: sigmoid(s(a) - s(b))).
"""
import math

POSITIVE = {"good", "great", "wonderful", "excellent", "beautiful", "loved", "moving", "best", "fun", "brilliant"}
NEGATIVE = {"bad", "terrible", "boring", "worst", "awful", "dull", "hated", "weak", "poor", "mess"}


def sentiment(text: str) -> int:
    words = [w.strip(".,!?;:").lower() for w in text.split()]
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)


def prefer_positive(prompts, responses_a, responses_b):
    """P(a > b) = sigmoid(sentiment(a) - sentiment(b)); each response scored once per call."""
    score = {t: sentiment(t) for t in set(responses_a) | set(responses_b)}
    return [1.0 / (1.0 + math.exp(-(score[a] - score[b]))) for a, b in zip(responses_a, responses_b)]
