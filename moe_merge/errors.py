"""Typed errors. Library code raises these; only the CLI turns them into exit codes."""


class MoEMergeError(Exception):
    """Base class: a problem with the user's inputs, with a message that says what to do."""


class ConfigError(MoEMergeError):
    """The recipe YAML is invalid (the message names the field and the line)."""


class SourceError(MoEMergeError):
    """A checkpoint or adapter cannot be read (the message names the file or tensor)."""


class CompatibilityError(MoEMergeError):
    """An expert does not fit the base (the message names both files and the field)."""


class OutputExistsError(MoEMergeError):
    """The output directory exists and --force was not given."""


class OutputError(MoEMergeError):
    """The output cannot be written: the disk is full, or another process is writing the same directory."""


class ModelConfigError(ConfigError, ValueError):
    """A dynamic model's config, or merge weights given to it, that it cannot take; also a ValueError, as transformers'
    callers expect from a model."""


class DataError(MoEMergeError):
    """Router-training data cannot be read or does not fit the model (the message names the file and row)."""


class PushError(MoEMergeError):
    """The folder would not work on the Hub, or the Hub could not be reached."""


class ZooError(MoEMergeError):
    """A zoo model missed its target: the zoo is not built (nor cached)."""
