"""PNG figures of runs: their metrics.jsonl curves (one run or several overlaid) and a profiled step's pipeline.

    runs = [read_run("runs/a"), read_run("runs/b", label="bf16")]
    plot_metrics(runs, "compare.png")                 # a panel per metric any run logged
    plot_timeline(read_timeline("runs/a"), "timeline.png", topology)

Every panel's x axis is tokens (consumed_tokens, or consumed_samples x model.seq_length from the run's
config.yaml): with batch ramp-up steps are unequal, and runs of other batch sizes compare by tokens. A run that
gives neither falls back to steps for the whole figure. matplotlib (`pip install megagpt[plot]`) is imported only
when drawing, with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from megagpt.errors import UserError
from megagpt.parallel.topology import Topology
from megagpt.timeline import Timeline


@dataclass(frozen=True)
class Panel:
    name: str  # what --panels selects
    title: str
    series: tuple[tuple[str, str], ...]  # (metrics.jsonl field, its name in the legend)
    log_y: bool = False


# Drawn in this order, each only when some run logged one of its fields.
PANELS = (
    Panel("loss", "loss (nats/token)", (("loss", "train"), ("val_loss", "validation"))),
    Panel("lr", "learning rate", (("lr", "lr"),)),
    Panel("throughput", "tokens/s (all devices)", (("tokens_per_s", "tokens/s"),)),
    Panel("per_device", "tokens/s per device", (("tokens_per_s_per_device", "tokens/s per device"),)),
    Panel("tflops", "TFLOP/s per device", (("tflops_per_device", "TFLOP/s"),)),
    Panel("mfu", "MFU, HFU (%)", (("mfu", "MFU"), ("hfu", "HFU"))),
    Panel("step_time", "step time (ms)", (("step_time_ms", "step time"),)),
    Panel("grad_norm", "gradient norm (before clipping)", (("grad_norm", "grad norm"),)),
    Panel("loss_scale", "fp16 loss scale", (("loss_scale", "loss scale"),), log_y=True),
)
PANEL_NAMES = tuple(panel.name for panel in PANELS)
PERCENT_FIELDS = ("mfu", "hfu")  # logged as fractions, drawn in percent


@dataclass
class Run:
    label: str
    rows: list[dict]
    seq_length: int | None  # from the run's config.yaml, to count tokens when rows lack consumed_tokens

    def tokens(self, row: dict) -> float | None:
        if row.get("consumed_tokens") is not None:
            return row["consumed_tokens"]
        if row.get("consumed_samples") is not None and self.seq_length:
            return row["consumed_samples"] * self.seq_length
        return None


def read_run(folder: str | Path, label: str | None = None) -> Run:
    """A run folder's logged rows (metrics.jsonl) and sequence length (config.yaml, when it is there)."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{folder} holds no metrics.jsonl; pass the logging.dir of a run")
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed run
    rows = [row for row in rows if isinstance(row, dict) and "step" in row]
    if not rows:
        raise UserError(f"{metrics} has no logged step yet; plot it after the first logged row")
    config = folder / "config.yaml"
    seq_length = None
    if config.is_file():
        seq_length = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("seq_length")
    return Run(label or folder.name, rows, seq_length)


