"""Checkpoints: every rank's DeepSpeed shard, its data position, and the run's meta, in one directory.

    model/...                 DeepSpeed's per-rank ZeRO files (tag "model")
    data.json                 the global data position (Trainer.state_dict()["data"]) and the settings
                              of the row stream it is a position in (rows.stream_settings)
    omnistream.json           step, world size, token totals, vocabulary layout + fingerprint, config

A checkpoint made with another vocabulary is refused, saying what differs. One written by N workers
resumes on M: the data position is global, and the ZeRO shards are re-sharded through DeepSpeed's
universal checkpoint (`to_universal`, converted once per checkpoint). Files are loaded with
weights_only=True (engine.weights_only_checkpoint_engine).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path

from omnistream.common.checkpoint import CKPT_TAG, DATA, META, read_checkpoint_meta, weights_only_loads
from omnistream.common.errors import UserError
from omnistream.common.paths import inside
from omnistream.modalities.vocab import Vocabulary, describe_mismatch

log = logging.getLogger(__name__)


def check_checkpoint(path: str | Path, vocab: Vocabulary) -> dict:
    """Refuse a checkpoint made with another vocabulary (saying what differs), or without a data position."""
    meta = read_checkpoint_meta(path)
    layout = meta["vocab"]
    if layout["fingerprint"] != vocab.fingerprint:
        raise UserError(
            f"checkpoint {path} was trained with another vocabulary: {describe_mismatch(layout, vocab.layout())}"
        )
    read_data_position(path)
    return meta


def read_data_position(path: str | Path) -> dict:
    """data.json: {"position": DataPosition.to_json(), "stream": rows.stream_settings(...)}."""
    p = Path(path) / DATA
    try:
        d = json.loads(p.read_text())
        d["position"]["rows"], d["stream"]
    except FileNotFoundError:
        raise UserError(
            f"checkpoint {path} has no {DATA} (written by an omnistream before the token cache?): "
            f"it cannot be resumed, only exported"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path}: {DATA} is damaged or cut off ({type(e).__name__}: {e})") from None
    return d


def describe_stream_change(have: dict, want: dict) -> str | None:
    """What differs between the row stream a checkpoint consumed and the one this run would read, or None."""
    diff = [
        f"{k}: {json.dumps(have.get(k), sort_keys=True)} -> {json.dumps(want.get(k), sort_keys=True)}"
        for k in sorted(set(have) | set(want))
        if have.get(k) != want.get(k)
    ]
    return "; ".join(diff) or None


def to_universal(ckpt: str | Path, out: str | Path) -> Path:
    """DeepSpeed's universal checkpoint of a checkpoint's ZeRO shards: per parameter its fp32 weights and
    AdamW moments, whole, which any number of ranks can load (re-sharded as they load). Converted once;
    a finished conversion is marked by a file and reused."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = Path(out)
    done = out / "converted.json"
    if not done.exists():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        with weights_only_loads():  # in this process: one extract and one merge worker, no pool
            ds_to_universal(
                argparse.Namespace(
                    input_folder=str(Path(ckpt) / CKPT_TAG),
                    output_folder=str(out / CKPT_TAG),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    # ZeRO-1/2 checkpoints hold no `universal_checkpoint_info` (a Megatron client writes one, with
                    # its tensor-parallel merge patterns); omnistream's model has none of those, so DeepSpeed's
                    # default (its version alone) is the right one. Without it ZeRO-1/2 could not resume elsewhere.
                    inject_missing_state=True,
                )
            )
        done.write_text(json.dumps({"from": str(ckpt)}))
    return out


class Checkpointer:
    """Saves and restores a Trainer. `publish(directory, metrics)` hands a finished checkpoint on
    (in a Ray Train worker: `ray.train.report`, which gathers every rank's files into one checkpoint)."""

    def __init__(self, publish: Callable[[str, dict], None], run_id: str = "", stream: dict | None = None):
        self.publish, self.run_id, self.stream = publish, run_id, stream or {}

    def save(self, trainer, metrics: dict) -> None:
        """Every rank calls this together."""
        sd = trainer.state_dict()
        with tempfile.TemporaryDirectory() as d:
            trainer.engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": sd["step"]})
            if trainer.rank == 0:
                Path(d, DATA).write_text(json.dumps({"position": sd["data"], "stream": self.stream}, indent=1))
                meta = {
                    "format": 1,
                    "step": sd["step"],
                    "world_size": trainer.world,
                    "run_id": self.run_id,
                    "tag": CKPT_TAG,
                    "vocab": trainer.vocab.layout(),
                    "config": trainer.cfg.model_dump(mode="json"),
                    "n_params": trainer.n_params,
                    "tokens": sd["tokens"],
                    "source_tokens": sd["source_tokens"],
                }
                Path(d, META).write_text(json.dumps(meta, indent=1))
            _write_manifest(d, trainer.rank)
            self.publish(d, {"step": sd["step"], **metrics})

    def load(self, trainer, d: str | Path, universal: str | Path | None = None) -> dict:
        """Restore model, optimizer and scheduler state (from `universal`, the checkpoint's universal form,
        when it was written by another number of ranks), then the Trainer's step, token totals and data
        position. Every rank calls this together."""
        meta = check_checkpoint(d, trainer.vocab)
        with weights_only_loads():  # DeepSpeed's universal loader calls torch.load itself
            trainer.engine.load_checkpoint(str(universal or d), tag=CKPT_TAG, load_module_strict=True)
        trainer.load_state_dict(
            {
                "step": meta["step"],
                "tokens": meta.get("tokens", {}),
                "source_tokens": meta.get("source_tokens", {}),
                "data": read_data_position(d)["position"],
            }
        )
        return meta


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
MANIFEST = "files-rank{rank}.json"


