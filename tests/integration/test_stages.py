"""The real Trainer in this process (world size 1, no Ray: the Ray wiring has its own end-to-end tests)
on the session's small corpus, a few steps at a time:

- a checkpoint of every ZeRO stage goes through `omnistream export` and `omnistream generate` as a user
  types them, and the exported weights are the trained ones;
- evaluating a barely trained model at every step, with every task and sample direction, never ends
  training: a sample its modality cannot draw is counted (`eval/sample_errors`) and said in the run.
"""

import shutil

import numpy as np
import pytest
import torch

from common import DIGIT_TASKS
from omnistream.common.stream import COLUMNS
from omnistream.configs import load_config
from omnistream.modalities.vocab import Vocabulary
from omnistream.pipelines.documents import held_out, local_documents
from omnistream.pipelines.packing import pack_documents
from omnistream.tracking import MemoryTracker
from omnistream.training.checkpoint import Checkpointer
from omnistream.training.engine import single_process_group
from omnistream.training.evaluate import TASK_KINDS, Evaluator
from omnistream.training.trainer import Trainer


def small_config(corpus, bundle, tmp_path, *overrides):
    (tmp_path / "run.toml").write_text(DIGIT_TASKS)
    cfg = load_config(
        tmp_path / "run.toml",
        [
            "data.seq_len=128",
            "model.n_layers=1",
            "model.d_model=32",
            "model.n_heads=2",
            "train.steps=3",
            "train.warmup_steps=1",
            "train.micro_batch_size=4",
            "train.log_every=1",
            "eval.examples=12",
            "eval.loss_rows=4",
            "eval.samples=1",
            "eval.max_new_tokens=3",
            f'data.bundle_dir="{bundle}"',
            *overrides,
        ],
    )
    cfg.data.train_shards, cfg.data.eval_shards = corpus["train"][:1], corpus["eval"]
    vocab = Vocabulary.load(bundle)
    cfg.modalities = {m["name"]: m["options"] for m in vocab.layout()["modalities"]}
    cfg.model.vocab_size, cfg.model.max_seq_len = vocab.size, 128
    return cfg, vocab


@pytest.fixture(scope="module")
def rows(corpus, bundle, tmp_path_factory):
    cfg, _ = small_config(corpus, bundle, tmp_path_factory.mktemp("rows"))
    docs = [
        (t, m, f"{r.shard}:{r.key}", cuts)
        for r, _, t, m, cuts in local_documents(corpus["train"][:1], bundle, None, cfg.data, cfg.seed)
    ]
    tokens, mods, keys, cuts = map(list, zip(*docs))
    return pack_documents(tokens, mods, keys, 128, cuts)


def batches(rows: dict, batch: int):
    """Packed rows in order, as the Trainer's stream gives them (keys included), round and round."""
    n, i = len(rows["input_ids"]), 0
    while True:
        idx = np.arange(i, i + batch) % n
        i += batch
        yield {**{c: rows[c][idx] for c in (*COLUMNS, "modality_ids")}, "keys": rows["keys"][idx]}


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_export_and_generate_from_a_checkpoint_of_every_zero_stage(
    corpus, bundle, rows, tmp_path, capsys, stage, precision
):
    from omnistream.cli import main
    from omnistream.serving.export import load_model

    single_process_group()
    cfg, vocab = small_config(
        corpus,
        bundle,
        tmp_path,
        f"train.zero_stage={stage}",
        f'train.precision="{precision}"',
        "train.checkpoint_every=3",
    )
    cfg.data.eval_shards = []
    saved = []

    def publish(d, metrics):  # what ray.train.report does with the folder, in one process
        saved.append(shutil.copytree(d, tmp_path / f"ckpt-{metrics['step']}"))

    trainer = Trainer(cfg, vocab, batches(rows, 4), checkpointer=Checkpointer(publish, "stages"))
    trainer.train()
    assert [p.name for p in saved] == ["ckpt-3"]
    trained = {k: v.detach().float().clone() for k, v in trainer.plain_model().named_parameters()}
    del trainer

    assert main(["export", str(saved[0]), str(tmp_path / "m")]) == 0
    model, _ = load_model(tmp_path / "m")
    got = dict(model.named_parameters())
    assert set(got) == set(trained)
    # the exported weights are the trained ones (in bf16 the exported fp32 masters round to the module's
    # bf16 weights: 8 bits of mantissa, a relative 2^-8)
    rtol, atol = (1e-2, 1e-4) if precision == "bf16" else (0, 1e-6)
    for k, v in trained.items():
        assert torch.allclose(got[k].float(), v, rtol=rtol, atol=atol), (stage, precision, k)
    capsys.readouterr()
    for to, ext in (("image", "png"), ("audio", "wav")):
        assert (
            main(
                [
                    "generate",
                    str(tmp_path / "m"),
                    "--from",
                    "text",
                    "--to",
                    to,
                    "--input",
                    "the digit 3",
                    "--out",
                    str(tmp_path / f"g.{ext}"),
                ]
            )
            == 0
        )
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "g.wav").read_bytes()[:4] == b"RIFF"
    assert (
        main(["generate", str(tmp_path / "m"), "--from", "text", "--input", "the digit", "--max-new-tokens", "3"]) == 0
    )


