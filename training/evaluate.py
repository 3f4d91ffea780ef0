"""Held-out evaluation: per-modality loss, and the cross-modal tasks the config declares.

The Evaluator runs on a plain (unsharded) copy of the model on every rank, each rank taking its
slice of the held-out records; counts are summed across ranks with the all-reduce it is given.

A task (`[eval.tasks.<name>]`, docs/architecture.md "Evaluation") prompts with one modality of a
record, `[<bos>, <begin:prompt>, prompt ids…, <end:prompt>, <begin:target>]`, greedily generates the
target modality, and checks the decoded answer against a field of the record's JSON with a match
rule. Nothing here knows which modalities or corpus a run uses: the demo's digit question is
two entries of configs/demo.toml.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from omnistream.common.stream import COLUMNS, label_modalities
from omnistream.configs import EvalTask, RunConfig
from omnistream.modalities.vocab import Vocabulary
from omnistream.model.model import GPT, generate, loss_by_group

log = logging.getLogger(__name__)

# ---- match rules ----------------------------------------------------------------------------------
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_WORDS = {w: i for i, w in enumerate(_UNITS)} | _TENS
_TOKEN = re.compile(r"-?\d+(?:\.\d+)?|[a-z]+")


def first_number(text: str) -> float | None:
    """The first number a text names, as numerals ("7", "3.5") or English words ("seven", "twenty one")."""
    toks = _TOKEN.findall(text.lower().replace("-", " "))
    for i, t in enumerate(toks):
        if t[0].isdigit() or t[0] == "-":
            return float(t)
        if t in _WORDS:
            n = _WORDS[t]
            if t in _TENS and i + 1 < len(toks) and toks[i + 1] in _WORDS and _WORDS[toks[i + 1]] < 10:
                n += _WORDS[toks[i + 1]]
            return float(n)
    return None


def matches(answer: str, label, rule: str) -> bool:
    """Does a generated answer give the label, by the task's match rule?"""
    if rule == "number":
        try:
            want = float(label)
        except (TypeError, ValueError):
            return False
        return first_number(answer) == want
    a, want = answer.strip().lower(), str(label).strip().lower()
    return a == want if rule == "exact" else bool(want) and want in a


# ---- the held-out set -----------------------------------------------------------------------------
@dataclass
class HeldOut:
    key: str
    meta: dict                  # the record's JSON, {} if it has none
    ids: dict                   # modality -> local ids


@dataclass
class EvalSet:
    """Held-out records, read and tokenized once per worker (by pipelines/documents.held_out, handed in)."""
    records: list[HeldOut] = field(default_factory=list)
    rows: dict = field(default_factory=dict)       # packed rows for the loss
    tally: object = None                           # what became of the held-out records read (a Tally)

    @classmethod
    def of(cls, held: dict) -> "EvalSet":
        """From what the loader returned: {"records": [(key, labels, ids)], "rows": ..., "tally": ...}."""
        return cls([HeldOut(k, meta, ids) for k, meta, ids in held["records"]], held["rows"], held["tally"])

    def for_task(self, task: EvalTask) -> list[HeldOut]:
        return [r for r in self.records if task.prompt in r.ids and r.meta.get(task.label_field) is not None]


def _generate(model: GPT, vocab: Vocabulary, prompts: list[list[int]], dst: str, n_new: int,
              errors: list[str], what: str) -> list:
    """Greedy continuations restricted to modality `dst`'s block, as `dst`'s decoded objects.

    A continuation its modality cannot decode (a barely trained model makes one or two ids of an image
    or a clip; a plugin's decode may refuse any sequence) is None, and the reason is appended to
    `errors`: a sample that cannot be drawn is reported, it never ends a training run.
    """
    gens = generate(model, prompts, n_new, allowed=vocab.block(dst), extra_allowed=(vocab.end(dst),),
                    stop_token=vocab.end(dst))
    out = []
    for i, g in enumerate(gens):
        local = vocab.to_local(dst, g)
        try:
            out.append(vocab.by_name[dst].decode(local))
        except Exception as e:  # noqa: BLE001 - any failure of a modality's decode is the sample's, not the run's
            out.append(None)
            errors.append(f"{what}[{i}]: {dst}.decode of {len(local)} ids raised {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}")
    return out


