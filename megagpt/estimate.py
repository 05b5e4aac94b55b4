"""What a config costs on a layout, computed, not run: parameters, memory per GPU, FLOPs, the pipeline bubble,
and the time a token budget takes at a given MFU (tools/estimate.py prints it).

Parameters: the model's tensors as megagpt builds them (the vocabulary padded for tp, the last pipeline stage's
copy of the tied embedding), per rank for each pipeline stage. They are the same numbers as building the rank's
shard on the meta device (launcher/pretrain.py --dry-run --meta-ranks) and the tests check that they are.

Memory per GPU, on the fullest rank (the first pipeline stage, or the last where the output layer dominates):
    weights        parameters x the compute dtype's bytes
    gradients      parameters x 4 (megagpt accumulates every gradient in fp32 buffers)
    optimizer      Adam's two fp32 moments (8 bytes a parameter), plus fp32 main weights when the model is not fp32
                   (4 more); ZeRO-1 divides them by dp
    activations    what backward keeps, per layer and micro-batch, after Korthikanti et al. (2022), "Reducing
                   Activation Recomputation in Large Transformer Models" (their 34 s b h + 5 a s^2 b bytes in fp16
                   are terms of the tensors saved for backward), counted for megagpt's layers and attention
                   backends in layer_activation_elements, whose terms a test measures at tp 1, 2, 4 with and
                   without sequence parallelism and for every recompute mode. The pipeline multiplies by the
                   micro-batches a stage holds (1F1B: up to pp on the first stage; interleaved: up to
                   2 (pp - 1) + (vpp - 1) pp + 1 chunks); full recomputation adds one layer's activations, rerun
                   in backward one layer at a time.
    output layer   the last stage's loss pass: its input and the input gradient (2 s b h), the fp32 gradient of the
                   embedding it computes in the forward (V h / t x 4), and one row block of fp32 logits
                   (1024 rows x V / t) or, in backward, the gradient's copy in the weight's dtype, whichever is larger.

FLOPs per step: 72 B s l h^2 (1 + s_eff / (6 h) + V / (12 l h)) (Narayanan et al. 2021: 24 B s h^2 + 4 B s^2 h
per layer forward, x3 with backward), where s_eff is the mean over layers of the keys each query is counted
against: s for a dense layer (the convention does not halve for causality) and the window for a local one.
Recomputation adds hardware FLOPs, not model FLOPs: selective the attention core's forward (4 B s keys h per
layer), full each layer's whole forward (24 B s h^2 + 4 B s keys h); the output layer is never recomputed.
Step time, two ways, by what the user knows:
- an assumed MFU (--mfu): model FLOPs / (GPUs x peak x MFU) x (1 + bubble). The MFU is the utilization while the
  pipeline computes, so the bubble comes on top; HFU = MFU x hardware / model FLOPs.
- a measured throughput (--tflops-per-gpu X, as Megatron logs and the papers report): FLOPs / (GPUs x X), with
  no bubble added, since a measured throughput already contains it. Its FLOP convention must be stated:
  "hardware" (the default; Narayanan et al. 2021's 140 TFLOP/s count the forward that recomputation repeats,
  their eq. (3)) or "model" (recomputation not counted).
Pipeline bubble (pipeline.predicted_bubble), m = micro-batches per step per replica: (pp - 1) / m for 1F1B,
(pp - 1) / (vpp m) interleaved, (pp - 1) / (3 m) for the zero-bubble zb-h1, and for zb-h2 the executor's rhythm
simulated (pipeline.simulated_bubble), where its warm-up forwards wait for their receives: above 1F1B's from
m = 2 pp on. Their activations: ZB-H1 holds up to pp micro-batches on every stage (1F1B's peak, on the first),
ZB-H2 up to 2 pp - 1 - r on stage r, each counted whole until its weight-gradient pass (an upper bound: after
the input-gradient pass only what the weight gradients need is left).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megagpt.config import Config, data_parallel_size, max_positions, padded_vocab_size
from megagpt.model.blocked_attention import default_block_size, key_window_rows
from megagpt.model.facts import compute_dtype, layer_kinds, layer_parameters, layer_window, num_parameters
from megagpt.model.loss import ROW_BLOCK
from megagpt.parallel.pipeline import (
    max_alive_promised,
    predicted_bubble,
    resolve_schedule,
    stage_layers,
    virtual_stage,
)
from megagpt.train.peaks import known_peak_tflops
from megagpt.train.schedules import micro_batches_per_replica, total_train_samples

# Dense bf16 matmul peaks (TFLOP/s, no sparsity) of the GPUs the tool knows: the training logs' table.
GPU_PEAK_TFLOPS = {gpu: known_peak_tflops(gpu, "bf16") for gpu in ("h100", "h200", "a100")}


@dataclass
class StageEstimate:
    stage: int
    layers: int
    params: int  # on one rank of this stage
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    micro_batches_held: int
    # zero 2 and 3: the full buffers that exist only while in use (gradient buckets, gathered layers)
    transient_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        stored = self.weights_bytes + self.grads_bytes + self.optimizer_bytes
        return stored + self.activations_bytes + self.transient_bytes


def stage_params(cfg: Config, tp: int, pp: int, vpp: int, stage: int) -> int:
    """Parameters of one rank of pipeline stage `stage` (all its model chunks)."""
    m, h = cfg.model, cfg.model.hidden_size
    total = 0
    for chunk in range(vpp):
        virtual = virtual_stage(pp, stage, chunk)
        total += len(stage_layers(m.num_layers, pp, vpp, stage, chunk)) * layer_parameters(m, tp)
        first, last = virtual == 0, virtual == pp * vpp - 1
        if first or last:
            total += padded_vocab_size(m, tp) // tp * h  # the token embedding, or the last stage's tied copy
        if first:
            total += max_positions(m) * h
        if last:
            total += 2 * h  # the final LayerNorm
    return total


def model_params(cfg: Config, tp: int = 1) -> int:
    """The whole model's parameters with the vocabulary padded for tp (the tied embedding once)."""
    return num_parameters(cfg.model, padded_vocab_size(cfg.model, tp))