def test_evaluating_an_untrained_model_every_step_never_ends_training(corpus, bundle, rows, tmp_path):
    """Every step evaluated (image->text, audio->text, and their reverse directions text->image and
    text->audio, whose generations from an untrained model stop after any number of ids, 0, 1, 2...):
    the run trains to its last step, and every evaluation logs eval/sample_errors."""
    single_process_group()
    cfg, vocab = small_config(corpus, bundle, tmp_path, "train.eval_every=1", "train.steps=4")
    tracker = MemoryTracker()
    Trainer(cfg, vocab, batches(rows, 4), tracker=tracker, evaluator=Evaluator(cfg, vocab, held_out)).train()
    assert [s for s, _ in sorted(tracker.history["train/loss"])] == [1, 2, 3, 4]
    assert [s for s, _ in sorted(tracker.history["eval/sample_errors"])][-4:] == [1, 2, 3, 4]
    for step in range(1, 5):
        assert f"samples/step_{step:06d}/image_to_text.json" in tracker.tables
    assert any(k.startswith("text_to_image/") for k in tracker.images)


def test_a_sample_that_cannot_be_drawn_is_counted_and_said_not_fatal(corpus, bundle, rows, tmp_path):
    """A modality whose decode refuses what the model generated (here the audio modality of the real
    bundle, made to refuse every sequence, as a plugin's decode may): each refusal is one counted sample
    error with its reason in samples/step_N/errors.txt, the task's answer counts as wrong, and training
    goes on to its last step."""
    single_process_group()
    cfg, vocab = small_config(corpus, bundle, tmp_path, "train.eval_every=2", "train.steps=4")
    audio = vocab.by_name["audio"]

    def refuse(ids):
        raise ValueError(f"cannot draw {len(ids)} frames")

    audio.decode = refuse
    tracker = MemoryTracker()
    Trainer(cfg, vocab, batches(rows, 4), tracker=tracker, evaluator=Evaluator(cfg, vocab, held_out)).train()
    assert [s for s, _ in sorted(tracker.history["train/loss"])] == [1, 2, 3, 4]
    errors = dict(tracker.history["eval/sample_errors"])
    assert errors[2] >= 1 and errors[4] >= 1, errors  # text->audio, drawn on rank 0
    text = tracker.artifacts["samples/step_000002/errors.txt"].decode()
    assert "text_to_audio[0]: audio.decode of" in text and "ValueError: cannot draw" in text, text
    assert not [k for k in tracker.artifacts if k.endswith(".wav")], "no clip was made of what could not be drawn"


def test_the_served_model_bounds_a_request(corpus, bundle, rows, tmp_path):
    """The MLflow model's predict: one row per request is a generation; more than MAX_ROWS rows in one
    request is refused in one line (a request of thousands held the server for all of them), and a
    prompt file that is no image is a UserError saying so, not a traceback."""
    from types import SimpleNamespace

    import pandas as pd

    from omnistream.common.errors import UserError
    from omnistream.serving.export import export
    from omnistream.serving.pyfunc import ARTIFACT, MAX_ROWS, OmnistreamModel

    single_process_group()
    cfg, vocab = small_config(
        corpus, bundle, tmp_path, "train.zero_stage=0", "train.steps=1", "train.checkpoint_every=1"
    )
    cfg.data.eval_shards = []
    saved = []
    trainer = Trainer(
        cfg,
        vocab,
        batches(rows, 4),
        checkpointer=Checkpointer(lambda d, m: saved.append(shutil.copytree(d, tmp_path / "ck")), "serve"),
    )
    trainer.train()
    served = OmnistreamModel()
    served.load_context(SimpleNamespace(artifacts={ARTIFACT: str(export(saved[0], tmp_path / "m"))}))
    one = served.predict(None, pd.DataFrame({"text": ["the digit"]}), {"max_new_tokens": 2})
    assert len(one) == 1 and one["to"][0] == "text"
    with pytest.raises(UserError, match=f"at most {MAX_ROWS}"):
        served.predict(None, pd.DataFrame({"text": ["the digit"] * (MAX_ROWS + 1)}), {"max_new_tokens": 2})
    with pytest.raises(UserError, match="image_wrong_format"):
        served.predict(None, pd.DataFrame({"image": [b"II*\x00 a TIFF, say"]}), {"max_new_tokens": 2})


