import torch

from omnistream.model.config import GPTConfig
from omnistream.model.model import GPT, attention_mask, generate, loss_by_group


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, n_layers=2, n_heads=2, d_model=32, max_seq_len=32)).eval()


def test_causality_later_tokens_never_change_earlier_logits():
    m = _model()
    ids = torch.randint(3, 50, (2, 20))
    pos = torch.arange(20).expand(2, 20)
    doc = torch.ones(2, 20, dtype=torch.long)
    a = m(ids, pos, doc)
    ids2 = ids.clone()
    ids2[:, 12:] = torch.randint(3, 50, (2, 8))
    b = m(ids2, pos, doc)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_document_isolation_in_a_packed_row():
    m = _model()
    ids = torch.randint(3, 50, (1, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
    doc = torch.cat([torch.full((10,), 1), torch.full((14,), 2)]).unsqueeze(0)
    a = m(ids, pos, doc)
    ids2 = ids.clone()
    ids2[0, :10] = torch.randint(3, 50, (10,))  # change all of document 1
    b = m(ids2, pos, doc)
    assert torch.allclose(a[:, 10:], b[:, 10:], atol=1e-5), "document 2 must not see document 1"
    # and document 2 alone, at positions 0.., gives the same logits as inside the packed row
    alone = m(ids[:, 10:], torch.arange(14).unsqueeze(0), torch.ones(1, 14, dtype=torch.long))
    assert torch.allclose(alone, a[:, 10:], atol=1e-5)


def test_mask_shape_and_self_attention():
    doc = torch.tensor([[1, 1, 2, 0, 0]])
    mk = attention_mask(doc)[0, 0]
    assert mk.diagonal().all()
    assert not mk[2, 1] and mk[1, 0] and not mk[0, 1] and mk[4, 3]


def test_loss_by_group_sums_to_total():
    m = _model()
    ids = torch.randint(3, 50, (2, 16))
    labels = torch.randint(3, 50, (2, 16))
    labels[:, -1] = -100
    pos = torch.arange(16).expand(2, 16)
    doc = torch.ones(2, 16, dtype=torch.long)
    _, loss, tok = m(ids, pos, doc, labels)
    groups = torch.randint(0, 3, (2, 16))
    s, c = loss_by_group(tok, labels, groups, 3)
    assert int(c.sum()) == 30
    assert torch.allclose(s.sum() / c.sum(), loss, atol=1e-5)


def test_generate_stays_in_the_allowed_block():
    m = _model()
    out = generate(m, [[1, 2, 3], [1, 4, 5, 6, 7]], 5, allowed=(10, 20), extra_allowed=(7,))
    assert all(10 <= t < 20 or t == 7 for seq in out for t in seq)
    assert all(len(seq) <= 5 for seq in out)


def test_left_padded_batch_matches_single_prompts():
    m = _model()
    prompts = [[1, 2, 3], [1, 4, 5, 6, 7, 8]]
    batch = generate(m, prompts, 4)
    single = [generate(m, [p], 4)[0] for p in prompts]
    assert batch == single
