"""Memory per rank, term by term, each with the formula it uses.

Notation: P parameters on the rank (its pipeline stage's share on one tensor-parallel rank),
N the data-parallel size, B bytes per activation element (2 in bf16, 4 in fp32), s sequence
length, b micro batch, h hidden, f SwiGLU width, a attention heads, t tensor-parallel size,
V padded vocabulary.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", the sbh(34 + 5as/h) per layer without parallelism), adapted to what this
model's layer saves for backward: RMSNorm instead of LayerNorm (computed in fp32), SwiGLU
instead of a 4h GeLU, no dropout, rotary positions, grouped-query attention (megatron-core's
local attention expands K and V to all heads before the matmuls), no sequence parallelism.
The core attention (model.attention) decides the one term that grows with s^2: megatron-core's
unfused local attention (`megatron`) stores the softmax probabilities, and its scores matmul
writes into a reused s x s buffer; `sdpa` (a fused flash / memory-efficient kernel) keeps only
its output, which is the context the output projection keeps anyway, and the softmax's fp32
log-sum-exp per query and head. Each coefficient was read off the tensors autograd saves for
one layer, for both settings (`benchmarks/plan_memory.py` measures the sum against the real
peak).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_dist.config import ModelConfig

GiB = 2**30


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    formula: str


def model_states(
    params: int,
    dp: int,
    engine: str,
    zero_stage: int,
    bf16: bool,
    largest_layer: int = 0,
) -> list[Term]:
    """Weights, gradients and optimizer state (AdamW) of one rank holding `params` parameters.

    megatron: megatron-core's DDP with fp32 gradient buffers (grad_reduce_in_fp32) and its
    distributed optimizer (fp32 main weights and both Adam moments sharded over N; in fp32
    training the main weights are the weights themselves).
    deepspeed: ZeRO's accounting as in DeepSpeed's estimate_zero2/3_model_states_mem_needs
    (16-bit weights and gradients, fp32 gradient partition, fp32 master weights and Adam
    moments), where ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also
    the weights (plus the largest module's gathered weights and gradients).
    """
    p, n = params, dp
    w = 2 if bf16 else 4
    if engine == "megatron":
        master = 12 if bf16 else 8
        return [
            Term("weights", w * p, f"{w} P"),
            Term("gradients", 4 * p, "4 P (fp32 gradient buffer)"),
            Term(
                "optimizer",
                master * p / n,
                f"{master} P / N ({'fp32 main weights 4 + ' if bf16 else ''}Adam moments 8)",
            ),
        ]
    if zero_stage == 1:
        grads = Term("gradients", w * p + 4 * p / n, f"{w} P + 4 P / N (fp32 partition)")
    else:
        grads = Term("gradients", (w + 4) * p / n, f"({w} + 4) P / N")
    weights = Term("weights", w * p, f"{w} P")
    if zero_stage == 3:
        weights = Term(
            "weights", w * p / n + w * largest_layer, f"{w} P / N + {w} x largest module (gathered)"
        )
        grads = Term(
            "gradients",
            (w + 4) * p / n + w * largest_layer,
            f"({w} + 4) P / N + {w} x largest module",
        )
    optimizer = Term("optimizer", 12 * p / n, "12 P / N (fp32 master 4 + Adam moments 8)")
    return [weights, grads, optimizer]


def layer_activations(m: ModelConfig, tensor: int, micro_batch: int, bf16: bool) -> float:
    """Bytes one transformer layer saves for backward, one microbatch, on one TP rank."""
    s, b, h, f, a = m.seq_length, micro_batch, m.hidden_size, m.ffn_size, m.num_attention_heads
    t, B = tensor, 2 if bf16 else 4
    groups = m.num_query_groups or a
    hn = h // a
    kv = groups * hn
    sbh = s * b * h
    norms = 2 * (8 + B) * sbh + 2 * 4 * s * b  # fp32 input and normalized, output, 1/rms
    if m.attention == "megatron" and groups < a:  # q, and k, v expanded to every head
        qkv = 3 * B * sbh / t
    else:  # q, k after rotary; v is a view of the qkv output, which it keeps alive
        qkv = B * (sbh + s * b * kv + s * b * (h + 2 * kv)) / t
    context = B * sbh / t
    rotary = 4 * B * s * hn  # cos and sin for q and k
    if m.attention == "megatron":
        scores = (4 + (2 if bf16 else 0)) * a * s * s * b / t  # fp32 softmax (+ its bf16 copy)
    else:
        scores = 4 * a * s * b / t  # the fp32 log-sum-exp; the kernel's output is `context`
    mlp = 5 * B * s * b * f / t  # fc1 output (2f), silu, gate, product
    return norms + qkv + context + rotary + scores + mlp


def layer_activations_formula(bf16: bool, attention: str = "sdpa") -> str:
    B = 2 if bf16 else 4
    if attention == "megatron":
        qkv, scores = "[3 or 2+(h+2kv)/h]", f"{6 if bf16 else 4} a s^2 b/t"
    else:
        qkv, scores = "[1+kv/h+(h+2kv)/h]", "4 a s b/t"
    return f"per layer 2(8+{B}) sbh + {B}{qkv} sbh/t + {B} sbh/t + {scores} + {5 * B} sbf/t"


def logits_bytes(m: ModelConfig, tensor: int, micro_batch: int, bf16: bool, heads: int) -> float:
    """One head's logits working set is one fp32 s x b x V/t tensor (the cross-entropy
    turns the logits into the softmax in place and saves it), plus the bf16 logits it was
    cast from; `heads` of them alive at once (joint mode keeps every head's softmax)."""
    svt = m.seq_length * micro_batch * m.padded_vocab_size / tensor
    return 4 * svt * heads + (2 * svt if bf16 else 0)


@dataclass(frozen=True)
class StageMemory:
    stage: int
    in_flight: int
    """Microbatches whose activations the stage holds at its peak under 1F1B."""
    terms: list[Term]

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)


