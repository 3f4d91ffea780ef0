"""Test hook, on PYTHONPATH for every process the tests start (tests/conftest.py), Ray's workers included:
a stand-in for a native decoder library that crashes on crafted input. soundfile, asked to open bytes
that carry MARKER, kills its own process with SIGKILL, as a segfault in libsndfile or the kernel's
OOM killer would. Bytes without the marker are decoded as always. Nothing in omnistream knows of it.

soundfile is patched as it is imported, not imported here: most of the processes the tests start (Ray's
workers and agents, the CLI's) never decode audio, and importing soundfile and numpy in each cost 0.1 s of
CPU (measured: `import ray` 0.66 -> 0.76 s with an eager import here), in hundreds of processes.
"""

import os
import signal
import sys

MARKER = b"OMNISTREAM-TEST-KILLS-ITS-READER"


def _patch(soundfile) -> None:
    _open = soundfile.SoundFile.__init__

    def _init(self, file, *args, **kwargs):
        data = file.getvalue() if hasattr(file, "getvalue") else b""
        if MARKER in data[:4096]:
            os.kill(os.getpid(), signal.SIGKILL)
        _open(self, file, *args, **kwargs)

    soundfile.SoundFile.__init__ = _init


class _PatchOnImport:
    """A meta path finder that finds nothing itself: for `soundfile` it asks the other finders, and wraps
    the loader they give so that the module is patched right after it runs."""

    def find_spec(self, name, path=None, target=None):
        if name != "soundfile":
            return None
        import importlib.util

        sys.meta_path.remove(self)  # once: the search below must not come back here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if "soundfile" in sys.modules:
    _patch(sys.modules["soundfile"])
else:
    sys.meta_path.insert(0, _PatchOnImport())
