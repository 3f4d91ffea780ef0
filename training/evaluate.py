"""Held-out evaluation: per-modality loss, and the cross-modal tasks the config declares.

The Evaluator runs on a plain (unsharded) copy of the model on every rank, each rank taking its
slice of the held-out records; counts are summed across ranks with the all-reduce it is given.

A task (`[eval.tasks.<name>]`, docs/architecture.md "Evaluation") is of a kind (`kind`, a `TaskKind` in
TASK_KINDS or under the `omnistream.eval_tasks` entry points): the kind picks the held-out records it
scores, counts the right answers, and draws the samples a person looks at; the Evaluator shards the records
over the ranks and sums the counts. The first kind, "generate", prompts with one modality of a record,
`[<bos>, <begin:prompt>, prompt ids…, <end:prompt>, <begin:target>]`, greedily generates the target
modality, and checks the decoded answer against a field of the record's JSON with a match rule; "parts"
prompts with every part of an interleaved record before its last answer part (several images and clips,
or few-shot examples) and checks the same way. Each task reads its own eval.examples records. Nothing
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


def numbers(text: str) -> list[float]:
    """Every number a text names, in order, as numerals or English words ("three then 7" -> [3.0, 7.0])."""
    toks = _TOKEN.findall(str(text).lower().replace("-", " "))
    out, i = [], 0
    while i < len(toks):
        t = toks[i]
        if t[0].isdigit() or t[0] == "-":
            out.append(float(t))
        elif t in _WORDS:
            n = _WORDS[t]
            if t in _TENS and i + 1 < len(toks) and toks[i + 1] in _WORDS and _WORDS[toks[i + 1]] < 10:
                n += _WORDS[toks[i + 1]]
                i += 1
            out.append(float(n))
        i += 1
    return out


def first_number(text: str) -> float | None:
    """The first number a text names, as numerals ("7", "3.5") or English words ("seven", "twenty one")."""
    found = numbers(text)
    return found[0] if found else None


def matches(answer: str, label, rule: str) -> bool:
    """Does a generated answer give the label, by the task's match rule?"""
    if rule == "numbers":  # the same numbers in the same order, and no other: "3 7" is "three then seven"
        want = numbers(str(label))
        return bool(want) and numbers(answer) == want
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
    ids: dict  # modality -> local ids of its first part of that modality
    parts: list = field(default_factory=list)  # [(modality, local ids)] in the document's order
    ordered: bool = False  # the parts' order is the record's own (KEY.<i>.<ext>)

    @classmethod
    def of(cls, rec: dict) -> HeldOut:
        """From a record the loader read: {"key", "labels", "parts", "ordered"}."""
        ids: dict = {}
        for name, local in rec["parts"]:
            ids.setdefault(name, local)
        return cls(rec["key"], rec["labels"], ids, list(rec["parts"]), bool(rec["ordered"]))


@dataclass
class EvalSet:
    """Held-out records, read and tokenized once per worker (by pipelines/documents.held_out, handed in)."""

    records: list[HeldOut] = field(default_factory=list)
    rows: dict = field(default_factory=dict)  # packed rows for the loss
    tally: object = None  # what became of the held-out records read (a Tally)
    counts: dict = field(default_factory=dict)  # task -> the held-out records read that it can score

    @classmethod
    def of(cls, held: dict) -> EvalSet:
        """From what the loader returned: {"records": [record dicts], "rows", "tally", "counts"}."""
        recs = [HeldOut.of(r) for r in held["records"]]
        return cls(recs, held["rows"], held["tally"], dict(held.get("counts", {})))

    def with_label(self, task: EvalTask) -> list[HeldOut]:
        """The records that hold the task's prompt modality and its label."""
        return [r for r in self.records if _wants_one(r, task)]


def _wants_one(r: HeldOut, task: EvalTask) -> bool:
    return task.prompt in r.ids and r.meta.get(task.label_field) is not None


def _generate(
    model: GPT, vocab: Vocabulary, prompts: list[list[int]], dst: str, n_new: int, errors: list[str], what: str
) -> list:
    """Greedy continuations held to what modality `dst` can decode at each place (Vocabulary.span_rule: an
    image exactly its ids, a codec frame each id in its codebook's range), as `dst`'s decoded objects.

    A continuation its modality cannot decode (a barely trained model makes one or two ids of an image
    or a clip; a plugin's decode may refuse any sequence) is None, and the reason is appended to
    `errors`: a sample that cannot be drawn is reported, it never ends a training run.
    """
    gens = generate(model, prompts, n_new, stop_token=vocab.end(dst), rule=vocab.span_rule(dst))
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
        """Greedy continuations held to what `target` can decode, decoded (None where `target`'s decode refuses)."""
        return _generate(self.model, self.vocab, prompts, target, n_new, self.errors, what or self.name)


class TaskKind(Protocol):
    """One kind of eval task. Register it in TASK_KINDS, or, from a package of its own, under the
    `omnistream.eval_tasks` entry points; `[eval.tasks.<name>] kind = "<its name>"` picks it, and its own
    settings are the task's `options`. tests/integration/test_stages.py runs every registered kind.

    A kind may also define `wants(record: HeldOut, task) -> bool`: whether it can score a held-out record.
    The held-out set is read until each task has eval.examples records it wants (without `wants`: records
    with the task's prompt modality and label)."""

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

    def wants(self, r: HeldOut, task: EvalTask) -> bool:
        return _wants_one(r, task)

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


