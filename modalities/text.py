"""Text: byte-level BPE from Hugging Face `tokenizers`, fitted on the corpus.

Byte-level means every UTF-8 string is encodable (no <unk>), so
decode(encode(s)) == s exactly and the error bound is 0.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from omnistream.common.errors import BadSample

from .base import BaseModality, FilterOptions, ModalityOptions


class TextOptions(ModalityOptions):
    vocab_size: int = Field(512, ge=260, le=1_000_000, description="BPE vocabulary size (256 bytes + merges)")
    max_bytes: int = Field(4096, ge=1, description="longer texts are refused as bad samples (untrusted-input bound)")
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to become a merge")


class TextFilters(FilterOptions):
    min_chars: int = Field(1, ge=0, description="shorter texts are filtered: text_too_short")
    max_chars: int = Field(100_000, ge=1, description="longer texts are filtered: text_too_long")
    max_repeated_line_frac: float = Field(
        0.5, ge=0, le=1, description="share of lines that repeat an earlier line: text_repeated_lines"
    )
    max_repeated_ngram_frac: float = Field(
        0.5, ge=0, le=1, description="share of word 3-grams that repeat an earlier one: text_repeated_ngrams"
    )
    min_letter_frac: float = Field(
        0.3, ge=0, le=1, description="share of non-space characters that are letters: text_few_letters"
    )
    near_min_words: int = Field(
        20, ge=1, description="texts shorter than this are left to the exact check (captions are alike by nature)"
    )
    minhash_bands: int = Field(
        16, ge=1, description="MinHash LSH bands; with 4 rows each, pairs above ~0.5 Jaccard collide"
    )
    minhash_rows: int = Field(4, ge=1, description="MinHash rows per LSH band")


_WORD = re.compile(r"\w+", re.UNICODE)
_MERSENNE = (1 << 61) - 1


@lru_cache(maxsize=4)
def _permutations(n: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(1234)  # fixed: every worker must draw the same permutations
    return (
        [int(v) for v in rng.integers(1, _MERSENNE, n, dtype=np.uint64)],
        [int(v) for v in rng.integers(0, _MERSENNE, n, dtype=np.uint64)],
    )


def minhash_bands(text: str, bands: int, rows: int) -> list[str]:
    """LSH bands of the MinHash of a text's word 3-grams: two texts sharing a band are candidates."""
    words = text.lower().split()
    shingles = {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}
    a, b = _permutations(bands * rows)
    hs = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in shingles]
    sig = [min((ai * h + bi) % _MERSENNE for h in hs) for ai, bi in zip(a, b)]
    return [
        f"t{k}:" + hashlib.blake2b(str(sig[k * rows : (k + 1) * rows]).encode(), digest_size=8).hexdigest()
        for k in range(bands)
    ]


class TextModality(BaseModality):
    name: ClassVar[str] = "text"
    version: ClassVar[str] = "1"
    keys: ClassVar[tuple[str, ...]] = ("txt", "text")
    Options = TextOptions
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.25}
    error_bound: ClassVar[float] = 0.0
    Filters = TextFilters

    def __init__(self, options=None):
        super().__init__(options)
        self._tok = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size() if self._tok is not None else self.options.vocab_size

    def decode_bytes(self, ext: str, data: bytes) -> str:
        if len(data) > self.options.max_bytes:
            raise BadSample("text_too_long", f"{len(data)} bytes > max_bytes={self.options.max_bytes}")
        try:
            s = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("text_not_utf8", str(e)) from None
        s = s.strip()
        if not s:
            raise BadSample("text_empty")
        return s

    def fit_features(self, obj: str) -> str:
        return obj

    def fit(self, features: list[str]) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.options.vocab_size,
            min_frequency=self.options.min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(features, trainer=trainer)
        self._tok = tok
        self._mark_fitted()

    def encode(self, obj: str) -> np.ndarray:
        self._require_fitted()
        return np.asarray(self._tok.encode(obj).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        self._require_fitted()
        return self._tok.decode([int(i) for i in ids])

    def roundtrip_error(self, obj: str, decoded: str) -> float:
        return 0.0 if obj == decoded else 1.0

    def to_bytes(self, obj: str) -> tuple[str, bytes]:
        return "txt", obj.encode("utf-8")

    def _state(self) -> dict[str, Any]:
        return {"tokenizer": self._tok.to_str()}

    def _set_state(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(state["tokenizer"])

    # ---- data quality ----------------------------------------------------------------
    def quality_reason(self, s: str, f: TextFilters) -> str | None:
        if len(s) < f.min_chars:
            return "text_too_short"
        if len(s) > f.max_chars:
            return "text_too_long"
        lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
        if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > f.max_repeated_line_frac:
            return "text_repeated_lines"
        words = _WORD.findall(s.lower())
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        if len(grams) > 1:
            repeated = sum(c - 1 for c in Counter(grams).values())
            if repeated / len(grams) > f.max_repeated_ngram_frac:
                return "text_repeated_ngrams"
        visible = [c for c in s if not c.isspace()]
        if visible and sum(c.isalpha() for c in visible) / len(visible) < f.min_letter_frac:
            return "text_few_letters"
        return None

    def near_signatures(self, s: str, f: TextFilters) -> list[tuple[str, int | None, int]]:
        if len(s.split()) < f.near_min_words:
            return []
        return [(b, None, 0) for b in minhash_bands(s, f.minhash_bands, f.minhash_rows)]
