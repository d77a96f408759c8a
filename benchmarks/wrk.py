"""``wrk -t1`` against a local server, its output read into figures (shared by the server benchmarks)."""
from __future__ import annotations

import re
import subprocess
from typing import Any


def run_wrk(url: str, seconds: int, connections: int) -> dict[str, Any]:
    """Drive ``url`` for ``seconds`` with ``connections`` connections from one wrk thread."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not m:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    return {"rps": float(m.group(1)), "requests": int(total.group(1)) if total else None,
            "errors": errors.group(1) if errors else None,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}
