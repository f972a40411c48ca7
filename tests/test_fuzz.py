"""Fuzzed recipes and checkpoints (hypothesis, derandomized: the same examples every run) never give a traceback:
each gives a message naming the field or the file.

`MOE_MERGE_FUZZ_EXAMPLES` sets the examples per test (default 300)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from moe_merge.errors import SourceError
from moe_merge.sources import Checkpoint, check_finite
from tests.conftest import pico_recipe, write_recipe

EXAMPLES = int(os.environ.get("MOE_MERGE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)


def run_cli(args: list) -> tuple[int, str]:
    """`moe-merge ARGS` in this process: its exit code and what it printed on stderr. A traceback fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main([str(a) for a in args])
    return rc, err.getvalue()


def kind(message: str) -> str:
    """An error message without its paths, numbers and quoted values: what tells two errors apart."""
    first = [line for line in message.splitlines() if line.strip()][:2]
    text = re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|\d+(\.\d+)?", "_", " ".join(first))
    return re.sub(r"\s+", " ", text).strip()


def report(name: str, errors: Counter, examples: int) -> None:
    line = f"{name}: {examples} examples, {sum(errors.values())} refused, {len(errors)} distinct errors"
    print(line)
    with open(Path(os.environ.get("MOE_MERGE_FUZZ_LOG", os.devnull)), "a") as f:
        f.write(line + "\n")


# ----------------------------------------------------------------------------- recipes


@pytest.fixture(scope="module")
def valid_recipes(pico) -> list[dict]:
    """Valid recipes of every shape: stock, each dynamic method and level, routers, static merges."""
    return [
        pico_recipe(pico),
        pico_recipe(pico, gate_mode="random", experts_per_token=2, dtype="bfloat16"),
        pico_recipe(pico, method="smear", level="block", router={"kind": "mlp", "granularity": "token"}),
        pico_recipe(pico, method="wemoe", router={"init": "uniform", "normalize": "none"}, wemoe={"scale": 0.3}),
        pico_recipe(pico, method="twin", twin={"rank": 4}, non_expert="ties", merge={"density": 0.5}),
        pico_recipe(pico, method="sparse", level="model", router={"prepass": 1, "temperature": 2.0}),
    ]


def _paths(node, prefix=()):
    """Every path into a nested recipe (dict keys and list indices), parents before children."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield from _paths(value, (*prefix, key))


def _get(node, path):
    for key in path:
        node = node[key]
    return node


def _set(node, path, value):
    _get(node, path[:-1])[path[-1]] = value


ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.sampled_from([-1, 0, 10**30, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


@st.composite
def mutated(draw, recipes: list[dict]) -> tuple[dict, tuple, str]:
    """A valid recipe with one thing wrong: a value's type, a number out of range, an unknown key, a key
    missing, a value nested one level too deep or too shallow. Returns it, the path changed and how."""
    recipe = json.loads(json.dumps(draw(st.sampled_from(recipes))))
    path = draw(st.sampled_from([p for p in _paths(recipe) if p]))
    how = draw(st.sampled_from(["value", "number", "unknown key", "delete", "nest", "unnest"]))
    old = _get(recipe, path)
    if how == "value":
        _set(recipe, path, draw(ODD_VALUES))
    elif how == "number":
        _set(recipe, path, draw(st.sampled_from([-1, -0.5, 0, 1e9, 10**20, math.inf, -math.inf, math.nan])))
    elif how == "unknown key":
        where = path if isinstance(old, dict) else path[:-1]
        if isinstance(parent := _get(recipe, where), dict):
            key = draw(st.sampled_from(["temprature", "expert", "levle", "router_init", "x"]))
            parent[key] = draw(ODD_VALUES)
            path = (*where, key)
    elif how == "delete":
        parent = _get(recipe, path[:-1])
        del parent[path[-1]]
    elif how == "nest":
        _set(recipe, path, draw(st.sampled_from([[old], {"value": old}])))
    elif how == "unnest" and isinstance(old, (list, dict)) and old:
        _set(recipe, path, next(iter(old.values())) if isinstance(old, dict) else old[0])
    return recipe, path, how


def test_mutated_recipes_are_refused_naming_the_field_or_accepted(valid_recipes, tmp_path):
    errors: Counter = Counter()
    examples = [0]

    @FUZZ
    @given(mutated(valid_recipes))
    def check(case):
        recipe, path, how = case
        examples[0] += 1
        file = tmp_path / "recipe.yaml"
        file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        rc, err = run_cli(["assemble", file, tmp_path / "out", "--dry-run"])
        assert rc in (0, 2)
        if rc == 2:
            assert err.startswith("moe-merge: error: ")
            field = [k for k in path if isinstance(k, str)][-1]  # the innermost key: `experts` alone names nothing
            value = _get(recipe, path[:-1]).get(path[-1]) if how != "delete" and isinstance(path[-1], str) else None
            assert re.search(rf"\b{re.escape(field)}\b", err) or (isinstance(value, str) and value and value in err), (
                f"{how} at {path}: the message names neither the field nor its value:\n{err}"
            )
            errors[kind(err)] += 1

    check()
    report("mutated recipes", errors, examples[0])
    assert len(errors) >= min(20, examples[0] // 4)  # the mutations reach many different checks, not one


RECIPE_KEYS = [
    "base_model",
    "experts",
    "source_model",
    "method",
    "level",
    "router",
    "positive_prompts",
    "gate_mode",
    "experts_per_token",
    "dtype",
    "twin",
    "rank",
    "non_expert",
    "merge",
    "kind",
    "init",
]
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(RECIPE_KEYS) | st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def test_random_yaml_documents_are_refused_with_a_message(tmp_path):
    errors: Counter = Counter()
    examples = [0]

    @FUZZ
    @given(st.one_of(YAML_VALUES.map(yaml.safe_dump), st.text(max_size=80)))
    def check(text):
        examples[0] += 1
        file = tmp_path / "recipe.yaml"
        file.write_text(text)
        rc, err = run_cli(["assemble", file, tmp_path / "out", "--dry-run"])
        assert rc == 2 and err.startswith("moe-merge: error: ") and str(file) in err, err
        errors[kind(err)] += 1

    check()
    report("random YAML documents", errors, examples[0])
    assert len(errors) >= min(5, examples[0] // 10)


# ----------------------------------------------------------------------------- checkpoints


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """A safetensors file cut short, or with bytes of its length field or header replaced."""
    header_end = 8 + int.from_bytes(data[:8], "little")
    how = draw(st.sampled_from(["truncate", "garble header", "length"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + data[8:]
    at = draw(st.integers(8, header_end - 1))
    junk = draw(st.binary(min_size=1, max_size=8))
    return data[:at] + junk + data[at + len(junk) :]


def test_damaged_safetensors_are_refused_naming_the_file(pico, tmp_path):
    source = pico["experts"][0]
    data = (source / "model.safetensors").read_bytes()
    errors: Counter = Counter()
    examples = [0]

    @FUZZ
    @given(damaged(data))
    def check(damaged_bytes):
        examples[0] += 1
        folder = tmp_path / "expert"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        (folder / "model.safetensors").write_bytes(damaged_bytes)
        try:
            check_finite([Checkpoint(folder)])  # reads the header, then every tensor
        except SourceError as e:
            assert str(folder / "model.safetensors") in str(e)
            errors[kind(str(e))] += 1

    check()
    report("damaged safetensors", errors, examples[0])
    assert sum(errors.values()) >= 0.9 * examples[0]  # a few header bytes can change harmlessly (a space for a space)


def _index_case(pico, tmp_path, edit) -> Path:
    """A sharded copy of the first pico expert, its index or shards edited."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(pico["experts"][0], folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    text = edit(folder, index)  # an edit may return the index's text instead
    (folder / "model.safetensors.index.json").write_text(text if isinstance(text, str) else json.dumps(index))
    return folder


