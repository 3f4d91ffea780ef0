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
- Causal, document-masked attention: a token sees only earlier tokens of its
  own document, so packing never leaks context. Three kernels compute it
  (ATTENTION_KERNELS, picked by `GPTConfig.attention`), none but the dense
  reference builds a T×T mask: FlexAttention on CUDA, length-bucketed causal
  SDPA ("varlen") elsewhere.
- A KV cache for generation: each new token costs one token's forward.
- Tied input/output embeddings: with ~1k-token vocabularies and small widths
  this halves the embedding parameters at no measurable cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    # x: (B, H, T, D); cos/sin: (B, 1, T, D/2) fp32, gathered at each token's position id. The rotation
    # is computed in fp32 and cast back: left in fp32, a bf16 model's attention and output projection
    # would run in fp32 (and DeepSpeed ZeRO-3's bf16 linear refuses the mixed dtypes outright)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, layout: Layout, kv: tuple[KVCache, int] | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:  # generation: this step's keys join the cached ones, and queries see them all
            k, v = kv[0].store(kv[1], k, v)
        y = attend(q, k, v, layout, self.dropout if self.training else 0.0)  # (B, T, H, D)
        return self.proj(y.reshape(B, T, C))


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

    def forward(self, x, cos, sin, layout, kv=None):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, layout, kv))
        return x + self.drop(self.mlp(self.norm2(x)))


# ---- document-masked attention -------------------------------------------------------------------
# A packed row holds many documents, and a token may see only earlier tokens of its own document. Each way
# of computing exactly that is one kernel class with two static methods, `layout(doc_ids)` (worked out once
# per forward, shared by every layer) and `attend(q, k, v, layout, dropout)`, registered by name in
# ATTENTION_KERNELS; `GPTConfig.attention` picks one by that name (model/config.py lists the names, so that
# a config is checked without torch). tests/unit/test_attention.py holds every registered kernel to the
# dense reference, 1e-5 in loss and gradients. Document ids are as pipelines/packing.py writes them: a
# document is a run of equal ids in a row.
MIN_BUCKET = 16  # finest varlen bucket step: below this, more SDPA calls cost more than the padding they save


