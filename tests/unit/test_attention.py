"""The attention paths against the dense reference, the KV cache against recomputation, and activation
checkpointing against none: each must change speed or memory, never the numbers."""

import random

import pytest
import torch

from omnistream.model.config import ATTENTION, GPTConfig
from omnistream.model.model import ATTENTION_KERNELS, GPT, VarlenAttention, generate
from omnistream.training.engine import apply_activation_checkpointing


def packed_rows(B: int, T: int, seed: int, pad_tail: bool = True):
    """Rows packed like pipelines/packing.py: documents 1, 2, … of random lengths (1 token to a whole row),
    then padding (doc 0) at the end; position ids restart at 0 for every document."""
    rng = random.Random(seed)
    doc = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        t, d = 0, 1
        end = T - (rng.randrange(1, T // 4) if pad_tail and b % 2 == 0 else 0)
        while t < end:
            n = min(end - t, rng.choice([1, 2, 7, 15, 16, 17, 33, 64, 100, 257, T]))
            doc[b, t : t + n], pos[b, t : t + n] = d, torch.arange(n)
            t, d = t + n, d + 1
        pos[b, end:] = torch.arange(T - end)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (B, T), generator=g)
    labels = torch.randint(3, 100, (B, T), generator=g)
    labels[doc == 0] = -100
    return ids, pos, doc, labels


def model(attention: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=100, n_layers=2, n_heads=4, d_model=64, max_seq_len=512, attention=attention))


def loss_and_grads(attention: str, batch):
    m = model(attention)
    _, loss, _ = m(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("kernel", sorted(set(ATTENTION_KERNELS) - {"dense"}))
def test_every_registered_kernel_gives_the_dense_loss_and_gradients(kernel):
    """Each kernel of ATTENTION_KERNELS against the dense reference on rows of many documents: 1 token,
    varlen's bucket edges (15, 16, 17, 257), whole rows, padding tails. A kernel without a CPU backward
    (flex in torch 2.14) is held to the loss here and to its gradients on CUDA by benchmarks/gpu_check.py."""
    batch = packed_rows(3, 384, seed=1)
    ref_loss, ref_grads = loss_and_grads("dense", batch)
    if not getattr(ATTENTION_KERNELS[kernel], "cpu_backward", True):
        with torch.no_grad():
            loss = model(kernel)(*batch)[1]
        assert abs(float(loss - ref_loss)) < 1e-5
        return
    loss, grads = loss_and_grads(kernel, batch)
    assert abs(float(loss - ref_loss)) < 1e-5
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], atol=1e-5, rtol=0), (n, float((g - ref_grads[n]).abs().max()))


def test_every_kernel_can_be_named_in_a_config():
    """model/config.py's names (checked without torch) are the table's, plus auto."""
    assert set(ATTENTION) == {"auto", *ATTENTION_KERNELS}


def test_the_cpu_path_is_varlen_and_builds_no_t_by_t_mask():
    m = GPT(GPTConfig(vocab_size=100, n_layers=1, n_heads=2, d_model=16, max_seq_len=4096))
    assert m.attention_kind("cpu") == "varlen"
    _, _, doc, _ = packed_rows(2, 4096, seed=2)
    lay = VarlenAttention.layout(doc)
    assert lay.mask is None
    # every token is in exactly one bucket once; a document is padded by at most a quarter of its length,
    # or by less than the 16-token step below 64 tokens
    placed = torch.cat([index.flatten()[keep] for index, keep in lay.buckets])
    assert torch.equal(placed.sort().values, torch.arange(doc.numel()))
    for index, keep in lay.buckets:
        valid = torch.zeros(index.numel(), dtype=torch.bool)
        valid[keep] = True
        n = valid.view(index.shape).sum(1)
        assert (index.shape[1] <= n + torch.maximum(n // 4, torch.full_like(n, 15))).all()


def test_a_document_id_reused_after_another_is_a_new_document():
    """Runs, not ids, are documents: a row "1 1 2 2 1 1" is three documents (packing never writes it,
    but the fast paths and the reference must agree on what it means if anything does)."""
    doc = torch.tensor([[1, 1, 2, 2, 3, 3]])
    lay = VarlenAttention.layout(doc)
    assert sum(len(keep) for _, keep in lay.buckets) == 6 and sum(len(index) for index, _ in lay.buckets) == 3


def test_kv_cache_generation_equals_recomputation():
    torch.manual_seed(3)
    m = GPT(GPTConfig(vocab_size=120, n_layers=3, n_heads=4, d_model=64, max_seq_len=256)).eval()
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 120) for _ in range(n)] for n in (1, 5, 40, 17, 90)]
    for allowed, stop in ((None, None), ((40, 80), 81)):
        cached = generate(m, prompts, 60, allowed=allowed, extra_allowed=(81,) if stop else (), stop_token=stop)
        plain = generate(
            m, prompts, 60, allowed=allowed, extra_allowed=(81,) if stop else (), stop_token=stop, use_cache=False
        )
        assert cached == plain
        assert all(0 < len(s) <= 60 for s in cached)


def test_activation_checkpointing_leaves_loss_and_gradients_unchanged():
    batch = packed_rows(2, 128, seed=4)
    ref_loss, ref_grads = loss_and_grads("varlen", batch)
    m = model("varlen")
    keys = list(m.state_dict())
    apply_activation_checkpointing(m)
    assert list(m.state_dict()) == keys, "checkpoints and exports keep their parameter names"
    _, loss, _ = m(*batch)
    loss.backward()
    assert float(loss.detach()) == float(ref_loss)
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6, rtol=0), n


def test_rotary_keeps_a_bf16_model_in_bf16():
    """The rotary tables are fp32; a bf16 model's q and k must come out bf16, or the attention and the
    output projection run in fp32 (and DeepSpeed ZeRO-3's bf16 linear refuses the mix: seen on an H100)."""
    from omnistream.model.model import apply_rotary, rotary_table

    cos, sin = rotary_table(16, 32, 10000.0)
    x = torch.randn(2, 4, 32, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = apply_rotary(x, cos[None, None], sin[None, None])
    assert out.dtype == torch.bfloat16
    ref = apply_rotary(x.float(), cos[None, None], sin[None, None])
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2)  # bf16 keeps 8 bits: ~0.4% per rounding
