"""The omnistream decoder: one Transformer over one token stream of every modality.

Plain single-device PyTorch in the manner of nanoGPT's model.py. Nothing here
knows about Ray, DeepSpeed or MLflow: sharding (ZeRO), precision and
checkpointing are applied around this module by cluster/, the way torchtitan
keeps `parallelize` apart from the model.

Pieces, and why:
- RMSNorm (pre-norm): as stable as LayerNorm, one reduction cheaper (Llama).
- Rotary positions, indexed by `position_ids` that restart at 0 for every
  packed document, so a document looks the same wherever packing put it.
- SwiGLU MLP with hidden = 8/3·d rounded up to a multiple of 64: same params
  as a 4·d GELU MLP, better loss per FLOP (Shazeer 2020).
- scaled_dot_product_attention with a causal AND document mask: a token sees
  only earlier tokens of its own document, so packing never leaks context.
- Tied input/output embeddings: with ~1k-token vocabularies and small widths
  this halves the embedding parameters at no measurable cost.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig

IGNORE = -100  # label value that carries no loss (pads, document boundaries)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_table(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ang = torch.outer(torch.arange(max_len).float(), inv)  # (max_len, head_dim/2)
    return ang.cos(), ang.sin()


def apply_rotary(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B, 1, T, D/2), gathered at each token's position id
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = 64 * math.ceil(8 * cfg.d_model / 3 / 64)  # 8/3·d keeps params equal to a 4·d MLP
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model), SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask))
        return x + self.drop(self.mlp(self.norm2(x)))


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query i may see key j iff j <= i and both are in the same document.

    Every token sees at least itself, so no row is empty (an all-False row
    would make softmax return NaN). Pads form their own document.
    """
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc).unsqueeze(1)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("GPTConfig.vocab_size must be set (from the tokenizer bundle's vocab.json)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rotary_table(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2: scale residual-branch outputs by 1/sqrt(2·n_layers) so the stream's variance stays flat
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, position_ids, doc_ids, labels=None):
        """Logits (B, T, V); with labels also the mean loss and the per-token loss (B, T), 0 where ignored."""
        if position_ids.max() >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(position_ids.max())} >= max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        cos = self.rope_cos[position_ids].unsqueeze(1)  # (B, 1, T, D/2)
        sin = self.rope_sin[position_ids].unsqueeze(1)
        mask = attention_mask(doc_ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        logits = self.head(self.norm(x))
        if labels is None:
            return logits
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                     ignore_index=IGNORE, reduction="none").view_as(labels)
        n = (labels != IGNORE).sum().clamp(min=1)
        return logits, token_loss.sum() / n, token_loss


def loss_by_group(token_loss: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, n_groups: int):
    """Summed loss and token count per group id (e.g. the modality of each label)."""
    valid = labels != IGNORE
    g = groups[valid]
    sums = torch.zeros(n_groups, dtype=torch.float32, device=token_loss.device).index_add_(0, g, token_loss[valid].float())
    counts = torch.bincount(g, minlength=n_groups).float()
    return sums, counts


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, allowed: tuple[int, int] | None = None,
             extra_allowed: tuple[int, ...] = (), stop_token: int | None = None) -> list[list[int]]:
    """Greedy continuation of a batch of prompts of different lengths.

    Prompts are left-padded; pads get their own document id, so the document
    mask keeps them out of every real token's context and each prompt's
    positions start at 0. `allowed` = [lo, hi) restricts the choice to one
    modality's block (plus `extra_allowed`, e.g. its end marker): asking for
    an image gets image ids. No KV cache: prompts here are ~100 tokens and the
    whole recompute costs less than the code a cache needs.
    """
    model.eval()
    device = next(model.parameters()).device
    out = [list(p) for p in prompts]
    done = [False] * len(prompts)
    V = model.cfg.vocab_size
    bias = None
    if allowed is not None:
        bias = torch.full((V,), float("-inf"), device=device)
        bias[allowed[0]:allowed[1]] = 0
        for t in extra_allowed:
            bias[t] = 0
    for _ in range(max_new_tokens):
        T = max(len(s) for s in out)
        ids = torch.zeros(len(out), T, dtype=torch.long, device=device)
        pos = torch.zeros_like(ids)
        doc = torch.zeros_like(ids)
        for i, s in enumerate(out):
            ids[i, T - len(s):] = torch.tensor(s, device=device)
            pos[i, T - len(s):] = torch.arange(len(s), device=device)
            doc[i, T - len(s):] = 1
        logits = model(ids, pos, doc)[:, -1, :].float()
        if bias is not None:
            logits = logits + bias
        nxt = logits.argmax(-1).tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                out[i].append(t)
                done[i] = stop_token is not None and t == stop_token
        if all(done):
            break
    return [s[len(p):] for s, p in zip(out, prompts)]


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matmuls (fwd + bwd) + 12·L·d·T for attention (PaLM, app. B)."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.d_model * seq_len
