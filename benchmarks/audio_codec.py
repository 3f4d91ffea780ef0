"""The learned audio codec (`audio` with `tokenizer = "codec"`) on real speech, held out by speaker.

Speech gathered here, no downloads at run time: the voiced dialogue of the game Fish Fillets NG, recorded by
Czech and Dutch voice actors (Debian's fillets-ng-data-cs and fillets-ng-data-nl, ~100 and ~90 minutes,
mono and stereo Ogg Vorbis at 22 and 44 kHz). The codec is fitted on the Czech recordings only and measured
on the Dutch ones: other actors, another language. A second held-out set is synthetic: espeak-ng voices
reading English sentences (the voices of the issue's own baseline), when espeak-ng is installed. A third is
the woman's voice of ALSA's speaker test (alsa-utils: "Front Left" and the like, 8 clips), when installed.

    apt-get install fillets-ng-data-cs fillets-ng-data-nl espeak-ng alsa-utils
    python benchmarks/audio_codec.py                     # the defaults: 150 ids/s
    python benchmarks/audio_codec.py --set width=192 --set envelope_weight=30

Prints one JSON object (and writes it to --out): the codec and k-means at the same ids per second, side by
side on each held-out set (modalities/audio_eval.compare), and the fit's time.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

from omnistream.modalities import audio_eval
from omnistream.modalities.audio import Audio, AudioModality

log = logging.getLogger("omnistream.bench.audio")
FILLETS = "/usr/share/games/fillets-ng/sound"
SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "Four hours of steady work faced us.",
]
VOICES = ["en+m3", "en-us+f2", "en+f4", "en-gb-scotland+m1"]
ALSA = "/usr/share/sounds/alsa"


def read(path: str) -> Audio:
    w, sr = sf.read(path, dtype="float32", always_2d=True)
    return Audio(w.mean(1), sr)


def fillets(lang: str, limit: int | None, seed: int) -> list[Audio]:
    files = sorted(glob.glob(f"{FILLETS}/*/{lang}/*.ogg"))
    if not files:
        raise SystemExit(f"no speech under {FILLETS}/*/{lang}: apt-get install fillets-ng-data-{lang}")
    if limit:
        files = random.Random(seed).sample(files, min(limit, len(files)))
    return [read(f) for f in files]


def espeak(voices: list[str]) -> list[Audio]:
    if not shutil.which("espeak-ng"):
        log.warning("espeak-ng is not installed: no synthetic held-out set")
        return []
    out = []
    with tempfile.TemporaryDirectory() as d:
        for v in voices:
            for i, s in enumerate(SENTENCES):
                p = f"{d}/{i}.wav"
                subprocess.run(["espeak-ng", "-v", v, "-w", p, s], check=True)
                out.append(read(p))
    return out


def alsa_voice() -> list[Audio]:
    files = [f for f in sorted(glob.glob(f"{ALSA}/*.wav")) if not f.endswith("Noise.wav")]
    if not files:
        log.warning("alsa-utils is not installed: no held-out set of ALSA's speaker-test voice")
    return [read(f) for f in files]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="an audio option for the codec (JSON value), e.g. fit_steps=6000 or 'levels=[8,8,8,5]'",
    )
    ap.add_argument("--held-clips", type=int, default=120, help="Dutch clips to measure on (random, seeded)")
    ap.add_argument("--out", default="audio_codec.json")
    ap.add_argument(
        "--bundle",
        help="save the fitted codec to this folder; if it holds one already, measure that one instead of fitting",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    opts = {"tokenizer": "codec"}
    for kv in args.set:
        k, v = kv.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    mod = AudioModality(opts)
    t0 = time.time()
    train = fillets("cs", None, 0)
    held = {"dutch_actors": fillets("nl", args.held_clips, 0), "espeak_ng": espeak(VOICES), "alsa_voice": alsa_voice()}
    log.info(
        "read %d fit clips (%.0f min) and %s in %.0f s",
        len(train),
        sum(a.seconds for a in train) / 60,
        {k: len(v) for k, v in held.items()},
        time.time() - t0,
    )
    t0 = time.time()
    last = [0.0]

    def progress(step, total, m):
        if time.time() - last[0] > 30 or step == total:
            last[0] = time.time()
            log.info("step %d/%d loss %.3f mel_l1 %.3f (%.0f s)", step, total, m["loss"], m["mel_l1"], time.time() - t0)

    if args.bundle and (Path(args.bundle) / "state.json").exists():
        mod.load(args.bundle)
        fit_s = float("nan")
    else:
        mod.fit([mod.fit_features(a) for a in train], progress=progress)
        fit_s = time.time() - t0
        if args.bundle:
            mod.save(args.bundle)
    report = {
        "options": mod.options.model_dump(mode="json"),
        "fit_seconds": round(fit_s, 1),
        "fit_minutes_of_speech": round(sum(a.seconds for a in train) / 60, 1),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for name, clips in held.items():
        if clips:
            report[name] = audio_eval.compare(mod, train[:400], clips)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
