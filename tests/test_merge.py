"""Static merges of task vectors (on top of peft.utils.merge_utils)."""

import torch

from moe_merge.merge import merge_deltas, static_merge


def _deltas(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, generator=g) for _ in range(n)]


def test_average_is_the_mean_of_the_experts():
    base = torch.randn(8, 6)
    deltas = _deltas()
    experts = [base + d for d in deltas]
    torch.testing.assert_close(static_merge("average", base, deltas), torch.stack(experts).mean(0))


def test_task_arithmetic_scales_the_summed_task_vectors():
    deltas = _deltas()
    torch.testing.assert_close(merge_deltas("task_arithmetic", deltas, scale=0.3), 0.3 * sum(deltas))


def test_ties_elects_the_sign_of_the_sum_and_averages_only_the_entries_that_agree():
    a, b = torch.tensor([2.0, -2.0, 3.0, -4.0]), torch.tensor([4.0, 3.0, -1.0, 1.0])
    merged = merge_deltas("ties", [a, b], density=1.0)
    # sums 6, 1, 2, -3: signs +, +, +, -. Agreeing: both (mean 3); b alone (3); a alone (3); a alone (-4)
    assert merged.tolist() == [3.0, 3.0, 3.0, -4.0]


def test_dare_is_seeded_by_tensor_name_not_call_order():
    deltas = _deltas()
    first = merge_deltas("dare_linear", deltas, density=0.5, seed=1, name="x")
    merge_deltas("dare_linear", deltas, density=0.5, seed=1, name="y")
    again = merge_deltas("dare_linear", deltas, density=0.5, seed=1, name="x")
    other = merge_deltas("dare_linear", deltas, density=0.5, seed=2, name="x")
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_mixup_interpolates_with_its_lambda_through_the_base_method():
    deltas = _deltas(2)
    lam = [0.3, 0.7]
    torch.testing.assert_close(merge_deltas("mixup", deltas, weights=lam), 0.3 * deltas[0] + 0.7 * deltas[1])
    torch.testing.assert_close(
        merge_deltas("mixup", deltas, weights=lam, base_method="task_arithmetic", scale=0.5),
        0.5 * (0.3 * deltas[0] + 0.7 * deltas[1]),
    )
    a, b = torch.tensor([1.0, -2, 3, 0]), torch.tensor([2.0, 1, -1, 4])
    # M³'s TIES: λ where both survive with the elected sign (entry 0), a lone survivor kept whole
    ties = merge_deltas("mixup", [a, b], weights=lam, base_method="ties", density=1.0)
    torch.testing.assert_close(ties, torch.tensor([0.3 * 1 + 0.7 * 2, -2, 3, 4]))


def test_mixup_draws_are_beta_for_two_experts_and_seeded():
    from moe_merge.merge import mixup_draws

    draws = torch.tensor(mixup_draws(2, 0.5, 4000, seed=0), dtype=torch.float64)
    assert torch.allclose(draws.sum(-1), torch.ones(4000, dtype=torch.float64))
    # Beta(0.5, 0.5): mean 1/2, variance 1/8; U-shaped: 41 % of the mass lies below 0.1 or above 0.9
    assert abs(draws[:, 0].mean() - 0.5) < 0.02 and abs(draws[:, 0].var() - 0.125) < 0.01
    assert 0.38 < ((draws[:, 0] < 0.1) | (draws[:, 0] > 0.9)).double().mean() < 0.44  # 2·(2/π)·asin(√0.1) = 0.41
    assert mixup_draws(3, 1.0, 2, seed=5) == mixup_draws(3, 1.0, 2, seed=5)
