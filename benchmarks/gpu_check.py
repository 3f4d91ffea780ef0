"""The model and the real Trainer on a GPU: run where one is (torch + deepspeed needed; no Ray).

    python3 benchmarks/gpu_check.py [--out benchmarks/gpu_h100.json]
    python3 benchmarks/gpu_check.py --cpu-smoke      # the same path, tiny, on the CPU (a dry run)

benchmarks/README.md says how to get it onto a machine with no package index. About 8 minutes on
one H100. It reports:
1. attention parity on CUDA in fp32 (TF32 off): FlexAttention's loss and gradients against the dense
   T×T-mask reference on packed rows of many documents, and the CPU's varlen loss for the same weights;
2. generation with the KV cache equals generation without it, token for token, on CUDA;
3. NCCL's listeners (world size 1, its bootstrap included) are all on loopback;
4. training through omnistream's Trainer (DeepSpeed ZeRO-3, bf16, world size 1; the loop users run,
   not a copy): tokens/s, MFU (6N + attention FLOPs per token, against the card's dense bf16 peak)
   and peak memory as the Trainer logs them to MLflow, for ~350M and ~1B parameters, with
   torch.compile of the blocks; the 1B one also with activation checkpointing.
Versions of torch and deepspeed go with the figures.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from omnistream.configs import load_config
from omnistream.modalities import registry
from omnistream.modalities.vocab import Vocabulary
from omnistream.model.config import GPTConfig
from omnistream.model.model import GPT, generate
from omnistream.pipelines.packing import pack_documents
from omnistream.tracking import MemoryTracker
from omnistream.training.engine import single_process_group
from omnistream.training.trainer import Trainer


def batch(vocab: int, rows: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    docs, mods, keys = [], [], []
    while sum(len(d) for d in docs) < rows * seq * 1.1:
        L = int(rng.integers(8, seq // 2))
        docs.append(rng.integers(3, vocab, L))
        mods.append(np.ones(L, np.int64))
        keys.append(str(len(keys)))
    out = pack_documents(docs, mods, keys, seq)
    return {k: torch.as_tensor(out[k][:rows]) for k in ("input_ids", "labels", "position_ids", "doc_ids")}


def tiny_vocab() -> Vocabulary:
    """A real one-modality vocabulary (a byte-level BPE fitted on a few strings): the Trainer's
    bookkeeping needs modality names; the model's own vocab_size is set by the config below."""
    text = registry.build("text", {"vocab_size": 260})
    text.fit([f"sample {i} of a tiny corpus" for i in range(50)])
    return Vocabulary([text])


