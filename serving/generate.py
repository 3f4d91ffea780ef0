"""Generation from a loaded model: prompts of one modality continued as another, greedy or sampled, every
span held to what its modality can decode (Modality.span)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from omnistream.common.errors import UserError
from omnistream.modalities.vocab import Vocabulary


@dataclass
class Sampling:
    """How the next token is chosen (model.pick): temperature 0 is greedy; top_k 0 and top_p 1 keep every
    token; a seed makes a draw reproducible (the same prompts, options and seed give the same samples)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    cfg_scale: float = 1.0  # classifier-free guidance: 1 is the prompt alone (needs data.cfg_dropout in training)

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError(
                f"sampling: temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (got {self.temperature}, "
                f"{self.top_k}, {self.top_p})"
            )


def sampling_for(defaults: dict[str, dict], dst: str, **given) -> tuple[Sampling, int | None]:
    """(Sampling, max_new_tokens) for target `dst`: the model's [generate.<dst>] defaults (export.generation_
    defaults), each overridden by a value given here that is not None."""
    chosen = {**defaults.get(dst, {}), **{k: v for k, v in given.items() if v is not None}}
    n = chosen.pop("max_new_tokens", None) or None  # 0: the model's room
    known = [f.name for f in fields(Sampling)]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise UserError(f"generation options {unknown} are not known ({', '.join(known)})")
    return Sampling(**chosen), n


def generate_ids(
    model,
    vocab: Vocabulary,
    prompts: list[list[int]],
    dst: str,
    max_new_tokens: int,
    sampling: Sampling,
    negative: list[int] | None = None,
) -> list[list[int]]:
    """Each prompt's `dst` span (global ids, its end marker included when written), in one batch. With
    sampling.cfg_scale != 1 it is guided away from the unconditional prompt [<bos>, <begin:dst>], or from
    `negative` (a prompt of what not to make) when given."""
    import torch

    from omnistream.model.model import generate

    generator = None
    if sampling.seed is not None and sampling.temperature > 0:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(sampling.seed)
    return generate(
        model,
        prompts,
        max_new_tokens,
        stop_token=vocab.end(dst),
        rule=vocab.span_rule(dst),
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        generator=generator,
        uncond=None if sampling.cfg_scale == 1 else [negative or vocab.prompt_parts([], dst)] * len(prompts),
        cfg_scale=sampling.cfg_scale,
    )


def generate_many(
    model,
    vocab: Vocabulary,
    items: list[tuple[str, object]],
    dst: str,
    max_new_tokens: int | None = None,
    sampling: Sampling | None = None,
    samples: int = 1,
    negative: tuple[str, object] | None = None,
) -> list[list]:
    """For each (src modality, object) prompt, `samples` decoded `dst` objects, all in one batch through the KV
    cache: [<bos>, <begin:src>, src ids, <end:src>, <begin:dst>] continued until `dst`'s end marker.
    `negative`: a (modality, object) prompt that guidance steers away from (with sampling.cfg_scale)."""
    sampling = sampling or Sampling()
    if samples < 1:
        raise UserError(f"samples: at least 1, not {samples}")
    for name in {dst, *(s for s, _ in items)}:
        if name not in vocab.by_name:
            raise UserError(f"the model knows modalities {vocab.names}, not {name!r}")
    prompts = [vocab.prompt(src, vocab.by_name[src].encode(obj), dst) for src, obj in items]
    room = model.cfg.max_seq_len - max(len(p) for p in prompts)
    n = min(max_new_tokens or room, room)
    if n <= 0:
        raise UserError(
            f"the prompt ({max(len(p) for p in prompts)} tokens) leaves no room in the model's {model.cfg.max_seq_len}"
        )
    neg = vocab.prompt(negative[0], vocab.by_name[negative[0]].encode(negative[1]), dst) if negative else None
    spans = generate_ids(model, vocab, [p for p in prompts for _ in range(samples)], dst, n, sampling, neg)
    mod = vocab.by_name[dst]
    decoded = [mod.decode(vocab.to_local(dst, [t for t in s if t != vocab.end(dst)])) for s in spans]
    return [decoded[i * samples : (i + 1) * samples] for i in range(len(items))]


def generate_from(
    model,
    vocab: Vocabulary,
    src: str,
    obj,
    dst: str,
    max_new_tokens: int | None = None,
    sampling: Sampling | None = None,
):
    """One prompt's continuation as `dst` (greedy unless `sampling` says otherwise)."""
    return generate_many(model, vocab, [(src, obj)], dst, max_new_tokens, sampling)[0][0]
