"""One small tokenizer interface shared by data preparation, training and inference.

Two kinds exist: a sentencepiece model (BPE with byte fallback, as Llama's) and a byte-level
tokenizer (256 byte ids + specials) for the paper's byte models. Both expose the same
attributes, and an `identity` dict that manifests record so that training can refuse shards
made with another tokenizer.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from mtp_dist.errors import UserError
from mtp_dist.files import atomic_write, tmp_name

BYTE_TOKENIZER_NAME = "byte"

# Special ids of the sentencepiece models trained here. pad has its own id so that padding can
# never be confused with an end-of-document token in a loss mask.
SPM_UNK_ID, SPM_BOS_ID, SPM_EOS_ID, SPM_PAD_ID = 0, 1, 2, 3

MAKE_ONE = "make one with `python -m data_prep train-tokenizer`"


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be loaded or trained; the message names it and the fix."""


class Tokenizer:
    """The interface; subclasses set the attributes in __init__."""

    kind: str
    vocab_size: int
    eod_id: int
    pad_id: int
    bos_id: int
    identity_hash: str

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """One int32 array of ids per text; no bos/eod added."""
        raise NotImplementedError

    def encode_flat(self, texts: list[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int32), and each text's length (int64)."""
        arrays = self.encode_batch(texts, num_threads)
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        return flat.astype(np.int32, copy=False), lengths

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def identity(self) -> dict:
        """What a manifest records; two tokenizers with equal identities encode alike."""
        return {
            "kind": self.kind,
            "hash": self.identity_hash,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
        }


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then pad, eod (end of document) and bos."""

    kind = "byte"

    def __init__(self) -> None:
        self.pad_id, self.eod_id, self.bos_id = 256, 257, 258
        self.vocab_size = 259
        self.identity_hash = hashlib.sha256(b"mtp-dist byte tokenizer v1: pad,eod,bos").hexdigest()

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def encode_flat(self, texts: list[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        # One join and one frombuffer instead of an array per text: byte models see many tokens.
        encoded = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32)
        return flat, lengths

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in (int(x) for x in ids) if i < 256)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file; its identity hash is the hash of the model file's bytes."""

    kind = "sentencepiece"

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        self.model_path = model_path
        with open(model_path, "rb") as f:
            proto = f.read()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:  # sentencepiece reports every failure as RuntimeError
            raise TokenizerError(
                f"{model_path} is not a sentencepiece model ({_spm_reason(e)}): give a .model "
                f"file, or {MAKE_ONE}"
            ) from e
        self.identity_hash = hashlib.sha256(proto).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.bos_id = self.sp.bos_id()
        if self.eod_id < 0 or self.pad_id < 0 or self.pad_id == self.eod_id:
            raise TokenizerError(
                f"{model_path}: the model needs distinct eos and pad ids (has eos={self.eod_id}, "
                f"pad={self.pad_id}); {MAKE_ONE}"
            )

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        # return_type="numpy" hands back int32 buffers: no Python int per token.
        return self.sp.encode(texts, num_threads=num_threads, return_type="numpy")

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """`byte`, a sentencepiece `.model` file, or a directory holding `tokenizer.model`."""
    if name_or_path == BYTE_TOKENIZER_NAME:
        return ByteTokenizer()
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerError(
            f"tokenizer {name_or_path!r} not found: give 'byte', a sentencepiece .model file, "
            f"or a directory with tokenizer.model ({MAKE_ONE})"
        )
    return SentencePieceTokenizer(path)


@dataclass
class SentencePieceOptions:
    """Training options; the defaults follow Llama's tokenizer (BPE, byte fallback, digits split,
    whitespace kept as is, no Unicode normalisation)."""

    vocab_size: int = 32000
    model_type: str = "bpe"
    byte_fallback: bool = True
    character_coverage: float = 0.99995
    split_digits: bool = True
    remove_extra_whitespaces: bool = False
    allow_whitespace_only_pieces: bool = True
    add_dummy_prefix: bool = True
    normalization_rule_name: str = "identity"
    input_sentence_size: int = 0
    max_sentence_length: int = 16384
    seed: int = 0
    num_threads: int = 1
    user_defined_symbols: list[str] | None = None
    """Pieces that are always one token wherever they occur (the induction task's name halves)."""


def train_sentencepiece(sentences: Iterator[str], output_prefix: str, opts: SentencePieceOptions):
    """Train on `sentences` and write OUTPUT_PREFIX.model / .vocab (atomically: temp + rename).

    Deterministic for a seed, across processes: sentencepiece's own sampling of input sentences
    is not (it ignores set_random_generator_seed), so the sample is drawn here with a seeded
    generator and sentencepiece gets exactly that; training threads are 1 by default because
    more threads give another model.
    """
    import sentencepiece as spm

    # Fail before training, not after, when the output cannot be written.
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    probe = tmp_name(output_prefix + ".model")
    open(probe, "wb").close()
    os.remove(probe)
    spm.set_random_generator_seed(opts.seed)
    usable = (s for s in sentences if len(s.encode("utf-8")) <= opts.max_sentence_length)
    if opts.input_sentence_size > 0:
        usable = iter(sample_sentences(usable, opts.input_sentence_size, opts.seed))
    source = _Guarded(usable)
    model = _BytesSink()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=source,
            model_writer=model,
            vocab_size=opts.vocab_size,
            model_type=opts.model_type,
            byte_fallback=opts.byte_fallback,
            character_coverage=opts.character_coverage,
            split_digits=opts.split_digits,
            remove_extra_whitespaces=opts.remove_extra_whitespaces,
            allow_whitespace_only_pieces=opts.allow_whitespace_only_pieces,
            add_dummy_prefix=opts.add_dummy_prefix,
            normalization_rule_name=opts.normalization_rule_name,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=opts.max_sentence_length,
            num_threads=opts.num_threads,
            user_defined_symbols=opts.user_defined_symbols or [],
            unk_id=SPM_UNK_ID,
            bos_id=SPM_BOS_ID,
            eos_id=SPM_EOS_ID,
            pad_id=SPM_PAD_ID,
            minloglevel=2,
        )
    except RuntimeError as e:
        source.reraise()  # a failure of our reader, which sentencepiece wraps in RuntimeError
        raise TokenizerError(_training_problem(e, output_prefix, source.count)) from e
    source.reraise()
    atomic_write(output_prefix + ".model", model.data)
    tok = SentencePieceTokenizer(output_prefix + ".model")
    vocab = "".join(
        f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i)}\n" for i in range(tok.vocab_size)
    )
    atomic_write(output_prefix + ".vocab", vocab.encode("utf-8"))
    return tok


