"""PolicyHead's logps, nll and loss modes against an fp64 log-softmax over the gathered completion positions
(the sampling temperature applied in each), and pack's layout."""

import pytest
import torch

from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.policy import PolicyHead, pack


def _root():
    args = ModelArgs(vocab_size=29, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=8)
    return PolicyHead(Transformer.from_config(args, seed=3, dtype=torch.float64))


def _reference_logps(root, packed, temperature):
    hidden = root.model(packed.input_ids, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
    logits = hidden[packed.gather_index].double() @ root.model.lm_head_weight.double().T / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, packed.completion_ids[..., None])[..., 0]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logps_mode_divides_the_logits_by_the_temperature(temperature, monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    root = _root()
    packed = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]])
    with torch.no_grad():
        got = root(packed, mode="logps", temperature=temperature)
        want = _reference_logps(root, packed, temperature)
    m = packed.mask.bool()
    torch.testing.assert_close(got[m].double(), want[m], rtol=1e-10, atol=1e-12)


def test_nll_mode_without_a_normalizer_is_the_mean_over_this_batchs_tokens(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    root = _root()
    for prompts, completions in (([[1, 2]], [[5]]), ([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]])):
        packed = pack(prompts, completions)
        nll = root(packed, mode="nll")
        with torch.no_grad():
            ref = _reference_logps(root, packed, 1.0)
        m = packed.mask.bool()
        want = -ref[m].sum() / m.sum()
        torch.testing.assert_close(nll.detach().double(), want, rtol=1e-10, atol=1e-12)
        nll4 = root(packed, mode="nll", normalizer=4.0)  # a given normalizer replaces the count
        torch.testing.assert_close(nll4.detach().double(), -ref[m].sum() / 4.0, rtol=1e-10, atol=1e-12)


def test_loss_mode_applies_temperature(monkeypatch):
    """Old log-probs taken at T = 0.6: a loss at the same T sees ratio 1 and its value is -sum(A * mask) / sum(mask);
    a loss that ignored T would compare T = 1 log-probs with them (ratio != 1, another value)."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    batch = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]])
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    head = _root()
    with torch.no_grad():
        old = head(batch, mode="logps", temperature=0.6)
        value, _ = head(batch, mode="loss", temperature=0.6, advantages=adv, old_logps=old, loss_type="dapo")
    # ratio exactly 1 everywhere: the surrogate is -sum(A * mask) / sum(mask)
    expect = -(1.0 * 2 - 0.5 * 4) / 6
    assert float(value) == pytest.approx(expect, abs=1e-6)


def test_pack_layout():
    b = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]])
    assert b.input_ids.tolist() == [1, 2, 3, 5, 6, 4, 7, 8, 9, 10]
    assert b.cu_seqlens.tolist() == [0, 5, 10] and b.max_seqlen == 5
    assert b.completion_ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]]  # right-padded with 0
    assert b.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b.gather_index[0, :2].tolist() == [2, 3] and b.gather_index[1].tolist() == [5, 6, 7, 8]


def test_pack_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match="prompt"):
        pack([[1], []], [[2], [3]])