class ContinueDocument:
    """Prompt with several parts of an interleaved held-out record: every part before its last part of the
    target modality, `[<bos>, <begin:a>, a…, <end:a>, <begin:b>, b…, <end:b>, …, <begin:target>]`; generate the
    target and match the decoded answer against the record's label (`match`). `prompt` names the modalities
    the prompt must hold (a string or a list: ["image", "audio"]). Few-shot prompts are the same thing: a
    record of part, answer, part, answer, part, answer is prompted with all but its last answer.
    options: max_new_tokens (default eval.max_new_tokens)."""

    def wants(self, r: HeldOut, task: EvalTask) -> bool:
        split = self._split(r, task)
        return split is not None and r.meta.get(task.label_field) is not None

    @staticmethod
    def _split(r: HeldOut, task: EvalTask) -> int | None:
        """The index of the record's last part of the target modality, when the parts before it hold every
        modality `prompt` names; else None."""
        last = max((i for i, (n, _) in enumerate(r.parts) if n == task.target), default=None)
        if not r.ordered or not last:
            return None
        before = {n for n, _ in r.parts[:last]}
        need = [task.prompt] if isinstance(task.prompt, str) else list(task.prompt)
        return last if all(n in before for n in need) else None

    def records(self, data: EvalSet, task: EvalTask) -> list[HeldOut]:
        return [r for r in data.records if self.wants(r, task)]

    def _answers(self, ctx: TaskContext, task: EvalTask, records: list[HeldOut]) -> list:
        n_new = int(task.options.get("max_new_tokens", ctx.settings.max_new_tokens))
        out = []
        for i in range(0, len(records), ctx.settings.batch_size):
            chunk = records[i : i + ctx.settings.batch_size]
            prompts = [ctx.vocab.prompt_parts(r.parts[: self._split(r, task)], task.target) for r in chunk]
            out += ctx.generate(prompts, task.target, n_new)
        return out

    def score(self, ctx: TaskContext, task: EvalTask, records: list[HeldOut]) -> int:
        answers = self._answers(ctx, task, records)
        return sum(
            a is not None and matches(str(a), r.meta[task.label_field], task.match) for r, a in zip(records, answers)
        )

    def samples(self, ctx: TaskContext, task: EvalTask, records: list[HeldOut], out: Samples) -> None:
        answers = self._answers(ctx, task, records)
        out.tables[ctx.name] = {
            "key": [r.key for r in records],
            "prompt": [" ".join(n for n, _ in r.parts[: self._split(r, task)]) for r in records],
            "label": [str(r.meta[task.label_field]) for r in records],
            "generated": ["" if a is None else str(a) for a in answers],
            "correct": [
                a is not None and bool(matches(str(a), r.meta[task.label_field], task.match))
                for r, a in zip(records, answers)
            ],
        }


TASK_GROUP = "omnistream.eval_tasks"
TASK_KINDS: dict[str, type] = {"generate": GenerateAndMatch, "parts": ContinueDocument}


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

    def __init__(self, cfg: RunConfig, vocab: Vocabulary, held_out: Callable[[RunConfig, dict], dict]):
        """`held_out(cfg, wanted)` reads the run's held-out set when it is first needed, until each task has
        the records it wants (the data side's job: omnistream.pipelines.documents.held_out, which the wiring
        hands in)."""
        self.cfg, self.vocab, self.held_out = cfg, vocab, held_out
        self.kinds = {name: task_kind(task.kind) for name, task in cfg.eval.tasks.items()}
        for name, task in cfg.eval.tasks.items():
            if task.kind == "generate" and not isinstance(task.prompt, str):
                raise UserError(f"eval.tasks.{name}: a generate task prompts with one modality, not {task.prompt}")
        self._set: EvalSet | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.data.eval_shards)

    def _wanted(self) -> dict:
        """Per task, the test of a held-out record its kind can score (TaskKind.wants)."""
        out = {}
        for name, task in self.cfg.eval.tasks.items():
            kind = self.kinds[name]
            want = getattr(kind, "wants", None) or _wants_one
            out[name] = lambda rec, want=want, task=task: bool(want(HeldOut.of(rec), task))
        return out

    @property
    def data(self) -> EvalSet:
        if self._set is None:
            self._set = EvalSet.of(self.held_out(self.cfg, self._wanted()))
            n = self.cfg.eval.examples
            for name in self.cfg.eval.tasks:
                got = self._set.counts.get(name, 0)
                if got < n:
                    log.warning(
                        "eval task %s: %d of the eval.examples = %d held-out records it needs are in %s (records "
                        "with %s and the label %r)%s",
                        name,
                        got,
                        n,
                        ", ".join(self.cfg.data.eval_shards),
                        self.cfg.eval.tasks[name].prompt,
                        self.cfg.eval.tasks[name].label_field,
                        ": it is not scored" if got == 0 else "",
                    )
        return self._set

    def task_records(self, name: str) -> list[HeldOut]:
        """The task's own eval.examples held-out records (the first its kind can score, in file order)."""
        return self.kinds[name].records(self.data, self.cfg.eval.tasks[name])[: self.cfg.eval.examples]

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
            recs = self.task_records(name)[rank::world]
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
            if k.startswith("task/"):
                m[f"eval/{k[5:]}/examples"] = float(v[1])  # 0: the held-out shards gave the task nothing
                if v[1] > 0:
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
            recs = self.task_records(name)[: cfg.eval.samples]
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
