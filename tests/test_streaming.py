"""Streaming: peak memory follows one layer's experts plus one shard, not the number of experts."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import pico_recipe, write_recipe
from tests.fixtures import pico_checkpoint as make_pico

HIDDEN, INTER, LAYERS = 128, 1024, 16  # 24 MiB of fp32 MLP weights per expert, 1.5 MiB per layer


@pytest.fixture(scope="module")
def fat_pico(tmp_path_factory):
    root = tmp_path_factory.mktemp("fat")
    base = make_pico(root / "base", hidden=HIDDEN, intermediate=INTER, layers=LAYERS)
    experts = [
        make_pico(root / f"e{i}", seed=i + 1, base=base, hidden=HIDDEN, intermediate=INTER, layers=LAYERS)
        for i in range(8)
    ]
    return {"root": root, "base": base, "experts": experts}


# The process's own peak RSS. Not ru_maxrss: Linux carries it over from the parent through fork and exec, so a
# child of a large pytest process would report the parent's size.
PEAK_MIB = (
    'peak_mib = lambda: next(int(line.split()[1]) for line in open("/proc/self/status") '
    'if line.startswith("VmHWM:")) / 1024'
)


def _peak_rss_mib(recipe_path, out) -> float:
    script = textwrap.dedent(f"""
        from moe_merge.cli import main
        assert main(["assemble", {str(recipe_path)!r}, {str(out)!r}, "--shard-size", "8M"]) == 0
        {PEAK_MIB}
        print(peak_mib())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().splitlines()[-1])


def test_peak_rss_grows_far_less_than_the_experts_bytes(fat_pico, tmp_path):
    expert_mib = 3 * HIDDEN * INTER * LAYERS * 4 / 2**20  # fp32 MLP weights of one expert
    peaks = {}
    for n in (2, 8):
        recipe = pico_recipe({"base": fat_pico["base"], "experts": fat_pico["experts"][:n]})
        peaks[n] = _peak_rss_mib(write_recipe(tmp_path / f"r{n}.yaml", recipe), tmp_path / f"out{n}")
    growth, experts_growth = peaks[8] - peaks[2], 6 * expert_mib
    print(
        f"peak RSS: E=2 {peaks[2]:.0f} MiB, E=8 {peaks[8]:.0f} MiB; growth {growth:.0f} MiB "
        f"for {experts_growth:.0f} MiB more expert weights"
    )
    assert growth < 0.35 * experts_growth


# A dynamic model's blocks: 6.25 MiB of fp32 attention + MLP weights per expert layer, 25 MiB per expert
WIDE_HIDDEN, WIDE_INTER, WIDE_LAYERS, SHARD_MIB = 128, 4096, 4, 8


@pytest.fixture(scope="module")
def wide_pico(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    dims = dict(hidden=WIDE_HIDDEN, intermediate=WIDE_INTER, layers=WIDE_LAYERS)
    base = make_pico(root / "base", **dims)
    experts = [make_pico(root / f"e{i}", seed=i + 1, base=base, perturb="linear", **dims) for i in range(8)]
    small = make_pico(root / "small")
    return {
        "base": base,
        "experts": experts,
        "warm-up": {
            "base": small,
            "experts": [make_pico(root / f"s{i}", seed=i + 1, base=small, perturb="linear") for i in range(2)],
        },
    }


def _peak_over_baseline_mib(warm_up, recipe_path, out) -> float:
    """Peak RSS of `assemble` above what the process held after a warm-up assembly of a tiny model (the imports,
    the tokenizer, the plotting, the allocator's pools). glibc keeps freed blocks below its mmap threshold, which
    rises to 32 MiB as tensors are freed; the threshold is pinned low so that RSS follows the live tensors, as it
    does at real sizes, where every tensor is above that ceiling."""
    script = textwrap.dedent(f"""
        from moe_merge.cli import main
        assert main(["assemble", {str(warm_up)!r}, {str(out) + "-warm-up"!r}]) == 0
        baseline = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        assert main(["assemble", {str(recipe_path)!r}, {str(out)!r}, "--shard-size", "{SHARD_MIB}M"]) == 0
        {PEAK_MIB}
        print(peak_mib() - baseline)
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["wemoe", "twin"])
def test_dynamic_assembly_holds_one_layer_of_its_sources_and_one_shard(wide_pico, tmp_path, method):
    """The goal: peak ≤ 1.5 × (one layer of the base's and every expert's tensors + one output shard) above the
    baseline, at E = 2 and E = 8. Building the whole model first took about twice its float32 size."""
    layer_mib = (4 * WIDE_HIDDEN**2 + 3 * WIDE_HIDDEN * WIDE_INTER) * 4 / 2**20
    extra = {"twin": {"rank": 16}} if method == "twin" else {}
    warm_up = write_recipe(
        tmp_path / "warm-up.yaml", pico_recipe(wide_pico["warm-up"], method=method, level="block", **extra)
    )
    for n in (2, 8):
        recipe = pico_recipe(
            {"base": wide_pico["base"], "experts": wide_pico["experts"][:n]}, method=method, level="block", **extra
        )
        peak = _peak_over_baseline_mib(warm_up, write_recipe(tmp_path / f"r{n}.yaml", recipe), tmp_path / f"out{n}")
        bound = 1.5 * ((n + 1) * layer_mib + SHARD_MIB)
        print(f"{method} E={n}: peak {peak:.0f} MiB above the baseline, bound {bound:.0f} MiB")
        assert peak <= bound