def _extra_tensor(folder, index):
    index["weight_map"].pop(sorted(index["weight_map"])[0])


def _missing_shard(folder, index):
    (folder / "model-00002-of-00002.safetensors").unlink()


def _outside(folder, index):
    index["weight_map"][sorted(index["weight_map"])[0]] = "../model.safetensors"


def _absolute(folder, index):
    index["weight_map"][sorted(index["weight_map"])[0]] = "/etc/passwd"


CHECKPOINT_CASES = {
    "an index naming a missing shard": (
        lambda p, t: _index_case(p, t, _missing_shard),
        "model.safetensors.index.json",
        "names shard model-00002-of-00002.safetensors, which is missing",
    ),
    "a shard holding a tensor the index does not list": (
        lambda p, t: _index_case(p, t, _extra_tensor),
        "model-00001-of-00002.safetensors",
        "which the index does not list",
    ),
    "an index naming a file outside the checkpoint": (
        lambda p, t: _index_case(p, t, _outside),
        "model.safetensors.index.json",
        "not a file name in",
    ),
    "an index naming an absolute path": (
        lambda p, t: _index_case(p, t, _absolute),
        "model.safetensors.index.json",
        "not a file name in",
    ),
    "an index that is not JSON": (
        lambda p, t: _index_case(p, t, lambda f, i: json.dumps(i)[:-20]),
        "model.safetensors.index.json",
        "is not a valid index",
    ),
    "an index without a weight map": (
        lambda p, t: _index_case(p, t, lambda f, i: '{"metadata": {}}'),
        "model.safetensors.index.json",
        "is not a valid index",
    ),
    "a config.json that is not JSON": (lambda p, t: _config_not_json(p, t), "config.json", "is not valid JSON"),
}


def _config_not_json(pico, tmp_path) -> Path:
    folder = tmp_path / "broken-config"
    shutil.copytree(pico["experts"][0], folder)
    (folder / "config.json").write_text('{"model_type": "llama", hidden_size: 32')
    return folder


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_broken_checkpoints_are_refused_naming_the_file(pico, tmp_path, case):
    make, file, message = CHECKPOINT_CASES[case]
    expert = make(pico, tmp_path)
    recipe = pico_recipe(pico)
    recipe["experts"][1]["source_model"] = str(expert)
    rc, err = run_cli(["assemble", write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "out"])
    assert rc == 2, err
    assert str(expert / file) in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_modules_the_base_lacks_is_refused_naming_its_config(zoo_dir, tmp_path):
    from moe_merge.zoo import zoo_recipe

    recipe = zoo_recipe(zoo_dir, "full")
    lora = next(e for e in recipe["experts"] if e["source_model"].endswith("-lora"))
    adapter = tmp_path / "adapter"
    shutil.copytree(lora["source_model"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["w1", "q_proj"]  # Mixtral's expert names, on a Llama base
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    lora["source_model"] = str(adapter)
    rc, err = run_cli(["assemble", write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "out"])
    assert rc == 2 and f"{adapter / 'adapter_config.json'}: `target_modules` names 'w1'" in err, err


def test_a_damaged_model_is_refused_by_bake_naming_the_file(pico, tmp_path):
    from moe_merge.assemble import assemble

    model = assemble(MergeConfig.model_validate(pico_recipe(pico, method="smear")), tmp_path / "smear")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    rc, err = run_cli(["bake", model, tmp_path / "baked", "--weights", "1,0,0"])
    assert rc == 2 and f"{model / 'model.safetensors'} is {len(data) // 2} bytes" in err, err
