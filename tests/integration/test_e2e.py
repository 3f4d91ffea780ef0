"""The real path end to end on a local Ray: the token cache, the Ray Data row stream, 2 Ray Train workers
with DeepSpeed ZeRO-3, MLflow run, checkpoints with every rank's shards, the export and the registered model,
loopback-only listeners. (Resumes: test_sources_run, 1 -> 2 workers from S3, tracked by TensorBoard; the
rehearsal, tests/system/test_scale.py, 8 -> 3 -> 8 ranks and a worker group started again without a node.)"""

import json
from pathlib import Path

import pytest

from common import mlflow_client, mlflow_run

pytestmark = pytest.mark.slow

# `trained` (tests/conftest.py): the session's run, 2 workers, logging to an MLflow tracking server on 127.0.0.1


def test_run_logs_the_design_metrics(trained):
    res = trained["res"]
    m = res.metrics
    for key in [
        "train/loss",
        "train/loss/text",
        "train/loss/image",
        "train/loss/audio",
        "train/tokens_per_s",
        "train/data_wait_frac",
        "train/lr",
        "train/grad_norm",
        "train/peak_memory_gb",
        "eval/loss/text",
        "eval/loss/image",
        "eval/loss/audio",
        "eval/image_to_text/accuracy",
        "eval/audio_to_text/accuracy",
        "data/seen",
        "data/kept",
    ]:
        assert key in m, key
    assert m["data/seen"] == m["data/kept"] + sum(
        v for k, v in m.items() if k.startswith(("data/filtered/", "data/errored/"))
    )
    steps = [s for s, _ in mlflow_run(res.tracking_uri, res.run_id).metric_history("train/loss")]
    assert sorted(steps) == list(range(1, 11))
    c = mlflow_client(res.tracking_uri)
    run = c.get_run(res.run_id)
    assert run.data.params["train.zero_stage"] == "3" and run.data.params["cluster.num_workers"] == "2"
    assert run.data.tags["model.attention"] == "varlen"  # the CPU path; never the T×T reference
    arts = {a.path for a in c.list_artifacts(res.run_id)}
    assert {"config", "vocab.json", "data", "samples"} <= arts
    sample_files = [a.path for a in c.list_artifacts(res.run_id, "samples/step_000010")]
    assert any(p.endswith(".wav") for p in sample_files), sample_files  # text -> audio, as files
    assert any(p.endswith("image_to_text.json") for p in sample_files), sample_files  # log_table
    images = [a.path for a in c.list_artifacts(res.run_id, "images")]  # log_image, with the step
    assert any("text_to_image" in p and "+step+10+" in p for p in images), images


def test_checkpoint_holds_every_ranks_shard_and_the_data_position(trained):
    ck = Path(trained["res"].checkpoint)
    meta = json.loads((ck / "omnistream.json").read_text())
    assert meta["step"] == 10 and meta["world_size"] == 2
    files = {p.name for p in (ck / "model").iterdir()}
    assert any("zero_pp_rank_0_" in f for f in files) and any("zero_pp_rank_1_" in f for f in files)
    data = json.loads((ck / "data.json").read_text())
    assert data["position"]["rows"] == 10 * 2 * 4  # steps × workers × micro_batch_size rows of the stream
    assert data["position"]["digest"] == trained["res"].ledger_digest


def test_every_epoch_reads_the_token_cache(trained):
    """The shards were tokenized once, as the run's first step; every epoch of the stream read tokens (a later
    run reports every shard reused and none tokenized: test_sources_run, from S3, and the rehearsal)."""
    res = trained["res"]
    assert res.metrics["data/cache/shards_tokenized"] == 4 and res.metrics["data/cache/shards_reused"] == 0
    assert res.metrics["data/consumed_rows"] == 80


