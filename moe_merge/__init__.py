"""moe-merge: expert checkpoints fine-tuned from one base, assembled into one MoE model."""

from moe_merge.versions import warn_if_untested

__version__ = "0.1.0"

warn_if_untested()
