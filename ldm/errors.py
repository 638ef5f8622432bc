"""The error types of bad user input.

The scripts report a `UserInputError` in one line with exit code 2, never with a traceback, so its
message names the input (flag, key or file) and the fix. Raise it, or a subclass naming the kind of
input, only for input the user can correct; a programming error stays a ValueError or an assert, so
that it still shows its traceback.

Subclasses live with the module that owns their input: `ldm.checkpoint_io.CheckpointError` (weight
files), `ldm.embeddings.EmbeddingError`, `ldm.pretrained.WeightsNotFoundError`, `data.dataset.DatasetError`,
the train config's `ConfigError`; `ModelConfigError` is here because the model YAML reader and the
cells built from it both raise it.
"""


class UserInputError(Exception):
    """Bad user input: reported in one line with exit code 2, never a traceback."""


class ModelConfigError(UserInputError):
    """A model config (YAML) this project cannot build; the message names the file or the setting."""


# What the scripts report in one line with exit code 2: our types, and a file the user named that does
# not exist (open() of a --config, --data_path or --resume path raises it).
USER_ERRORS = (UserInputError, FileNotFoundError)
