"""The learned image tokenizer end to end: `tokenizers fit` trains it in a Ray task and records the fit,
`tokenizers eval` measures it beside k-means and a thumbnail, the bundle encodes alike in a fresh process,
and the tokenizer actors' batched encoding gives each image the ids it gets alone."""

import json
import subprocess

import numpy as np

from common import EXE, mlflow_client
from omnistream.configs import load_config
from omnistream.modalities.vocab import Vocabulary
from omnistream.pipelines.documents import RecordProcessor
from omnistream.pipelines.records import read_shard

FSQ = {"tokenizer": "fsq", "size": 16, "down": 4, "width": 32, "levels": [8, 5, 5], "fit_steps": 200, "fit_batch": 16}


def _config(corpus, tmp) -> str:
    d = corpus["dir"]
    toml = tmp / "fsq.toml"
    toml.write_text(f'''name = "fsq-small"
[modalities.text]
vocab_size = 300
[modalities.image]
{chr(10).join(f"{k} = {json.dumps(v)}" for k, v in FSQ.items())}
[modalities.audio]
codebook_size = 32
[data]
train_shards = ["{d}/train-*.tar"]
eval_shards = ["{d}/eval-000.tar"]
bundle_dir = "{tmp}/bundle"
fit_records = 480
[cluster]
local_cpus = 2
[tracking]
uri = "sqlite:///{tmp}/mlflow.db"
''')
    return str(toml)


ENCODE_IN_A_FRESH_PROCESS = """
import json, sys
from omnistream.configs import load_config
from omnistream.modalities.vocab import Vocabulary
from omnistream.pipelines.records import read_shard
cfg = load_config(sys.argv[1]).resolved_paths()
image = Vocabulary.load(cfg.data.bundle_dir, cfg.modalities).by_name["image"]
out = [image.encode(image.decode_bytes(e, b)).tolist() for s in cfg.data.eval_shards for r in read_shard(s, 1 << 26)
       for e, b in r.fields.items() if e in image.keys]
print(json.dumps(out))
"""


def test_fit_trains_in_ray_records_the_fit_and_the_bundle_encodes_alike_everywhere(
    own_ray_only, corpus, tmp_path, capsys
):
    toml = _config(corpus, tmp_path)
    fit = subprocess.run([*EXE, "tokenizers", "fit", toml], capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "training the image tokenizer as a Ray task" in fit.stderr, fit.stderr[-3000:]
    # on a 2-CPU local Ray the fit trains on both cores, not on what was free the instant the sample's
    # reading actors were dropped (it was 1: half the speed)
    assert "trained the image tokenizer with 2 threads" in fit.stderr, fit.stderr[-3000:]
    assert "fit curves and reconstructions:" in fit.stdout, fit.stdout
    assert (tmp_path / "bundle" / "image" / "state.safetensors").exists()

    # a second fit into the same folder would replace what checkpoints were made against: refused, unchanged
    before = (tmp_path / "bundle" / "vocab.json").read_bytes()
    again = subprocess.run([*EXE, "tokenizers", "fit", toml], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2, again.stderr[-2000:]
    assert len(again.stderr.strip().splitlines()) == 1 and "--overwrite" in again.stderr and "--out" in again.stderr
    assert json.loads(before)["fingerprint"][:12] in again.stderr
    assert (tmp_path / "bundle" / "vocab.json").read_bytes() == before

    # the fit's run: the loss curve falls, the reconstructions are an image
    c = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("omnistream")
    runs = c.search_runs([exp.experiment_id], "tags.`omnistream.kind` = 'tokenizers-fit'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    loss = [
        m.value for m in sorted(c.get_metric_history(runs[0].info.run_id, "tokenizer/image/loss"), key=lambda m: m.step)
    ]
    assert len(loss) > 10 and np.mean(loss[-5:]) < np.mean(loss[:5]), loss
    summary = runs[0].data.metrics
    assert summary["tokenizer/image/threads"] == 2 and summary["tokenizer/image/steps_per_s"] > 0, summary
    assert any("reconstructions" in a.path for a in c.list_artifacts(runs[0].info.run_id, "images")), [
        a.path for a in c.list_artifacts(runs[0].info.run_id, "images")
    ]

    # a fresh process encodes the held-out images exactly as this one does
    cfg = load_config(toml).resolved_paths()
    image = Vocabulary.load(cfg.data.bundle_dir, cfg.modalities).by_name["image"]
    here = [
        image.encode(image.decode_bytes(e, b)).tolist()
        for s in cfg.data.eval_shards
        for r in read_shard(s, 1 << 26)
        for e, b in r.fields.items()
        if e in image.keys
    ]
    there = subprocess.run(
        [*EXE[:1], "-c", ENCODE_IN_A_FRESH_PROCESS, toml], capture_output=True, text=True, timeout=300
    )
    assert there.returncode == 0, there.stderr[-2000:]
    assert json.loads(there.stdout) == here and len(here) > 10

    # the stream's processor encodes a chunk's images in batches: each gets the ids it gets alone
    proc = RecordProcessor(cfg.modalities, str(cfg.data.bundle_dir), cfg.data, cfg.seed)
    records = [r for s in cfg.data.eval_shards for r in read_shard(s, 1 << 26)]
    alone = {
        r.key: image.encode(image.decode_bytes(e, b)).tolist()
        for r in records
        for e, b in r.fields.items()
        if e in image.keys
    }
    batched = {  # the records of one value per modality (a document's images are parts, not `alone`'s keys)
        r.key: dict(o.parts)["image"].tolist()
        for r, o in zip(records, proc.outcomes(records))
        if o.status == "kept" and not o.ordered and "image" in dict(o.parts)
    }
    assert len(batched) > 10 and all(batched[k] == alone[k] for k in batched)

    # eval: the learned tokenizer, k-means at the same ids per image and the thumbnail, side by side
    from omnistream.cli import main

    capsys.readouterr()
    assert main(["tokenizers", "eval", toml, "--images", "40"]) == 0  # in this process: no Ray, no second start-up
    res = json.loads(capsys.readouterr().out)
    assert res["tokens_per_image"] == 16 and res["codes"] == 200 and res["images"] == 40
    for k in ("fsq", "kmeans", "thumbnail"):
        assert 5 < res[f"psnr_db_{k}"] < 60 and 0 < res[f"ssim_{k}"] <= 1, res
    assert res["fsq_encode_images_per_s_1core"] > 0
    evals = c.search_runs([exp.experiment_id], "tags.`omnistream.kind` = 'tokenizer-eval'")
    assert len(evals) == 1 and evals[0].data.metrics["tokenizer_eval/image/psnr_db_fsq"] == res["psnr_db_fsq"]
