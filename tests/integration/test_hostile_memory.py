"""Hostile records under an address-space limit (RLIMIT_AS, in a subprocess): each bound errors its
record under its reason; nothing raises MemoryError, and the process is not killed. No Ray."""

import json
import subprocess
import sys

from common import REPO

SCRIPT = r"""
import json, resource, sys
from omnistream.pipelines.accounting import Tally
from omnistream.pipelines.config import DataConfig
from omnistream.pipelines.documents import RecordProcessor

import torchaudio.transforms  # noqa: F401 - loaded before the limit, as a warm actor has it
proc = RecordProcessor(None, sys.argv[1], DataConfig(), seed=0)
# the process as it stands (torch, the tokenizers loaded) plus 768 MiB: a 1.4 GB resampler kernel,
# or a record's worth of members read without bound, would not fit
vm = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmSize:"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (768 << 20), resource.RLIM_INFINITY))
tally = Tally()
out = [(r.key, o.status, o.reason) for _, r, o in proc.process([(0, sys.argv[2])], tally)]
print(json.dumps({"records": out, "balanced": tally.balanced(), "shard_errors": tally.shard_errors}))
"""


def test_hostile_records_under_an_address_space_limit(bundle, corpus, tmp_path):
    import io
    import tarfile

    from test_hostile_records import tar_bytes  # the unit tier's real-bytes helper

    from common import wav_header
    from omnistream.pipelines.records import read_shard

    good = next(r for r in read_shard(corpus["train"][0], 1 << 26) if "txt" in r.fields)
    members = [("ok-0.txt", good.fields["txt"])]
    members += [("odd-0.wav", wav_header(44_101, 4000))]  # in range, but a 1.4 GB kernel bank
    members += [(f"many-0.f{i}", b"x" * 1000) for i in range(5000)]  # 5000 members in one record
    members += [("ok-1.txt", good.fields["txt"])]
    shard = tmp_path / "hostile.tar"
    shard.write_bytes(tar_bytes(members))
    buf = io.BytesIO()  # and a shard whose third member comes after a 5 MB pax header
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, pax in (("a-0.txt", {}), ("b-0.txt", {}), ("c-0.txt", {"comment": "x" * (5 << 20)})):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(good.fields["txt"]), pax
            t.addfile(info, io.BytesIO(good.fields["txt"]))
    pax = tmp_path / "pax.tar"
    pax.write_bytes(buf.getvalue())

    # 30 records of a 4000x4000 PNG (a few KB each, 48 MB decoded, within image.max_pixels): decoded one
    # record at a time, never the chunk's 30 at once (1.4 GB)
    import numpy as np
    from PIL import Image

    png = io.BytesIO()  # wide stripes: not near-uniform, and a few KB as PNG
    stripes = np.broadcast_to(((np.arange(4000) // 500) % 2 * 255).astype(np.uint8), (4000, 4000))
    Image.fromarray(np.ascontiguousarray(stripes)).convert("RGB").save(png, "PNG", optimize=True)
    big = tmp_path / "big.tar"
    big.write_bytes(
        tar_bytes(
            [m for i in range(30) for m in ((f"big-{i}.png", png.getvalue()), (f"big-{i}.txt", good.fields["txt"]))]
        )
    )

    results = {}
    for path in (shard, pax, big):
        p = subprocess.run(
            [sys.executable, "-c", SCRIPT, bundle, str(path)], capture_output=True, text=True, timeout=300, cwd=REPO
        )
        assert p.returncode == 0, p.stderr[-3000:]
        assert "MemoryError" not in p.stderr
        results[path.name] = json.loads(p.stdout.strip().splitlines()[-1])
    got = {k: r for k, _, r in results["hostile.tar"]["records"]}
    assert got == {"ok-0": "", "odd-0": "audio_sample_rate", "many-0": "too_many_members", "ok-1": ""}, got
    assert results["hostile.tar"]["balanced"]
    got = {k: r for k, _, r in results["pax.tar"]["records"]}
    assert got == {"a-0": "", "b-0": "header_too_large"}, got
    got = {k: (s, r) for k, s, r in results["big.tar"]["records"]}
    assert len(got) == 30 and set(got.values()) == {("kept", "")}, got
