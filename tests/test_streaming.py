"""Streaming: peak memory follows one layer's experts plus one shard, not the number of experts."""

import subprocess
import sys
import textwrap

import pytest

from moe_merge.zoo import pico_checkpoint as make_pico
from tests.conftest import pico_recipe, write_recipe

HIDDEN, INTER, LAYERS = 128, 1024, 16  # 24 MiB of fp32 MLP weights per expert, 1.5 MiB per layer


@pytest.fixture(scope="module")
def fat_pico(tmp_path_factory):
    root = tmp_path_factory.mktemp("fat")
    base = make_pico(root / "base", hidden=HIDDEN, intermediate=INTER, layers=LAYERS)
    experts = [make_pico(root / f"e{i}", seed=i + 1, base=base, hidden=HIDDEN, intermediate=INTER, layers=LAYERS)
               for i in range(8)]
    return {"root": root, "base": base, "experts": experts}


def _peak_rss_mib(recipe_path, out) -> float:
    script = textwrap.dedent(f"""
        import resource
        from moe_merge.cli import main
        assert main(["assemble", {str(recipe_path)!r}, {str(out)!r}, "--shard-size", "8M"]) == 0
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
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
    print(f"peak RSS: E=2 {peaks[2]:.0f} MiB, E=8 {peaks[8]:.0f} MiB; growth {growth:.0f} MiB "
          f"for {experts_growth:.0f} MiB more expert weights")
    assert growth < 0.35 * experts_growth
