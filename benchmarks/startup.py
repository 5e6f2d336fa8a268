"""Fine-tuning start-up from a ZeRO pre-training run: every rank reading the checkpoint (before) against rank 0
reading it and broadcasting the loaded weights (``itpn_ds.engine.commands.init_from``).

1. A real ZeRO checkpoint of the pre-training recipe's model (``--pretrain-recipe``, random weights) is made once
   under ``--work``, by ``--ranks`` CPU ranks: the recipe's DeepSpeed engine, one optimizer step on a cheap loss
   (the sum of the weights: no forward pass, but the Adam moments exist as in a real checkpoint), saved by the
   engine's own ``CheckpointManager``.
2. For each strategy, ``--ranks`` fresh rank processes build the fine-tuning recipe's model
   (``--finetune-recipe``, same seed) and initialise it from that checkpoint: ``every_rank`` (each rank
   reads, consolidates and loads: the engine's path before) or ``broadcast`` (the engine's path now).
   Per rank and strategy: seconds (barrier to barrier), bytes this process read through read() calls
   (``/proc/self/io`` rchar, page cache hits included; memory-mapped reads are not counted, so it is a lower
   bound), the growth of its peak RSS over the initialisation, and a SHA-256 of the resulting weights.

    python benchmarks/startup.py [--ranks 2] [--work /tmp/itpn-startup] [--out benchmarks/results/startup.json]
    python benchmarks/startup.py --checkpoint RUN_DIR --finetune-recipe tiny_finetune_cpu   (an existing run)
    python benchmarks/startup.py ... --strategies broadcast                                  (one of them)

One machine: both ranks share its page cache, so the bytes read are the figure that scales with the nodes of a
shared file system; the seconds are those of a warm cache (the checkpoint was just written or read).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STRATEGIES = ("every_rank", "broadcast")
CHECKPOINT_SEED = 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/itpn-startup"))
    p.add_argument("--pretrain-recipe", default="itpn_large_clip_l_pretrain")
    p.add_argument("--finetune-recipe", default="itpn_large_finetune")
    p.add_argument("--checkpoint", type=Path, default=None, help="an existing run directory instead of making one")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/startup.json"))
    p.add_argument("--role", choices=("driver", "make-checkpoint", "measure"), default="driver", help=argparse.SUPPRESS)
    p.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def launch(args: argparse.Namespace, role: str, *extra: str) -> None:
    """This script in ``role`` on ``args.ranks`` CPU ranks under torchrun."""
    from tests.fixtures.cli import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
               "--master_port", str(free_port()), __file__, "--role", role, "--work", str(args.work),
               "--pretrain-recipe", args.pretrain_recipe, "--finetune-recipe", args.finetune_recipe, *extra]
    subprocess.run(command, check=True, env=env)


def make_checkpoint(args: argparse.Namespace) -> None:
    """Rank role: the pre-training recipe's engine, one step on the sum of the weights, one checkpoint."""
    import torch

    from itpn_ds.config import load_config
    from itpn_ds.engine.model import build_model
    from itpn_ds.engine.checkpoint import CheckpointManager
    from itpn_ds.engine.ds_config import build_ds_config
    from itpn_ds.engine.runtime import build_engine, init_distributed, seed_everything

    cfg = load_config(args.pretrain_recipe, ["data.micro_batch=1", "tracking.enabled=false"])
    runtime = init_distributed()
    seed_everything(CHECKPOINT_SEED)
    model = build_model(cfg)
    ds_config = build_ds_config(cfg, runtime.world_size, num_params=sum(p.numel() for p in model.parameters()))
    engine = build_engine(model, cfg, runtime, ds_config)
    loss = sum(p.float().sum() for p in engine.module.parameters())
    engine.backward(loss)
    engine.step()
    meta = {"task": cfg.task, "zero_stage": int(engine.zero_optimization_stage()), "precision": cfg.deepspeed.precision,
            "model": {"name": cfg.model.name, "kwargs": cfg.model.kwargs}, "trainer": {"step": 1}}
    CheckpointManager(args.work / "pretrain", keep_last=1, rank=runtime.rank,
                      world_size=runtime.world_size).save(engine, 1, meta, {"loader": {}})
    del engine, loss
    torch.distributed.barrier()


