"""The one exception type users see: the CLI prints its message as one line and exits 2."""


class HwgenError(Exception):
    """A problem with the user's input (model, file, option), described in one line."""


class RetrainDiverged(HwgenError):
    """Retraining's loss became infinite or NaN: a search rejects that candidate."""
