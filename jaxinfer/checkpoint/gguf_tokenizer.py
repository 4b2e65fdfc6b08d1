"""The tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata, rebuilt as a `tokenizers.Tokenizer`.

Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`, used by Llama 3, Qwen2, SmolLM and Mistral
Tekken files) is built. A GGUF has no tokenizer.json, so the parts the file does not carry are
chosen from `tokenizer.ggml.pre`, the name llama.cpp gives the original tokenizer's pre-tokenizer;
each entry below reproduces that original tokenizer.json.
"""

from __future__ import annotations

from functools import lru_cache

from gguf import GGUFReader, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .gguf import LLAMA3_PRE_TOKENIZERS, gguf_special_tokens, gguf_value

# Split patterns, as the original tokenizer.json files write them (`Split` + `ByteLevel` without regex).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _regex_split(pattern: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _gpt2_split():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split():
    # SmolLM, StarCoder and friends isolate every digit before the GPT-2 split (llama.cpp: "\p{N}" first).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


# tokenizer.ggml.pre -> pre-tokenizer factory. "default" (or no name) gets GPT-2's split, as in
# transformers; llama.cpp's own "default" is an odd regex set no released tokenizer uses.
_PRE_TOKENIZERS = {
    **{name: _gpt2_split for name in ("default", "gpt2", "gpt-2")},
    **{
        name: _digits_then_gpt2_split
        for name in ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b")
    },
    **{name: (lambda: _regex_split(_LLAMA3_SPLIT)) for name in LLAMA3_PRE_TOKENIZERS},
    **{name: (lambda: _regex_split(_QWEN2_SPLIT)) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
    "tekken": lambda: _regex_split(_TEKKEN_SPLIT),
}
# Their original tokenizers also NFC-normalise the text.
_NFC = ("qwen2", "deepseek-r1-qwen", "megrez")
# Their original tokenizers take a word that is itself in the vocabulary as one token, merges or not.
_IGNORE_MERGES = (*LLAMA3_PRE_TOKENIZERS, "tekken")


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (the spelling byte-level vocabularies use)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # '!'..'~', '¡'..'¬', '®'..'ÿ'
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def _vocab(tokens: list[str], types: list[int]) -> dict[str, int]:
    """token -> id. Ordinary tokens not written in the byte alphabet are respelled into it (llama.cpp
    sometimes stores them as raw text); control and user-defined tokens keep their raw text, which is
    what matches them in input."""
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    raw_text = (TokenType.CONTROL, TokenType.USER_DEFINED)
    vocab = {}
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind not in raw_text and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    return vocab


def _post_processor(special: dict, tokens: list[str]):
    """Add BOS (and EOS) around each sequence only when the file asks for it."""
    marks = {}
    for flag, key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id")):
        if special[flag]:
            if special[key] is None:
                raise ValueError(f"GGUF tokenizer sets {flag} but has no {key}")
            marks[flag] = (tokens[special[key]], special[key])
    bos = [marks["add_bos_token"][0]] if "add_bos_token" in marks else []
    eos = [marks["add_eos_token"][0]] if "add_eos_token" in marks else []
    return processors.TemplateProcessing(
        single=[*bos, "$A:0", *eos],
        pair=[*bos, "$A:0", *eos, *[f"{t}:1" for t in bos], "$B:1", *[f"{t}:1" for t in eos]],
        special_tokens=list(marks.values()),
    )


def tokenizer_from_gguf(reader: GGUFReader) -> Tokenizer:
    """The file's byte-level BPE tokenizer: vocabulary, merges, pre-tokenizer per `tokenizer.ggml.pre`,
    control tokens as special tokens, user-defined tokens as added tokens, BOS only if the file says so.
    """
    model = gguf_value(reader, "tokenizer.ggml.model", None)
    if model is None:
        raise ValueError("GGUF file has no tokenizer (no tokenizer.ggml.model metadata)")
    if model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {model!r} is not supported; jaxinfer builds only 'gpt2' (byte-level BPE)"
        )
    pre = gguf_value(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        supported = ", ".join(_PRE_TOKENIZERS)
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {supported}")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    types = gguf_value(reader, "tokenizer.ggml.token_type", None) or [TokenType.NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in gguf_value(reader, "tokenizer.ggml.merges")]

    tokenizer = Tokenizer(
        models.BPE(
            vocab=_vocab(tokens, types),
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in _IGNORE_MERGES,
        )
    )
    if pre in _NFC:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    added = lambda kind, special: [
        AddedToken(t, special=special, normalized=False) for t, k in zip(tokens, types) if k == kind
    ]
    tokenizer.add_special_tokens(added(TokenType.CONTROL, special=True))
    tokenizer.add_tokens(added(TokenType.USER_DEFINED, special=False))
    tokenizer.post_processor = _post_processor(gguf_special_tokens(reader), tokens)
    return tokenizer
