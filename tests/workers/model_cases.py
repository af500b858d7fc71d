"""Worker run under torchrun by tests/test_model_parallel.py.

For each case (layout, n, head mode, core attention, train.trainable) it builds the model at
that layout with the same full weights, runs one global batch through megatron-core's schedule
with several microbatches, averages gradients over data-parallel ranks, and rank 0 saves the
loss, per-head losses and every gradient as full tensors to OUT/<case name>.pt (zeros for a
frozen parameter's). Many cases per launch keep the suite fast.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from mtp_dist.compat import ignore_known_warnings  # noqa: E402

ignore_known_warnings()

from megatron.core import parallel_state  # noqa: E402

from mtp_dist import distributed  # noqa: E402
from mtp_dist.config import ModelConfig  # noqa: E402
from mtp_dist.model.model import build_model  # noqa: E402
from mtp_dist.model.weights import full_grads, full_state, init_weights  # noqa: E402
from mtp_dist.schedule import run_schedule  # noqa: E402

SEED = 7
GLOBAL_BATCH = 8
MICRO_BATCH = 2


def model_config(n: int, mode: str, attention: str = "sdpa") -> ModelConfig:
    return ModelConfig(
        attention=attention,
        n_future_tokens=n,
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=250,
        vocab_multiple=64,
        seq_length=16,
        head_backward=mode,
        head_loss_weights=[1.0, 0.5, 0.25, 2.0][:n] if n > 1 else None,
    )


def global_batch(cfg: ModelConfig, extra: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_length + extra), generator=gen)


def run_case(case: dict, out_dir: str) -> None:
    tp, pp, n, mode = case["tp"], case["pp"], case["n"], case["mode"]
    dims = distributed.init(tp, pp, seed=SEED)
    cfg = model_config(n, mode, case.get("attention", "sdpa"))
    model = build_model(cfg, tp, pp, dims.pp_rank)
    init_weights(model, SEED)
    model.set_trainable(case.get("trainable", "all"))
    tokens = global_batch(cfg, extra=case.get("extra", n))
    per_dp = GLOBAL_BATCH // dims.dp
    mine = tokens[dims.dp_rank * per_dp : (dims.dp_rank + 1) * per_dp]
    mbs = [{"tokens": t} for t in mine.split(MICRO_BATCH)]
    result = run_schedule(model, mbs, cfg.seq_length)

    dp_group = parallel_state.get_data_parallel_group()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=dp_group)
        p.grad /= dims.dp
    grads = full_grads(model)
    weights = full_state(model)
    numbers = [layer.layer_number for layer in model.trunk.layers]
    if dims.is_last_stage:
        numbers += [layer.layer_number for layer in model.heads.layers]
    per_stage = [None] * pp
    dist.all_gather_object(
        per_stage, numbers, group=parallel_state.get_pipeline_model_parallel_group()
    )

    # Losses live on the last stage; bring the DP mean to rank 0.
    stats = torch.zeros(1 + n)
    if dims.is_last_stage and dims.tp_rank == 0:
        stats = torch.tensor([result.loss, *result.head_losses])
    dist.all_reduce(stats)
    stats /= dims.dp
    if dims.rank == 0:
        payload = {
            "loss": stats[0].item(),
            "head_losses": stats[1:].tolist(),
            "grads": grads,
            "layer_numbers": per_stage,
        }
        if case.get("save_weights"):
            payload["weights"] = weights
        torch.save(payload, os.path.join(out_dir, case["name"] + ".pt"))
    dist.barrier()


def run_gpt_reference(case: dict, out_dir: str) -> None:
    """n=1 MTP model vs a plain megatron-core GPTModel with num_layers+1 layers and the same
    weights (trunk layers, then the head's layer, then the final norm and output layer)."""
    from megatron.core.models.gpt import GPTModel

    from mtp_dist.model.spec import layer_spec, transformer_config

    distributed.init(1, 1, seed=SEED)
    cfg = model_config(1, "sequential")
    mtp = build_model(cfg)
    init_weights(mtp, SEED)
    state = full_state(mtp)
    L = cfg.num_layers
    gpt_cfg = transformer_config(cfg.__class__(**{**cfg.__dict__, "num_layers": L + 1}))
    gpt = GPTModel(
        gpt_cfg,
        layer_spec(),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.seq_length,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    mapping = {}
    for k in state:
        g = k.replace("trunk.", "decoder.")
        g = g.replace("heads.layers.0.", f"decoder.layers.{L}.")
        g = g.replace("heads.final_norm.", "decoder.final_layernorm.")
        mapping[k] = g
    gpt_params = dict(gpt.named_parameters())
    assert sorted(mapping.values()) == sorted(gpt_params), "parameter sets differ"
    with torch.no_grad():
        for k, g in mapping.items():
            gpt_params[g].copy_(state[k])
    tokens = global_batch(cfg, extra=1)
    s = cfg.seq_length
    out = gpt(
        tokens[:, :s],
        position_ids=None,
        attention_mask=torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s),
        labels=tokens[:, 1 : s + 1],
    )
    loss = out.float().mean()
    loss.backward()
    grads = {k: gpt_params[g].grad for k, g in mapping.items()}
    torch.save({"loss": loss.item(), "grads": grads}, os.path.join(out_dir, case["name"] + ".pt"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="JSON list of cases")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    for case in json.loads(args.cases):
        if case.get("kind") == "gpt":
            run_gpt_reference(case, args.out)
        else:
            run_case(case, args.out)
    distributed.destroy()


if __name__ == "__main__":
    main()
