"""The dependency releases moe-merge is tested with, and a warning when an installed one is not among them.

pyproject.toml is the one place the ranges are written (lower and upper bound for every package whose
internals we lean on: cache classes, masking, config sub-specs, PEFT's adapter format, accelerate's
state hooks, the Hub's upload code, datasets' loaders). They are read back from the installed
package's metadata, so this check can never disagree with what pip was told. `.ci/run` tests the
newest releases the ranges allow, `.ci/oldest` the oldest.
"""

from __future__ import annotations

import importlib.metadata
import warnings

CHECKED = ("transformers", "peft", "accelerate", "huggingface-hub", "datasets")


class UntestedVersionWarning(UserWarning):
    """An installed dependency is outside the range moe-merge was tested with."""


def untested() -> list[str]:
    """'name version (tested: range)' for every checked dependency installed outside its declared range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requires = importlib.metadata.requires("moe-merge") or []
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return []
    found = []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None or canonicalize_name(req.name) not in CHECKED:
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not req.specifier.contains(installed, prereleases=True):
            found.append(f"{req.name} {installed} (tested: {req.specifier})")
    return found


_warned = False


def warn_if_untested() -> None:
    """Warn once per process if a dependency is outside its tested range."""
    global _warned
    if _warned:
        return
    _warned = True
    found = untested()
    if found:
        warnings.warn(
            f"moe-merge was not tested with {'; '.join(found)}: the dynamic model leans on transformers internals "
            "that move between releases. Install releases within the tested ranges (pip picks them when it "
            "installs moe-merge).",
            UntestedVersionWarning,
            stacklevel=3,
        )
