"""One line per measured ratio, read by ``run_all.py``: ``RESULT {"name": ..., "value": ..., "goal": ..., ...}``."""

from __future__ import annotations

import json
import operator

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def result(name: str, value: float | None, op: str, goal: float, unit: str = "", note: str = "",
           tol: float | None = None) -> bool | None:
    """Print the RESULT line for ``value`` against ``op goal`` (None: not measured, with ``note`` saying why).
    ``op`` "+-": within ``tol`` of ``goal``."""
    if value is None:
        met = None
    elif op == "+-":
        met = abs(value - goal) <= tol
    else:
        met = bool(_OPS[op](value, goal))
    print("RESULT " + json.dumps({"name": name, "value": value, "op": op, "goal": goal, "unit": unit, "met": met,
                                  "note": note, **({"tol": tol} if op == "+-" else {})}), flush=True)
    return met
