"""The model on a GPU, with nothing but torch (what a lent GPU machine has): run where one is.

    python3 benchmarks/gpu_check.py [--out gpu.json]

1. the same weights and packed batch (documents, positions, document mask) give the same loss on
   CUDA in fp32 as on the CPU;
2. bf16 autocast training steps on CUDA: tokens/s and MFU (6N + attention FLOPs per token, against
   the card's dense bf16 peak) for the demo model and a ~350M-parameter one;
3. greedy generation runs on CUDA and matches the CPU's ids.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from omnistream.model.model import GPT, GPTConfig, flops_per_token, generate  # noqa: E402
from omnistream.pipelines.packing import pack_documents  # noqa: E402

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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


def train_speed(cfg: GPTConfig, rows: int, steps: int = 10) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    b = {k: v.cuda() for k, v in batch(cfg.vocab_size, rows, cfg.max_seq_len).items()}
    tokens = int((b["doc_ids"] > 0).sum())

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss, _ = model(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    n = model.num_params()
    tps = tokens / dt
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK.items() if k in name), None)
    return {"params_m": round(n / 1e6, 1), "tokens_per_s": round(tps), "step_ms": round(dt * 1e3, 1),
            "mfu": round(tps * flops_per_token(cfg, n, cfg.max_seq_len) / peak, 3) if peak else None,
            "loss": round(loss.item(), 4), "max_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu.json")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    # 1. CPU vs CUDA, fp32
    cfg = GPTConfig(vocab_size=608, n_layers=4, n_heads=4, d_model=128, max_seq_len=256)
    torch.manual_seed(0)
    cpu = GPT(cfg).eval()
    gpu = GPT(cfg).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    b = batch(cfg.vocab_size, 8, 256)
    with torch.no_grad():
        _, l_cpu, _ = cpu(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"])
        torch.backends.cuda.matmul.allow_tf32 = False
        bg = {k: v.cuda() for k, v in b.items()}
        _, l_gpu, _ = gpu(bg["input_ids"], bg["position_ids"], bg["doc_ids"], bg["labels"])
    res["fp32_loss_cpu"], res["fp32_loss_cuda"] = float(l_cpu), float(l_gpu)
    res["fp32_loss_match"] = abs(float(l_cpu) - float(l_gpu)) < 1e-4

    # 3. generation on CUDA equals generation on the CPU
    prompts = [[1, 3, 20, 21, 22], [1, 5, 40]]
    res["generate_match"] = generate(cpu, prompts, 8) == generate(gpu, prompts, 8)

    # 2. bf16 training speed
    res["demo_model_bf16"] = train_speed(cfg, rows=64)
    big = GPTConfig(vocab_size=32768, n_layers=24, n_heads=16, d_model=1024, max_seq_len=2048)
    res["gpt350m_bf16"] = train_speed(big, rows=8)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
