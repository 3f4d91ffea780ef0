"""The Ray token is never sent in clear to another host, and a damaged checkpoint is one line naming the file and
what is wrong. No network: every refusal
here happens before a connection is made."""

import json

import pytest

from omnistream.cli import main
from omnistream.cluster import auth, jobs
from omnistream.common.checkpoint import META, read_checkpoint_meta
from omnistream.common.errors import UserError


@pytest.mark.parametrize(
    "address,insecure,refused",
    [
        ("http://127.0.0.1:8265", False, False),
        ("http://localhost:8265", False, False),
        ("http://[::1]:8265", False, False),
        ("127.0.0.1:8265", False, False),
        ("https://ray.example.org:8265", False, False),
        ("http://ray.example.org:8265", False, True),
        ("http://10.0.0.7:8265", False, True),
        ("ray.example.org:8265", False, True),  # no scheme: Ray's client speaks plain http
        ("http://10.0.0.7:8265", True, False),  # --insecure: the user said so
    ],
)
def test_token_goes_over_plain_http_only_on_loopback(address, insecure, refused):
    if refused:
        with pytest.raises(UserError, match="refusing to send the Ray token over plain http"):
            auth.check_transport(address, insecure)
    else:
        auth.check_transport(address, insecure)


def test_client_refuses_before_connecting(tmp_path, monkeypatch, capsys):
    tok = tmp_path / "auth_token"
    tok.write_text("secret")
    tok.chmod(0o600)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tok))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    import ray.job_submission

    def never(*a, **k):  # a guard, so that even a broken check sends nothing anywhere
        raise AssertionError("a connection was attempted before the transport check")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", never)
    # a TEST-NET-1 address (RFC 5737), and the client is never even built
    assert main(["jobs", "list", "--address", "http://192.0.2.1:8265"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to send the Ray token over plain http to 192.0.2.1" in err[0]


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"step": 3, "world_si', "damaged or cut off"),
        ("\xff\xfe not json", "damaged or cut off"),
        ("[1, 2]", "holds list"),
        ('{"step": 3, "world_size": 2, "config": {}}', "lacks vocab"),
        ('{"step": 3, "world_size": 2, "config": {}, "vocab": {}}', "lacks vocab.fingerprint"),
        # a resume read config.train's fields (KeyError, the tracking run left RUNNING); export config.data's
        (
            '{"step": 3, "world_size": 2, "config": {"model": {}, "data": {"bundle_dir": "b"}}, "vocab": '
            '{"fingerprint": "f"}}',
            "lacks config.train",
        ),
        (
            '{"step": 3, "world_size": 2, "config": {"train": {"zero_stage": 3}, "model": {}, "data": {}},'
            ' "vocab": {"fingerprint": "f"}}',
            "lacks config.train.micro_batch_size.*config.data.bundle_dir",
        ),
    ],
)
def test_damaged_checkpoint_is_one_line(tmp_path, capsys, content, needle):
    (tmp_path / META).write_text(content)
    with pytest.raises(UserError, match=needle):
        read_checkpoint_meta(tmp_path)
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and META in err[0] and "Traceback" not in err[0], err


# the parts of a run's config that a resume and an export read back from a checkpoint
WHOLE_CONFIG = {
    "train": {"micro_batch_size": 4, "grad_accum": 1, "zero_stage": 3, "precision": "fp32"},
    "model": {},
    "data": {"bundle_dir": "b"},
}


def test_a_whole_meta_reads_back(tmp_path):
    meta = {"step": 3, "world_size": 2, "vocab": {"fingerprint": "abc"}, "config": WHOLE_CONFIG}
    (tmp_path / META).write_text(json.dumps(meta))
    assert read_checkpoint_meta(tmp_path) == meta


@pytest.mark.parametrize(
    "message, refused",
    [
        ("Failed to connect to Ray at address: http://127.0.0.1:40391.", False),  # "403" in a port is not a refusal
        ("Failed to connect to Ray at address: http://10.0.0.401:8265.", False),
        ("Request failed with status code 403: Forbidden", True),
        ("HTTP 401 Unauthorized", True),
        ("Authentication failed: invalid token", True),
    ],
)
def test_a_refusal_is_told_apart_from_an_unreachable_address(message, refused):
    assert jobs._refused(message) is refused


