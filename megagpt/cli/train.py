"""Train a GPT: `python launcher/pretrain.py --config configs/X.yaml [section.key=value ...]` (or the installed
`megagpt-pretrain`, the same command).

Runs as one process with plain python, or under torchrun, srun or mpirun. Every user error (config, data, launch
environment) is printed as one sentence and exits with status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import sys

import torch

from megagpt.config import data_parallel_size, load_config, validate
from megagpt.errors import UserError
from megagpt.launch import discover_launch, resolve_device, set_cpu_threads
from megagpt.log import get_logger, setup_logging
from megagpt.parallel.comm import shutdown
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.pipeline import max_alive_promised, predicted_bubble, resolve_schedule, slower_schedule_warning
from megagpt.parallel.topology import Topology
from megagpt.train.schedules import micro_batches_per_replica


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (may name a preset); see configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.iters=100 parallel.tp=2")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the config and layout for --world-size ranks, start nothing"
    )
    parser.add_argument("--world-size", type=int, default=None, help="with --dry-run: the number of ranks to plan for")
    parser.add_argument(
        "--meta-ranks",
        default=None,
        help="with --dry-run: comma-separated ranks whose model shards to build on the meta device and count",
    )
    return parser.parse_args(argv)


def dry_run(cfg, world_size: int, meta_ranks: str | None = None) -> dict:
    """Validate for world_size ranks and print the layout; no process group, no memory. With meta_ranks, build
    those ranks' model shards on the meta device and report their parameter counts next to the estimate's.
    Returns {rank: parameters} of the meta ranks."""
    from megagpt.estimate import gib, stage_estimate, stage_params

    validate(cfg, world_size)
    topology = Topology(cfg.parallel.tp, data_parallel_size(cfg, world_size), cfg.parallel.pp)
    print(
        f"dry run: the config is valid for {world_size} ranks: tp={topology.tp} dp={topology.dp} pp={topology.pp} "
        f"vpp={cfg.parallel.vpp}, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"precision {cfg.train.precision}, zero {cfg.parallel.zero}, recompute {cfg.parallel.recompute}"
    )
    p, micro = cfg.parallel, micro_batches_per_replica(cfg.train, topology.dp)
    print(
        f"pipeline schedule {resolve_schedule(p.pp_schedule, p.vpp)}: {micro} micro-batches per replica, predicted "
        f"bubble {predicted_bubble(p.pp_schedule, p.pp, p.vpp, micro):.1%}, up to "
        f"{max_alive_promised(p.pp, p.vpp, 0, micro, p.pp_schedule)} micro-batches' activations held on stage 0"
    )
    slower = slower_schedule_warning(p.pp_schedule, p.pp, p.vpp, micro)
    if slower:
        print(f"warning: {slower}")
    first = stage_estimate(cfg, world_size, 0)  # what each rank of the first stage stores, after the zero level
    print(
        f"stored per rank of stage 0 (tools/estimate.py has the rest): weights {gib(first.weights_bytes)}, "
        f"gradients {gib(first.grads_bytes)}, optimizer {gib(first.optimizer_bytes)}"
    )
    counts = {}
    for text in (meta_ranks or "").split(","):
        if not text.strip():
            continue
        try:
            rank = int(text)
        except ValueError:
            raise UserError(f"--meta-ranks {meta_ranks!r} must be comma-separated rank numbers") from None
        if not 0 <= rank < world_size:
            raise UserError(f"--meta-ranks: rank {rank} is outside the world of {world_size}")
        counts[rank] = meta_rank_params(cfg, topology, rank)
        tp_rank, dp_rank, stage = topology.coords(rank)
        expected = stage_params(cfg, topology.tp, topology.pp, cfg.parallel.vpp, stage)
        print(
            f"rank {rank} (tp {tp_rank}, dp {dp_rank}, stage {stage}): {counts[rank]:,} parameters built on the "
            f"meta device; the estimate says {expected:,}"
        )
    return counts


def meta_rank_params(cfg, topology: Topology, rank: int) -> int:
    """Parameters of one rank's model chunks, built on the meta device (no memory)."""
    from megagpt.model.build import build_model

    with torch.device("meta"):
        chunks = build_model(cfg, ParallelContext.planned(topology, rank))
    return sum(p.numel() for p in chunks.parameters())


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    try:
        if args.dry_run:
            if args.world_size is None or args.world_size < 1:
                raise UserError("--dry-run needs --world-size N (the number of ranks to plan for)")
            dry_run(load_config(args.config, args.overrides), args.world_size, args.meta_ranks)
            return None
        if args.meta_ranks is not None:
            raise UserError("--meta-ranks is for --dry-run")
        if args.world_size is not None:
            raise UserError("--world-size is for --dry-run; a real run takes its world size from the launcher")
        launch = discover_launch()
        setup_logging(launch.rank)
        cfg = load_config(args.config, args.overrides)
        validate(cfg, launch.world_size)
        device = resolve_device(cfg.train.device, launch.local_rank, launch.local_world_size, launch.source)
        if device.type == "cpu":
            set_cpu_threads(launch.local_world_size)
        topology = Topology(cfg.parallel.tp, data_parallel_size(cfg, launch.world_size), cfg.parallel.pp)
        if launch.world_size == 1:
            ctx = ParallelContext.single_process(device)
        else:
            timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
            launch.export_rendezvous()
            ctx = ParallelContext.initialize(topology, launch.rank, device, timeout)
        setup_logging(launch.rank, ctx.coords)
        get_logger().info(
            f"launched by {launch.source}: rank {launch.rank} of {launch.world_size}, "
            f"layout tp={topology.tp} dp={topology.dp} pp={topology.pp}"
        )

        from megagpt.train.run import pretrain  # after validation: heavy imports only for a valid run

        finished = False
        try:
            state = pretrain(cfg, ctx)
            finished = True
            return state
        finally:
            shutdown(ctx.world_group, finished)  # on every exit path: success, error, stop signal
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cli() -> None:
    """The command-line entry (launcher/pretrain.py, megagpt-pretrain). A native crash (a segfault, an abort in a
    C++ thread) prints every thread's Python stack, and torchrun reports a Python exception as the job's root
    cause rather than "error_file: <N/A>"."""
    faulthandler.enable(all_threads=True)
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
