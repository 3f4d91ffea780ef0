"""The real path end to end on a local Ray: Ray Data stream, 2 Ray Train workers with DeepSpeed ZeRO-3,
MLflow run, checkpoint with every rank's shards, resume at the same step, loopback-only listeners."""
import json
import threading
from pathlib import Path

import psutil
import pytest

from cluster import tracking
from cluster.config import load_config

pytestmark = pytest.mark.slow

OVERRIDES = [
    "data.seq_len=128", "data.epochs=2", "data.fit_records=400",
    "modalities.text.vocab_size=300", "modalities.image.codebook_size=64", "modalities.audio.codebook_size=32",
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
    "train.micro_batch_size=4", "train.warmup_steps=2", "train.log_every=1", "train.zero_stage=3",
    "cluster.num_workers=2", "cluster.cpus_per_worker=0.5",
    "eval.examples=20", "eval.loss_rows=8", "eval.samples=1", "eval.max_new_tokens=3",
]


def _cfg(corpus, tmp, *extra):
    d = corpus["dir"]
    return load_config(None, OVERRIDES + [
        f'data.train_shards=["{d}/train-*.tar"]', f'data.eval_shards=["{d}/eval-000.tar"]',
        f'data.bundle_dir="{tmp}/bundle"', f'cluster.storage_path="{tmp}/ray"',
        f'tracking.uri="sqlite:///{tmp}/mlflow.db"', *extra])


def _non_loopback_listeners() -> list[str]:
    """Listening TCP sockets of this process's descendants (Ray's processes) not bound to loopback."""
    me = psutil.Process()
    bad = []
    for p in [me] + me.children(recursive=True):
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and not (c.laddr.ip.startswith("127.") or c.laddr.ip in ("::1", "::ffff:127.0.0.1")):
                bad.append(f"{p.name()}[{p.pid}] {c.laddr.ip}:{c.laddr.port}")
    return bad


@pytest.fixture(scope="module")
def trained(ray_local, corpus, tmp_path_factory):
    from cluster.train import run_training
    from pipelines.fit import fit_bundle

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = _cfg(corpus, tmp, "train.steps=6", "train.checkpoint_every=3")
    vocab, summary = fit_bundle(cfg.resolved_paths().data, cfg.modalities, cfg.seed)
    assert set(summary["samples"]) == {"text", "image", "audio"}

    seen_bad: list[str] = []
    stop = threading.Event()

    def watch():  # sample the listener table while the cluster trains
        while not stop.is_set():
            seen_bad.extend(_non_loopback_listeners())
            stop.wait(1.0)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        res = run_training(cfg)
    finally:
        stop.set()
        th.join()
    return {"cfg": cfg, "res": res, "tmp": tmp, "bad_listeners": sorted(set(seen_bad))}


def test_run_logs_the_design_metrics(trained):
    res = trained["res"]
    m = res.metrics
    for key in ["train/loss", "train/loss/text", "train/loss/image", "train/loss/audio", "train/tokens_per_s",
                "train/data_wait_frac", "train/lr", "train/grad_norm", "eval/loss/text", "eval/loss/image",
                "eval/loss/audio", "eval/image_to_text/accuracy", "eval/audio_to_text/accuracy",
                "data/seen", "data/kept"]:
        assert key in m, key
    assert m["data/seen"] == m["data/kept"] + sum(v for k, v in m.items() if k.startswith(("data/filtered/", "data/errored/")))
    steps = [s for s, _ in tracking.metric_history(res.tracking_uri, res.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    c = tracking.client(res.tracking_uri)
    run = c.get_run(res.run_id)
    assert run.data.params["train.zero_stage"] == "3" and run.data.params["cluster.num_workers"] == "2"
    arts = {a.path for a in c.list_artifacts(res.run_id)}
    assert {"config", "vocab.json", "data", "samples"} <= arts
    sample_files = [a.path for a in c.list_artifacts(res.run_id, "samples/step_000006")]
    assert any(p.endswith(".png") for p in sample_files) and any(p.endswith(".wav") for p in sample_files)
    assert any(p.endswith(".txt") for p in sample_files)


def test_checkpoint_holds_every_ranks_shard(trained):
    ck = Path(trained["res"].checkpoint)
    meta = json.loads((ck / "omnistream.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 2
    files = {p.name for p in (ck / "model").iterdir()}
    assert any("zero_pp_rank_0_" in f for f in files) and any("zero_pp_rank_1_" in f for f in files)
    assert (ck / "data_rank0.json").exists() and (ck / "data_rank1.json").exists()


def test_resume_continues_at_the_same_step(trained, corpus):
    from cluster.train import run_training

    ck = trained["res"].checkpoint
    cfg = _cfg(corpus, trained["tmp"], "train.steps=8", f'train.resume_from="{ck}"')
    res = run_training(cfg)
    steps = sorted(s for s, _ in tracking.metric_history(res.tracking_uri, res.run_id, "train/loss"))
    assert steps == [7, 8]
    assert json.loads((Path(res.checkpoint) / "omnistream.json").read_text())["step"] == 8
    # the resumed run starts from the trained weights: its loss is near where the first run ended
    first = tracking.metric_history(res.tracking_uri, trained["res"].run_id, "train/loss")
    resumed = tracking.metric_history(res.tracking_uri, res.run_id, "train/loss")
    assert min(v for _, v in resumed) < max(v for _, v in first)


def test_every_listener_is_loopback(trained):
    assert trained["bad_listeners"] == []


def test_resume_with_other_vocabulary_is_refused(trained, corpus, tmp_path):
    from cluster.train import check_checkpoint
    from modalities.base import UserError
    from modalities.vocab import Vocabulary
    from conftest import fit_modalities

    other = Vocabulary(fit_modalities(corpus["train"][:1], {"image": {"codebook_size": 32}}))
    with pytest.raises(UserError, match="another vocabulary"):
        check_checkpoint(trained["res"].checkpoint, other, 2)
    v = Vocabulary.load(trained["cfg"].resolved_paths().data.bundle_dir)
    with pytest.raises(UserError, match="training workers"):
        check_checkpoint(trained["res"].checkpoint, v, 3)
