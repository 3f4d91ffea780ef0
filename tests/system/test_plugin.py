"""A third-party modality, as a user meets it: docs/plugins.md's "Your first corpus and run", block by
block, with the example video plugin pip-installed into a throwaway venv (never into the venv running
these tests): listed, a corpus of clips beside the demo corpus, fit, trained under a token mixture,
exported and generated from; then its checkpoint refuses to load where the plugin is not installed
(this venv). Every step is the real CLI in a subprocess, because a plugin is found through installed
entry points."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from common import mlflow_client, mlflow_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray_only")]

from common import REPO as ROOT  # noqa: E402

PLUGIN = ROOT / "examples" / "omnistream-video"
GUIDE = ROOT / "docs" / "plugins.md"


def omnistream(*args, python=sys.executable, check=True, timeout=600) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [python, "-m", "omnistream.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"omnistream {' '.join(args)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def throwaway_venv(where: Path) -> str:
    """A venv that sees this venv's packages (omnistream's editable install included: `addsitedir` runs
    their .pth hooks) but installs into its own site-packages. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    site = next(where.glob("lib/python*/site-packages"))
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").exists())
    (site / "borrowed.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return str(where / "bin" / "python")


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugin-venv")
    py = throwaway_venv(tmp / "venv")
    site = next(Path(py).parents[1].glob("lib/python*/site-packages"))
    src = tmp / "omnistream-video"  # a copy: building leaves build/ and egg-info beside the sources
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--no-compile",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return py


def guide_blocks() -> list[tuple[str, str]]:
    """The fenced blocks of docs/plugins.md's "Your first corpus and run", in order: (language, text)."""
    section = GUIDE.read_text().split("## Your first corpus and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def guide_run(plugin_python, tmp_path_factory):
    """The guide's blocks as a new plugin author types them, from an empty folder: the plugin installed
    (into the throwaway venv, as its pip line would), the corpus script, the config, then fit, train,
    export and generate through the `omnistream` command."""
    tmp = tmp_path_factory.mktemp("guide")
    blocks = guide_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash", "toml", "bash"], [lang for lang, _ in blocks]
    bin_dir = tmp / "bin"  # `omnistream` and `python` as the plugin's venv has them
    bin_dir.mkdir()
    for name, cmd in (
        ("omnistream", f'exec {plugin_python} -m omnistream.cli "$@"'),
        ("python", f'exec {plugin_python} "$@"'),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{cmd}\n")
        (bin_dir / name).chmod(0o755)
    work = tmp / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    said = []
    for lang, body in blocks:
        if lang in ("python", "toml"):  # a file, named on its first line
            (work / body.splitlines()[0].lstrip("# ").strip()).write_text(body)
            continue
        lines = [ln for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
        # the install line: plugin_python installed the same package, into a throwaway venv
        assert all("examples/omnistream-video" in ln for ln in lines if ln.startswith("pip ")), lines
        script = "\n".join(ln for ln in lines if not ln.startswith("pip "))
        p = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900
        )
        assert p.returncode == 0, f"{script}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        said.append(p.stdout)
    # the id ranges, as the config's bundle (relative paths: from the folder the guide works in) lays them out
    listed = subprocess.run(
        [str(bin_dir / "omnistream"), "modalities", "list", "--config", "first.toml"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    cfg = tomllib.loads((work / "first.toml").read_text())
    run_id = next(ln.split("run id: ")[1].split()[0] for ln in said[2].splitlines() if ln.startswith("run id: "))
    return {
        "work": work,
        "said": said,
        "listed": listed,
        "cfg": cfg,
        "run_id": run_id,
        "uri": f"sqlite:///{work}/runs/first.db",
    }


def test_the_guides_first_run_reaches_a_trained_model(guide_run):
    work, said = guide_run["work"], guide_run["said"]
    assert any(ln.split()[:1] == ["video"] for ln in said[0].splitlines()), said[0]
    assert "eval/video_to_text/accuracy" in said[2], said[2][-3000:]
    assert (work / "first-model" / "model.safetensors").exists()
    assert (work / "seven.gif").read_bytes()[:3] == b"GIF", "text -> video, written as the plugin's own file"
    m = mlflow_run(guide_run["uri"], guide_run["run_id"]).final_metrics()
    assert "eval/video_to_text/accuracy" in m and m["eval/sample_errors"] == 0, m


def test_plugin_is_listed_with_version_and_id_range(guide_run):
    rows = {ln.split()[0]: ln for ln in guide_run["listed"].splitlines()[1:] if ln.strip()}
    assert set(rows) >= {"text", "image", "audio", "video"}
    video = rows["video"].split()
    assert video[1] == "0.1.0", rows["video"]
    ids = {n: tuple(int(x) for x in re.search(r"\[(\d+), (\d+)\)", ln).groups()) for n, ln in rows.items()}
    lo, hi = ids["video"]
    assert hi - lo == guide_run["cfg"]["modalities"]["video"]["codebook_size"] + 1, "the codes + the frame separator"
    assert lo >= max(ids[n][1] for n in ("text", "image", "audio")), (
        "video comes last in the config, so its block is allocated last"
    )


def test_training_logs_video_loss_and_meets_token_shares(guide_run):
    uri, run_id = guide_run["uri"], guide_run["run_id"]
    mix = guide_run["cfg"]["data"]["mix"]
    shares, tol = mix["shares"], mix["tolerance"]
    m = mlflow_run(uri, run_id).final_metrics()
    for name in ("text", "image", "audio", "video"):
        assert f"train/loss/{name}" in m
        assert m[f"data/tokens/{name}"] > 0
    hist = {n: mlflow_run(uri, run_id).metric_history(f"data/token_share/{n}") for n in shares}
    assert len(hist["video"]) >= 8, "log_every=1: one share per global batch"
    for n, target in shares.items():
        worst = max(abs(v - target) for _, v in hist[n])
        assert worst <= tol, f"{n}: a global batch had share {target}±{worst:.3f}, tolerance {tol}"


def test_checkpoint_needs_the_plugin(guide_run, tmp_path):
    """Where the plugin is not installed (this venv), its checkpoint is unreadable, with one line naming
    what is missing; the test venv itself never had the plugin."""
    ckpt = mlflow_client(guide_run["uri"]).get_run(guide_run["run_id"]).data.tags["omnistream.checkpoint"]
    listed = omnistream("modalities", "list").stdout
    assert "video" not in listed
    p = omnistream("export", ckpt, str(tmp_path / "export"), check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "video" in err[0] and "not installed" in err[0], p.stderr