@dataclass
class Layout:
    """Where the documents of a batch are, worked out once per forward and shared by every layer."""

    kernel: type  # the kernel class that made it (and attends with it)
    mask: torch.Tensor | None = None  # dense: (B, 1, T, S) bool, True = may attend
    buckets: list = field(default_factory=list)  # varlen: [(index (n, L) into the B·T tokens, real slots)]
    order: torch.Tensor | None = None  # varlen: puts the buckets' outputs back in row order
    block_mask: object = None  # flex: torch's BlockMask


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query i may see key j iff j <= i and both are in the same document.

    Every token sees at least itself, so no row is empty (an all-False row
    would make softmax return NaN). Pads form their own document.
    """
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc).unsqueeze(1)


class DenseAttention:
    """The reference: SDPA with a (B, 1, T, T) bool mask. The mask is T² per row (64 MB at T = 8k) and an
    explicit mask makes SDPA give up its flash kernels. Generation's cached steps attend this way too, with
    the (B, 1, T, S) mask of the new tokens over every cached key (KVCache.extend)."""

    @staticmethod
    def layout(doc_ids: torch.Tensor) -> Layout:
        return Layout(DenseAttention, mask=attention_mask(doc_ids))

    @staticmethod
    def attend(q, k, v, layout: Layout, dropout: float = 0.0) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, dropout_p=dropout).transpose(1, 2)


class VarlenAttention:
    """Every document cut out of the row, documents grouped into length buckets (25% apart), and each bucket
    run as one batch of causal SDPA with no mask (the flash kernel, on CPU too). Padding a document at its
    END is exact under causality: no real query sees a later pad. Memory is linear in T and compute is
    sum(L_doc²), not T². The path on CPU."""

    @staticmethod
    def layout(doc_ids: torch.Tensor) -> Layout:
        """Documents as runs of equal ids, bucketed by length rounded up to a quarter of its power of two
        (257..320 -> 320), in steps of at least 16: at most 25% padding above 64 tokens (at most 1.56x the
        attention FLOPs of exact lengths), in a few SDPA calls instead of one per document."""
        B, T = doc_ids.shape
        flat = doc_ids.reshape(-1)
        starts_doc = torch.ones_like(flat, dtype=torch.bool)
        starts_doc[1:] = flat[1:] != flat[:-1]
        starts_doc[::T] = True  # a row always starts a document, even if the last one had the same id
        starts = starts_doc.nonzero().squeeze(1)
        lengths = torch.diff(starts, append=starts.new_tensor([flat.numel()]))
        octave = torch.exp2(torch.floor(torch.log2(lengths.double()))).long()
        step = (octave // 4).clamp(min=MIN_BUCKET)
        sizes = (lengths + step - 1) // step * step
        buckets, picked = [], []
        for size in sizes.unique().tolist():
            sel = sizes == size
            s, n = starts[sel], lengths[sel]
            ar = torch.arange(size, device=flat.device)
            valid = ar < n[:, None]
            index = torch.where(valid, s[:, None] + ar, s[:, None])  # pads read the document's first token
            buckets.append((index, valid.flatten().nonzero().squeeze(1)))  # and are dropped after attention
            picked.append(index[valid])
        return Layout(VarlenAttention, buckets=buckets, order=torch.argsort(torch.cat(picked)))

    @staticmethod
    def attend(q, k, v, layout: Layout, dropout: float = 0.0) -> torch.Tensor:
        B, H, T, D = q.shape
        # one gather per bucket for q, k and v together: (B·T, 3, H, D) rows, picked by token index
        qkv = torch.stack((q, k, v), dim=2).permute(0, 3, 2, 1, 4).reshape(B * T, 3, H, D)
        outs = []
        for index, keep in layout.buckets:
            n, L = index.shape
            qb, kb, vb = qkv.index_select(0, index.flatten()).view(n, L, 3, H, D).permute(2, 0, 3, 1, 4)  # (n, H, L, D)
            y = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, dropout_p=dropout)
            outs.append(y.transpose(1, 2).reshape(n * L, H, D).index_select(0, keep))  # real tokens only
        return torch.cat(outs).index_select(0, layout.order).view(B, T, H, D)


class FlexAttention:
    """FlexAttention with a block mask built from doc_ids: key blocks no query can see are skipped and
    nothing T×T exists. The path when training on CUDA (compiled once per process); no dropout."""

    cpu_backward = False  # torch 2.14's CPU form has no backward: the parity test checks its forward there
    _compiled = None

    @staticmethod
    def _flex():
        """(flex_attention, create_block_mask), compiled on CUDA: uncompiled, the first is a slow reference
        that materialises the scores and the second materialises the whole mask before blocking it."""
        if FlexAttention._compiled is None:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            if torch.cuda.is_available():
                flex_attention, create_block_mask = torch.compile(flex_attention), torch.compile(create_block_mask)
            FlexAttention._compiled = (flex_attention, create_block_mask)
        return FlexAttention._compiled

    @staticmethod
    def layout(doc_ids: torch.Tensor) -> Layout:
        def causal_same_doc(b, h, q, kv):
            return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

        B, T = doc_ids.shape
        block_mask = FlexAttention._flex()[1](causal_same_doc, B, None, T, T, device=doc_ids.device)
        return Layout(FlexAttention, block_mask=block_mask)

    @staticmethod
    def attend(q, k, v, layout: Layout, dropout: float = 0.0) -> torch.Tensor:
        return FlexAttention._flex()[0](q, k, v, block_mask=layout.block_mask).transpose(1, 2)


# name -> kernel; a new kernel is one class above and one entry here (and its name in config.ATTENTION)
ATTENTION_KERNELS: dict[str, type] = {"dense": DenseAttention, "varlen": VarlenAttention, "flex": FlexAttention}


def attend(q, k, v, layout: Layout, dropout: float = 0.0) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H, S, D) as the layout allows; returns (B, T, H, D)."""
    return layout.kernel.attend(q, k, v, layout, dropout)


