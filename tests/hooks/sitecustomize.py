"""Test hook, on PYTHONPATH for every process the tests start (tests/conftest.py), Ray's workers included:
a stand-in for a native decoder library that crashes on crafted input. soundfile, asked to open bytes
that carry MARKER, kills its own process with SIGKILL, as a segfault in libsndfile or the kernel's
OOM killer would. Bytes without the marker are decoded as always. Nothing in omnistream knows of it.
"""

import os
import signal

MARKER = b"OMNISTREAM-TEST-KILLS-ITS-READER"

try:
    import soundfile

    _open = soundfile.SoundFile.__init__

    def _init(self, file, *args, **kwargs):
        data = file.getvalue() if hasattr(file, "getvalue") else b""
        if MARKER in data[:4096]:
            os.kill(os.getpid(), signal.SIGKILL)
        _open(self, file, *args, **kwargs)

    soundfile.SoundFile.__init__ = _init
except ImportError:  # a process without soundfile (not the project's venv) has nothing to crash
    pass
