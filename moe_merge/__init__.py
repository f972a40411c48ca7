"""moe-merge: expert checkpoints fine-tuned from one base, assembled into one MoE model."""

__version__ = "0.1.0"
