"""Held-out evaluation: per-modality loss, and the cross-modal tasks the config declares.

The Evaluator runs on a plain (unsharded) copy of the model on every rank, each rank taking its
slice of the held-out records; counts are summed across ranks with the all-reduce it is given.

A task (`[eval.tasks.<name>]`, docs/architecture.md "Evaluation") is of a kind (`kind`, a `TaskKind` in
TASK_KINDS or under the `omnistream.eval_tasks` entry points): the kind picks the held-out records it
scores, counts the right answers, and draws the samples a person looks at; the Evaluator shards the records
over the ranks and sums the counts. The first kind, "generate", prompts with one modality of a record,
`[<bos>, <begin:prompt>, prompt ids…, <end:prompt>, <begin:target>]`, greedily generates the target
modality, and checks the decoded answer against a field of the record's JSON with a match rule. Nothing
here knows which modalities or corpus a run uses: the demo's digit question is two entries of
configs/demo.toml.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from omnistream.common.errors import UserError
from omnistream.common.stream import COLUMNS, label_modalities
from omnistream.configs import EvalTask, RunConfig
from omnistream.modalities.vocab import Vocabulary
from omnistream.model.model import GPT, generate, loss_by_group

log = logging.getLogger(__name__)

# ---- match rules ----------------------------------------------------------------------------------
_UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
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
    meta: dict  # the record's JSON, {} if it has none
    ids: dict  # modality -> local ids


@dataclass
class EvalSet:
    """Held-out records, read and tokenized once per worker (by pipelines/documents.held_out, handed in)."""

    records: list[HeldOut] = field(default_factory=list)
    rows: dict = field(default_factory=dict)  # packed rows for the loss
    tally: object = None  # what became of the held-out records read (a Tally)

    @classmethod
    def of(cls, held: dict) -> EvalSet:
        """From what the loader returned: {"records": [(key, labels, ids)], "rows": ..., "tally": ...}."""
        return cls([HeldOut(k, meta, ids) for k, meta, ids in held["records"]], held["rows"], held["tally"])

    def with_label(self, task: EvalTask) -> list[HeldOut]:
        """The records that hold the task's prompt modality and its label."""
        return [r for r in self.records if task.prompt in r.ids and r.meta.get(task.label_field) is not None]


def _generate(
    model: GPT, vocab: Vocabulary, prompts: list[list[int]], dst: str, n_new: int, errors: list[str], what: str
) -> list:
    """Greedy continuations restricted to modality `dst`'s block, as `dst`'s decoded objects.

    A continuation its modality cannot decode (a barely trained model makes one or two ids of an image
    or a clip; a plugin's decode may refuse any sequence) is None, and the reason is appended to
    `errors`: a sample that cannot be drawn is reported, it never ends a training run.
    """
    gens = generate(
        model, prompts, n_new, allowed=vocab.block(dst), extra_allowed=(vocab.end(dst),), stop_token=vocab.end(dst)
    )
    out = []
    for i, g in enumerate(gens):
        local = vocab.to_local(dst, g)
        try:
            out.append(vocab.by_name[dst].decode(local))
        except Exception as e:  # noqa: BLE001 - any failure of a modality's decode is the sample's, not the run's
            out.append(None)
            errors.append(
                f"{what}[{i}]: {dst}.decode of {len(local)} ids raised {type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}"
            )
    return out


# ---- task kinds ------------------------------------------------------------------------------------
@dataclass
class TaskContext:
    """What a task kind works with: the model (eval mode, no grad), the vocabulary, the [eval] section, the
    task's name, and the list a sample that cannot be drawn is reported into (it never ends a run)."""

    model: GPT
    vocab: Vocabulary
    settings: object  # the config's [eval] section (EvalConfig)
    name: str
    errors: list[str]

    def generate(self, prompts: list[list[int]], target: str, n_new: int, what: str = "") -> list:
        """Greedy continuations restricted to `target`'s block, decoded (None where `target` cannot decode)."""
        return _generate(self.model, self.vocab, prompts, target, n_new, self.errors, what or self.name)


class TaskKind(Protocol):
    """One kind of eval task. Register it in TASK_KINDS, or, from a package of its own, under the
    `omnistream.eval_tasks` entry points; `[eval.tasks.<name>] kind = "<its name>"` picks it, and its own
    settings are the task's `options`. tests/integration/test_stages.py runs every registered kind."""

    def records(self, data: EvalSet, task: EvalTask) -> list[HeldOut]:
        """The held-out records the task scores, in a fixed order (the Evaluator deals them to the ranks)."""
        ...

    def score(self, ctx: TaskContext, task: EvalTask, records: list[HeldOut]) -> int:
        """How many of `records` the model answers right (eval/<name>/accuracy = right / len(records))."""
        ...

    def samples(self, ctx: TaskContext, task: EvalTask, records: list[HeldOut], out: Samples) -> None:
        """A few answers for a person to look at: a table in out.tables[ctx.name], files in out.media."""
        ...


