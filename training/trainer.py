"""The Trainer: one object owns the training step and loop (torchtitan's `Trainer` has this shape).

    trainer = Trainer(cfg, vocab, batches, tracker=..., checkpointer=..., evaluator=..., monitor=...)
    trainer.train()            # to train.steps, or until the stream ends

Its state is `state_dict()` / `load_state_dict()`: the step, the token totals per modality, and the
data position in the global row stream (rows consumed, their digest, the last row; common/stream.DataPosition).
The stream is built to start at that position (pipelines/rows.py), so loading it replays nothing; the
Trainer checks that every micro-batch carries the stream positions due to this rank at this step.
Everything else is a component with a small interface, handed in:

    batches        an iterator of packed micro-batches ({input_ids, labels, position_ids, doc_ids,
                   modality_ids, keys, win, row, pos}); in a Ray Train worker, this rank's blocks of the
                   stream (block b of world × b + rank: pipelines/rows.py)
    tracker        a Tracker (omnistream.tracking: log, log_image, log_table, set_tag, ...); rank 0 only
    checkpointer   save(trainer, metrics) / load(trainer, dir) (checkpoint.py)
    evaluator      evaluate(model, rank, world, all_reduce) / samples(model) (evaluate.py)
    monitor        metrics() / should_stop() / stop_reason() of the data accounting (rank 0 only)

torch.distributed must be initialised first (Ray Train does it; engine.single_process_group() for
one process): ranks agree on every micro-batch, so when one rank's share of the stream runs dry all
stop together instead of deadlocking in the next collective (all_reduce MIN of "I have a batch").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from omnistream.common.errors import DataOrderError, ErrorRateExceeded
from omnistream.common.stream import (
    COLUMNS,
    DataPosition,
    label_modalities,
    shares_of,
    token_counts,
)
from omnistream.configs import RunConfig
from omnistream.modalities.vocab import Vocabulary
from omnistream.model.model import IGNORE, flops_per_token, loss_by_group

from .engine import build_engine, plain_copy
from .metrics import Interval, memory_gb, peak_flops, scalars

log = logging.getLogger(__name__)


class DataMonitor(Protocol):
    """The data accounting as the Trainer sees it (a DataLedger actor behind it in a Ray run)."""

    def metrics(self) -> dict[str, float]: ...
    def stop_reason(self) -> str | None: ...


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        vocab: Vocabulary,
        batches: Iterator[dict],
        *,
        tracker=None,
        checkpointer=None,
        evaluator=None,
        monitor: DataMonitor | None = None,
        load_universal: bool = False,
    ):
        self.cfg, self.vocab, self.batches = cfg, vocab, batches
        self.tracker, self.checkpointer, self.evaluator, self.monitor = tracker, checkpointer, evaluator, monitor
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.engine, self.scheduler, self.n_params = build_engine(cfg, load_universal)
        self.device = self.engine.device  # DeepSpeed placed the model (CPU here, the rank's GPU on a GPU node)
        self.n_mods = len(vocab.names)
        self.target = torch.tensor([cfg.data.mix.shares.get(n, 0.0) for n in vocab.names], dtype=torch.float64)
        # train.loss_weights: each label token's loss counts by its modality's weight (the specials' by 1);
        # None when every weight is 1, so the loss is the model's own mean, unchanged
        w = [1.0] + [float(cfg.train.loss_weights.get(n, 1.0)) for n in vocab.names]
        self.loss_w = torch.tensor(w, dtype=torch.float32, device=self.device) if any(x != 1.0 for x in w) else None
        # state
        self.step = 0
        self.tokens = torch.zeros(self.n_mods, dtype=torch.float64)  # per modality, all ranks, since step 0
        # named sources (data.sources): tokens per source, all ranks, since step 0 and since the last log
        self.sources = [n for n, _ in cfg.data.source_items()] if cfg.data.sources else []
        self.source_tokens = torch.zeros(len(self.sources), dtype=torch.float64)
        self.interval_source_tokens = torch.zeros(len(self.sources), dtype=torch.float64)
        self.start = DataPosition()  # the position this run started at (a checkpoint's, or 0)
        self.consumed = DataPosition()  # what this rank consumed since: rows, records, digest, last row
        self.micro_batches = 0  # received by this rank since the start (for the order check)
        self.resume_t0: float | None = None
        self.metrics_once: dict[str, float] = {}  # logged with the next interval, then dropped
        self.metrics: dict[str, float] = {}
        self._stop = False  # set on rank 0 when the data accounting says stop; the MIN in next_batch stops all

    # ---- state ------------------------------------------------------------------------------------
    def position(self) -> DataPosition:
        """The global data position now: every rank's consumption gathered (a collective: all ranks call it)."""
        ranks: list = [None] * self.world
        dist.all_gather_object(ranks, self.consumed)
        return self.start.merged(ranks)

    def state_dict(self) -> dict:
        """A collective (every rank calls it together): the data position is gathered from all ranks."""
        return {
            "step": self.step,
            "tokens": {n: int(v) for n, v in zip(self.vocab.names, self.tokens)},
            "source_tokens": {n: int(v) for n, v in zip(self.sources, self.source_tokens)},
            "data": self.position().to_json(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore step, token totals and the data position. The stream this Trainer reads must start
        there (rows.build_train_stream with the checkpoint's StreamStart); the first micro-batch proves it."""
        self.resume_t0 = time.perf_counter()
        self.step = int(sd["step"])
        self.tokens = torch.tensor([sd.get("tokens", {}).get(n, 0) for n in self.vocab.names], dtype=torch.float64)
        self.source_tokens = torch.tensor(
            [sd.get("source_tokens", {}).get(n, 0) for n in self.sources], dtype=torch.float64
        )
        self.start = DataPosition.from_json(sd["data"])
        self.consumed = DataPosition()
        self.micro_batches = 0

    # ---- the step ---------------------------------------------------------------------------------
    def next_batch(self) -> tuple[dict | None, float]:
        """This rank's next micro-batch, or None for every rank once any rank has none."""
        t0 = time.perf_counter()
        b = next(self.batches, None)
        wait = time.perf_counter() - t0
        if b is not None:
            self.check_order(b)
            if self.resume_t0 is not None and self.rank == 0:
                self.metrics_once["data/resume/seconds"] = time.perf_counter() - self.resume_t0
                self.resume_t0 = None
        if self.world == 1:  # nobody to agree with: no collective on the step's path
            return (None if b is None or self._stop else b), wait
        have = torch.tensor([0 if b is None or self._stop else 1])
        self.all_reduce(have, op=dist.ReduceOp.MIN)
        return (b if have.item() else None), wait

    def check_order(self, b: dict) -> None:
        """The rows due to this rank: its m-th micro-batch lies in block (m // grad_accum) × world + rank of
        the stream, each block micro_batch_size × grad_accum rows, from the position the run started at."""
        t = self.cfg.train
        m, unit = self.micro_batches, t.micro_batch_size * t.grad_accum
        first = (
            self.start.rows
            + ((m // t.grad_accum) * self.world + self.rank) * unit
            + (m % t.grad_accum) * t.micro_batch_size
        )
        if "pos" not in b:  # a plain iterator of batches (the golden test, benchmarks): they are where they are due
            n = len(b["keys"])
            b.update(pos=range(first, first + n), win=[-1] * n, row=[-1] * n)
        got = [int(p) for p in b["pos"]]
        if got != list(range(first, first + len(got))):
            raise DataOrderError(
                f"rank {self.rank} received stream rows {got[0]}..{got[-1]} where {first}..{first + len(got) - 1} "
                f"were due (micro-batch {m}): the data split no longer hands blocks to the ranks in turn, so rows "
                f"would be repeated or skipped"
            )
        self.micro_batches += 1

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        """In-place all_reduce of a CPU tensor, through the device when the backend needs it (NCCL); on one
        rank the tensor is already the sum."""
        if self.world == 1:
            return
        if self.device.type == "cpu":
            dist.all_reduce(t, op=op)
        else:
            d = t.to(self.device)
            dist.all_reduce(d, op=op)
            t.copy_(d.cpu())

    def train_step(self, acc: Interval) -> bool:
        """One optimizer step over train.grad_accum micro-batches; False if the stream ended first."""
        t0 = time.perf_counter()
        n, S = self.n_mods, len(self.sources)
        step_tokens = torch.zeros(n + S, dtype=torch.float64)  # per modality, then per source: one all_reduce
        for _ in range(self.cfg.train.grad_accum):
            b, wait = self.next_batch()
            if b is None:
                return False
            states = b["state"] if "state" in b else [None] * len(b["keys"])
            for k, w, r, p, st in zip(b["keys"], b["win"], b["row"], b["pos"], states):
                self.consumed.add_row(int(p), k, int(w), int(r), st)
            if S:
                per_row = (np.asarray(b["doc_ids"]) > 0).sum(1)
                step_tokens[n:] += torch.as_tensor(np.bincount(np.asarray(b["src"]), per_row, S), dtype=torch.float64)
            # np.array copies: Ray hands read-only arrays, which torch warns about sharing
            x = {
                c: torch.from_numpy(np.array(b[c], dtype=np.int64)).to(self.device, non_blocking=True) for c in COLUMNS
            }
            _, loss, tok_loss = self.engine(x["input_ids"], x["position_ids"], x["doc_ids"], x["labels"])
            lm = torch.as_tensor(label_modalities(b["modality_ids"]), dtype=torch.long).to(self.device)
            if self.loss_w is not None:
                loss = weighted_loss(tok_loss, x["labels"], self.loss_w[lm])
            self.engine.backward(loss)
            self.engine.step()
            s, c = loss_by_group(tok_loss.detach().float(), x["labels"], lm, self.n_mods + 1)
            acc.add(s, c, tokens=int((b["doc_ids"] > 0).sum()), wait=wait)
            step_tokens[:n] += torch.as_tensor(token_counts(b["modality_ids"], self.n_mods), dtype=torch.float64)
        self.step += 1
        # the global batch's token shares (data/token_share/*, data/source_share/*): one small all_reduce per step
        self.all_reduce(step_tokens)
        step_tokens, by_source = step_tokens[:n], step_tokens[n:]
        self.source_tokens += by_source
        self.interval_source_tokens += by_source
        self.tokens += step_tokens
        dev = (shares_of(step_tokens) - self.target).abs().max().item() if self.cfg.data.mix.on else None
        acc.add_shares(step_tokens, dev)
        acc.time += time.perf_counter() - t0
        return True

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Train to train.steps (or the end of the stream), then evaluate and save; returns the last metrics."""
        t, cfg = self.cfg.train, self.cfg
        fpt = flops_per_token(cfg.model, self.n_params, cfg.data.seq_len)
        peak = peak_flops()
        if self.rank == 0:
            attention = self.engine.module.attention_kind(self.device)  # "auto" resolves per device
            log.info(
                "%.2fM parameters, vocab %d, %d workers, ZeRO-%d, %s, %s attention, steps %d->%d",
                self.n_params / 1e6,
                self.vocab.size,
                self.world,
                t.zero_stage,
                t.precision,
                attention,
                self.step,
                t.steps,
            )
            self._log({"model/params": self.n_params})
            if self.tracker is not None:
                self.tracker.set_tag("model.attention", attention)
        self.engine.module.train()
        acc = Interval(self.n_mods + 1, self.device)
        exhausted = False
        while self.step < t.steps:
            if not self.train_step(acc):
                exhausted = True
                break
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log_interval(acc, fpt, peak)
                acc = Interval(self.n_mods + 1, self.device)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self.metrics.update(self.evaluate())
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
                self.save()
        if exhausted:
            reason = self.monitor.stop_reason() if self.monitor is not None else None
            if reason:
                raise ErrorRateExceeded(reason)
            if self.rank == 0:
                self._stream_ended_early()
        self.metrics.update(self.evaluate())
        self._log_ledger()
        self.save()
        return self.metrics

    def _stream_ended_early(self) -> None:
        """The stream ran out before train.steps: a warning, and a tag on the run saying at which step, why,
        and which setting would have kept it going (the run still ends FINISHED: it trained on all it had)."""
        d, t = self.cfg.data, self.cfg.train
        if d.sources:
            stop = [n for n, s in sorted(d.sources.items()) if s.exhausted == "stop"]
            hint = '; raise data.sources.<name>.epochs or set exhausted = "repeat"' if stop else ""
            why = f"every source with a weight ran out (`stop` sources: {', '.join(stop) or 'none'}){hint}"
        else:
            why = f"the shards ran out after data.epochs = {d.epochs}; raise data.epochs to train longer"
        log.warning("the stream ended at step %d of train.steps = %d: %s", self.step, t.steps, why)
        if self.tracker is not None:
            self.tracker.set_tag("omnistream.stream_ended_early", f"step {self.step} of {t.steps}: {why}")

    def _log_interval(self, acc: Interval, fpt: float, peak: float | None) -> None:
        m = acc.reduce(self.all_reduce, self.world).metrics(self.vocab)
        m.update({f"data/tokens/{n}": float(v) for n, v in zip(self.vocab.names, self.tokens)})
        if self.sources:  # each source's share of the tokens consumed since the last log, and its total
            total = float(self.interval_source_tokens.sum()) or 1.0
            m.update(
                {f"data/source_share/{n}": float(v) / total for n, v in zip(self.sources, self.interval_source_tokens)}
            )
            m.update({f"data/source_tokens/{n}": float(v) for n, v in zip(self.sources, self.source_tokens)})
            self.interval_source_tokens.zero_()
        gn = self.engine.get_global_grad_norm()
        m.update(
            {
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/grad_norm": float(gn) if gn is not None else None,
                "train/peak_memory_gb": memory_gb(),
            }
        )
        if peak:
            m["train/mfu"] = m["train/tokens_per_s"] * fpt / (peak * self.world)
        self.metrics = m
        if self.rank != 0:
            return
        if self.monitor is not None:
            m.update(self.monitor.metrics())
            self._stop = self.monitor.stop_reason() is not None
        m.update(self.metrics_once)
        self.metrics_once = {}
        self._log(m)
        per = " ".join(f"{n}={m[f'train/loss/{n}']:.3f}" for n in self.vocab.names if f"train/loss/{n}" in m)
        log.info(
            "step %d/%d loss=%.3f (%s) %.0f tok/s data_wait=%.2f",
            self.step,
            self.cfg.train.steps,
            m["train/loss"],
            per,
            m["train/tokens_per_s"],
            m["train/data_wait_frac"],
        )

    def _log(self, m: dict) -> None:
        if self.tracker is not None and self.rank == 0:
            self.tracker.log(m, self.step)

    def _log_ledger(self) -> None:
        """data.ledger_digest: the digest of every row consumed, at its place in the global stream, since
        step 0 (a resumed run carries on its checkpoint's): same rows, same places, same digest."""
        pos = self.position()
        if self.rank == 0:
            if self.tracker is not None:
                self.tracker.set_tag("data.ledger_digest", pos.ledger_digest())
            self._log({"data/consumed_records": pos.records, "data/consumed_rows": pos.rows})
            log.info("consumed %d rows (%d records), ledger digest %s", pos.rows, pos.records, pos.ledger_digest()[:16])

    # ---- evaluation and checkpoints ---------------------------------------------------------------
    def plain_model(self):
        """A full unsharded copy of the model (every rank gathers under ZeRO-3)."""
        return plain_copy(self.engine, self.cfg)

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None or not self.evaluator.enabled:
            return {}
        # ZeRO-3 holds 1/world of each parameter per rank. Evaluation gathers a full fp32 copy on every
        # rank for its duration, on purpose: it is one all-gather per evaluation, where evaluating the
        # sharded module would all-gather every layer for every generated token on every rank, in
        # lockstep. The price is one model copy per rank (4 bytes/param: 4 GB at 1B); a model whose
        # copy does not fit one device is evaluated after `omnistream export` instead.
        plain = self.plain_model()
        m = self.evaluator.evaluate(plain, self.rank, self.world, self.all_reduce)
        if self.rank == 0:
            samples = self._draw_samples(plain) if self.tracker is not None else None
            if samples is not None and samples.errors:
                m["eval/sample_errors"] = m.get("eval/sample_errors", 0.0) + len(samples.errors)
            self._log(m)
            if samples is not None:
                self._log_samples(samples)
            log.info("eval step %d: %s", self.step, ", ".join(f"{k}={v:.3f}" for k, v in sorted(m.items())))
        self.engine.module.train()
        return m

    def _draw_samples(self, plain):
        """The evaluator's samples; generation failing as a whole is reported like one sample that could
        not be drawn: what a person looks at never ends training (rank 0 alone draws them, no collective)."""
        from types import SimpleNamespace

        try:
            return self.evaluator.samples(plain)
        except Exception as e:  # noqa: BLE001
            return SimpleNamespace(tables={}, media=[], errors=[f"samples: {type(e).__name__}: {e}"])

    def _log_samples(self, samples) -> None:
        """Images with the step (MLflow's image grid and step slider compare them across evaluations and
        runs), other outputs (WAV, ...) as files beside them, each task's answers as a table; the samples
        that could not be drawn, and why, in errors.txt beside them."""
        at = f"samples/step_{self.step:06d}"
        errors = getattr(samples, "errors", [])
        if errors:
            log.warning(
                "eval step %d: %d sample(s) could not be drawn (%s); training goes on",
                self.step,
                len(errors),
                errors[0],
            )
            self.tracker.log_text("\n".join(errors) + "\n", f"{at}/errors.txt")
        for task, rows in samples.tables.items():
            self.tracker.log_table(rows, f"{at}/{task}.json")
        for key, name, ext, data in samples.media:
            if ext == "png":
                self.tracker.log_image(f"{key}/{name}", data, self.step)
            else:
                self.tracker.log_artifact(data, f"{key}_{name}.{ext}", at)

    def save(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(self, scalars(self.metrics))


def weighted_loss(token_loss: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean of each label token's loss weighted by its modality's weight (train.loss_weights):
    sum(w · loss) / sum(w) over the tokens with a label, so with every weight 1 it is the plain mean. The
    tracked curves (train/loss/<modality>) stay the unweighted per-modality means."""
    w = weights * (labels != IGNORE).float()
    return (token_loss * w).sum() / w.sum().clamp_min(1e-9)