class Evaluator:
    """eval/loss/<modality> and eval/<task>/accuracy, plus a few generations a person can open."""

    def __init__(self, cfg: RunConfig, vocab: Vocabulary, held_out: Callable[[RunConfig], dict]):
        """`held_out(cfg)` reads the run's held-out set when it is first needed (the data side's job:
        omnistream.pipelines.documents.held_out, which the wiring hands in)."""
        self.cfg, self.vocab, self.held_out = cfg, vocab, held_out
        self._set: EvalSet | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.data.eval_shards)

    @property
    def data(self) -> EvalSet:
        if self._set is None:
            self._set = EvalSet.of(self.held_out(self.cfg))
        return self._set

    @torch.no_grad()
    def local(self, model: GPT, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """This rank's share: loss sums/counts per modality and correct/total per task (summed by the caller)."""
        cfg, vocab, es = self.cfg, self.vocab, self.data
        model.eval()
        device = next(model.parameters()).device
        n_groups = len(vocab.names) + 1
        sums, counts = torch.zeros(n_groups), torch.zeros(n_groups)
        if es.rows:
            n = min(len(es.rows["input_ids"]), cfg.eval.loss_rows)
            mine = list(range(rank, n, world))
            for i in range(0, len(mine), cfg.eval.batch_size):
                idx = mine[i:i + cfg.eval.batch_size]
                b = {c: torch.as_tensor(es.rows[c][idx], dtype=torch.long, device=device) for c in COLUMNS}
                _, _, tok = model(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"])
                lm = torch.as_tensor(label_modalities(es.rows["modality_ids"][idx]), dtype=torch.long, device=device)
                s, c = loss_by_group(tok, b["labels"], lm, n_groups)
                sums += s.cpu()
                counts += c.cpu()
        out = {"loss_sums": sums, "loss_counts": counts}
        errors: list[str] = []
        for name, task in cfg.eval.tasks.items():
            recs = es.for_task(task)[rank::world]
            correct = 0
            for i in range(0, len(recs), cfg.eval.batch_size):
                chunk = recs[i:i + cfg.eval.batch_size]
                answers = _generate(model, vocab, [vocab.prompt(task.prompt, r.ids[task.prompt], task.target)
                                                   for r in chunk], task.target, cfg.eval.max_new_tokens, errors, name)
                # an answer that could not be decoded is a wrong answer
                correct += sum(a is not None and matches(str(a), r.meta[task.label_field], task.match)
                               for r, a in zip(chunk, answers))
            out[f"task/{name}"] = torch.tensor([float(correct), float(len(recs))])
        for e in errors[:5]:
            log.warning("evaluation: %s", e)
        # every rank sends the count, errors or not: the all-reduce needs the same tensors on every rank
        out["sample_errors"] = torch.tensor([float(len(errors))])
        return out

    def metrics(self, reduced: dict[str, torch.Tensor]) -> dict[str, float]:
        m = {}
        s, c = reduced["loss_sums"], reduced["loss_counts"]
        for g, name in enumerate(self.vocab.names, start=1):
            if c[g] > 0:
                m[f"eval/loss/{name}"] = float(s[g] / c[g])
        if c.sum() > 0:
            m["eval/loss"] = float(s.sum() / c.sum())
        for k, v in reduced.items():
            if k.startswith("task/") and v[1] > 0:
                m[f"eval/{k[5:]}/accuracy"] = float(v[0] / v[1])
        if "sample_errors" in reduced:
            m["eval/sample_errors"] = float(reduced["sample_errors"][0])
        return m

    def evaluate(self, model: GPT, rank: int = 0, world: int = 1,
                 all_reduce: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
        """Every rank calls this together; `all_reduce` sums a tensor in place across ranks."""
        local = self.local(model, rank, world)
        if all_reduce is not None:
            for v in local.values():
                all_reduce(v)
        return self.metrics(local)

    @torch.no_grad()
    def samples(self, model: GPT) -> "Samples":
        """For each task: its answers on a few records (a table), and the reverse direction (target ->
        prompt, e.g. text -> image) as the prompt modality's files (PNG, WAV, ...)."""
        cfg, vocab, out = self.cfg, self.vocab, Samples()
        if cfg.eval.samples == 0:
            return out
        for name, task in cfg.eval.tasks.items():
            recs = self.data.for_task(task)[: cfg.eval.samples]
            if not recs:
                continue
            answers = _generate(model, vocab, [vocab.prompt(task.prompt, r.ids[task.prompt], task.target)
                                               for r in recs], task.target, cfg.eval.max_new_tokens, out.errors, name)
            out.tables[name] = {
                "key": [r.key for r in recs], "label": [str(r.meta[task.label_field]) for r in recs],
                "caption": [_caption(vocab, task.target, r) for r in recs],
                "generated": ["" if a is None else str(a) for a in answers],
                "correct": [a is not None and bool(matches(str(a), r.meta[task.label_field], task.match))
                            for r, a in zip(recs, answers)]}
            back = [r for r in recs if task.target in r.ids]
            if not back:
                continue
            n_new = max(len(r.ids[task.prompt]) for r in back) + 1
            key = f"{task.target}_to_{task.prompt}"
            objs = _generate(model, vocab, [vocab.prompt(task.target, r.ids[task.target], task.prompt) for r in back],
                             task.prompt, n_new, out.errors, key)
            mod = vocab.by_name[task.prompt]
            for i, (r, obj) in enumerate(zip(back, objs)):
                if obj is None:
                    continue
                try:
                    ext, data = mod.to_bytes(obj)
                except Exception as e:  # noqa: BLE001 - as a failed decode: the sample's, not the run's
                    out.errors.append(f"{key}[{i}]: {task.prompt}.to_bytes raised {type(e).__name__}: {e}")
                    continue
                out.media.append((key, f"{i}_{_slug(r.meta[task.label_field])}", ext, data))
        return out


@dataclass
class Samples:
    """What one evaluation generated, for a person to look at: per task a table (key, label, caption,
    generated, correct), and the reverse direction's outputs as (key, name, extension, bytes)."""
    tables: dict[str, dict[str, list]] = field(default_factory=dict)
    media: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the samples that could not be drawn, and why


def _caption(vocab: Vocabulary, target: str, r) -> str:
    """The record's own content in the answer's modality, where that is text (the caption an
    image_to_text answer is read against); else ''."""
    if target not in r.ids:
        return ""
    obj = vocab.by_name[target].decode(np.asarray(r.ids[target]))
    return obj if isinstance(obj, str) else ""


def _slug(text) -> str:
    text = "" if text is None else str(text)  # not `text or ""`: the label 0 is a label
    return "".join(ch if ch.isalnum() else "-" for ch in text)[:24].strip("-") or "x"
