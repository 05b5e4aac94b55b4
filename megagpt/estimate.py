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
                   Activation Recomputation in Large Transformer Models": their 34 s b h + 5 a s^2 b bytes (fp16) are
                   terms of the tensors saved for backward. Counted here in elements of the compute dtype for
                   megagpt's layers, with the same structure:
                     LayerNorm inputs                      2 s b h
                     attention: qkv input, q k v, output   5 s b h  (+1 s b h, the output's head-major copy)
                     attention probabilities               dense: none (Flash keeps none) unless attention dropout
                                                           on CPU falls back to the math path: a s^2 b (+ a mask);
                                                           local (blocked): a s W b, W = the window + one block of keys
                                                           (blocked_attention.key_window_rows)
                     MLP: fc input, GELU input and output  9 s b h
                     dropout masks                         2 s b h bytes (when dropout > 0)
                   Tensor parallelism divides the attention and MLP terms by t; sequence parallelism also the
                   LayerNorm and dropout terms. selective recomputation drops the attention core's terms (it keeps
                   q, k, v); full keeps only each layer's input (s b h, / t with sequence parallelism) and
                   recomputes one layer at a time in backward. The pipeline multiplies by the micro-batches a stage
                   holds (1F1B: up to pp on the first stage; interleaved: up to 2 (pp - 1) + (vpp - 1) pp + 1 chunks).
    output layer   the last stage's loss pass: its input and the input gradient (2 s b h), the fp32 gradient of the
                   embedding it computes in the forward (V h / t x 4), and one row block of fp32 logits
                   (1024 rows x V / t) or, in backward, the gradient's copy in the weight's dtype, whichever is larger.

FLOPs per step: 72 B s l h^2 (1 + s_eff / (6 h) + V / (12 l h)) (Narayanan et al. 2021: 24 B s h^2 + 4 B s^2 h
per layer forward, x3 with backward), where s_eff is the mean over layers of the keys each query is counted
against: s for a dense layer (the convention does not halve for causality) and the window for a local one.
Recomputation adds hardware FLOPs, not model FLOPs: selective the attention core's forward (4 B s keys h per
layer), full each layer's whole forward (24 B s h^2 + 4 B s keys h); the output layer is never recomputed.
Step time = model FLOPs / (GPUs x peak x MFU) x (1 + bubble): the stated MFU is the utilization while the
pipeline computes, and HFU = MFU x hardware / model FLOPs. Pipeline bubble: (pp - 1) / (vpp m), m = micro-batches
per step per replica.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megagpt.config import Config, data_parallel_size, max_positions, padded_vocab_size
from megagpt.model.blocked_attention import key_window_rows
from megagpt.model.facts import compute_dtype, layer_kinds, layer_parameters, layer_window, num_parameters
from megagpt.model.loss import ROW_BLOCK
from megagpt.parallel.pipeline import max_alive_promised, stage_layers, virtual_stage
from megagpt.train.schedules import total_train_samples

# Dense bf16 matmul peaks (TFLOP/s, no sparsity) of the GPUs the tool knows.
GPU_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}


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

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes


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
    """(elements of the compute dtype, bytes of masks) one layer keeps for backward per micro-batch."""
    m, p = cfg.model, cfg.parallel
    s, b, h, a = m.seq_length, micro_batch, m.hidden_size, m.num_heads
    sbh = s * b * h
    dropout = m.dropout > 0
    split_outside = tp if sp else 1  # LayerNorms and dropouts are split only under sequence parallelism
    if p.recompute == "full":
        return sbh / split_outside, 0.0
    layer_norms = 2 * sbh / split_outside
    mlp = 9 * sbh / tp
    masks = 2 * sbh / split_outside if dropout else 0.0
    if p.recompute == "selective":
        attention = 4 * sbh / tp  # the checkpoint keeps the layer's qkv input and q, k, v
    else:
        attention = 6 * sbh / tp
        if window is not None and window < s:
            keys = key_window_rows(window)
            attention += a * s * min(keys, s) * b / tp
            masks += a * s * min(keys, s) * b / tp if dropout else 0.0
        elif dropout and cfg.train.device == "cpu":
            attention += 2 * a * s * s * b / tp  # the math path keeps the probabilities, before and after dropout
            masks += a * s * s * b / tp
    return layer_norms + attention + mlp, masks


def stage_estimate(cfg: Config, world_size: int, stage: int, micro_batches: int | None = None) -> StageEstimate:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, vpp = p.tp, p.pp, p.vpp
    dp = data_parallel_size(cfg, world_size)
    dtype = compute_dtype(t.precision).itemsize  # bytes per element
    micro = t.micro_batch_size
    m_steps = micro_batches if micro_batches is not None else t.global_batch_size // (micro * dp)
    sp = p.sequence_parallel and tp > 1
    params = stage_params(cfg, tp, pp, vpp, stage)
    optimizer_per_param = 8 + (4 if t.precision != "fp32" else 0)
    optimizer = params * optimizer_per_param / (dp if p.zero == 1 else 1)

    per_layer = {}
    for chunk in range(vpp):
        for layer in stage_layers(m.num_layers, pp, vpp, stage, chunk):
            window = layer_window(m, layer)
            per_layer[layer] = layer_activation_elements(cfg, tp, sp, window, micro)
    held = max_alive_promised(pp, vpp, stage, m_steps)  # (chunk, micro-batch) activations alive at once
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
        weights_bytes=params * dtype,
        grads_bytes=params * 4,
        optimizer_bytes=int(optimizer),
        activations_bytes=activations,
        micro_batches_held=held,
    )


