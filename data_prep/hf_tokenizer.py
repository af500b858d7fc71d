"""A sentencepiece BPE model as Hugging Face tokenizer files (`tokenizer.json` and its config),
encoding exactly as sentencepiece does.

transformers' own LlamaTokenizer, built from `tokenizer.model`, applies its own fixed
normalisation (it does not add the dummy prefix before leading whitespace, for one), so the
files here describe the tokenizer itself: sentencepiece's normaliser (its precompiled Unicode
map, whitespace handling and dummy prefix), the BPE vocabulary and merges, byte fallback, and
the special pieces. `AutoTokenizer` loads them as a plain fast tokenizer. Text that spells a
special piece ("</s>") stays text, as in sentencepiece.
"""

from __future__ import annotations

from data_prep.tokenizers import SentencePieceTokenizer

BPE = 2
"""sentencepiece's TrainerSpec.model_type for BPE."""


def _proto(tok: SentencePieceTokenizer):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(tok.model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _merges(vocab: dict[str, int], mergeable: set[str]) -> list[tuple[str, str]]:
    """BPE merges in sentencepiece's order: a piece made earlier in training (a lower id)
    merges first; the splits of one piece, by the ids of their parts."""
    merges = []
    for piece in sorted(mergeable, key=vocab.__getitem__):
        splits = [
            (piece[:i], piece[i:])
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges.extend(sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])))
    return merges


def to_hf_tokenizer(tok: SentencePieceTokenizer):
    """The tokenizers.Tokenizer equivalent to `tok`; ValueError if it has no exact equivalent
    (a unigram model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = _proto(tok)
    if proto.trainer_spec.model_type != BPE:
        raise ValueError(
            f"{tok.model_path} is not a BPE sentencepiece model: only its tokenizer.model is "
            "exported"
        )
    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in range(len(vocab)) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = {
        p for p, i in vocab.items() if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
    }
    unk = sp.id_to_piece(sp.unk_id())
    model = models.BPE(
        vocab, _merges(vocab, mergeable), unk_token=unk, fuse_unk=True, byte_fallback=True
    )
    hf = Tokenizer(model)
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    hf.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(content=" ", left=1)] if spec.add_dummy_prefix else []
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    hf.add_special_tokens(
        [AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special]
    )
    return hf


def tokenizer_config(tok: SentencePieceTokenizer, max_length: int) -> dict:
    """tokenizer_config.json: a plain fast tokenizer (transformers' LlamaTokenizer class would
    replace the normaliser), no bos/eos added (training data has none: documents end with eod),
    special pieces kept as text when they appear in the input."""
    sp = tok.sp

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tok.bos_id),
        "eos_token": piece(tok.eod_id),
        "pad_token": piece(tok.pad_id),
        "unk_token": piece(sp.unk_id()),
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
