"""The weighted k-NN of the probe (itpn_ds/engine/knn.py) against a brute-force computation written here from
DINO's rule: every query against every bank entry in float64, one query at a time, neighbours by sorting."""
import math

import pytest
import torch

from itpn_ds.engine.knn import PAD_LABEL, chunk_rows, knn_hits, merge_topk, normalize, shard_topk

TEMPERATURE = 0.07


def brute_force(queries, targets, bank, bank_labels, num_classes, k, temperature=TEMPERATURE):
    """(top-1 hits, top-5 hits): per query, cosines to all entries, the k largest, exp(cos / T) summed by class,
    classes ranked by score (ties: lower id first)."""
    top1 = top5 = 0
    for q, target in zip(queries.double(), targets.tolist()):
        cos = [float(q @ b / (q.norm() * b.norm())) for b in bank.double()]
        nearest = sorted(range(len(cos)), key=lambda i: -cos[i])[:k]
        scores = [0.0] * num_classes
        for i in nearest:
            scores[int(bank_labels[i])] += math.exp(cos[i] / temperature)
        ranked = sorted(range(num_classes), key=lambda c: (-scores[c], c))
        top1 += ranked[0] == target
        top5 += target in ranked[:5]
    return top1, top5


def data(seed, queries, bank, dim, classes):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    bank_labels = torch.randint(0, classes, (bank,), generator=g)
    targets = torch.randint(0, classes, (queries,), generator=g)
    noise = 1.5
    return (centres[targets] + noise * torch.randn(queries, dim, generator=g), targets,
            centres[bank_labels] + noise * torch.randn(bank, dim, generator=g), bank_labels)


@pytest.mark.parametrize("queries,bank,dim,classes,chunk,shards", [
    (37, 101, 13, 7, 5, 1),     # odd sizes, chunks that do not divide the queries
    (37, 101, 13, 7, 37, 3),    # one chunk, a bank split in 3 uneven shards
    (64, 50, 8, 3, 1, 4),       # one query per chunk, fewer than 5 classes (top-5 capped at 3)
    (9, 23, 5, 11, 4, 5),       # shards of 4-5 entries: fewer than k = 10 or 20 (padding candidates)
])
def test_sharded_chunked_knn_equals_brute_force(queries, bank, dim, classes, chunk, shards):
    q, targets, b, bank_labels = data(queries + bank, queries, bank, dim, classes)
    qn, bn = normalize(q), normalize(b)
    pieces = torch.arange(bank).tensor_split(shards)
    candidates = [shard_topk(qn, bn[idx], bank_labels[idx], 20, chunk) for idx in pieces]
    sims, labels = merge_topk(torch.cat([s for s, _ in candidates], 1), torch.cat([l for _, l in candidates], 1), 20)
    got = knn_hits(sims, labels, targets, classes, (10, 20), TEMPERATURE)
    for k in (10, 20):
        want = brute_force(q, targets, b, bank_labels, classes, k)
        assert (got[k][1], got[k][5]) == want, (k, got[k], want)


def test_a_shard_smaller_than_k_pads_with_candidates_that_never_vote():
    qn, bn = normalize(torch.randn(3, 4)), normalize(torch.randn(2, 4))
    sims, labels = shard_topk(qn, bn, torch.tensor([1, 0]), 5, 2)
    assert torch.isinf(sims[:, 2:]).all() and (labels[:, 2:] == PAD_LABEL).all()
    assert torch.isfinite(sims[:, :2]).all() and (sims[:, 0] >= sims[:, 1]).all()
    empty = shard_topk(qn, bn[:0], torch.tensor([], dtype=torch.int64), 5, 2)
    assert (empty[1] == PAD_LABEL).all()


def test_bf16_bank_gives_the_fp32_neighbours_on_separated_data():
    q, targets, b, bank_labels = data(0, 40, 60, 16, 4)
    fp32 = shard_topk(normalize(q), normalize(b), bank_labels, 10, 7)
    bf16 = shard_topk(normalize(q).bfloat16(), normalize(b).bfloat16(), bank_labels, 10, 7)
    assert bf16[0].dtype == torch.float32
    assert torch.allclose(bf16[0], fp32[0], atol=2e-2)
    assert knn_hits(*bf16, targets, 4, (10,), TEMPERATURE)[10][1] == pytest.approx(
        knn_hits(*fp32, targets, 4, (10,), TEMPERATURE)[10][1], abs=2)


def test_chunk_rows_bounds_the_similarity_block():
    assert chunk_rows(1000, 4000 * 7) == 7
    assert chunk_rows(10**9, 1024) == 1
    assert chunk_rows(0, 400) == 100