def test_a_stream_that_ends_before_train_steps_is_a_warning_and_a_tag_naming_the_setting(
    corpus, bundle, rows, tmp_path, caplog
):
    """It was one info line with a hint (raise data.epochs) that does nothing for named sources. Now a
    warning and a run tag: the step, the steps asked for, and the setting that would have gone on."""
    import itertools
    import logging

    from omnistream.pipelines.sources import SourceConfig

    single_process_group()
    for sources, says in (
        ({}, "raise data.epochs"),
        ({"web": SourceConfig(shards=["x"], exhausted="stop")}, "data.sources.<name>.epochs"),
    ):
        cfg, vocab = small_config(corpus, bundle, tmp_path, "train.steps=5")
        cfg.data.eval_shards, cfg.data.sources = [], sources
        tracker = MemoryTracker()
        stream = itertools.islice(batches(rows, 4), 2)
        if sources:  # a named source's rows say which source they came from
            stream = ({**b, "src": np.zeros(len(b["keys"]), np.int64)} for b in stream)
        with caplog.at_level(logging.WARNING, logger="omnistream"):
            Trainer(cfg, vocab, stream, tracker=tracker).train()
        tag = tracker.tags()["omnistream.stream_ended_early"]
        assert tag.startswith("step 2 of 5: ") and says in tag, tag
        assert any(
            "the stream ended at step 2 of train.steps = 5" in r.getMessage() and says in r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING
        ), caplog.text
        caplog.clear()


class FirstNumberIsSeven:
    """A task kind of the test's own, registered in the evaluator's table: a record is 'right' when its label
    is 7, whatever the model says (so the count is known), and its samples are one table."""

    def records(self, data, task):
        return data.with_label(task)

    def score(self, ctx, task, records):
        assert not ctx.model.training
        return sum(str(r.meta[task.label_field]) == "7" for r in records)

    def samples(self, ctx, task, records, out):
        out.tables[ctx.name] = {"key": [r.key for r in records], "option": [task.options["note"]] * len(records)}


@pytest.mark.parametrize("kind", [*sorted(TASK_KINDS), "sevens"])
def test_every_registered_task_kind_runs_through_the_evaluator(corpus, bundle, tmp_path, kind, monkeypatch):
    """Every kind in the table (the built-in generate-and-match, and one registered here) is called by the
    Evaluator: its accuracy is its right answers over the records it picked, its samples are the run's."""
    from omnistream.model.model import GPT
    from omnistream.training import evaluate

    monkeypatch.setitem(evaluate.TASK_KINDS, "sevens", FirstNumberIsSeven)
    cfg, vocab = small_config(corpus, bundle, tmp_path)
    for task in cfg.eval.tasks.values():
        task.kind, task.options = kind, {"note": "from options"}
        if kind == "parts":  # the held-out documents of several parts: labelled with their digits in order
            task.label_field, task.match = "digits", "numbers"
    torch.manual_seed(0)
    model = GPT(cfg.model)
    ev = Evaluator(cfg, vocab, held_out)
    metrics = ev.evaluate(model)
    samples = ev.samples(model)
    for name, task in cfg.eval.tasks.items():
        picked = ev.task_records(name)
        assert picked, name
        acc = metrics[f"eval/{name}/accuracy"]
        if kind == "sevens":
            assert acc == pytest.approx(sum(str(r.meta[task.label_field]) == "7" for r in picked) / len(picked))
            assert samples.tables[name]["option"] == ["from options"] * min(len(picked), cfg.eval.samples)
        else:
            assert 0 <= acc <= 1 and name in samples.tables, (kind, name)
            if kind in ("generate", "parts"):
                assert set(samples.tables[name]) >= {"key", "label", "generated", "correct"}
            if kind == "parts":
                assert all(r.ordered and len(r.parts) >= 3 for r in picked)


def test_an_unknown_task_kind_is_a_user_error_naming_the_registered(corpus, bundle, tmp_path):
    from omnistream.common.errors import UserError

    cfg, vocab = small_config(corpus, bundle, tmp_path)
    next(iter(cfg.eval.tasks.values())).kind = "riddles"
    with pytest.raises(UserError, match=r"eval task kind 'riddles' is not registered \(registered: .*generate"):
        Evaluator(cfg, vocab, held_out)


def test_a_zero_engine_builds_without_compiling_deepspeeds_muon_kernels():
    """A fresh process (as each Ray Train worker is) builds a ZeRO-3 engine without loading torch's inductor,
    which DeepSpeed's Muon module would load to compile kernels an AdamW run never uses
    (engine.skip_muon_import); the stand-in still hands over the real module for any other name."""
    import subprocess
    import sys

    code = """
import sys
from omnistream.configs import load_config
from omnistream.training.engine import MUON, build_engine, single_process_group
single_process_group()
cfg = load_config(None, ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                         "train.zero_stage=3"])
engine, _, n = build_engine(cfg)
print("inductor", "torch._inductor.compile_fx" in sys.modules, n > 0)
import deepspeed.runtime.zero.muon.muon_optimizer as muon
print("real", callable(muon.adam_update), sys.modules[MUON].__file__.endswith("muon_optimizer.py"))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert "inductor False True" in lines and "real True True" in lines, p.stdout
