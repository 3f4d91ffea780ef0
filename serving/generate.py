"""Generation from a loaded model: a prompt of one modality, continued greedily as another."""

from __future__ import annotations

from omnistream.common.errors import UserError
from omnistream.modalities.vocab import Vocabulary


def generate_from(model, vocab: Vocabulary, src: str, obj, dst: str, max_new_tokens: int | None = None):
    """Prompt [<bos>, <begin:src>, src ids, <end:src>, <begin:dst>] and decode the greedy continuation as dst."""
    from omnistream.model.model import generate

    for name in (src, dst):
        if name not in vocab.by_name:
            raise UserError(f"the model knows modalities {vocab.names}, not {name!r}")
    prompt = vocab.prompt(src, vocab.by_name[src].encode(obj), dst)
    room = model.cfg.max_seq_len - len(prompt)
    n = min(max_new_tokens or room, room)
    if n <= 0:
        raise UserError(f"the prompt ({len(prompt)} tokens) leaves no room in the model's {model.cfg.max_seq_len}")
    out = generate(
        model, [prompt], n, allowed=vocab.block(dst), extra_allowed=(vocab.end(dst),), stop_token=vocab.end(dst)
    )[0]
    return vocab.by_name[dst].decode(vocab.to_local(dst, out))