def _checkpoint(d, step: int, ranks: int = 2, data: str | None = '{"position": {"rows": 8}, "stream": {}}'):
    """A checkpoint's files as omnistream writes them (the model files' bytes do not matter here)."""
    (d / "model").mkdir(parents=True)
    for r in range(ranks):
        (d / "model" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
    (d / META).write_text(
        json.dumps({"step": step, "world_size": 2, "vocab": {"fingerprint": "f"}, "config": WHOLE_CONFIG})
    )
    if data is not None:
        (d / "data.json").write_text(data)


def test_the_newest_complete_checkpoint_passes_over_a_cut_off_one(tmp_path):
    """A run folder whose last checkpoint was cut off mid-write (a rank's shard or the data position
    missing, or the data position half-written) resumes from the one before; a lone broken one is one line."""
    from omnistream.training.checkpoint import latest_checkpoint, read_data_position

    _checkpoint(tmp_path / "checkpoint_a", 3)
    _checkpoint(tmp_path / "checkpoint_b", 6)
    _checkpoint(tmp_path / "checkpoint_c", 9, ranks=1)  # one rank's shard missing
    _checkpoint(tmp_path / "checkpoint_d", 12, data='{"position": {"ro')  # data position cut off
    _checkpoint(tmp_path / "checkpoint_e", 15, data=None)  # no data position at all
    assert latest_checkpoint(tmp_path).name == "checkpoint_b"
    with pytest.raises(UserError, match="data.json is damaged or cut off"):
        read_data_position(tmp_path / "checkpoint_d")
    with pytest.raises(UserError, match="has no data.json"):
        read_data_position(tmp_path / "checkpoint_e")
    assert latest_checkpoint(tmp_path / "checkpoint_c") is None
    _checkpoint(tmp_path / "checkpoint_f", 18)
    (tmp_path / "checkpoint_f" / META).write_text("")  # meta opened, not yet written
    assert latest_checkpoint(tmp_path).name == "checkpoint_b"


def test_a_checkpoint_ray_train_has_not_registered_is_not_complete(tmp_path):
    """Ray Train registers a checkpoint (checkpoint_manager_snapshot.json) only once every rank's files
    are persisted: one whose files all look whole but that is not yet listed is passed over."""
    from omnistream.training.checkpoint import (
        RAY_SNAPSHOT,
        complete_checkpoints,
        latest_checkpoint,
    )

    for name, step in (("checkpoint_a", 3), ("checkpoint_b", 6), ("checkpoint_c", 9)):
        _checkpoint(tmp_path / name, step)
    (tmp_path / RAY_SNAPSHOT).write_text(
        json.dumps(
            {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}, {"checkpoint_dir_name": "checkpoint_b"}]}
        )
    )
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint_a", "checkpoint_b"]
    (tmp_path / RAY_SNAPSHOT).write_text('{"checkpoint_res')  # the record itself half-written
    assert latest_checkpoint(tmp_path).name == "checkpoint_c"


def test_failed_shards_count_in_the_metrics_and_the_error_rate():
    from omnistream.pipelines.accounting import Tally, error_rate_verdict

    t = Tally()
    for i in range(3):
        t.shard_error(f"s3://bucket/gone-{i}.tar", "shard_unreadable", "FileNotFoundError")
    assert t.metrics()["data/shard_errors/shard_unreadable"] == 3
    verdict = error_rate_verdict(t, 0.5, 1000, final=True)  # every shard gone, no record seen
    assert verdict and "3 of the first 3 records and shards could not be read" in verdict
    assert "shard:shard_unreadable (3)" in verdict
    assert Tally.from_json(t.to_json()).metrics() == t.metrics()


def test_a_token_file_others_can_read_is_refused(tmp_path, monkeypatch):
    p = tmp_path / "auth_token"
    p.write_text("secret\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(p))
    p.chmod(0o644)
    with pytest.raises(UserError, match="can be read by other users \\(mode 644\\): chmod 600"):
        auth.read_token()
    with pytest.raises(UserError, match="chmod 600"):
        auth.ensure_token()
    p.chmod(0o600)
    assert auth.read_token() == "secret" and auth.ensure_token() == p


def test_private_dirs_are_this_users_alone(tmp_path):
    """Created 0700; a folder of this user's left open is closed; another user's, a link or a file at the
    place is refused, naming it (the head's temp dir sits at a path anyone can predict)."""
    import os

    from omnistream.common.private import private_dir

    d = private_dir(tmp_path / "a" / "b")
    assert os.stat(d).st_mode & 0o777 == 0o700
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    assert os.stat(private_dir(tmp_path / "open")).st_mode & 0o777 == 0o700
    (tmp_path / "link").symlink_to(tmp_path / "open")
    with pytest.raises(UserError, match="not a directory"):
        private_dir(tmp_path / "link")
    if os.getuid() == 0:  # a directory of another user's, made as root can
        (tmp_path / "theirs").mkdir()
        os.chown(tmp_path / "theirs", 65534, 65534)
        with pytest.raises(UserError, match="belongs to another user"):
            private_dir(tmp_path / "theirs")


def test_a_rank_file_cut_short_mid_copy_is_not_complete(tmp_path):
    """Ray Train copies each rank's folder into the checkpoint on its own, and keeps no record of an
    attempt whose worker was killed: a checkpoint whose files all exist, one of them cut short by the
    kill, was taken for complete, and the retry failed loading it (EOFError, seen in a CI run). Each rank
    now lists its files with their sizes (files-rank<R>.json); a file short of its size, or a rank's list
    missing, is not complete."""
    from omnistream.training.checkpoint import _write_manifest, latest_checkpoint

    for name, step in (("checkpoint_a", 7), ("checkpoint_b", 8), ("checkpoint_c", 9)):
        d = tmp_path / name
        _checkpoint(d, step)
        for r in range(2):
            (d / "model" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"y" * 1000)
        _write_manifest(d, 0)
        _write_manifest(d, 1)
    assert latest_checkpoint(tmp_path).name == "checkpoint_c"
    cut = tmp_path / "checkpoint_c" / "model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    cut.write_bytes(b"y" * 400)  # killed mid-copy: there, but short
    assert latest_checkpoint(tmp_path).name == "checkpoint_b"
    (tmp_path / "checkpoint_b" / "files-rank1.json").unlink()  # a rank whose files never arrived
    assert latest_checkpoint(tmp_path).name == "checkpoint_a"
