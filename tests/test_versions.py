"""The tested dependency range: declared once, checked at import, and the cache under the installed release's name."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import warnings
from pathlib import Path

from moe_merge import versions

ROOT = Path(__file__).parent.parent


def test_every_dependency_whose_internals_we_use_has_both_bounds():
    """Read from the installed package's metadata, which is what the import-time check reads."""
    from packaging.requirements import Requirement

    ranged = {
        Requirement(r).name.replace("_", "-")
        for r in importlib.metadata.requires("moe-merge")
        if ">=" in r and "<" in r
    }
    assert set(versions.CHECKED) <= ranged


def test_the_installed_releases_are_the_tested_ones():
    assert importlib.metadata.requires("moe-merge")  # installed: the check below has ranges to read
    assert versions.untested() == []


def test_an_untested_release_warns_once_and_names_the_range(monkeypatch):
    installed = importlib.metadata.version

    def version(name):
        return "5.99.0" if name == "transformers" else installed(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(versions, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        versions.warn_if_untested()
        versions.warn_if_untested()
    assert len(caught) == 1 and issubclass(caught[0].category, versions.UntestedVersionWarning)
    assert "transformers 5.99.0 (tested: <5.25,>=5.23)" in str(caught[0].message)


def test_our_code_passes_the_cache_under_the_installed_name():
    """transformers 5.24 warns (once per process, through its logger) when `past_key_values` reaches its masks
    and attention; a fresh process runs every dynamic layout with the cache and collects its warnings."""
    script = """
import logging, torch, warnings
from transformers.utils import logging as hf_logging
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
hf_logging.get_logger().addHandler(Keep())
from pathlib import Path
import tempfile
from tests.fixtures import pico_checkpoint
from moe_merge.recipe import open_recipe
from moe_merge.config import MergeConfig
from moe_merge.assemble.dynamic import build_model
root = Path(tempfile.mkdtemp())
base = pico_checkpoint(root / "base")
experts = [pico_checkpoint(root / f"e{i}", seed=i + 1, base=base, perturb="linear") for i in range(2)]
for method, level in [("smear", "ffn"), ("twin", "block"), ("sparse", "block"), ("sparse", "model")]:
    recipe = {"base_model": str(base), "method": method, "level": level, "gate_mode": "random",
              "experts_per_token": 1, "experts": [{"source_model": str(e)} for e in experts]}
    model = build_model(open_recipe(MergeConfig.model_validate(recipe)), seed=0)
    with warnings.catch_warnings(record=True) as caught:  # transformers' deprecate_kwarg warns through `warnings`
        warnings.simplefilter("always")
        model.generate(input_ids=torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    records += [str(w.message) for w in caught]
print("WARNINGS", [r for r in records if "deprecated" in r or "past_key_values" in r])
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "WARNINGS []" in run.stdout, run.stdout[-2000:]


def test_the_dynamic_model_takes_the_cache_under_either_name(pico):
    """`cache` is transformers 5.24's name, `past_key_values` 5.23's; callers of either release work."""
    import torch

    from moe_merge.assemble.dynamic import build_model
    from moe_merge.config import MergeConfig
    from moe_merge.modeling import CACHE
    from moe_merge.recipe import open_recipe
    from tests.conftest import pico_recipe

    model = build_model(
        open_recipe(MergeConfig.model_validate(pico_recipe(pico, method="smear", gate_mode="random"))), 0
    )
    with torch.no_grad():
        whole = model(input_ids=torch.tensor([[1, 5, 6, 7]]), use_cache=False).logits[0, -1]
        steps = []
        for name in ("cache", "past_key_values"):
            prefill = model(input_ids=torch.tensor([[1, 5, 6]]), use_cache=True)
            step = model(input_ids=torch.tensor([[7]]), merge_weights=prefill.merge_weights, **{name: prefill[CACHE]})
            steps.append(step.logits[0, -1])
    for logits in steps:
        torch.testing.assert_close(logits, whole, rtol=0, atol=1e-5)
