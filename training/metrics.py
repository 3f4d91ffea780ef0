"""Training metrics between two log points, reduced across ranks: loss per modality, tokens/s,
data wait, token shares; and the device figures (memory, MFU) that go with them."""

from __future__ import annotations

import torch

from omnistream.modalities.vocab import Vocabulary

# dense bf16 peak FLOP/s per device, for train/mfu; CPUs have no dependable figure, so no MFU there
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class Interval:
    """Sums over the steps between two log points; reduced across ranks before logging."""

    def __init__(self, n_groups: int, device: torch.device | str = "cpu"):
        # loss sums stay on the training device between log points: a .cpu() per micro-batch would
        # make every step on a GPU wait for its own backward before the next batch is queued
        self.sums = torch.zeros(n_groups, device=device)
        self.counts = torch.zeros(n_groups, device=device)
        self.tokens = 0
        self.wait = 0.0
        self.time = 0.0
        self.mod_tokens = torch.zeros(n_groups - 1, dtype=torch.float64)  # already summed over ranks
        self.max_dev = None  # largest |share - target| of any global step (token mixture on)

    def add_shares(self, step_tokens, dev: float | None) -> None:
        self.mod_tokens += step_tokens
        if dev is not None:
            self.max_dev = dev if self.max_dev is None else max(self.max_dev, dev)

    def add(self, s, c, tokens: int, wait: float) -> None:
        self.sums += s
        self.counts += c
        self.tokens += tokens
        self.wait += wait

    def reduce(self, all_reduce, world: int) -> Interval:
        """Summed over ranks by `all_reduce` (in place); wait and time are averaged."""
        v = torch.cat(
            [self.sums.cpu(), self.counts.cpu(), torch.tensor([self.tokens, self.wait, self.time], dtype=torch.float32)]
        )
        all_reduce(v)
        n = len(self.sums)
        out = Interval(n)
        out.sums, out.counts = v[:n], v[n : 2 * n]
        out.tokens, out.wait, out.time = float(v[2 * n]), float(v[2 * n + 1]) / world, float(v[2 * n + 2]) / world
        out.mod_tokens, out.max_dev = self.mod_tokens, self.max_dev
        return out

    def metrics(self, vocab: Vocabulary) -> dict[str, float]:
        m = {
            "train/loss": float(self.sums.sum() / self.counts.sum().clamp(min=1)),
            "train/tokens_per_s": self.tokens / max(self.time, 1e-9),
            "train/data_wait_frac": self.wait / max(self.time, 1e-9),
        }
        for g, name in enumerate(vocab.names, start=1):
            if self.counts[g] > 0:
                m[f"train/loss/{name}"] = float(self.sums[g] / self.counts[g])
        total = float(self.mod_tokens.sum())
        if total:
            m.update({f"data/token_share/{n}": float(v) / total for n, v in zip(vocab.names, self.mod_tokens)})
        if self.max_dev is not None:
            m["data/token_share_max_dev"] = self.max_dev
        return m


def memory_gb() -> float:
    """Peak device memory (CUDA), else this process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and v is not None}