def stage_memory(
    m: ModelConfig,
    *,
    stage: int,
    pipeline: int,
    trunk_layers: int,
    params: int,
    tensor: int,
    dp: int,
    micro_batch: int,
    num_microbatches: int,
    recompute: bool,
    bf16: bool,
    engine: str,
    zero_stage: int,
    largest_layer: int,
    last: bool,
) -> StageMemory:
    """Every memory term of one rank of pipeline stage `stage`."""
    B = 2 if bf16 else 4
    sbh = m.seq_length * micro_batch * m.hidden_size
    layer = layer_activations(m, tensor, micro_batch, bf16)
    in_flight = min(pipeline - stage, num_microbatches)
    terms = model_states(params, dp, engine, zero_stage, bf16, largest_layer)
    if m.attention == "megatron":
        terms.append(
            Term(
                "attention buffer",
                B * m.num_attention_heads * m.seq_length**2 * micro_batch / tensor,
                f"{B} a s^2 b/t (megatron-core's reused buffer for the scores matmul)",
            )
        )
    n = m.n_future_tokens
    head = layer + (8 + B) * sbh  # a head's layer and the shared final norm
    sequential_last = last and m.head_backward == "sequential"
    head_transient = head + logits_bytes(m, tensor, micro_batch, bf16, 1)
    if recompute:
        # The recomputed layer lives in the backward pass; sequential heads free their own
        # transient in the forward pass, so only what exceeds it adds to the peak.
        again = max(0.0, layer - head_transient) if sequential_last else layer
        terms.append(
            Term(
                "activations",
                in_flight * trunk_layers * B * sbh + again,
                f"{in_flight} microbatches x {trunk_layers} layers x {B} sbh (each layer's "
                "input) + one layer recomputed"
                + (" (within the heads' transient)" if sequential_last else ""),
            )
        )
    else:
        terms.append(
            Term(
                "activations",
                in_flight * trunk_layers * layer,
                f"{in_flight} microbatches x {trunk_layers} layers x "
                + layer_activations_formula(bf16, m.attention),
            )
        )
    if last:
        if sequential_last:
            terms.append(
                Term(
                    "heads",
                    head + B * sbh,
                    "one head at a time: one layer + final norm, and the trunk output's "
                    f"gradient {B} sbh",
                )
            )
            terms.append(
                Term(
                    "logits",
                    logits_bytes(m, tensor, micro_batch, bf16, 1),
                    "one head's: 4 s b V/t (fp32 softmax)" + (" + 2 s b V/t" if bf16 else ""),
                )
            )
        else:
            terms.append(Term("heads", n * head, f"{n} heads in one graph: {n} x (layer + norm)"))
            terms.append(
                Term(
                    "logits",
                    logits_bytes(m, tensor, micro_batch, bf16, n),
                    f"all {n} heads': {n} x 4 s b V/t" + (" + 2 s b V/t" if bf16 else ""),
                )
            )
    return StageMemory(stage, in_flight, terms)
