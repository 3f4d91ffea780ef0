"""The CLI as a user meets it: --help, one-line errors with exit 2, config layering."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config, parse_value
from modalities.base import UserError

REPO = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "cluster.cli"]


def run(*args, cwd=None):
    return subprocess.run(EXE + list(args), capture_output=True, text=True, cwd=cwd or REPO, timeout=120)


def test_help_names_every_command():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "data", "tokenizers", "train", "modalities", "config"):
        assert cmd in r.stdout
    r = run("train", "--help")
    assert r.returncode == 0 and "--set" in r.stdout and "model.n_layers=4" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (("train", "nope.toml"), "config file nope.toml does not exist"),
    (("train", "configs/demo.toml", "--set", "model.n_layerz=3"), "model.n_layerz"),
    (("train", "configs/demo.toml", "--set", "train.zero_stage=9"), "train.zero_stage"),
    (("train", "configs/demo.toml", "--set", "modalities.image.patch=5"), "modalities.image"),
    (("train", "configs/demo.toml", "--set", "modalities.smell.x=1"), "modality 'smell' is not installed"),
    (("train", "configs/demo.toml", "--set", "data.bundle_dir=\"/nonexistent/bundle\""), "no tokenizer bundle"),
    (("tokenizers", "fit", "configs/demo.toml", "--set", "data.train_shards=[\"/nonexistent/x-{0..3}.tar\"]"),
     "no shards found"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, needle):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0]


def test_modalities_list_shows_the_builtins():
    r = run("modalities", "list")
    assert r.returncode == 0
    for name in ("text", "image", "audio"):
        assert any(line.split()[0] == name for line in r.stdout.splitlines()[1:])


def test_layering_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\nn_layers = 3\nd_model = 64\n[train]\nlr = 0.01\n')
    c = load_config(f, ["model.n_layers=5", 'tracking.experiment="x"', "data.train_shards=[\"a\", \"b\"]"])
    assert c.model.n_layers == 5 and c.model.d_model == 64 and c.train.lr == 0.01
    assert c.tracking.experiment == "x" and c.data.train_shards == ["a", "b"]
    assert c.train.steps == load_config().train.steps  # untouched keys keep defaults
    flat = c.flat()
    assert flat["model.n_layers"] == 5 and flat["modalities.image"] == {}


def test_saved_config_reloads_to_the_same_tree(tmp_path):
    c = load_config(REPO / "configs" / "demo.toml", ["train.steps=7"])
    f = tmp_path / "resolved.toml"
    f.write_text(c.to_toml())
    assert load_config(f) == c


def test_values_parse_as_toml():
    assert parse_value("4") == 4 and parse_value("1e-3") == 1e-3 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("hello") == "hello"
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["model.n_layers"])


def test_demo_corpus_is_deterministic(tmp_path):
    for d in ("a", "b"):
        r = run("data", "demo", str(tmp_path / d), "--train-records", "30", "--eval-records", "5", "--per-shard", "15")
        assert r.returncode == 0, r.stderr
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for name in ("train-000.tar", "train-001.tar", "eval-000.tar"):
        assert digest(tmp_path / "a" / name) == digest(tmp_path / "b" / name)
    import tarfile
    with tarfile.open(tmp_path / "a" / "train-000.tar") as t:
        exts = {n.split(".", 1)[1] for n in t.getnames()}
    assert {"txt", "json"} <= exts and exts & {"jpg", "png"} and exts & {"wav", "flac"}
