"""Text: byte-level BPE from Hugging Face `tokenizers`, fitted on the corpus.

Byte-level means every UTF-8 string is encodable (no <unk>), so
decode(encode(s)) == s exactly and the error bound is 0.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from .base import BadSample, BaseModality, ModalityOptions


class TextOptions(ModalityOptions):
    vocab_size: int = Field(512, ge=260, le=1_000_000, description="BPE vocabulary size (256 bytes + merges)")
    max_bytes: int = Field(4096, ge=1, description="longer texts are refused as bad samples (untrusted-input bound)")
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to become a merge")


class TextModality(BaseModality):
    name: ClassVar[str] = "text"
    version: ClassVar[str] = "1"
    keys: ClassVar[tuple[str, ...]] = ("txt", "text")
    Options = TextOptions
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.25}
    error_bound: ClassVar[float] = 0.0

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
        trainer = trainers.BpeTrainer(vocab_size=self.options.vocab_size, min_frequency=self.options.min_frequency,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
                                      show_progress=False)
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
