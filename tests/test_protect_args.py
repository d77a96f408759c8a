"""forkpoint.wsgi.protect and forkpoint.asgi.protect refuse bad arguments with a specific error, and
wrapping an application starts nothing (gunicorn --preload wraps it in the master process)."""
from __future__ import annotations

import pytest
from conftest import run_py

import forkpoint.asgi
import forkpoint.wsgi

pytestmark = pytest.mark.timeout(30)


def wsgi_app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]


async def asgi_app(scope, receive, send):
    pass


class AsgiClass:
    async def __call__(self, scope, receive, send):
        pass


@pytest.mark.parametrize("call, error, words", [
    (lambda: forkpoint.wsgi.protect(42), TypeError, "needs the application callable"),
    (lambda: forkpoint.wsgi.protect(asgi_app), TypeError, "use forkpoint.asgi.protect"),
    (lambda: forkpoint.wsgi.protect(AsgiClass()), TypeError, "use forkpoint.asgi.protect"),
    (lambda: forkpoint.wsgi.protect(wsgi_app, mode="fork"), ValueError, "mode must be one of"),
    (lambda: forkpoint.wsgi.protect(wsgi_app, refresh=5), ValueError, "refresh= applies to mode='restart'"),
    (lambda: forkpoint.wsgi.protect(wsgi_app, timeout=0), ValueError, "timeout must be a positive"),
    (lambda: forkpoint.wsgi.protect(wsgi_app, timeout="1"), ValueError, "timeout must be a positive"),
    (lambda: forkpoint.wsgi.protect(wsgi_app, key="path"), TypeError, "key must be a function"),
    (lambda: forkpoint.wsgi.protect(wsgi_app, quarantine_after=0), ValueError, "quarantine_after"),
    (lambda: forkpoint.wsgi.protect(wsgi_app, mode="restart", refresh=0), ValueError, "refresh must be"),
    (lambda: forkpoint.asgi.protect(None), TypeError, "needs the application callable"),
    (lambda: forkpoint.asgi.protect(wsgi_app), TypeError, "use forkpoint.wsgi.protect"),
    (lambda: forkpoint.asgi.protect(asgi_app, timeout=-1), ValueError, "timeout must be a positive"),
    (lambda: forkpoint.asgi.protect(asgi_app, quarantine_after=True), ValueError, "quarantine_after"),
])
def test_bad_arguments_are_refused_clearly(call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_wrapping_starts_nothing(tmp_path):
    r = run_py("""
    import os
    import forkpoint.asgi, forkpoint.wsgi
    from forkpoint._runtime import runtime
    async def asgi_app(scope, receive, send):
        pass
    def wsgi_app(environ, start_response):
        return []
    a = forkpoint.asgi.protect(asgi_app, timeout=1, refresh=60)
    b = forkpoint.wsgi.protect(wsgi_app, mode="restart", timeout=1)
    c = forkpoint.wsgi.protect(wsgi_app)
    print(runtime().started, runtime().arena is None, a.__wrapped__ is asgi_app, c.__wrapped__ is wsgi_app)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False True True True"
