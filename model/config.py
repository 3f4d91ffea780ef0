"""The model's shape, apart from model.py so that reading or validating a config never imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION = ("auto", "flex", "varlen", "dense")


@dataclass
class GPTConfig:
    # pydantic (in cluster/config.py) validates this dataclass directly; unknown keys are errors
    __pydantic_config__ = {"extra": "forbid"}

    vocab_size: int = field(
        default=0, metadata={"doc": "total ids in the shared vocabulary; 0 = take it from vocab.json"}
    )
    n_layers: int = field(default=4, metadata={"doc": "Transformer blocks"})
    n_heads: int = field(default=4, metadata={"doc": "attention heads per block; d_model must divide by it"})
    d_model: int = field(default=128, metadata={"doc": "residual stream width"})
    max_seq_len: int = field(
        default=256, metadata={"doc": "longest position the rotary table covers; 0 = data.seq_len"}
    )
    rope_theta: float = field(default=10000.0, metadata={"doc": "rotary base period"})
    dropout: float = field(
        default=0.0, metadata={"doc": "dropout on attention and residual outputs (0 for small data-rich runs)"}
    )
    tie_embeddings: bool = field(default=True, metadata={"doc": "share the input embedding with the output projection"})
    attention: str = field(
        default="auto",
        metadata={
            "doc": "document-masked attention: auto (flex when training on CUDA, else varlen), flex (FlexAttention "
            "block mask), "
            "varlen (one causal SDPA per length bucket of documents), dense (the (B,1,T,T) mask: reference only)"
        },
    )

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}: choose one of {', '.join(ATTENTION)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head size d_model/n_heads must be even for rotary positions")
