"""`rl: ebft`'s objective, chosen by `ebft.mode`: structured (structured.py) or strided (strided.py)."""

from __future__ import annotations

import importlib

from tuneforge.config.schema import Config
from tuneforge.errors import NotSupportedYet

from ..base import Objective


def ebft_objective(cfg: Config) -> Objective:
    """The objective of `rl: ebft` for the config's `ebft.mode` (structured when the block is absent)."""
    mode = cfg.ebft.mode if cfg.ebft is not None else "structured"
    if mode == "structured":
        from .structured import StructuredEBFTObjective

        return StructuredEBFTObjective(cfg)
    try:
        strided = importlib.import_module(f"{__package__}.strided")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.strided":
            raise  # a missing dependency of an existing strided.py is a real error
        raise NotSupportedYet("ebft.mode: strided is not implemented in this version of tuneforge yet; use "
                              "ebft.mode: structured (prompt + ground_truth rows).") from None
    return strided.StridedEBFTObjective(cfg)
