"""Issue 20, item 9: the prepared-data cache checks content, not only sizes: token ids overwritten in place
(same file size) are detected and the entry rebuilt, never trained on."""

from __future__ import annotations

import logging
import struct

from test_cache import _rows_of, setup  # noqa: F401 - the fixture
from tuneforge.data.pipeline import prepare


def _overwrite_a_token_in_place(entry) -> None:
    ids = [10, 13, 16, 19, 22]  # row 0's input_ids in test_cache._rows()
    for arrow in (entry / "train").glob("*.arrow"):
        data = bytearray(arrow.read_bytes())
        for fmt in ("<5i", "<5q"):
            at = data.find(struct.pack(fmt, *ids))
            if at >= 0:
                size = struct.calcsize(fmt) // 5
                data[at:at + size] = struct.pack(fmt[0] + fmt[2], 777)
                arrow.write_bytes(bytes(data))  # same size, different tokens
                return
    raise AssertionError("row 0's token ids were not found in the cached arrow files")


def test_tokens_changed_in_place_are_not_trained_on(setup, caplog):  # noqa: F811
    cfg, tok = setup()
    first = prepare(cfg, tok)
    expected = _rows_of(first.train)
    _overwrite_a_token_in_place(first.cache_dir)
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        again = prepare(cfg, tok)
    assert not again.reused_cache
    assert "does not hold the bytes that were written (changed in place)); rebuilding it" in caplog.text
    assert _rows_of(again.train) == expected
