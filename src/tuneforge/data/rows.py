"""What every row builder shares: the label of an untrained token, and the error for one malformed row.

They live below both the format registry (`data/formats/`) and the chat masking (`data/masking.py`), which
each use them, so that neither imports the other for them.
"""

from __future__ import annotations

from tuneforge.errors import DataError

IGNORE_INDEX = -100  # a label that trains nothing (PyTorch cross-entropy's ignore_index)


class RowError(DataError):
    """A single row is malformed; raised from a RowFn with a message describing the problem (the pipeline
    adds the dataset and row number)."""
