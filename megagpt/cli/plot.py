"""PNG figures of training runs: their curves, one run or several overlaid, and a profiled step's pipeline.

    python tools/plot.py runs/a                                  # runs/a/metrics.png: every metric it logged
    python tools/plot.py runs/fp32 runs/bf16 --out cmp.png       # several runs overlaid, one colour each
    python tools/plot.py runs/a --panels loss --out loss.png     # only some panels (names below)
    python tools/plot.py --timeline runs/a [--step 7]            # runs/a/timeline.png from logging.profile's traces

Curves come from each run's metrics.jsonl, against tokens: loss and validation loss, learning rate, throughput,
TFLOP/s and MFU / HFU per device and step time (when the run logged them), gradient norm, the fp16 loss scale.
The timeline draws one row per rank, a block per forward and backward of each micro-batch and chunk, from the
times the profiler measured (train with logging.profile=5-7, say). Needs matplotlib: pip install 'megagpt[plot]'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megagpt.cli import reports_user_errors
from megagpt.errors import UserError


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders (logging.dir), each holding metrics.jsonl")
    parser.add_argument("--labels", nargs="+", help="a legend label per run (default: the folders' names)")
    parser.add_argument("--panels", help="comma-separated panels to draw (default: every one some run logged)")
    parser.add_argument("--timeline", metavar="RUN", help="draw the pipeline of a profiled run (or its traces/)")
    parser.add_argument("--step", type=int, help="with --timeline: the profiled step (default: the last)")
    parser.add_argument("--out", help="the PNG to write (default: metrics.png or timeline.png in the first run)")
    args = parser.parse_args(argv)

    from megagpt import plots  # after parsing: --help answers without importing the library

    if args.timeline:
        if args.runs:
            raise UserError("give either run folders to plot their curves or --timeline RUN, not both")
        return _timeline(args, plots)
    if not args.runs:
        raise UserError("name at least one run folder (logging.dir), or --timeline RUN")
    if args.labels and len(args.labels) != len(args.runs):
        raise UserError(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs; give one per run")
    panels = tuple(p.strip() for p in args.panels.split(",")) if args.panels else plots.PANEL_NAMES
    unknown = sorted(set(panels) - set(plots.PANEL_NAMES))
    if unknown:
        raise UserError(f"--panels names unknown panels {unknown}; choose from {', '.join(plots.PANEL_NAMES)}")
    runs = [plots.read_run(run, label) for run, label in zip(args.runs, args.labels or [None] * len(args.runs))]
    out = plots.plot_metrics(runs, args.out or Path(args.runs[0]) / "metrics.png", panels)
    print(f"wrote {out}")
    return 0


def _timeline(args, plots) -> int:
    from megagpt.timeline import read_timeline

    timeline = read_timeline(args.timeline, args.step)
    folder = Path(args.timeline)
    run = folder.parent if folder.name == "traces" else folder
    topology = plots.run_topology(run, timeline.world_size)
    out = plots.plot_timeline(timeline, args.out or run / "timeline.png", topology)
    print(f"wrote {out}")
    return 0
