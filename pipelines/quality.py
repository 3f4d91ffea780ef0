"""Quality filters: per-modality checks on decoded objects, each failing with a reason name.

A record is filtered (not errored) when one of its fields fails a check: the bytes were fine,
the content is not what a model should learn from. The reason names are the metric names
(`data/filtered/<reason>`), e.g. `text_too_short`, `image_near_uniform`, `audio_clipped`.
Checks for modalities without built-in filters (plugins) pass everything.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class _Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="apply this modality's filters")


class TextFilters(_Filters):
    min_chars: int = Field(1, ge=0, description="shorter texts are filtered: text_too_short")
    max_chars: int = Field(100_000, ge=1, description="longer texts are filtered: text_too_long")
    max_repeated_line_frac: float = Field(0.5, ge=0, le=1, description="share of lines that repeat an earlier line: text_repeated_lines")
    max_repeated_ngram_frac: float = Field(0.5, ge=0, le=1, description="share of word 3-grams that repeat an earlier one: text_repeated_ngrams")
    min_letter_frac: float = Field(0.3, ge=0, le=1, description="share of non-space characters that are letters: text_few_letters")


class ImageFilters(_Filters):
    min_side: int = Field(8, ge=1, description="images with a smaller side are filtered: image_too_small")
    max_aspect: float = Field(4.0, ge=1, description="width/height (or height/width) above this: image_bad_aspect")
    min_std: float = Field(3.0, ge=0, description="grey-level standard deviation (0-255) below this: image_near_uniform")


class AudioFilters(_Filters):
    min_seconds: float = Field(0.05, ge=0, description="shorter clips are filtered: audio_too_short")
    max_seconds: float = Field(600.0, gt=0, description="longer clips are filtered: audio_too_long_for_filter")
    silence_db: float = Field(-50.0, description="a 20 ms frame quieter than this (dBFS) counts as silent")
    max_silence_frac: float = Field(0.9, ge=0, le=1, description="share of silent frames above this: audio_silent")
    max_clipping_frac: float = Field(0.05, ge=0, le=1, description="share of samples at full scale above this: audio_clipped")


class QualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: TextFilters = Field(default_factory=TextFilters, description="filters on text")
    image: ImageFilters = Field(default_factory=ImageFilters, description="filters on images")
    audio: AudioFilters = Field(default_factory=AudioFilters, description="filters on audio")


_WORD = re.compile(r"\w+", re.UNICODE)


def text_reason(s: str, f: TextFilters) -> str | None:
    if len(s) < f.min_chars:
        return "text_too_short"
    if len(s) > f.max_chars:
        return "text_too_long"
    lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
    if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > f.max_repeated_line_frac:
        return "text_repeated_lines"
    words = _WORD.findall(s.lower())
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if len(grams) > 1:
        repeated = sum(c - 1 for c in Counter(grams).values())
        if repeated / len(grams) > f.max_repeated_ngram_frac:
            return "text_repeated_ngrams"
    visible = [c for c in s if not c.isspace()]
    if visible and sum(c.isalpha() for c in visible) / len(visible) < f.min_letter_frac:
        return "text_few_letters"
    return None


def image_reason(im, f: ImageFilters) -> str | None:
    w, h = im.size
    if min(w, h) < f.min_side:
        return "image_too_small"
    if max(w, h) / max(min(w, h), 1) > f.max_aspect:
        return "image_bad_aspect"
    grey = np.asarray(im.convert("L").resize((min(w, 64), min(h, 64))), dtype=np.float32)
    if grey.std() < f.min_std:
        return "image_near_uniform"
    return None


def audio_reason(a, f: AudioFilters) -> str | None:
    secs = len(a.wave) / a.sample_rate
    if secs < f.min_seconds:
        return "audio_too_short"
    if secs > f.max_seconds:
        return "audio_too_long_for_filter"
    if np.mean(np.abs(a.wave) >= 0.999) > f.max_clipping_frac:
        return "audio_clipped"
    hop = max(1, int(0.02 * a.sample_rate))
    n = len(a.wave) // hop
    if n:
        rms = np.sqrt(np.mean(a.wave[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
        if np.mean(20 * np.log10(rms) < f.silence_db) > f.max_silence_frac:
            return "audio_silent"
    return None


def quality_reason(objs: dict[str, object], q: QualityConfig) -> str | None:
    """The first failed check over a record's decoded fields, or None."""
    for name, obj in objs.items():
        f = getattr(q, name, None)
        if f is None or not f.enabled:
            continue
        reason = {"text": text_reason, "image": image_reason, "audio": audio_reason}[name](obj, f)
        if reason:
            return reason
    return None
