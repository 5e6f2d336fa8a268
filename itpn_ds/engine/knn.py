"""Weighted k-nearest-neighbour classification of frozen features (DINO's rule), in chunks, over a feature bank
that may be split into shards (one per rank).

Features are L2-normalised (:func:`normalize`), so the similarity of a query and a bank entry is their cosine.
A query's k most similar bank entries vote for their class with weight ``exp(similarity / temperature)``
(:func:`vote`); the classes ranked by their summed weights are its predictions (:func:`hits`: top-1, top-5).

A bank split into shards is searched shard by shard: :func:`shard_topk` gives each query's k best candidates
within one shard, :func:`merge_topk` the k best of all shards' candidates. That is the search over the whole
bank: each of the k nearest entries overall is among the k nearest of its own shard. Only one chunk of
similarities, (chunk, shard entries) in fp32, exists at a time (:func:`chunk_rows`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAD_LABEL = -1  # the label of a padding candidate (a shard with fewer than k entries); its similarity is -inf


def normalize(features: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, D) fp32, each row scaled to unit L2 norm."""
    return F.normalize(features.float(), dim=1)


def chunk_rows(bank_rows: int, chunk_bytes: int) -> int:
    """Queries per chunk so that one chunk's fp32 similarities to ``bank_rows`` entries take at most
    ``chunk_bytes`` (at least one query)."""
    return max(1, chunk_bytes // (4 * max(bank_rows, 1)))


def shard_topk(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int, chunk: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``k`` most similar entries of one bank shard, most similar first.

    queries: (Q, D) and bank: (N, D), normalised, in any one dtype (bf16 on the GPU); bank_labels: (N,) int64;
    chunk: queries per matrix product. Returns (similarities (Q, k) fp32, labels (Q, k) int64); where N < k the
    last k - N columns are padding (similarity -inf, label ``PAD_LABEL``).
    """
    Q, N = queries.shape[0], bank.shape[0]
    sims = torch.full((Q, k), float("-inf"), device=queries.device)
    labels = torch.full((Q, k), PAD_LABEL, dtype=torch.int64, device=queries.device)
    found = min(k, N)
    if found == 0:
        return sims, labels
    for start in range(0, Q, chunk):
        block = (queries[start:start + chunk] @ bank.T).float()  # (c, N)
        top = block.topk(found, dim=1)
        sims[start:start + chunk, :found] = top.values
        labels[start:start + chunk, :found] = bank_labels[top.indices]
    return sims, labels


def merge_topk(sims: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each query's candidates from several shards: sims, labels (Q, S·k) -> (Q, k), most
    similar first."""
    top = sims.topk(k, dim=1)
    return top.values, labels.gather(1, top.indices)


def vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores (Q, C) fp32 of the neighbours sims, labels (Q, k): each adds ``exp(sim / temperature)`` to its
    class (padding adds nothing)."""
    weights = (sims / temperature).exp()  # exp(-inf) = 0 for padding
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    return scores.scatter_add_(1, labels.clamp(min=0), weights)


def hits(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many queries have their target (Q,) among their ``t`` best-scored classes, for each t of ``ks``
    (t capped at the number of classes). Ties between scores rank the lower class id first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    found = order == targets[:, None]
    return {t: int(found[:, :min(t, scores.shape[1])].any(dim=1).sum()) for t in ks}


def knn_hits(sims: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, num_classes: int, ks: tuple[int, ...],
             temperature: float) -> dict[int, dict[int, int]]:
    """Top-1 / top-5 hit counts of the weighted k-NN for each k of ``ks``, from each query's nearest neighbours
    sims, labels (Q, >= max(ks)), most similar first (``shard_topk`` / ``merge_topk``): k -> {1: hits, 5: hits}."""
    return {k: hits(vote(sims[:, :k], labels[:, :k], num_classes, temperature), targets) for k in ks}