def test_export_rebuilds_the_trained_model_from_zero3_shards(trained, tmp_path, capsys):
    """2 ranks' ZeRO-3 shards -> one safetensors model whose held-out loss is the one the run logged."""
    from omnistream.cli import main
    from omnistream.pipelines.documents import held_out
    from omnistream.serving.export import load_model
    from omnistream.training.evaluate import Evaluator

    res = trained["res"]
    assert main(["export", res.checkpoint, str(tmp_path / "m")]) == 0
    model, vocab = load_model(tmp_path / "m")
    cfg = trained["cfg"].resolved_paths()
    m = Evaluator(cfg, vocab, held_out).evaluate(model)
    assert abs(m["eval/loss"] - res.metrics["eval/loss"]) < 1e-4
    from omnistream.pipelines.records import read_shard

    rec = next(r for r in read_shard(cfg.data.eval_shards[0], 1 << 26) if "png" in r.fields)
    (tmp_path / "x.png").write_bytes(rec.fields["png"])
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(tmp_path / "m"),
                "--from",
                "image",
                "--input",
                str(tmp_path / "x.png"),
            ]  # no --max-new-tokens: the export's [generate.text] max_new_tokens = 4
        )
        == 0
    )
    # a briefly trained model may well continue with spaces: what matters is that the CLI prints exactly
    # the greedy continuation
    from omnistream.serving.generate import generate_from

    image = vocab.by_name["image"].decode_bytes("png", rec.fields["png"])
    text = generate_from(model, vocab, "image", image, "text", 4)
    assert capsys.readouterr().out == text + "\n"
    assert (
        main(
            [
                "generate",
                str(tmp_path / "m"),
                "--from",
                "text",
                "--to",
                "image",
                "--input",
                "the digit 3",
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        main(
            [
                "generate",
                str(tmp_path / "m"),
                "--from",
                "text",
                "--to",
                "audio",
                "--input",
                "the digit 3",
                "--out",
                str(tmp_path / "g.wav"),
            ]
        )
        == 0
    )
    assert (tmp_path / "g.wav").read_bytes()[:4] == b"RIFF"

    # registered in the run's MLflow store, loaded back through MLflow, generating the same answer
    import base64

    import mlflow.artifacts
    import mlflow.pyfunc
    import pandas as pd

    assert main(["export", res.checkpoint, str(tmp_path / "r"), "--register", "e2e-digits"]) == 0
    assert "registered models:/e2e-digits/1" in capsys.readouterr().out
    mlflow.set_tracking_uri(res.tracking_uri)
    # logged from code: the version holds no pickle, so loading it unpickles nothing (a registered pickle runs
    # whatever its author put in it on every machine that loads it)
    files = [
        p
        for p in Path(mlflow.artifacts.download_artifacts("models:/e2e-digits/1", dst_path=str(tmp_path / "dl"))).rglob(
            "*"
        )
        if p.is_file()
    ]
    assert any(p.name == "python_model.py" or p.suffix == ".py" for p in files), [p.name for p in files]
    pickles = [p.name for p in files if p.suffix in (".pkl", ".pickle") or p.read_bytes()[:1] == b"\x80"]
    assert not pickles, pickles
    served = mlflow.pyfunc.load_model("models:/e2e-digits/1")
    # no max_new_tokens asked: the run's [generate.text] max_new_tokens = 4, kept in the export, bounds it
    got = served.predict(pd.DataFrame({"image": [rec.fields["png"]]}))
    assert got.to_dict("records") == [{"to": "text", "ext": "txt", "output": text}]
    got = served.predict(pd.DataFrame({"text": ["the digit 3"]}), params={"to": "image"})
    assert got["ext"][0] == "png" and base64.b64decode(got["output"][0])[:4] == b"\x89PNG"
    models = {
        m.name
        for m in mlflow_client(res.tracking_uri).search_logged_models(
            [mlflow_client(res.tracking_uri).get_run(res.run_id).info.experiment_id]
        )
    }
    assert models, "the model is logged in the experiment of the run that trained it"

    # and `mlflow models serve` answers for it on 127.0.0.1, base64 in JSON for the image
    import json as _json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from omnistream.cluster.connect import free_port

    port, bindir = free_port(), str(Path(sys.executable).parent)
    srv = subprocess.Popen(
        [
            f"{bindir}/mlflow",
            "models",
            "serve",
            "-m",
            "models:/e2e-digits/1",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_TRACKING_URI": res.tracking_uri, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"},
    )
    try:
        body = _json.dumps(
            {
                "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(rec.fields["png"]).decode()]]},
                "params": {"max_new_tokens": 4},
            }
        ).encode()
        deadline, answer = time.time() + 120, None
        while answer is None and time.time() < deadline and srv.poll() is None:
            try:
                answer = _json.loads(
                    urllib.request.urlopen(
                        urllib.request.Request(
                            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
                        ),
                        timeout=30,
                    ).read()
                )
            except OSError:
                time.sleep(1)
        assert answer == {"predictions": [{"to": "text", "ext": "txt", "output": text}]}, answer
        # text -> image, sampled with a seed, two prompts in one request: PNGs, the same bytes asked twice
        body = _json.dumps(
            {
                "dataframe_split": {"columns": ["text"], "data": [["the digit 3"], ["a picture of seven"]]},
                "params": {"to": "image", "temperature": 1.0, "top_k": 20, "seed": 5},
            }
        ).encode()

        def ask():
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
            )
            return _json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]

        images = ask()
        assert [p["ext"] for p in images] == ["png", "png"]
        assert all(base64.b64decode(p["output"])[:4] == b"\x89PNG" for p in images)
        assert ask() == images
    finally:
        os.killpg(srv.pid, 15)
        srv.wait(timeout=30)


def test_every_listener_is_loopback(trained):
    assert trained["bad_listeners"] == []


def test_resume_with_other_vocabulary_or_data_is_refused(trained, corpus, tmp_path):
    from common import fit_modalities
    from omnistream.cluster.driver import resume_plan
    from omnistream.common.errors import UserError
    from omnistream.modalities.vocab import Vocabulary
    from omnistream.training.checkpoint import check_checkpoint

    other = Vocabulary(fit_modalities(corpus["train"][:1], {"image": {"codebook_size": 32}}))
    with pytest.raises(UserError, match="another vocabulary"):
        check_checkpoint(trained["res"].checkpoint, other)
    ck = trained["res"].checkpoint
    stream = json.loads((Path(ck) / "data.json").read_text())["stream"]
    with pytest.raises(UserError, match=r"another data stream \(seq_len: 128 -> 256\)"):
        resume_plan(trained["cfg"], ck, {**stream, "seq_len": 256})
