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


def test_ties_keeps_only_agreeing_signs():
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 2.0, -1.0])
    merged = merge_deltas("ties", [a, b], density=1.0)
    # elected sign per entry: +, + (|-2|<|2|? total: 0 -> +), + ; disjoint mean of agreeing entries
    assert merged[0] == 1.0 and merged[2] == 3.0


def test_dare_is_seeded_by_tensor_name_not_call_order():
    deltas = _deltas()
    first = merge_deltas("dare_linear", deltas, density=0.5, seed=1, name="x")
    merge_deltas("dare_linear", deltas, density=0.5, seed=1, name="y")
    again = merge_deltas("dare_linear", deltas, density=0.5, seed=1, name="x")
    other = merge_deltas("dare_linear", deltas, density=0.5, seed=2, name="x")
    assert torch.equal(first, again) and not torch.equal(first, other)
