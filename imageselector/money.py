"""Etsy's Money shape, the one reading of it: {"amount": 1500, "divisor": 100, "currency_code": "USD"}.

Shared by sync (which stores prices) and search (which converts and compares them).
"""

from __future__ import annotations

from typing import Any


def money(price: Any) -> float | None:
    """Etsy Money {"amount": 1500, "divisor": 100} -> 15.0 (currency units)."""
    if not isinstance(price, dict):
        return None
    amount, divisor = price.get("amount"), price.get("divisor")
    if not isinstance(amount, int | float) or not isinstance(divisor, int | float) or divisor == 0:
        return None
    return amount / divisor
