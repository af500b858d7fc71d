"""The model side of an evaluation, in one place: reading a source, its identity, and text
continuations of prompts. It reads models through inference/load.py for now; when sources.py
(the one reader of model sources) lands, only this file changes."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

from mtp_dist.inference.sampling import Sampling


class Model:
    """A source's model, loaded for generation at this process group's TP size (WORLD_SIZE, as
    `generate` does); a context manager that ends the process group on exit."""

    def __init__(self, source_path, tokenizer: str | None, speculative: int | None):
        from mtp_dist.generate import check_speculative
        from mtp_dist.inference import load

        self.source = load.read_source(source_path)
        self.tensor = int(os.environ.get("WORLD_SIZE", "1"))
        self.cfg = load.model_config(self.source, self.tensor)
        self.k = check_speculative(speculative, self.cfg.model.n_future_tokens, self.source.path)
        self.tokenizer = load.load_tokenizer(self.source, self.cfg, tokenizer)
        self.decoder = None

    @property
    def identity(self) -> dict:
        """What tells this model from another: the resolved source, its training step, a hash
        of its model config, and its tokenizer's identity."""
        model = json.dumps(self.source.config.get("model", {}), sort_keys=True)
        return {
            "source": str(self.source.path.resolve()),
            "step": self.source.step,
            "model_config_sha256": hashlib.sha256(model.encode()).hexdigest(),
            "tokenizer": self.tokenizer.identity_hash,
        }

    def __enter__(self) -> Model:
        from mtp_dist import distributed
        from mtp_dist.inference import load
        from mtp_dist.inference.decode import Decoder

        self.dims = distributed.init(self.tensor, 1, seed=self.cfg.train.seed)
        try:
            model = load.load_model(self.source, self.cfg, self.dims)
        except BaseException:
            distributed.destroy()
            raise
        self.decoder = Decoder(model, self.cfg.model.vocab_size)
        return self

    def __exit__(self, *exc) -> None:
        from mtp_dist import distributed

        distributed.destroy()

    @property
    def is_main(self) -> bool:
        return self.dims.rank == 0

    def encode(self, prompts: list[str]) -> list[list[int]]:
        from mtp_dist.generate import encode_prompts

        return encode_prompts(self.tokenizer, prompts, self.cfg.model.seq_length)

    def continuations(
        self, prompts: list[list[int]], samples: list[int], max_new_tokens: int, s: Sampling
    ) -> tuple[list[str], list]:
        """Each (encoded prompt, sample index)'s continuation as text (decoded with the prompt,
        then cut: a tokenizer may join pieces across the boundary), and the Generations."""
        eos = self.tokenizer.eod_id
        results = self.decoder.generate(
            prompts, max_new_tokens, k=self.k, eos_id=eos, sampling=s, samples=samples
        )
        texts = []
        for ids, r in zip(prompts, results, strict=True):
            prefix = self.tokenizer.decode(ids)
            texts.append(self.tokenizer.decode(ids + r.tokens)[len(prefix) :])
        return texts, results


def settings_of(s: Sampling, **more) -> dict:
    """The sampling settings as recorded with an evaluation's samples."""
    if not s.temperature:
        s = Sampling(0.0, 0, 1.0, s.seed)  # greedy: top-k, top-p change nothing
    return {**asdict(s), **more}
