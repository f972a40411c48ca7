"""Training-free router initialisation (routers/prompt_init.py)."""

import torch

from moe_merge.routers.prompt_init import TokenSet, calibrate, direction_rows, fit, hidden


def test_prompt_means_ignore_padding():
    states = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    padded = states.clone()
    padded[0, 2:] = 1e6
    torch.testing.assert_close(TokenSet(padded, mask).prompt_means(), TokenSet(states, mask).prompt_means())
    torch.testing.assert_close(TokenSet(states, mask).prompt_means()[0], states[0, :2].mean(0))


def test_last_tokens_are_the_last_real_ones():
    states = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    last = TokenSet(states, mask).last_tokens()
    assert torch.equal(last[0], states[0, 1]) and torch.equal(last[1], states[1, 3])


def test_direction_rows_are_centred_unit_vectors():
    common = torch.randn(16) * 100
    rows = direction_rows([common + torch.randn(3, 16) for _ in range(4)], [None] * 4)
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(4))
    assert rows.sum(0).norm() < rows.norm(dim=-1).sum() * 0.5  # the shared component is gone


def _clusters(n_per=40, dims=16, experts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(experts, dims, generator=g) * 3 + 10  # large common component
    return [
        TokenSet((centres[e] + torch.randn(1, n_per, dims, generator=g)), torch.ones(1, n_per)) for e in range(experts)
    ]


def test_hidden_and_fit_route_separable_prompts_to_their_expert():
    sets = _clusters()
    for weight in (hidden(sets, [None] * 3), fit(sets, ridge=1e-3)):
        for e, s in enumerate(sets):
            assert ((s.tokens() @ weight.T).argmax(-1) == e).float().mean() > 0.95


def test_calibration_hits_the_target_confidence():
    sets = _clusters()
    tokens = torch.cat([s.tokens() for s in sets])
    weight, scale = calibrate(hidden(sets, [None] * 3), tokens, 0.9)
    confidence = torch.softmax(tokens @ weight.T, -1).max(-1).values.mean()
    assert abs(confidence.item() - 0.9) < 1e-3 and scale > 0
