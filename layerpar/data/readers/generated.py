"""The sets made here, from no files: ``peaks`` (points generated from the
seed, labelled by level sets of MATLAB's ``peaks`` function; Haber &
Ruthotto 2017, Guenther et al., SIMODS 2020), scikit-learn's 8x8
``digits`` (shipped with scikit-learn, offline) and ``recall``
(associative recall: token sequences generated from the seed)."""
import numpy as np

from layerpar.data.readers import RawSet

__all__ = ["PEAKS_THRESHOLDS", "PEAKS_DEFAULT_SAMPLES", "peaks_function", "peaks", "digits",
           "RECALL_KEYS", "RECALL_VALUES", "RECALL_PAIRS", "RECALL_VOCAB",
           "RECALL_DEFAULT_SAMPLES", "recall"]

# Level-set thresholds of the peaks function: the 5 classes are
# f < -0.3, [-0.3, 0), [0, 0.15), [0.15, 1.3), f >= 1.3.  On uniform points in
# [-3, 3]^2 this gives class fractions of about 20/16/24/20/20 %.
PEAKS_THRESHOLDS = (-0.3, 0.0, 0.15, 1.3)
PEAKS_DEFAULT_SAMPLES = 6000


def peaks_function(x, y):
    """MATLAB's ``peaks``: 3(1-x)^2 e^{-x^2-(y+1)^2}
    - 10(x/5 - x^3 - y^5) e^{-x^2-y^2} - 1/3 e^{-(x+1)^2-y^2}."""
    return (3.0 * (1.0 - x) ** 2 * np.exp(-x ** 2 - (y + 1.0) ** 2)
            - 10.0 * (x / 5.0 - x ** 3 - y ** 5) * np.exp(-x ** 2 - y ** 2)
            - 1.0 / 3.0 * np.exp(-(x + 1.0) ** 2 - y ** 2))


def peaks(seed: int, n: int = PEAKS_DEFAULT_SAMPLES) -> RawSet:
    """``n`` points uniform in [-3, 3]^2 drawn from ``seed``, 5 classes by
    the level sets ``PEAKS_THRESHOLDS`` of :func:`peaks_function`."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {n!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7065616B73]))  # "peaks"
    pts = rng.uniform(-3.0, 3.0, size=(n, 2))
    labels = np.digitize(peaks_function(pts[:, 0], pts[:, 1]), PEAKS_THRESHOLDS)
    return RawSet(pts, labels.astype(np.int64), None, None, (2,), 5, 1.0)


def digits() -> RawSet:
    """scikit-learn's 1797 handwritten digits, 1x8x8 pixels 0..16, 10 classes."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8)   # pixel values 0..16
    y = bunch.target.astype(np.int64)
    return RawSet(x, y, None, None, (1, 8, 8), 10, 16.0)


# Associative recall: a query key, then 2..6 (key, value) pairs with distinct
# keys, padded to the longest; the class is the value stored under the query.
RECALL_KEYS = 8          # key symbols
RECALL_VALUES = 8        # value symbols: the classes
RECALL_PAIRS = (2, 6)    # fewest and most pairs in a sequence
RECALL_VOCAB = RECALL_KEYS + RECALL_VALUES  # token ids 0..15: keys, then values
RECALL_DEFAULT_SAMPLES = 6000


def recall(seed: int, n: int = RECALL_DEFAULT_SAMPLES) -> RawSet:
    """``n`` sequences of associative recall drawn from ``seed``: inputs of
    length 1 + 2 * RECALL_PAIRS[1] holding stored token ids (a token id t
    as t + 1; 0 is padding): the query key, then the pairs ``key value``
    (keys 0..RECALL_KEYS-1, values RECALL_KEYS + 0..RECALL_VALUES-1); the
    label is the value under the query key.  Answering needs attention (the
    query must find its key anywhere in the sequence) and depth (the value
    sits beside the key: one layer moves the key to its value or the value
    to its key, a later one matches the query): the number of pairs varies,
    so the padding differs per sample."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {n!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x726563616C6C]))  # "recall"
    lo, hi = RECALL_PAIRS
    x = np.zeros((n, 1 + 2 * hi), dtype=np.int64)
    y = np.zeros(n, dtype=np.int64)
    for i in range(n):
        p = int(rng.integers(lo, hi + 1))
        keys = rng.choice(RECALL_KEYS, size=p, replace=False)
        values = rng.integers(0, RECALL_VALUES, size=p)
        q = int(rng.integers(p))
        x[i, 0] = keys[q] + 1
        x[i, 1:1 + 2 * p:2] = keys + 1
        x[i, 2:2 + 2 * p:2] = RECALL_KEYS + values + 1
        y[i] = values[q]
    return RawSet(x, y, None, None, (x.shape[1],), RECALL_VALUES, 1.0)