def layer_activation_elements(
    cfg: Config, tp: int, sp: bool, window: int | None, micro_batch: int
) -> tuple[float, float]:
    """(elements of the compute dtype, bytes of masks) one layer keeps for backward per micro-batch.

    Calibrated against what one megagpt layer keeps alive between forward and backward, measured at tp 1, 2 and
    4, with and without sequence parallelism, for each recompute mode, dense and local, with and without dropout
    (tests/distributed/test_activation_memory.py). In units of s b h elements:

        replicated, or sequence-sharded (/t) under SP: the two LayerNorm inputs and the two column-parallel
            inputs (qkv's and fc's: each rank holds them whole without SP; under SP the column-parallel layer
            keeps its sequence shard and gathers it again in backward)                                  4
        split by tp (/t): q, k, v (views of the qkv output) and the attention output                      4
                          the GELU's input and output                                                  4 + 4
        the two residual dropouts' masks (dropout > 0), like the LayerNorm inputs: bool bytes on a GPU, the
            compute dtype on CPU                                                                           2
        the attention core, when not recomputed, by backend: Flash-like kernels (sdpa on a GPU, or on CPU
            without dropout; Flex for local layers on a GPU without dropout) keep nothing more; sdpa's math path
            (CPU with dropout) keeps the probabilities, the dropout mask and the dropped probabilities (3 a s^2 b);
            blocked local attention (CPU, or dropout on a GPU) keeps its own copies of q, k, v and output (+1
            s b h) and the band's probabilities, a S W b for W keys per query block (+ a bool keep mask with
            dropout)
    selective recomputation keeps none of the core's extra tensors; full keeps only the layer's input (/t with
    SP). With dropout and TP + SP on a GPU this is Korthikanti et al.'s 34 s b h / t bytes (fp16) for selective
    recomputation and 2 s b h / t for full.
    """
    m, p = cfg.model, cfg.parallel
    s, b, h, a = m.seq_length, micro_batch, m.hidden_size, m.num_heads
    sbh = s * b * h
    cpu = cfg.train.device == "cpu"  # planning (device auto) assumes GPUs
    dropout = m.dropout > 0
    outside = tp if sp else 1  # what tensor parallelism leaves whole is sequence-sharded only under SP
    if p.recompute == "full":
        return sbh / outside, 0.0
    elements = 4 * sbh / outside + 12 * sbh / tp
    masks = 0.0
    if dropout:
        if cpu:
            elements += 2 * sbh / outside
        else:
            masks += 2 * sbh / outside
    if p.recompute == "selective":
        return elements, masks
    local = window is not None and window < s
    if local and (cpu or dropout):  # the blocked kernel (on a GPU Flex serves local layers without dropout)
        block = default_block_size(window)
        keys = key_window_rows(window, block)  # W: the window rounded up to blocks, plus one block
        padded = -(-s // block) * block  # S: the sequence padded to whole blocks
        elements += sbh / tp + a * padded * keys * b / tp
        masks += a * padded * keys * b / tp if dropout else 0.0
    elif not local and cpu and dropout:  # sdpa's math path keeps the (b, a, s, s) tensors
        elements += 3 * a * s * s * b / tp
    return elements, masks


def layer_activation_bytes(cfg: Config, tp: int, sp: bool, window: int | None, micro_batch: int) -> float:
    """Bytes one layer keeps for backward per micro-batch (layer_activation_elements in the compute dtype)."""
    elements, masks = layer_activation_elements(cfg, tp, sp, window, micro_batch)
    return elements * compute_dtype(cfg.train.precision).itemsize + masks


def stage_estimate(cfg: Config, world_size: int, stage: int, micro_batches: int | None = None) -> StageEstimate:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, vpp = p.tp, p.pp, p.vpp
    dp = data_parallel_size(cfg, world_size)
    dtype = compute_dtype(t.precision).itemsize  # bytes per element
    micro = t.micro_batch_size
    m_steps = micro_batches if micro_batches is not None else micro_batches_per_replica(t, dp)
    sp = p.sequence_parallel and tp > 1
    params = stage_params(cfg, tp, pp, vpp, stage)
    optimizer_per_param = 8 + (4 if t.precision != "fp32" else 0)
    optimizer = params * optimizer_per_param / (dp if p.zero >= 1 else 1)
    weights, grads, transient = zero_bytes(cfg, dp, stage, params)

    per_layer = {}
    for chunk in range(vpp):
        for layer in stage_layers(m.num_layers, pp, vpp, stage, chunk):
            window = layer_window(m, layer)
            per_layer[layer] = layer_activation_elements(cfg, tp, sp, window, micro)
    # (chunk, micro-batch) activations alive at once; under a zero-bubble schedule counted whole until their W
    # (after B only the weight-gradient inputs remain), an upper bound
    held = max_alive_promised(pp, vpp, stage, m_steps, p.pp_schedule)
    chunks = vpp
    elements = sum(e for e, _ in per_layer.values()) / chunks * held
    mask_bytes = sum(k for _, k in per_layer.values()) / chunks * held
    layers_held = len(per_layer) / chunks * held
    s, h = m.seq_length, m.hidden_size
    sbh = s * micro * h
    if p.recompute == "full" and per_layer:  # one layer recomputed at a time in backward, all of its activations
        full_cfg = _with_recompute(cfg, "none")
        worst = max(layer_activation_elements(full_cfg, tp, sp, None, micro)[0], 1)
        elements += worst
    first = virtual_stage(pp, stage, 0) == 0
    last = any(virtual_stage(pp, stage, c) == pp * vpp - 1 for c in range(vpp))
    if first:
        elements += sbh / (tp if sp else 1)  # the embedding's output, kept by the first layer's LayerNorm / dropout
    if last:
        vocab = padded_vocab_size(m, tp) // tp
        elements += 2 * sbh  # the final LayerNorm's output (the loss input) and its gradient
        # The loss pass (model/loss.py) holds the fp32 embedding gradient it computes in the forward, and one
        # row block of fp32 logits; in backward the gradient is scaled into a copy of the weight's dtype instead.
        rows = min(ROW_BLOCK, s * micro)
        block_logits = rows * vocab * 4
        if dtype < 4:  # bf16 / fp16: the block's softmax cast for the matmuls, and the (V, h) product before adding
            block_logits += rows * vocab * dtype + vocab * h * dtype
        mask_bytes += vocab * h * 4 + max(block_logits, vocab * h * dtype)
    # Backward's own temporaries for one layer at a time: the attention probabilities' gradients where the math
    # path keeps probabilities (CPU with attention dropout, without recomputation); the recomputed attention
    # core of one layer under selective recomputation.
    math_path = m.dropout > 0 and t.device == "cpu"  # planning (device auto) assumes GPUs
    dense_layers = "dense" in layer_kinds(m)
    if math_path and dense_layers and p.recompute != "full":
        a = m.num_heads
        elements += 3 * a * s * s * micro / tp
    activations = int(elements * dtype + mask_bytes)
    return StageEstimate(
        stage=stage,
        layers=int(layers_held),
        params=params,
        weights_bytes=weights,
        grads_bytes=grads,
        optimizer_bytes=int(optimizer),
        activations_bytes=activations,
        micro_batches_held=held,
        transient_bytes=transient,
    )


def zero_bytes(cfg: Config, dp: int, stage: int, params: int) -> tuple[int, int, int]:
    """(weights, fp32 gradients, transient) bytes of one rank of a stage under parallel.zero. zero 2 keeps 1/dp
    of the gradients, zero 3 of the weights too (data_parallel.py); their full buffers exist only in use: zero 3
    the chunk's root (embeddings, final LayerNorm) and two layers (one computing, one prefetched), gradients in
    two buckets (slice) or all of them through the step (bucket)."""
    p, dtype = cfg.parallel, compute_dtype(cfg.train.precision).itemsize
    shard_grads, shard_params = p.zero >= 2 and dp > 1, p.zero >= 3 and dp > 1
    weights = params * dtype / (dp if shard_params else 1)
    grads = params * 4 / (dp if shard_grads else 1)
    transient = 0.0
    layers = sum(len(stage_layers(cfg.model.num_layers, p.pp, p.vpp, stage, c)) for c in range(p.vpp))
    layer = layer_parameters(cfg.model, p.tp)
    if shard_params:
        root = params - layers * layer
        transient += (root + 2 * layer) * dtype
    if shard_grads:
        unit = layer * 4 if shard_params else p.grad_bucket_mb * 2**20
        transient += params * 4 if p.zero_accumulate == "bucket" else min(2 * unit, params * 4)
    return int(weights), int(grads), int(transient)


def _with_recompute(cfg: Config, recompute: str) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, recompute=recompute))


