"""How good is g? Held-out accuracy, log-loss, Brier score, expected calibration error and a
reliability diagram, all for probabilities p_i = g(x_i, a_i, b_i) against labels y_i.

Preference data lists the winner first (label 1 for every row), which makes a reliability
diagram one-sided. ``both_orders`` adds each pair reversed, (1 - p_i, 1 - y_i): for an
antisymmetric g the two orders are the same prediction, so accuracy, log-loss and Brier are
unchanged and the calibration curve covers [0, 1].

Log-loss, Brier score and the reliability curve are scikit-learn's (``log_loss``,
``brier_score_loss``, ``calibration_curve`` with uniform bins, each closed on the right);
written here are only what it lacks: the expected calibration error (a weighted mean of the
curve's gaps, which needs the bin counts the curve does not return), accuracy with ties
counted one half, and the both-orders view.
"""
from __future__ import annotations

import numpy as np


def _arrays(prob, labels):
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"calibration: {p.size} probabilities but {y.size} labels; expected one per pair")
    if p.size == 0:
        raise ValueError("calibration: no pairs; expected at least one")
    return p, y


def both_orders(prob, labels):
    """Each pair in both orders: (p, y) and (1 - p, 1 - y)."""
    p, y = _arrays(prob, labels)
    return np.concatenate([p, 1.0 - p]), np.concatenate([y, 1.0 - y])


def accuracy(prob, labels) -> float:
    """Fraction of pairs where g sides with the label (a tie p = 1/2 counts one half)."""
    p, y = _arrays(prob, labels)
    return float(np.mean(np.where(p == 0.5, 0.5, (p > 0.5) == (y > 0.5))))


def log_loss(prob, labels) -> float:
    """mean of -[y log p + (1 - y) log(1 - p)] (nats; scikit-learn clips p away from 0 and 1)."""
    from sklearn.metrics import log_loss as sklearn_log_loss

    p, y = _arrays(prob, labels)
    return float(sklearn_log_loss(y, p, labels=[0, 1]))


def brier(prob, labels) -> float:
    """mean of (p - y)^2 (scikit-learn's ``brier_score_loss``)."""
    from sklearn.metrics import brier_score_loss

    p, y = _arrays(prob, labels)
    return float(brier_score_loss(y, p, labels=[0, 1]))


def reliability_bins(prob, labels, bins: int = 10):
    """Equal-width bins on [0, 1] as scikit-learn's ``calibration_curve`` makes them (each
    closed on the right, the first also on the left): per bin the count, the mean predicted
    probability and the observed frequency of y = 1 (NaN for empty bins)."""
    from sklearn.calibration import calibration_curve

    p, y = _arrays(prob, labels)
    count = np.bincount(np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], p), minlength=bins).astype(float)
    frequency, confidence = np.full(bins, np.nan), np.full(bins, np.nan)
    frequency[count > 0], confidence[count > 0] = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    return count, confidence, frequency


def expected_calibration_error(prob, labels, bins: int = 10) -> float:
    """ECE = sum over bins of (n_bin / n) * |mean p in bin - mean y in bin|."""
    count, conf, freq = reliability_bins(prob, labels, bins)
    nonempty = count > 0
    return float(np.sum(count[nonempty] / count.sum() * np.abs(conf[nonempty] - freq[nonempty])))


def calibration_report(prob, labels, bins: int = 10) -> dict:
    """All metrics, on both orders of each pair (see module docstring)."""
    p, y = both_orders(prob, labels)
    return {
        "pairs": int(p.size // 2),
        "accuracy": accuracy(p, y),
        "log_loss": log_loss(p, y),
        "brier": brier(p, y),
        "ece": expected_calibration_error(p, y, bins),
        "bins": bins,
    }


def plot_reliability(prob, labels, path, bins: int = 10, title: str = "reliability of g") -> None:
    """Reliability diagram (observed frequency vs mean predicted probability per bin, with
    the diagonal of perfect calibration) and the histogram of predictions; PNG, atomic write."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, y = both_orders(prob, labels)
    count, conf, freq = reliability_bins(p, y, bins)
    ok = count > 0
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(4.5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=1, label="perfect calibration")
    ax.plot(conf[ok], freq[ok], marker="o", label="g")
    ax.set_ylabel("observed frequency a preferred")
    ax.set_title(f"{title}\nECE {expected_calibration_error(p, y, bins):.3f}, Brier {brier(p, y):.3f}")
    ax.legend(loc="upper left")
    hx.bar((np.arange(bins) + 0.5) / bins, count, width=1.0 / bins, edgecolor="white")
    hx.set_xlabel("predicted P(a preferred to b)")
    hx.set_ylabel("pairs (both orders)")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