def _registered(read_snapshot: Callable[[], bytes]) -> set[str] | None:
    """The checkpoint folders Ray Train registered in a run's folder (`read_snapshot` reads its RAY_SNAPSHOT),
    or None where it keeps no readable record. Ray registers a checkpoint only after every rank has reported,
    and a rank reports only after its files are persisted, so a folder not listed may still be being written
    (or was cut off by a kill)."""
    try:
        snap = json.loads(read_snapshot())
        return {r["checkpoint_dir_name"] for r in snap["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(d: str | Path, rank: int) -> None:
    """files-rank<R>.json: every file this rank wrote into the checkpoint, with its size, written last.
    Ray Train copies each rank's folder into the checkpoint on its own; a worker killed mid-copy leaves
    files that exist but are short, and Ray keeps no record of a run's checkpoints until it writes its
    snapshot (not at all for an attempt whose worker was killed). The sizes tell a whole file from one
    cut off, whatever order the files were copied in."""
    root = Path(d)
    sizes = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    (root / MANIFEST.format(rank=rank)).write_text(json.dumps(sizes, indent=1))


def _whole(listing: dict[str, int], read: Callable[[str], bytes], meta: dict) -> bool:
    """Every rank's manifest there, and every file it lists there at its size (a checkpoint written before
    manifests were: every rank's model files there). `listing`: the checkpoint's files (path inside it ->
    size); `read`: one file's bytes."""
    world = meta["world_size"]
    manifests = [n for n in listing if fnmatch.fnmatch(n, MANIFEST.format(rank="*"))]
    if not manifests:
        ranks = {n for n in listing if n.startswith(CKPT_TAG + "/") and n.endswith("model_states.pt")}
        return len(ranks) >= (world if meta["config"]["train"]["zero_stage"] == 3 else 1)
    if len(manifests) < world:
        return False
    return all(listing.get(name) == size for m in manifests for name, size in json.loads(read(m)).items())


def is_remote(path: str | Path | None) -> bool:
    """A URL (s3://...) rather than a path on this machine."""
    return path is not None and "://" in str(path)


def complete_checkpoints(root: str | Path) -> list:
    """Every complete checkpoint under `root` (a Ray Train run's folder, or a folder of them; a path, or a URL
    such as s3://bucket/runs), by step: registered by Ray Train where it keeps a record, and with meta, data
    position and every rank's model files all there. A checkpoint cut off mid-write is passed over, never
    read. Paths for a local root, URLs for a remote one."""
    if is_remote(root):
        return _complete_remote(str(root))
    found: list[tuple[int, Path]] = []
    registered: dict[Path, set[str] | None] = {}
    # os.walk, not Path.glob("**/..."): a folder removed mid-walk (Ray Train dropping an old checkpoint
    # while a run goes on) is skipped there, where glob raises FileNotFoundError
    for top, _, files in os.walk(root):
        if META not in files:
            continue
        d = Path(top)
        if d.parent not in registered:  # one read per run folder, not one per checkpoint in it
            registered[d.parent] = _registered(lambda p=d.parent: (p / RAY_SNAPSHOT).read_bytes())
        listed = registered[d.parent]
        if listed is not None and d.name not in listed:
            continue
        try:
            meta = read_checkpoint_meta(d)
            read_data_position(d)
            listing = {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}
            whole = _whole(listing, lambda n, d=d: (d / n).read_bytes(), meta)
        except (UserError, OSError, ValueError):  # OSError: removed while read (Ray Train drops old ones)
            continue
        if not whole:
            continue
        found.append((meta["step"], d))
    return [d for _, d in sorted(found)]


def _complete_remote(root: str) -> list[str]:
    """complete_checkpoints of a folder in object storage: one listing (with sizes), the small JSON files read."""
    import fsspec

    scheme = root.split("://", 1)[0]
    fs, base = fsspec.core.url_to_fs(root)
    files = {p: info.get("size") for p, info in fs.find(base, detail=True).items()}
    found, registered = [], {}
    for meta_path in [p for p in files if posixpath.basename(p) == META]:
        d = posixpath.dirname(meta_path)
        run = posixpath.dirname(d)
        if run not in registered:  # one read per run folder, not one per checkpoint in it
            snap = posixpath.join(run, RAY_SNAPSHOT)
            registered[run] = _registered(lambda snap=snap: fs.cat_file(snap)) if snap in files else None
        if registered[run] is not None and posixpath.basename(d) not in registered[run]:
            continue
        try:
            meta = json.loads(fs.cat_file(meta_path))
            data = json.loads(fs.cat_file(posixpath.join(d, DATA)))
            data["position"]["rows"], data["stream"], meta["step"], meta["vocab"]["fingerprint"]
            listing = {p[len(d) + 1 :]: n for p, n in files.items() if p.startswith(d + "/")}
            if not _whole(listing, lambda n, d=d: fs.cat_file(posixpath.join(d, n)), meta):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((meta["step"], f"{scheme}://{d}"))
    return [d for _, d in sorted(found)]


_COPIES: dict[str, str] = {}


def local_copy(path: str | Path | None) -> str | None:
    """A checkpoint (or a universal checkpoint) kept at a URL, downloaded once per process into a private
    temporary folder, whose path is returned; a local path as it is. DeepSpeed, the export and the meta
    readers then read files, wherever the run keeps them."""
    if path is None or not is_remote(path):
        return None if path is None else str(path)
    url = str(path).rstrip("/")
    if url not in _COPIES:
        import fsspec

        fs, base = fsspec.core.url_to_fs(url)
        names = fs.find(base)
        # a store may hold folder markers (an empty object named like the folder, as pyarrow writes them)
        folders = {posixpath.dirname(n) for n in names}
        names = [n for n in names if n.rstrip("/") not in folders and not n.endswith("/")]
        if not names:
            raise UserError(f"{url}: nothing there (no such checkpoint)")
        # every key is checked before anything is written: whoever can write to the bucket must not be able
        # to write files on the machines that read from it (a key `ckpt/../../x` would land above the folder)
        out = Path(tempfile.mkdtemp(prefix="omnistream-checkpoint-"))
        targets = [(f, inside(out, f[len(base) + 1 :] if f.startswith(base + "/") else "")) for f in names]
        bad = [f for f, t in targets if t is None]
        if bad:
            out.rmdir()
            raise UserError(
                f"{url}: the object key {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} "
                f"would be written outside the checkpoint's folder: refused, nothing copied"
            )
        for f, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(target))
        log.info("checkpoint %s copied to %s", url, out)
        _COPIES[url] = str(out)
    return _COPIES[url]


def release_copies() -> None:
    """Remove the copies local_copy made in this process: a rank's once its resume has loaded them, the
    driver's when its run ends. Each is a whole checkpoint (every rank's ZeRO shards: gigabytes at 1B), and
    nothing else removes it: a process that resumes from object storage would leave one in the temporary
    folder of each node it ran on, for every resume."""
    import shutil

    for url in list(_COPIES):
        shutil.rmtree(_COPIES.pop(url), ignore_errors=True)


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint was written at (its meta), wherever it is kept."""
    if is_remote(path):
        import fsspec

        fs, base = fsspec.core.url_to_fs(str(path))
        return int(json.loads(fs.cat_file(posixpath.join(base, META)))["step"])
    return int(read_checkpoint_meta(path)["step"])


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (see complete_checkpoints)."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def checkpoint_or_newest_in(path: str | Path, what: str) -> str:
    """`path` itself when it is a checkpoint (or not a folder: reading it says what is wrong); a run's folder
    (`cluster.storage_path`, or one run in it): its newest complete checkpoint, a last one cut off
    mid-write passed over. `what` names the setting in the error and the log line."""
    if is_remote(path):
        import fsspec

        fs, base = fsspec.core.url_to_fs(str(path))
        if fs.exists(posixpath.join(base, META)):
            return str(path)
    elif not Path(path).is_dir() or (Path(path) / META).exists():
        return str(path)
    newest = latest_checkpoint(path)
    if newest is None:
        raise UserError(f"{what}={path} holds no complete omnistream checkpoint")
    log.info("%s: the newest complete checkpoint under %s: %s", what, path, newest)
    return str(newest)