def _with_recompute(cfg: Config, recompute: str) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, recompute=recompute))


def attention_keys(cfg: Config) -> list[int]:
    """Per layer, the keys each query is counted against: s for a dense layer, the window for a local one."""
    m = cfg.model
    return [min(m.local_window, m.seq_length) if kind == "local" else m.seq_length for kind in layer_kinds(m)]


def model_flops_per_step(cfg: Config) -> float:
    m, b = cfg.model, cfg.train.global_batch_size
    s, h, layers, vocab = m.seq_length, m.hidden_size, m.num_layers, m.vocab_size
    s_eff = sum(attention_keys(cfg)) / layers
    return 72 * b * s * layers * h * h * (1 + s_eff / (6 * h) + vocab / (12 * layers * h))


def hardware_flops_per_step(cfg: Config) -> float:
    """Model FLOPs plus the forward work that activation recomputation repeats in the backward."""
    m, b = cfg.model, cfg.train.global_batch_size
    s, h = m.seq_length, m.hidden_size
    core_attention = sum(4 * b * s * keys * h for keys in attention_keys(cfg))  # q k^T and softmax(.) v, forward
    repeated = {
        "none": 0.0,
        "selective": core_attention,
        "full": 24 * b * s * h * h * m.num_layers + core_attention,
    }[cfg.parallel.recompute]
    return model_flops_per_step(cfg) + repeated


def estimate(cfg: Config, world_size: int, gpu: str = "h100", mfu: float = 0.4, tokens: float | None = None) -> dict:
    """Everything tools/estimate.py prints, as a dict."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = data_parallel_size(cfg, world_size)
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    stages = [stage_estimate(cfg, world_size, stage) for stage in range(p.pp)]
    fullest = max(stages, key=lambda st: st.total_bytes)
    flops, hardware_flops = model_flops_per_step(cfg), hardware_flops_per_step(cfg)
    peak = GPU_PEAK_TFLOPS[gpu] * 1e12
    step_seconds = flops / (world_size * peak * mfu)
    bubble = (p.pp - 1) / (p.vpp * micro_batches) if p.pp > 1 else 0.0
    step_seconds *= 1 + bubble
    tokens = tokens if tokens is not None else total_train_samples(t) * m.seq_length
    steps = tokens / (t.global_batch_size * m.seq_length)
    return {
        "layout": {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "dp": dp, "world_size": world_size, "zero": p.zero,
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
        "mfu": mfu,
        "hfu": mfu * hardware_flops / flops,
        "step_seconds": step_seconds,
        "tokens": tokens,
        "days": steps * step_seconds / 86400,
    }  # fmt: skip


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(result: dict) -> str:
    """The estimate as text."""
    lay, mem = result["layout"], result["memory_per_gpu_bytes"]
    lines = [
        f"layout: tp {lay['tp']} x pp {lay['pp']} (vpp {lay['vpp']}) x dp {lay['dp']} = {lay['world_size']} GPUs, "
        f"zero {lay['zero']}, sequence parallel {lay['sequence_parallel']}, recompute {lay['recompute']}",
        f"parameters: {result['params_total'] / 1e9:.3f}B with the padded vocabulary "
        f"({result['params_real_vocab'] / 1e9:.3f}B with the real one); per rank by stage: "
        + ", ".join(f"{n / 1e6:.1f}M" for n in result["params_per_rank_by_stage"]),
        f"memory per GPU (stage {mem['stage']}, the fullest): weights {gib(mem['weights_bytes'])}, gradients "
        f"{gib(mem['grads_bytes'])}, optimizer {gib(mem['optimizer_bytes'])}, activations "
        f"{gib(mem['activations_bytes'])} ({mem['micro_batches_held']} micro-batches held): "
        f"{gib(mem['total_bytes'])}",
        f"model FLOPs per step: {result['model_flops_per_step'] / 1e15:.2f} PFLOP (with recomputation "
        f"{result['hardware_flops_per_step'] / 1e15:.2f}); {result['micro_batches_per_step']} "
        f"micro-batches per replica; pipeline bubble {result['pipeline_bubble']:.1%}",
        f"at {result['mfu']:.0%} MFU ({result['hfu']:.1%} HFU) on {result['gpu']}: "
        f"{result['step_seconds']:.2f} s per step, "
        f"{result['days']:.1f} days for {result['tokens'] / 1e9:.0f}B tokens",
    ]
    return "\n".join(lines)