def attention_keys(cfg: Config) -> list[int]:
    """Per layer, the keys each query is counted against: s for a dense layer, the window for a local one."""
    m = cfg.model
    return [min(m.local_window, m.seq_length) if kind == "local" else m.seq_length for kind in layer_kinds(m)]


def model_flops_per_step(cfg: Config, samples: int | None = None) -> float:
    """Model FLOPs of a step of `samples` sequences (default train.global_batch_size); the training logs' MFU
    uses this same count (train/metrics.py)."""
    m, b = cfg.model, samples if samples is not None else cfg.train.global_batch_size
    s, h, layers, vocab = m.seq_length, m.hidden_size, m.num_layers, m.vocab_size
    s_eff = sum(attention_keys(cfg)) / layers
    return 72 * b * s * layers * h * h * (1 + s_eff / (6 * h) + vocab / (12 * layers * h))


def hardware_flops_per_step(cfg: Config, samples: int | None = None) -> float:
    """Model FLOPs plus the forward work that activation recomputation repeats in the backward."""
    m, b = cfg.model, samples if samples is not None else cfg.train.global_batch_size
    s, h = m.seq_length, m.hidden_size
    core_attention = sum(4 * b * s * keys * h for keys in attention_keys(cfg))  # q k^T and softmax(.) v, forward
    repeated = {
        "none": 0.0,
        "selective": core_attention,
        "full": 24 * b * s * h * h * m.num_layers + core_attention,
    }[cfg.parallel.recompute]
    return model_flops_per_step(cfg, b) + repeated