class KVCache:
    """Every layer's keys and values for a batch being generated, preallocated for `max_len` positions:
    with it a new token costs one token's forward, and sampling a 256-token image is not quadratic."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype=torch.float32):
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.doc = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.start = self.length = 0

    def extend(self, doc_ids: torch.Tensor, fresh) -> Layout:
        """Room for T more tokens; the layout they attend with. An empty cache (the prompt) attends as
        training does, `fresh(doc_ids)`; later tokens see every cached key of their document through a
        (B, 1, T, S) mask, which for one new token is one row."""
        T = doc_ids.shape[1]
        if self.length + T > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions, not {self.length + T}")
        self.start, self.length = self.length, self.length + T
        self.doc[:, self.start : self.length] = doc_ids
        if self.start == 0:
            return fresh(doc_ids)
        qpos = torch.arange(self.start, self.length, device=doc_ids.device)
        visible = torch.arange(self.length, device=doc_ids.device)[None, :] <= qpos[:, None]  # (T, S)
        same = self.doc[:, None, : self.length] == doc_ids[:, :, None]  # (B, T, S)
        return Layout(DenseAttention, mask=(same & visible).unsqueeze(1))

    def store(self, layer: int, k, v):
        self.k[layer, :, :, self.start : self.length] = k
        self.v[layer, :, :, self.start : self.length] = v
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]


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

    def attention_kind(self, device: torch.device | str, training: bool = True) -> str:
        """The attention path this model takes on `device` (config "auto" resolved). Flex is for training
        on CUDA: its CPU form is an unfused reference and has no dropout, and evaluation and generation
        meet a new prompt length at every call, where a compiled kernel would recompile."""
        kind = self.cfg.attention
        if kind == "auto":
            cuda = torch.device(device).type == "cuda"
            kind = "flex" if cuda and training and self.cfg.dropout == 0 else "varlen"
        return kind

    def layout(self, doc_ids: torch.Tensor) -> Layout:
        return ATTENTION_KERNELS[self.attention_kind(doc_ids.device, self.training)].layout(doc_ids)

    def forward(self, input_ids, position_ids, doc_ids, labels=None, cache: KVCache | None = None):
        """Logits (B, T, V); with labels also the mean loss and the per-token loss (B, T), 0 where ignored.
        With a cache, these tokens follow the cached ones (generation)."""
        if position_ids.max() >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(position_ids.max())} >= max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        cos = self.rope_cos[position_ids].unsqueeze(1)  # (B, 1, T, D/2)
        sin = self.rope_sin[position_ids].unsqueeze(1)
        layout = self.layout(doc_ids) if cache is None else cache.extend(doc_ids, self.layout)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout, None if cache is None else (cache, i))
        logits = self.head(self.norm(x))
        if labels is None:
            return logits
        token_loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none"
        ).view_as(labels)
        n = (labels != IGNORE).sum().clamp(min=1)
        return logits, token_loss.sum() / n, token_loss


def loss_by_group(token_loss: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, n_groups: int):
    """Summed loss and token count per group id (e.g. the modality of each label). Ignored labels add
    0 to both; no boolean indexing, so on a GPU nothing here waits for the device."""
    valid = (labels != IGNORE).flatten().float()
    g = groups.flatten()
    zeros = torch.zeros(n_groups, dtype=torch.float32, device=token_loss.device)
    sums = zeros.index_add(0, g, token_loss.detach().flatten().float() * valid)
    counts = zeros.index_add(0, g, valid)
    return sums, counts


def pick(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row of (B, V) logits (-inf where not allowed). temperature 0 is greedy; else
    softmax(logits / temperature) sampled from its `top_k` most likely tokens (0 = all) and from the
    smallest set whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2019), with
    `generator` for a reproducible draw. top_k = 1 is greedy whatever the temperature."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the ones before it already reach top_p (the first is always kept)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    allowed: tuple[int, int] | None = None,
    extra_allowed: tuple[int, ...] = (),
    stop_token: int | None = None,
    use_cache: bool = True,
    rule=None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uncond: list[list[int]] | None = None,
    cfg_scale: float = 1.0,
) -> list[list[int]]:
    """Continuation of a batch of prompts of different lengths: greedy, or sampled (`pick`).

    Classifier-free guidance (Ho & Salimans 2022; Emu3 uses 3.0): with `uncond` (one prompt per prompt: the
    target's begin marker alone, or a negative prompt) both run in one batch, and the choice is made on
    u + cfg_scale·(c − u) of their logits; each chosen token goes on both. cfg_scale 1 is the prompt alone.

    Prompts are left-padded; pads get their own document id, so the document
    mask keeps them out of every real token's context and each prompt's
    positions start at 0. `allowed` = [lo, hi) restricts the choice to one
    modality's block (plus `extra_allowed`, e.g. its end marker): asking for
    an image gets image ids. `rule(i)` -> (lo, hi, may_stop), when given, says it
    per position i of the new span instead: ids [lo, hi) there, and `stop_token`
    only where may_stop (an image is exactly its ids per image, then its end
    marker; a codec frame's ids each in their codebook's range). With the KV cache
    (default) the prompt runs once and each new token is one token's forward;
    without it every step reruns the whole sequence (the reference the cache is
    tested against).
    """
    model.eval()
    device = next(model.parameters()).device
    guided = uncond is not None
    if guided:
        if len(uncond) != len(prompts):
            raise ValueError(f"{len(uncond)} unconditional prompts for {len(prompts)} prompts")
        prompts = list(prompts) + list(uncond)  # one batch: the first half conditional, the second not
    B, T0 = len(prompts), max(len(p) for p in prompts)
    n_out = B // 2 if guided else B
    V = model.cfg.vocab_size
    ids = torch.zeros(B, T0, dtype=torch.long, device=device)
    pos = torch.zeros_like(ids)
    doc = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T0 - len(p) :] = torch.tensor(p, device=device)
        pos[i, T0 - len(p) :] = torch.arange(len(p), device=device)
        doc[i, T0 - len(p) :] = 1
    bias = None
    if allowed is not None:
        bias = torch.full((V,), float("-inf"), device=device)
        bias[allowed[0] : allowed[1]] = 0
        bias[list(extra_allowed)] = 0

    biases: dict[tuple, torch.Tensor] = {}  # a rule repeats a few masks (an image's, a codec frame's places)

    def rule_bias(i: int) -> torch.Tensor:
        key = rule(i)
        if key not in biases:
            lo, hi, may_stop = key
            b = torch.full((V,), float("-inf"), device=device)
            b[lo:hi] = 0
            if may_stop and stop_token is not None:
                b[stop_token] = 0
            biases[key] = b
        return biases[key]

    cache = KVCache(model.cfg, B, T0 + max_new_tokens, device, next(model.parameters()).dtype) if use_cache else None
    new = torch.zeros(n_out, 0, dtype=torch.long, device=device)
    done = torch.zeros(n_out, dtype=torch.bool, device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    step_ids, step_pos, step_doc = ids, pos, doc
    for step in range(max_new_tokens):
        logits = model(step_ids, step_pos, step_doc, cache=cache)[:, -1, :].float()
        if guided:
            c, u = logits[:n_out], logits[n_out:]
            logits = u + cfg_scale * (c - u)
        b = rule_bias(step) if rule is not None else bias
        nxt = pick(logits if b is None else logits + b, temperature, top_k, top_p, generator)
        new = torch.cat([new, nxt[:, None]], dim=1)
        if stop_token is not None:
            done |= nxt == stop_token
        if bool(done.all()):
            break
        if guided:
            nxt = torch.cat([nxt, nxt])  # the same token continues both halves
        if cache is not None:  # only the new token goes in; rows already done run on, their tokens dropped
            step_ids, step_pos, step_doc = nxt[:, None], lengths[:, None], torch.ones_like(nxt)[:, None]
        else:
            step_ids = torch.cat([step_ids, nxt[:, None]], dim=1)
            step_pos = torch.cat([step_pos, lengths[:, None]], dim=1)
            step_doc = torch.cat([step_doc, torch.ones_like(nxt)[:, None]], dim=1)
        lengths = lengths + 1
    out = []
    for row in new.tolist():  # each row up to and including its first stop token
        if stop_token is not None and stop_token in row:
            row = row[: row.index(stop_token) + 1]
        out.append(row)
    return out


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matmuls (fwd + bwd) + 12·L·d·T for attention (PaLM, app. B)."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.d_model * seq_len
