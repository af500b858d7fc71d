"""lm-evaluation-harness (optional: not a dependency, not in requirements.lock) on an
`export --format hf` directory, offline, on a small local multiple-choice task: every
log-likelihood it reports is our head 1's, on the same tokens (about a minute on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_hf import (
    CONFIGS,
    head1_logits,
    our_model,
    tokenizer,  # noqa: F401 (a fixture: the sentencepiece tokenizer)
)

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install lm-eval")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate")

ROWS = [
    {"question": "def f(x):\n    return", "choices": ["x", ")"], "answer": 0},
    {"question": "import", "choices": ["os", "="], "answer": 0},
    {"question": "class A", "choices": [":", "(", "self"], "answer": 1},
]


def test_lm_eval_reads_head_1_of_an_hf_export(megatron_1proc, tmp_path, tokenizer):  # noqa: F811
    from mtp_dist.model import hf
    from mtp_dist.model.weights import full_state

    m = CONFIGS["n3_gqa_untied"]
    model = our_model(m, seed=5)
    out = hf.write_dir(tmp_path / "hf", full_state(model), m, tokenizer, {"n": 0})
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tasks / "tiny.yaml").write_text(
        "task: mtp_tiny_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'tiny.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    )
    # One process of its own: not the launcher variables this test process exports (accelerate
    # would start torch.distributed from them).
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    alone = {k: v for k, v in os.environ.items() if k not in launch}
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [
            sys.executable, "-m", "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={out},dtype=float32", "--tasks", "mtp_tiny_choice",
            "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
            "--output_path", str(tmp_path / "results"), "--log_samples",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**alone, **offline, "HF_HOME": str(tmp_path / "hf-home")},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (samples,) = (tmp_path / "results").rglob("samples_mtp_tiny_choice_*.jsonl")
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == len(ROWS)
    correct = 0
    for r in records:
        ours = []
        for args in r["arguments"].values():
            context, continuation = args["arg_0"], args["arg_1"]
            # lm-eval's split: the continuation's tokens are those after the context's.
            whole = tokenizer.encode_batch([context + continuation])[0].tolist()
            start = len(tokenizer.encode_batch([context])[0])
            logits = head1_logits(model, torch.tensor([whole[:-1]]), m.vocab_size)[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            ours.append(sum(float(logp[t - 1, whole[t]]) for t in range(start, len(whole))))
        theirs = [float(ll) for ll, _ in r["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3), r["doc"]
        correct += int(max(range(len(ours)), key=ours.__getitem__) == r["doc"]["answer"])
    (result,) = (tmp_path / "results").rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["mtp_tiny_choice"]["acc,none"]
    assert acc == pytest.approx(correct / len(ROWS))
