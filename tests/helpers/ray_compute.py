"""Compute factories for the Ray pool tests."""

from __future__ import annotations

import os
import time


def make_doubler(delay_s: float = 0.0):
    def compute(payload: list[int]) -> dict:
        time.sleep(delay_s)
        return {"pid": os.getpid(), "out": [x * 2 for x in payload]}

    return compute