class GenerateAndMatch:
    """Prompt with one modality, generate another, check the decoded answer against the record's label
    (`match`: exact, contains or number); the samples add the reverse direction as the prompt modality's
    files (text -> image PNGs, text -> audio WAVs)."""

    def records(self, data: EvalSet, task: EvalTask) -> list[HeldOut]:
        return data.with_label(task)

    def _answers(self, ctx: TaskContext, task: EvalTask, records: list[HeldOut]) -> list:
        return ctx.generate(
            [ctx.vocab.prompt(task.prompt, r.ids[task.prompt], task.target) for r in records],
            task.target,
            ctx.settings.max_new_tokens,
        )

    def score(self, ctx: TaskContext, task: EvalTask, records: list[HeldOut]) -> int:
        correct, size = 0, ctx.settings.batch_size
        for i in range(0, len(records), size):
            chunk = records[i : i + size]
            # an answer that could not be decoded is a wrong answer
            correct += sum(
                a is not None and matches(str(a), r.meta[task.label_field], task.match)
                for r, a in zip(chunk, self._answers(ctx, task, chunk))
            )
        return correct

    def samples(self, ctx: TaskContext, task: EvalTask, records: list[HeldOut], out: Samples) -> None:
        vocab, answers = ctx.vocab, self._answers(ctx, task, records)
        out.tables[ctx.name] = {
            "key": [r.key for r in records],
            "label": [str(r.meta[task.label_field]) for r in records],
            "caption": [_caption(vocab, task.target, r) for r in records],
            "generated": ["" if a is None else str(a) for a in answers],
            "correct": [
                a is not None and bool(matches(str(a), r.meta[task.label_field], task.match))
                for r, a in zip(records, answers)
            ],
        }
        back = [r for r in records if task.target in r.ids]
        if not back:
            return
        n_new = max(len(r.ids[task.prompt]) for r in back) + 1
        key = f"{task.target}_to_{task.prompt}"
        objs = ctx.generate(
            [vocab.prompt(task.target, r.ids[task.target], task.prompt) for r in back], task.prompt, n_new, key
        )
        mod = vocab.by_name[task.prompt]
        for i, (r, obj) in enumerate(zip(back, objs)):
            if obj is None:
                continue
            try:
                ext, data = mod.to_bytes(obj)
            except Exception as e:  # noqa: BLE001 - as a failed decode: the sample's, not the run's
                ctx.errors.append(f"{key}[{i}]: {task.prompt}.to_bytes raised {type(e).__name__}: {e}")
                continue
            out.media.append((key, f"{i}_{_slug(r.meta[task.label_field])}", ext, data))


TASK_GROUP = "omnistream.eval_tasks"
TASK_KINDS: dict[str, type] = {"generate": GenerateAndMatch}


def task_kinds() -> dict[str, object]:
    """name -> kind class (or entry point) of every task kind: the table, then the entry points."""
    from importlib.metadata import entry_points

    return {**{ep.name: ep for ep in entry_points(group=TASK_GROUP)}, **TASK_KINDS}


def task_kind(name: str) -> TaskKind:
    """A task kind by name; an unknown one is a UserError listing those there are."""
    found = task_kinds()
    if name not in found:
        raise UserError(f"eval task kind {name!r} is not registered (registered: {', '.join(sorted(found))})")
    cls = found[name]
    return (cls.load() if hasattr(cls, "load") else cls)()


class Evaluator:
    """eval/loss/<modality> and eval/<task>/accuracy, plus a few generations a person can open."""

    def __init__(self, cfg: RunConfig, vocab: Vocabulary, held_out: Callable[[RunConfig], dict]):
        """`held_out(cfg)` reads the run's held-out set when it is first needed (the data side's job:
        omnistream.pipelines.documents.held_out, which the wiring hands in)."""
        self.cfg, self.vocab, self.held_out = cfg, vocab, held_out
        self.kinds = {name: task_kind(task.kind) for name, task in cfg.eval.tasks.items()}
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
                idx = mine[i : i + cfg.eval.batch_size]
                b = {c: torch.as_tensor(es.rows[c][idx], dtype=torch.long, device=device) for c in COLUMNS}
                _, _, tok = model(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"])
                lm = torch.as_tensor(label_modalities(es.rows["modality_ids"][idx]), dtype=torch.long, device=device)
                s, c = loss_by_group(tok, b["labels"], lm, n_groups)
                sums += s.cpu()
                counts += c.cpu()
        out = {"loss_sums": sums, "loss_counts": counts}
        errors: list[str] = []
        for name, task in cfg.eval.tasks.items():
            kind = self.kinds[name]
            recs = kind.records(es, task)[rank::world]
            correct = kind.score(TaskContext(model, vocab, cfg.eval, name, errors), task, recs)
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

    def evaluate(
        self, model: GPT, rank: int = 0, world: int = 1, all_reduce: Callable[[torch.Tensor], None] | None = None
    ) -> dict[str, float]:
        """Every rank calls this together; `all_reduce` sums a tensor in place across ranks."""
        local = self.local(model, rank, world)
        if all_reduce is not None:
            for v in local.values():
                all_reduce(v)
        return self.metrics(local)

    @torch.no_grad()
    def samples(self, model: GPT) -> Samples:
        """For each task, what its kind draws from its first eval.samples records (generate: its answers as a
        table, and the reverse direction, e.g. text -> image, as the prompt modality's files)."""
        cfg, vocab, out = self.cfg, self.vocab, Samples()
        if cfg.eval.samples == 0:
            return out
        for name, task in cfg.eval.tasks.items():
            kind = self.kinds[name]
            recs = kind.records(self.data, task)[: cfg.eval.samples]
            if recs:
                kind.samples(TaskContext(model, vocab, cfg.eval, name, out.errors), task, recs, out)
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
