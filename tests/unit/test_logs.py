"""One log format, and what recognises it: `[omnistream] ...` lines from logging, parsed back by the same
module, so `jobs follow` keeps omnistream's lines out of a Ray job's log whatever Ray puts before them."""

import logging

from omnistream.cluster.jobs import ours
from omnistream.common import logs


def test_every_level_formats_and_parses_back(capsys):
    logs.setup(1)
    log = logging.getLogger("omnistream.test")
    log.debug("a detail")
    log.info("step %d/%d loss=%.3f", 3, 10, 2.5)
    log.warning("the tracking store failed")
    log.error("two\nlines")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "[omnistream] debug: omnistream.test: a detail",
        "[omnistream] step 3/10 loss=2.500",
        "[omnistream] warning: the tracking store failed",
        "[omnistream] error: two",
        "[omnistream]   lines",
    ]
    assert [logs.parse(line) for line in err[:4]] == [
        ("debug", "omnistream.test: a detail"),
        ("info", "step 3/10 loss=2.500"),
        ("warning", "the tracking store failed"),
        ("error", "two"),
    ]
    assert logs.parse("INFO worker.py:12 -- Started a local Ray instance.") is None


def test_quiet_keeps_warnings_only(capsys):
    logs.setup(-1)
    logging.getLogger("omnistream.test").info("hidden")
    logging.getLogger("omnistream.test").warning("shown")
    assert capsys.readouterr().err == "[omnistream] warning: shown\n"
    logs.setup(0)


def test_follow_keeps_omnistream_lines_from_any_ray_process():
    assert ours("(RayTrainWorker pid=4242) [omnistream] step 2/4 loss=3.1") == "[omnistream] step 2/4 loss=3.1"
    assert ours("\x1b[36m(SplitCoordinator pid=7)\x1b[0m [omnistream] warning: x") == "[omnistream] warning: x"
    assert ours("omnistream: error: no shards found for data.train_shards") is not None
    assert ours("(raylet) A worker died or was killed while executing a task") is None
    assert ours("2026-11-30 02:00:00,000 INFO worker.py:1 -- [omnistream] quoted by Ray") is None
