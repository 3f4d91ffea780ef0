"""Model and optimizer state re-sharded across worker counts: real DeepSpeed ZeRO-3 engines on gloo
(2 processes, then 1, then 2 again; no Ray). A checkpoint of 2 ranks goes through DeepSpeed's universal
checkpoint (checkpoint.to_universal) into 1 rank and back into 2; every parameter's fp32 weights and
both AdamW moments, and the step, come back bit for bit."""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _cfg(stage: int = 3):
    from omnistream.configs import load_config

    c = load_config(
        None,
        [
            "model.n_layers=2",
            "model.d_model=32",
            "model.n_heads=2",
            f"train.zero_stage={stage}",
            "train.micro_batch_size=2",
            "data.seq_len=16",
            "train.warmup_steps=1",
            "modalities = {text = {vocab_size = 260}}",
        ],
    )
    c.model.vocab_size, c.model.max_seq_len = 300, 16
    return c


def _rank(rank: int, world: int, port: int, load: str | None, save: str, steps: int, stage: int) -> None:
    import torch.distributed as dist

    from omnistream.common.checkpoint import CKPT_TAG
    from omnistream.training.engine import build_engine, pin_collectives_to_loopback

    pin_collectives_to_loopback()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    engine, _, _ = build_engine(_cfg(stage), load_universal=load is not None)
    if load:
        engine.load_checkpoint(load, tag=CKPT_TAG, load_module_strict=True)
    for s in range(steps):
        g = torch.Generator().manual_seed(100 * s + rank)
        x = torch.randint(3, 300, (2, 16), generator=g)
        _, loss, _ = engine(x, torch.arange(16).repeat(2, 1), torch.ones(2, 16, dtype=torch.long), x.roll(-1, 1))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(save, tag=CKPT_TAG)
    dist.destroy_process_group()
    # the work is on disk: leave without the interpreter's teardown, where a C++ thread of the collective
    # backend once aborted a rank that had done everything ("terminate called without an active
    # exception", SIGABRT), failing the spawn
    os._exit(0)


def _states(universal: Path) -> dict:
    out = {}
    for d in sorted((universal / "model" / "zero").iterdir()):
        if d.is_dir():
            for f in sorted(d.iterdir()):
                t = torch.load(f, weights_only=False)
                out[f"{d.name}/{f.name}"] = t["param"] if isinstance(t, dict) else t
    return out


def _ranks(world: int, *args) -> None:
    """`world` rank processes, forked from a server that imported torch and DeepSpeed once: five spawned
    ranks would import them five times (about 13 s of CPU each here)."""
    mp.start_processes(_rank, args=(world, *args), nprocs=world, start_method="forkserver")


@pytest.mark.parametrize("stage", [3, 1])
def test_a_checkpoint_of_2_ranks_loads_on_1_and_on_2_again_bit_for_bit(tmp_path, stage):
    import multiprocessing

    from omnistream.cluster.connect import free_port
    from omnistream.training.checkpoint import to_universal

    multiprocessing.set_forkserver_preload(["torch", "deepspeed", "omnistream.training.engine"])

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _ranks(2, free_port(), None, str(a), 3, stage)
    ua = to_universal(a, tmp_path / "ua")
    _ranks(1, free_port(), str(ua), str(b), 0, stage)  # 2 -> 1, saved as it was loaded
    ub = to_universal(b, tmp_path / "ub")
    _ranks(2, free_port(), str(ub), str(c), 0, stage)  # 1 -> 2
    uc = to_universal(c, tmp_path / "uc")
    sa, sb, sc = _states(ua), _states(ub), _states(uc)
    # 14 parameters, each with fp32, exp_avg and exp_avg_sq (ZeRO-1's form adds AdamW's step per parameter,
    # and the tied head's fp32 under its own name)
    for part in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
        assert len({k.split("/")[0] for k in sa if k.endswith("/" + part) and not k.startswith("head.")}) == 14
    assert any(k.endswith("exp_avg.pt") and v.abs().sum() > 0 for k, v in sa.items())  # the moments are real
    for k in sa:
        assert torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]), k
    steps = [
        torch.load(next((u / "model").glob("*model_states.pt")), weights_only=False)["global_steps"]
        for u in (ua, ub, uc)
    ]
    assert steps == [3, 3, 3]
    assert to_universal(a, tmp_path / "ua") == ua  # converted once, then reused


class _Payload:
    """Unpickled, it creates a file: what a planted checkpoint's optimizer file could do with any code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(tmp_path):
    """Resuming on another number of workers converts the checkpoint to DeepSpeed's universal form, whose
    converter calls torch.load(weights_only=False); the checkpoint's own omnistream.json decides that
    path. An optimizer file holding a __reduce__ payload is refused with one line, and never runs."""
    import torch

    from omnistream.common.errors import UserError
    from omnistream.training.checkpoint import to_universal

    marker = tmp_path / "pwned"
    model = tmp_path / "ck" / "model"
    model.mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        torch.save({"optimizer_state_dict": {"zero_stage": _Payload(str(marker))}}, model / name)
    with pytest.raises(UserError, match="needs a pickle to load, refused"):
        to_universal(tmp_path / "ck", tmp_path / "u")
    assert not marker.exists(), "the pickle ran"