def sample_sentences(sentences: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of k sentences (all if fewer), the same for the same input and seed.

    Reservoir sampling, Algorithm L (Li 1994): it draws O(k log(n/k)) random numbers instead of
    one per sentence, which matters when the corpus has many more lines than k.
    """
    rng = random.Random(seed)
    it = iter(sentences)
    sample = list(itertools.islice(it, k))
    if len(sample) < k:
        return sample

    def uniform() -> float:  # in (0, 1): logarithms below need it > 0
        while (u := rng.random()) == 0.0:
            pass
        return u

    w = math.exp(math.log(uniform()) / k)
    while True:
        denom = math.log1p(-w) if w < 1.0 else -math.inf
        skip = math.floor(math.log(uniform()) / denom)
        nxt = next(itertools.islice(it, skip, None), None)
        if nxt is None:
            return sample
        sample[rng.randrange(k)] = nxt
        w *= math.exp(math.log(uniform()) / k)


class _Guarded:
    """An iterator for sentencepiece that remembers an exception of the underlying iterator:
    sentencepiece stops at it (at once) but reports it as an opaque RuntimeError, so `reraise`
    raises the original afterwards (a BadInputFile stays one, Ctrl-C stays KeyboardInterrupt).
    Counts the sentences passed."""

    def __init__(self, it: Iterator[str]) -> None:
        self.it, self.error, self.count = it, None, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            item = next(self.it)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise
        self.count += 1
        return item

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


def _spm_reason(e: RuntimeError) -> str:
    """sentencepiece's message without its source location: `INTERNAL: src/x.cc(12) [cond] why`."""
    text = " ".join(str(e).split())
    m = re.match(r"^\w+: \S+\(\d+\) \[(.*?)\]\s*(.*)$", text)
    if m is None:
        return text
    return m.group(2) or f"failed check {m.group(1)}"


def _training_problem(e: RuntimeError, output_prefix: str, sentences: int) -> str:
    reason = _spm_reason(e)
    if sentences == 0:
        fix = "the inputs have no text: check the paths, --format and --text-field"
    elif "Vocabulary size too high" in reason:
        fix = "lower --vocab-size, or train on more text"
    elif "smaller than required_chars" in reason:
        fix = "raise --vocab-size, or lower --character-coverage"
    else:
        fix = "check the options and the inputs"
    return (
        f"sentencepiece could not train {output_prefix}.model on {sentences} sentences "
        f"({reason}): {fix}"
    )


class _BytesSink:
    """sentencepiece's model_writer: collects the serialized model."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data