def measure(args: argparse.Namespace, checkpoint: Path) -> None:
    """Rank role: ``args.strategy`` on a fresh model; one JSON line per rank into ``work/ranks.jsonl``."""
    import torch.distributed as dist

    from itpn_ds.config import load_config
    from itpn_ds.engine.model import build_model
    from itpn_ds.engine.broadcast import ReadMeter
    from itpn_ds.engine.commands import LOG_FORMAT, init_from, load_on_this_rank
    from itpn_ds.engine.runtime import init_distributed, seed_everything

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    cfg = load_config(args.finetune_recipe, ["tracking.enabled=false"])
    runtime = init_distributed()
    strategies = {"every_rank": lambda m: load_on_this_rank(m, str(checkpoint), strict=False, new_head=False),
                  "broadcast": lambda m: init_from(m, str(checkpoint))}
    seed_everything(cfg.schedule.seed)
    model = build_model(cfg)
    rss_before = peak_rss_bytes()
    dist.barrier()
    with ReadMeter() as meter:
        strategies[args.strategy](model)
        dist.barrier()
    record = {"strategy": args.strategy, "rank": runtime.rank, "seconds": meter.seconds, "bytes_read": meter.bytes,
              "peak_rss_growth_bytes": peak_rss_bytes() - rss_before, "weights_sha256": weights_digest(model)}
    with open(args.work / "ranks.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    dist.barrier()


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weights_digest(model) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (name, then raw bytes), in state-dict order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def summarise(records: list[dict], strategies: list[str]) -> dict:
    """Per strategy: the slowest rank's seconds, bytes read (summed over ranks and by rank), the peak RSS growth
    by rank, and the weights' digests (one digest: every rank ended with the same weights)."""
    out = {}
    for name in strategies:
        rows = [r for r in records if r["strategy"] == name]
        out[name] = {"seconds": max(r["seconds"] for r in rows),
                     "bytes_read_all_ranks": sum(r["bytes_read"] for r in rows),
                     "bytes_read_by_rank": {r["rank"]: r["bytes_read"] for r in sorted(rows, key=lambda r: r["rank"])},
                     "peak_rss_growth_by_rank": {r["rank"]: r["peak_rss_growth_bytes"]
                                                 for r in sorted(rows, key=lambda r: r["rank"])},
                     "weights_sha256": sorted({r["weights_sha256"] for r in rows})}
    return out


def checkpoint_bytes(run_dir: Path) -> int:
    from itpn_ds.engine.checkpoint import read_checkpoint

    ref = read_checkpoint(run_dir)
    return sum(f.stat().st_size for f in ref.path.rglob("*") if f.is_file())


def driver(args: argparse.Namespace) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.work / "pretrain"
        if not (checkpoint / "checkpoints" / "latest").is_file():
            started = time.perf_counter()
            launch(args, "make-checkpoint")
            print(f"checkpoint made in {time.perf_counter() - started:.0f} s")
    (args.work / "ranks.jsonl").unlink(missing_ok=True)
    for strategy in args.strategies:
        launch(args, "measure", "--checkpoint", str(checkpoint), "--strategy", strategy)
    records = [json.loads(line) for line in (args.work / "ranks.jsonl").read_text().splitlines()]
    result = {"ranks": args.ranks, "pretrain_recipe": args.pretrain_recipe, "finetune_recipe": args.finetune_recipe,
              "checkpoint": str(checkpoint), "checkpoint_bytes": checkpoint_bytes(checkpoint),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average": os.getloadavg()[0],
              "strategies": summarise(records, args.strategies), "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    print(f"{result['finetune_recipe']} from {result['checkpoint']} ({result['checkpoint_bytes'] / 1e9:.2f} GB), "
          f"{result['ranks']} ranks")
    print(f"{'strategy':<12} {'s (slowest rank)':>17} {'GB read, all ranks':>19} {'GB read by rank':>16} "
          f"{'peak RSS growth GB by rank':>27} same weights")
    for name, row in result["strategies"].items():
        by_rank = " / ".join(f"{b / 1e9:.2f}" for b in row["bytes_read_by_rank"].values())
        rss = " / ".join(f"{b / 1e9:.2f}" for b in row["peak_rss_growth_by_rank"].values())
        print(f"{name:<12} {row['seconds']:>17.1f} {row['bytes_read_all_ranks'] / 1e9:>19.2f} {by_rank:>16} "
              f"{rss:>27} {len(row['weights_sha256']) == 1}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.role == "make-checkpoint":
        make_checkpoint(args)
    elif args.role == "measure":
        measure(args, args.checkpoint)
    else:
        driver(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