def run_topology(folder: str | Path, world_size: int | None) -> Topology | None:
    """The (tp, dp, pp) layout of the run a traces folder belongs to, from its config.yaml and the traces' world
    size (None without them)."""
    folder = Path(folder)
    config = (folder.parent if folder.name == "traces" else folder) / "config.yaml"
    if not config.is_file() or not world_size:
        return None
    parallel = (yaml.safe_load(config.read_text()) or {}).get("parallel") or {}
    tp, pp = int(parallel.get("tp", 1)), int(parallel.get("pp", 1))
    return Topology(tp, world_size // (tp * pp), pp) if world_size % (tp * pp) == 0 else None


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "drawing needs matplotlib, which is not installed; run `pip install 'megagpt[plot]'` (or `pip install "
            "matplotlib`)"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(runs: list[Run], out: str | Path, panels: tuple[str, ...] = PANEL_NAMES) -> Path:
    """One figure, a panel per metric in `panels` that some run logged, every run overlaid in its own colour."""
    chosen = [
        p for p in PANELS if p.name in panels and any(f in r for run in runs for r in run.rows for f, _ in p.series)
    ]
    if not chosen:
        raise UserError(f"the runs logged none of the metrics of the panels {list(panels)}")
    by_tokens = all(run.tokens(run.rows[0]) is not None for run in runs)
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter

    columns = min(len(chosen), 2)
    rows = -(-len(chosen) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, chosen):
        for i, run in enumerate(runs):
            for (name, legend), style in zip(panel.series, ("-", "--")):
                label = legend if len(runs) == 1 else f"{run.label}: {legend}"
                _draw_series(ax, run, name, style, colors[i % len(colors)], label, by_tokens)
        ax.set_title(panel.title)
        ax.set_xlabel("tokens" if by_tokens else "step")
        if by_tokens:
            ax.xaxis.set_major_formatter(EngFormatter())  # 400k, 3M, 300G
        if panel.log_y:
            ax.set_yscale("log", base=2)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in axes.flat[len(chosen) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, out, plt)


def _draw_series(ax, run: Run, name: str, style: str, color: str, label: str, by_tokens: bool) -> None:
    points = [
        (run.tokens(row) if by_tokens else row["step"], row[name]) for row in run.rows if row.get(name) is not None
    ]
    if not points:
        return
    xs, ys = zip(*points)
    if name in PERCENT_FIELDS and max(ys) <= 1.0:
        ys = [100 * y for y in ys]
    marker = "o" if len(points) < 30 or style == "--" else None
    ax.plot(xs, ys, linestyle=style, color=color, marker=marker, markersize=3, label=label)


def _save(fig, out: str | Path, plt) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# Colour maps per action kind; the shade within one tells the chunk apart.
_KIND_COLORS = {"F": "Blues", "B": "Greens"}
_OTHER_COLORS = ("Oranges", "Purples", "Reds", "Greys")


def plot_timeline(timeline: Timeline, out: str | Path, topology: Topology | None = None) -> Path:
    """One row per rank, a block per forward and backward (coloured by kind and chunk, labelled with the
    micro-batch), white where the rank waited: the measured pipeline of one step."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    kinds = sorted({b.kind for row in timeline.rows for b in row.blocks}, key=lambda k: ({"F": 0, "B": 1}.get(k, 2), k))
    chunks = sorted({b.chunk for row in timeline.rows for b in row.blocks}) or [0]
    others = iter(_OTHER_COLORS)
    maps = {kind: plt.get_cmap(_KIND_COLORS.get(kind) or next(others, "Greys")) for kind in kinds}

    def color(kind: str, chunk: int):
        return maps[kind](0.45 + 0.35 * chunks.index(chunk) / max(len(chunks) - 1, 1))

    end = max(row.step_end_ms for row in timeline.rows)
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(timeline.rows) + 1.6))
    for y, row in enumerate(timeline.rows):
        ax.barh(y, row.step_end_ms - row.step_start_ms, left=row.step_start_ms, height=0.9, color="#f4f4f4")
        for block in row.blocks:
            width = block.end_ms - block.start_ms
            ax.barh(y, width, left=block.start_ms, height=0.8, color=color(block.kind, block.chunk), edgecolor="white")
            if width > end / 80:
                text = str(block.micro_batch) if len(chunks) == 1 else f"{block.micro_batch}.{block.chunk}"
                ax.text(block.start_ms + width / 2, y, text, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(timeline.rows)), [_row_label(row, topology) for row in timeline.rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began")
    ax.set_xlim(0, end)
    names = {"F": "forward", "B": "backward"}
    handles = [
        Patch(
            color=color(kind, chunk), label=f"{names.get(kind, kind)}" + (f", chunk {chunk}" if len(chunks) > 1 else "")
        )
        for kind in kinds
        for chunk in chunks
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(handles), 6), fontsize=8)
    clocks = (
        "one host's clock" if not timeline.hosts_aligned else f"{timeline.hosts_aligned + 1} hosts aligned at step end"
    )
    ax.set_title(
        f"pipeline timeline of step {timeline.step} (block label: micro-batch"
        + ("" if len(chunks) == 1 else ".chunk")
        + f"; grey: idle, exchanges, optimizer; {clocks})",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, out, plt)


def _row_label(row, topology: Topology | None) -> str:
    where = f"rank {row.rank}"
    if topology is not None and row.rank < topology.world_size:
        tp, dp, pp = topology.coords(row.rank)
        where += f" (pp {pp}, tp {tp}, dp {dp})"
    return f"{where}\nidle {100 * row.idle_fraction:.0f}%"
