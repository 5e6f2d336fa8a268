"""``itpn_ds.engine.broadcast`` on 2 real gloo ranks (processes): rank 0's result, or its error, reaches every
rank, and a module's tensors end equal to rank 0's. The fine-tuning path through it is in test_engine_e2e.py."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from itpn_ds.engine.broadcast import broadcast_module, on_source_rank
from itpn_ds.engine.checkpoint import CheckpointError
from tests.fixtures.cli import free_port

pytestmark = pytest.mark.dist


def outcome_of(fn) -> dict:
    try:
        return {"result": on_source_rank(fn)}
    except CheckpointError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def rank_main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different weights on each rank before the broadcast
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.add_(rank + 1.0)
    received = broadcast_module(model)

    def bad_checkpoint() -> None:
        raise CheckpointError("runs/pt: meta.json is corrupt")

    record = {"ok": outcome_of(lambda: {"read_by": dist.get_rank()}), "bad": outcome_of(bad_checkpoint),
              "received": received, "state": {k: v.tolist() for k, v in model.state_dict().items()}}
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(record, fh)
    dist.destroy_process_group()


def test_rank_zeros_result_error_and_weights_reach_every_rank(tmp_path):
    mp.spawn(rank_main, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for record in ranks:
        assert record["ok"] == {"result": {"read_by": 0}}  # computed on rank 0 only, handed to rank 1
        assert record["bad"] == {"error": "CheckpointError: runs/pt: meta.json is corrupt"}  # raised on both
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[1]["state"]["1.running_mean"] == [1.0] * 4  # rank 0's buffer, not rank 1's 2.0
    assert ranks[1]["received"] == 4 * (3 * 4 + 4 + 4 * 4) + 8  # float32 weights + BatchNorm's int64 counter
