"""The model side of an evaluation, in one place: reading a source (through mtp_dist.sources,
the one reader of model sources, with its checks), its identity, and text continuations of
prompts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from mtp_dist.errors import UserError
from mtp_dist.inference.sampling import Sampling


class Model:
    """A source's model, loaded for generation with tensor-parallel size `tensor`; under
    torchrun the other factor of the world size is data parallelism (each group of `tensor`
    ranks holds the whole model). A context manager that ends the process group on exit."""

    def __init__(
        self, source_path, tokenizer: str | None, speculative: int | None, tensor: int = 1
    ):
        from mtp_dist import distributed, sources
        from mtp_dist.generate import check_speculative

        world = distributed.read_launch_env().world_size
        if tensor < 1 or world % tensor:
            raise UserError(
                f"--tensor {tensor} does not divide the {world} processes: give a divisor of "
                f"{world}"
            )
        self.source = sources.open_source(source_path)
        self.tensor = tensor
        self.cfg = self.source.config_at(self.tensor)
        self.k = check_speculative(speculative, self.cfg.model.n_future_tokens, self.source.path)
        self.tokenizer = sources.load_tokenizer(self.source, tokenizer)
        self.decoder = self.network = None

    @property
    def identity(self) -> dict:
        """What tells this model from another: the resolved source, its training step, a hash
        of its model config, and its tokenizer's identity."""
        model = json.dumps(self.source.config.to_dict()["model"], sort_keys=True)
        return {
            "source": str(self.source.path.resolve()),
            "step": self.source.step,
            "model_config_sha256": hashlib.sha256(model.encode()).hexdigest(),
            "tokenizer": self.tokenizer.identity_hash,
        }

    def __enter__(self) -> Model:
        from mtp_dist import distributed
        from mtp_dist.inference.decode import Decoder
        from mtp_dist.model.model import build_model

        self.dims = distributed.init(self.tensor, 1, seed=self.cfg.train.seed)
        try:
            model = build_model(self.cfg.model, tensor=self.dims.tp, device=self.dims.device)
            self.source.load_into(model)
        except BaseException:
            distributed.destroy()
            raise
        self.network = model.eval()
        self.decoder = Decoder(self.network, self.cfg.model.vocab_size)
        return self

    @property
    def vocab(self) -> int:
        """The tokenizer's vocabulary size (the unembedding's padding is never chosen)."""
        return self.cfg.model.vocab_size

    def __exit__(self, *exc) -> None:
        from mtp_dist import distributed

        distributed.destroy()

    @property
    def share(self) -> tuple[int, int]:
        """(this rank's data-parallel index, the number of data-parallel groups)."""
        return self.dims.dp_rank, self.dims.dp

    @property
    def checks(self) -> bool:
        """Whether this rank runs its group's completions (the first of its TP group)."""
        return self.dims.tp_rank == 0

    def gather(self, records: list[dict]) -> list[dict]:
        """Every rank's records, on every rank, in rank order."""
        import torch.distributed as dist

        if self.dims.world_size == 1:
            return records
        everyone = [None] * self.dims.world_size
        dist.all_gather_object(everyone, records)
        return [r for part in everyone for r in part]

    def encode(self, prompts: list[str]) -> list[list[int]]:
        from mtp_dist.generate import encode_prompts

        return encode_prompts(self.tokenizer, prompts, self.source)

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
