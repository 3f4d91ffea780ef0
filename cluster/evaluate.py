"""Held-out evaluation: per-modality loss and cross-modal tasks by greedy generation.

Runs on a plain (unsharded) copy of the model on every rank, each rank taking
its slice of the held-out records; the caller sums the counts across ranks.
Tasks: for every non-text modality m in a record that carries text,
`m_to_text`: prompt [<bos>, <begin:m>, m…, <end:m>, <begin:text>], generate
text, and check that it names the record's label (the demo's digit).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import torch

from model.model import GPT, generate, loss_by_group
from modalities.vocab import BOS, Vocabulary
from pipelines.accounting import Tally
from pipelines.democorpus import digit_in_text
from pipelines.packing import COLUMNS, label_modalities, pack_documents
from pipelines.stream import local_documents


@dataclass
class EvalSet:
    """Held-out records, read and tokenized once per worker."""
    records: list = field(default_factory=list)   # (key, label, {modality: local ids}, caption)
    rows: dict = field(default_factory=dict)       # packed rows for the loss
    tally: Tally = field(default_factory=Tally)

    @classmethod
    def load(cls, cfg, vocab: Vocabulary) -> "EvalSet":
        es = cls()
        docs = []
        for r, ids, toks, mods in local_documents(cfg.data.eval_shards, cfg.data.bundle_dir, cfg.modalities,
                                                  cfg.data, cfg.seed, limit=cfg.eval.examples, tally=es.tally):
            label = None
            if "json" in r.fields:
                try:
                    label = json.loads(r.fields["json"]).get("digit")
                except (ValueError, AttributeError):
                    label = None
            caption = vocab.by_name["text"].decode(ids["text"]) if "text" in ids else None
            es.records.append((r.key, label, ids, caption))
            docs.append((toks, mods, r.key))
        if docs:
            t, m, k = zip(*docs)
            es.rows = pack_documents(list(t), list(m), list(k), cfg.data.seq_len)
        return es


def _to_tensors(rows: dict, sl: slice) -> dict[str, torch.Tensor]:
    return {c: torch.as_tensor(rows[c][sl], dtype=torch.long) for c in COLUMNS}


@torch.no_grad()
def local_eval(model: GPT, es: EvalSet, cfg, vocab: Vocabulary, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's share: loss sums/counts per modality and correct/total per task (summed by the caller)."""
    model.eval()
    n_groups = len(vocab.names) + 1
    sums = torch.zeros(n_groups)
    counts = torch.zeros(n_groups)
    if es.rows:
        n = min(len(es.rows["input_ids"]), cfg.eval.loss_rows)
        mine = list(range(rank, n, world))
        for i in range(0, len(mine), cfg.eval.batch_size):
            idx = mine[i:i + cfg.eval.batch_size]
            b = _to_tensors(es.rows, idx)
            _, _, tok = model(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"])
            lm = torch.as_tensor(label_modalities(es.rows["modality_ids"][idx]), dtype=torch.long)
            s, c = loss_by_group(tok, b["labels"], lm, n_groups)
            sums += s
            counts += c
    out = {"loss_sums": sums, "loss_counts": counts}
    if "text" not in vocab.names:
        return out
    lo, hi = vocab.block("text")
    for m in vocab.names:
        if m == "text":
            continue
        recs = [r for r in es.records if m in r[2] and r[1] is not None][rank::world]
        correct = 0
        for i in range(0, len(recs), cfg.eval.batch_size):
            chunk = recs[i:i + cfg.eval.batch_size]
            prompts = [[BOS, vocab.begin(m), *vocab.to_global(m, r[2][m]).tolist(), vocab.end(m), vocab.begin("text")]
                       for r in chunk]
            gens = generate(model, prompts, cfg.eval.max_new_tokens, allowed=(lo, hi),
                            extra_allowed=(vocab.end("text"),), stop_token=vocab.end("text"))
            for r, g in zip(chunk, gens):
                text = vocab.by_name["text"].decode(vocab.to_local("text", g))
                correct += int(digit_in_text(text) == r[1])
        out[f"{m}_to_text"] = torch.tensor([float(correct), float(len(recs))])
    return out


def eval_metrics(reduced: dict[str, torch.Tensor], vocab: Vocabulary) -> dict[str, float]:
    m = {}
    s, c = reduced["loss_sums"], reduced["loss_counts"]
    for g, name in enumerate(vocab.names, start=1):
        if c[g] > 0:
            m[f"eval/loss/{name}"] = float(s[g] / c[g])
    if c.sum() > 0:
        m["eval/loss"] = float(s.sum() / c.sum())
    for k, v in reduced.items():
        if k.endswith("_to_text") and v[1] > 0:
            m[f"eval/{k}/accuracy"] = float(v[0] / v[1])
    return m


@torch.no_grad()
def samples(model: GPT, es: EvalSet, cfg, vocab: Vocabulary) -> dict[str, bytes]:
    """A few generations a person can open: text→m as PNG/WAV, m→text as TXT."""
    files: dict[str, bytes] = {}
    if "text" not in vocab.names or cfg.eval.samples == 0:
        return files
    with_text = [r for r in es.records if "text" in r[2]]
    lo_t, hi_t = vocab.block("text")
    for m in vocab.names:
        if m == "text":
            continue
        recs = [r for r in with_text if m in r[2]][: cfg.eval.samples]
        if not recs:
            continue
        mod = vocab.by_name[m]
        # text -> m
        prompts = [[BOS, vocab.begin("text"), *vocab.to_global("text", r[2]["text"]).tolist(), vocab.end("text"),
                    vocab.begin(m)] for r in recs]
        n_new = max(len(r[2][m]) for r in recs) + 1
        gens = generate(model, prompts, n_new, allowed=vocab.block(m), extra_allowed=(vocab.end(m),),
                        stop_token=vocab.end(m))
        for i, (r, g) in enumerate(zip(recs, gens)):
            ext, data = mod.to_bytes(mod.decode(vocab.to_local(m, g)))
            files[f"text_to_{m}_{i}_{_slug(r[3])}.{ext}"] = data
        # m -> text
        prompts = [[BOS, vocab.begin(m), *vocab.to_global(m, r[2][m]).tolist(), vocab.end(m), vocab.begin("text")]
                   for r in recs]
        gens = generate(model, prompts, cfg.eval.max_new_tokens, allowed=(lo_t, hi_t),
                        extra_allowed=(vocab.end("text"),), stop_token=vocab.end("text"))
        buf = io.StringIO()
        for r, g in zip(recs, gens):
            text = vocab.by_name["text"].decode(vocab.to_local("text", g))
            buf.write(f"{r[0]}\tlabel={r[1]}\tcaption={r[3]!r}\tgenerated={text!r}\n")
        files[f"{m}_to_text.txt"] = buf.getvalue().encode()
    return files


def _slug(text) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in str(text or ""))[:24].strip("-") or "x"

