"""Real tokenizers built offline: the CLIP byte-level BPE (a prefix of its merges) and a word-level T5 stand-in.

The CLIP vocabulary is derived exactly as OpenAI's `simple_tokenizer.py` derives it: the 256 byte symbols, the same
with `</w>`, one entry per merge, then `<|startoftext|>` and `<|endoftext|>`. Keeping the first N merges keeps the
ids of every regular token (only the two special ids move to the end of the shorter vocabulary).
"""

from __future__ import annotations

import functools
from pathlib import Path

MERGES_FILE = Path(__file__).with_name("clip_merges_8k.txt")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            symbols.append(256 + extra)
            extra += 1
    return [chr(s) for s in symbols]


@functools.lru_cache(maxsize=8)
def clip_vocab_and_merges(n_merges: int = 8192) -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary and merge list restricted to the first `n_merges` merges (at most 8192 are shipped)."""
    lines = MERGES_FILE.read_text(encoding="utf-8").splitlines()[1:]
    if not 0 <= n_merges <= len(lines):
        raise ValueError(f"n_merges must lie in [0, {len(lines)}], got {n_merges}.")
    merges = lines[:n_merges]  # "a b" lines
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, [tuple(m.split()) for m in merges]


def clip_tokenizer(n_merges: int = 8192, model_max_length: int = 77):
    """A `CLIPTokenizer` with CLIP's real ids for every token in its vocabulary (`"a photo of a cat"` ->
    `[BOS, 320, 1125, 539, 320, 2368, EOS]`)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(n_merges)
    # transformers 5 ignores `vocab_file`/`merges_file` keyword paths, so pass the objects themselves.
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=EOS, bos_token=BOS, eos_token=EOS
    )
    return tokenizer


def t5_tokenizer(words: list[str] | None = None, model_max_length: int = 32):
    """A real `T5TokenizerFast` (Unigram, pad 0, eos 1, unk 2) whose pieces are `"▁" + word` for each of `words`,
    defaulting to CLIP's whole-word tokens. It saves and loads with `from_pretrained` like any T5 tokenizer."""
    from transformers import T5TokenizerFast

    if words is None:
        vocab, _ = clip_vocab_and_merges()
        words = sorted({t[: -len("</w>")] for t in vocab if t.endswith("</w>") and len(t) > 4})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -20.0)]
    pieces += [("▁" + word, -1.0) for word in dict.fromkeys(words)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