def estimate(
    cfg: Config,
    world_size: int,
    gpu: str = "h100",
    mfu: float = 0.4,
    tokens: float | None = None,
    tflops_per_gpu: float | None = None,
    flops_convention: str = "hardware",
) -> dict:
    """Everything tools/estimate.py prints, as a dict. With tflops_per_gpu the step time comes from that measured
    throughput, counted in flops_convention ("hardware" or "model" FLOPs), instead of from the MFU."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = data_parallel_size(cfg, world_size)
    micro_batches = micro_batches_per_replica(t, dp)
    stages = [stage_estimate(cfg, world_size, stage) for stage in range(p.pp)]
    fullest = max(stages, key=lambda st: st.total_bytes)
    flops, hardware_flops = model_flops_per_step(cfg), hardware_flops_per_step(cfg)
    peak = GPU_PEAK_TFLOPS[gpu] * 1e12
    bubble = predicted_bubble(p.pp_schedule, p.pp, p.vpp, micro_batches)
    if tflops_per_gpu is None:
        step_seconds = flops / (world_size * peak * mfu) * (1 + bubble)
    else:
        if flops_convention not in ("hardware", "model"):
            raise ValueError(f"flops_convention={flops_convention!r}; use hardware or model")
        counted = hardware_flops if flops_convention == "hardware" else flops
        step_seconds = counted / (world_size * tflops_per_gpu * 1e12)  # the bubble is inside a measured rate
        mfu = flops / (step_seconds * world_size * peak)  # what that rate means on this GPU
    tokens = tokens if tokens is not None else total_train_samples(t) * m.seq_length
    steps = tokens / (t.global_batch_size * m.seq_length)
    return {
        "layout": {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "pp_schedule": resolve_schedule(p.pp_schedule, p.vpp),
                   "dp": dp, "world_size": world_size, "zero": p.zero,
                   "sequence_parallel": p.sequence_parallel, "recompute": p.recompute},
        "params_total": model_params(cfg, p.tp),
        "params_real_vocab": model_params(cfg, 1) - (padded_vocab_size(m, 1) - m.vocab_size) * m.hidden_size,
        "params_per_rank_by_stage": [st.params for st in stages],
        "params_per_pipeline_slice": sum(st.params for st in stages),
        "memory_per_gpu_bytes": asdict(fullest) | {"total_bytes": fullest.total_bytes},
        "memory_by_stage_bytes": [st.total_bytes for st in stages],
        "model_flops_per_step": flops,
        "hardware_flops_per_step": hardware_flops,
        "micro_batches_per_step": micro_batches,
        "pipeline_bubble": bubble,
        "gpu": gpu,
        "throughput": (
            {"tflops_per_gpu": tflops_per_gpu, "flops_convention": flops_convention} if tflops_per_gpu else None
        ),
        "mfu": mfu,
        "hfu": mfu * hardware_flops / flops,
        "step_seconds": step_seconds,
        "tokens": tokens,
        "days": steps * step_seconds / 86400,
    }  # fmt: skip


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _speed(result: dict) -> str:
    measured = result["throughput"]
    if measured is None:
        return f"at {result['mfu']:.0%} MFU ({result['hfu']:.1%} HFU) on {result['gpu']}: "
    return (
        f"at a measured {measured['tflops_per_gpu']:g} TFLOP/s per GPU ({measured['flops_convention']} FLOPs; "
        f"{result['mfu']:.1%} MFU on {result['gpu']}, bubble included): "
    )


def report(result: dict) -> str:
    """The estimate as text."""
    lay, mem = result["layout"], result["memory_per_gpu_bytes"]
    lines = [
        f"layout: tp {lay['tp']} x pp {lay['pp']} (vpp {lay['vpp']}, {lay['pp_schedule']}) x dp {lay['dp']} = "
        f"{lay['world_size']} GPUs, "
        f"zero {lay['zero']}, sequence parallel {lay['sequence_parallel']}, recompute {lay['recompute']}",
        f"parameters: {result['params_total'] / 1e9:.3f}B with the padded vocabulary "
        f"({result['params_real_vocab'] / 1e9:.3f}B with the real one); per rank by stage: "
        + ", ".join(f"{n / 1e6:.1f}M" for n in result["params_per_rank_by_stage"]),
        f"memory per GPU (stage {mem['stage']}, the fullest): weights {gib(mem['weights_bytes'])}, gradients "
        f"{gib(mem['grads_bytes'])}, optimizer {gib(mem['optimizer_bytes'])}, activations "
        f"{gib(mem['activations_bytes'])} ({mem['micro_batches_held']} micro-batches held)"
        + (
            f", zero {lay['zero']}'s transient full buffers {gib(mem['transient_bytes'])}"
            if mem["transient_bytes"]
            else ""
        )
        + ": "
        f"{gib(mem['total_bytes'])}",
        f"model FLOPs per step: {result['model_flops_per_step'] / 1e15:.2f} PFLOP (with recomputation "
        f"{result['hardware_flops_per_step'] / 1e15:.2f}); {result['micro_batches_per_step']} "
        f"micro-batches per replica; pipeline bubble {result['pipeline_bubble']:.1%}",
        _speed(result) + f"{result['step_seconds']:.2f} s per step, "
        f"{result['days']:.1f} days for {result['tokens'] / 1e9:.0f}B tokens",
    ]
    return "\n".join(lines)
