"""Logits to the top-k classes with softmax probabilities."""

from __future__ import annotations

import numpy as np


def top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> list[dict]:
    logits = logits.astype(np.float64)
    k = min(k, logits.shape[-1])
    exp = np.exp(logits - logits.max())
    probs = exp / exp.sum()
    idx = np.argpartition(-probs, k - 1)[:k]
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return [{"label": str(labels[i]), "index": int(i), "score": float(probs[i])} for i in idx]
