"""A Starlette service under uvicorn whose worker restarts warm after a crash (forkpoint.asgi.protect).

Run it from the repository root (pip install starlette uvicorn; forkpoint installed):

    uvicorn --app-dir examples starlette_uvicorn:app              # or with --workers 4

and try it:

    curl localhost:8000/lookup/ab                    # {"word": "ab", "matches": 2, "warm_ms": ...}
    curl localhost:8000/lookup/a%00b                 # the parser (C code) segfaults: a 500
    curl localhost:8000/lookup/abc                   # served at once: the index is still loaded,
                                                     # same PID, nothing to reload
    # the poisoned request again: a 500, then 503 (quarantined); other requests never notice

The index takes a while to build (``warm_ms``), as real warm-up does: loading a model, compiling
templates, filling a cache. In restart mode the worker is checkpointed once it has started and
listens, before it holds any connection; a segfault, an abort or a request stuck past ``timeout``
restores that checkpoint in a millisecond instead of a cold restart. Requests in flight on the
worker at that moment fail with it (500); only the one whose code crashed is blamed. It costs a few
microseconds per request. Needs asyncio's loop: if uvloop is installed, run uvicorn with
--loop asyncio (forkpoint says so and refuses to start otherwise).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import forkpoint.asgi

index: dict[str, int] = {}
warm = {"ms": 0.0}


def build_index() -> None:
    t = time.perf_counter()
    for i in range(200_000):
        word = format(i, "x")
        index[word[:2]] = index.get(word[:2], 0) + 1
    warm["ms"] = round((time.perf_counter() - t) * 1e3, 1)


def parse(word: str) -> str:
    """Stands for a native parser with a bug: a NUL byte makes it dereference NULL."""
    if "\0" in word:
        ctypes.string_at(0)
    return word.lower()


async def lookup(request):
    word = parse(request.path_params["word"])
    await asyncio.sleep(0)
    return JSONResponse({"word": word, "matches": index.get(word[:2], 0), "warm_ms": warm["ms"],
                         "pid": os.getpid()})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    build_index()                        # before the worker's checkpoint: kept by every restore
    yield


service = Starlette(routes=[Route("/lookup/{word}", lookup)], lifespan=lifespan)
app = forkpoint.asgi.protect(service, timeout=5.0)