def synthetic_batches(vocab_size: int, rows: int, seq: int):
    """Packed rows of random documents, forever, in the stream's format (keys and modality ids included)."""
    rng = np.random.default_rng(0)
    n = 0
    while True:
        docs, mods, keys = [], [], []
        while sum(len(d) for d in docs) < rows * seq * 1.1:
            L = int(rng.integers(8, seq // 2))
            docs.append(rng.integers(3, vocab_size, L))
            mods.append(np.ones(L, np.int64))
            keys.append(f"0:synthetic:{n}")
            n += 1
        out = pack_documents(docs, mods, keys, seq)
        yield {k: out[k][:rows] for k in ("input_ids", "labels", "position_ids", "doc_ids", "modality_ids", "keys")}


def trainer_speed(model: GPTConfig, rows: int, steps: int, precision: str, **train) -> dict:
    """Train through the real Trainer (DeepSpeed ZeRO-3, world size 1) and read what it logged."""
    t0 = time.perf_counter()
    cfg = load_config(
        None,
        [f"model.{k}={v!r}".replace("'", '"') for k, v in vars(model).items() if k != "vocab_size"]
        + [
            f"train.steps={steps}",
            f"train.log_every={max(1, steps // 2)}",
            f"train.micro_batch_size={rows}",
            "train.zero_stage=3",
            f'train.precision="{precision}"',
            "train.warmup_steps=1",
            "data.eval_shards=[]",
            f"data.seq_len={model.max_seq_len}",
            "modalities = {text = {vocab_size = 260}}",
        ]
        + [f"train.{k}={str(v).lower()}" for k, v in train.items()],
    )
    cfg.model.vocab_size = model.vocab_size
    tracker = MemoryTracker()
    trainer = Trainer(cfg, tiny_vocab(), synthetic_batches(model.vocab_size, rows, model.max_seq_len), tracker=tracker)
    trainer.train()
    m = tracker.last()  # the second interval: the first holds the warm-up (and compile) steps
    out = {
        "params_m": round(trainer.n_params / 1e6, 1),
        "tokens_per_s": round(m["train/tokens_per_s"]),
        "mfu": round(m["train/mfu"], 3) if "train/mfu" in m else None,
        "loss": round(m["train/loss"], 4),
        "peak_mem_gb": round(m["train/peak_memory_gb"], 2),
        "precision": precision,
        "zero_stage": 3,
        "attention": trainer.engine.module.attention_kind(trainer.device),
        "rows": rows,
        "seq_len": model.max_seq_len,
        **train,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(out), flush=True)
    return out


def attention_parity(seq: int = 1024) -> dict:
    """Flex (CUDA) against dense (CUDA), fp32, loss and every gradient; and varlen on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    b = batch(512, 4, seq, seed=1)
    out = {}
    grads = {}
    for kind, device in (("dense", "cuda"), ("flex", "cuda"), ("varlen", "cpu")):
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=512, n_layers=2, n_heads=4, d_model=128, max_seq_len=seq, attention=kind)).to(
            device
        )
        x = {k: v.to(device) for k, v in b.items()}
        _, loss, _ = m(x["input_ids"], x["position_ids"], x["doc_ids"], x["labels"])
        loss.backward()
        out[f"loss_{kind}_{device}"] = float(loss)
        grads[kind] = {n: p.grad.detach().cpu() for n, p in m.named_parameters()}
    out["flex_loss_diff"] = abs(out["loss_flex_cuda"] - out["loss_dense_cuda"])
    out["flex_max_grad_diff"] = max(float((grads["flex"][n] - g).abs().max()) for n, g in grads["dense"].items())
    out["varlen_cpu_vs_dense_cuda_loss_diff"] = abs(out["loss_varlen_cpu"] - out["loss_dense_cuda"])
    out["flex_matches_dense_1e-5"] = out["flex_loss_diff"] < 1e-5 and out["flex_max_grad_diff"] < 1e-5
    return out


def loopback_listeners() -> list[str]:
    """This process's listening TCP sockets as (address, port), from /proc: no psutil on a bare machine."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                addr, port = f[1].split(":")
                raw = bytes.fromhex(addr)  # 32-bit words in host (little-endian) order
                ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
                found.append((ip, int(port, 16)))
    return found


def is_loopback(ip) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def main() -> None:
    from omnistream.common import logs

    logs.setup()  # the Trainer's step lines on stderr
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the Trainer path tiny on the CPU (no CUDA checks)")
    ap.add_argument("--quick", action="store_true", help="parity, cache and listeners only; no speed runs")
    ap.add_argument("--speed-only", action="store_true", help="the speed runs alone")
    args = ap.parse_args()
    single_process_group()
    if args.cpu_smoke:
        print(
            json.dumps(
                trainer_speed(
                    GPTConfig(vocab_size=608, n_layers=2, n_heads=2, d_model=64, max_seq_len=64),
                    rows=4,
                    steps=6,
                    precision="fp32",
                    activation_checkpointing=True,
                ),
                indent=1,
            )
        )
        return
    import deepspeed

    assert torch.cuda.is_available(), "no CUDA device"
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "deepspeed": deepspeed.__version__}

    def save():
        Path(args.out).write_text(json.dumps(res, indent=1))

    if not args.speed_only:
        checks(res, save)
    if args.quick:
        return

    # 4. bf16 training speed through the Trainer; a failing configuration is recorded, not fatal
    def speed(name, *a, **kw):
        try:
            res[name] = trainer_speed(*a, **kw)
        except Exception as e:  # noqa: BLE001 - the report says what failed and goes on
            res[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
            print(name, res[name], flush=True)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        save()

    m350 = GPTConfig(vocab_size=32768, n_layers=24, n_heads=16, d_model=1024, max_seq_len=2048)
    speed("gpt350m_bf16", m350, rows=16, steps=16, precision="bf16")
    speed("gpt350m_bf16_compile", m350, rows=16, steps=16, precision="bf16", compile=True)
    m1b = GPTConfig(vocab_size=32768, n_layers=24, n_heads=16, d_model=1792, max_seq_len=2048)
    speed("gpt1b_bf16", m1b, rows=8, steps=16, precision="bf16")
    speed("gpt1b_bf16_ac", m1b, rows=16, steps=16, precision="bf16", activation_checkpointing=True)
    print(json.dumps(res, indent=1))


def checks(res: dict, save) -> None:
    """Attention parity, KV-cache generation, NCCL listeners."""
    # 1. attention parity
    res["attention_parity"] = attention_parity()
    save()
    # 2. generation: cache == recompute, on CUDA, and the same ids as the CPU
    torch.manual_seed(0)
    demo = GPTConfig(vocab_size=608, n_layers=4, n_heads=4, d_model=128, max_seq_len=256)
    cpu = GPT(demo).eval()
    gpu = GPT(demo).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    prompts = [[1, 3, 20, 21, 22], [1, 5, 40], list(range(3, 103))]
    cached = generate(gpu, prompts, 64)
    res["generate_cache_equals_recompute"] = cached == generate(gpu, prompts, 64, use_cache=False)
    res["generate_cuda_equals_cpu"] = cached == generate(cpu, prompts, 64)
    # 3. NCCL's listeners (single_process_group initialised NCCL; a collective makes it connect)
    x = torch.ones(1, device="cuda")
    torch.distributed.all_reduce(x)
    listeners = loopback_listeners()
    res["listeners"] = [f"{ip}:{port}" for ip, port in listeners]
    res["listeners_all_loopback"] = all(is_loopback(ip) for ip, _ in listeners)
    save()
    print(json.dumps(res, indent=1), flush=True)


if __name__ == "__main__":
    main()
