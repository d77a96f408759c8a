"""A pooled database connection that a restore cut is not lent to the next request.

Invariant protected: after a restore, the request that follows is answered as it would have been
without forkpoint (a new worker connects afresh): Django with persistent connections and no health
checks, and SQLAlchemy without ``pool_pre_ping``, each failed it with ``OperationalError`` before.
Needs PostgreSQL's ``initdb`` (on PATH or /usr/lib/postgresql/*/bin), Django, SQLAlchemy and
psycopg 3; skipped otherwise (CI: apt-get install postgresql, pip install django sqlalchemy
'psycopg[binary]'). A root run needs a ``postgres`` user to run the server as.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

import pytest
from conftest import free_port, run_py

pytestmark = pytest.mark.timeout(120)
for mod in ("django", "sqlalchemy", "psycopg"):
    pytest.importorskip(mod)


def _bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL's initdb not found")
    d = tempfile.mkdtemp(prefix="fp-pg-")      # (pytest's own is root's 0700: not postgres's)
    os.chmod(d, 0o777)
    port = free_port()
    pre = ["su", "postgres", "-c"] if os.geteuid() == 0 else None

    def run(*cmd):
        line = " ".join(cmd)
        subprocess.run(pre + [line] if pre else ["sh", "-c", line], check=True, capture_output=True)
    run(initdb, "-D", f"{d}/data", "-A", "trust", "-U", "postgres")
    run(pg_ctl, "-D", f"{d}/data", "-w", "-l", f"{d}/log", "-o",
        f"'-p {port} -k {d} -c listen_addresses=127.0.0.1'", "start")
    try:
        yield port
    finally:
        run(pg_ctl, "-D", f"{d}/data", "-m", "immediate", "stop")
        shutil.rmtree(d, ignore_errors=True)


DJANGO = """
import ctypes, sys, forkpoint as fp
from django.conf import settings
settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.postgresql",
    "NAME": "postgres", "USER": "postgres", "HOST": "127.0.0.1", "PORT": sys.argv[1],
    "CONN_MAX_AGE": 60}})
import django; django.setup()
from django.db import close_old_connections, connection
def request(crash=False):          # what Django's handler does around a view
    close_old_connections()
    with connection.cursor() as c:
        c.execute("select pg_backend_pid()")
        pid = c.fetchone()[0]
    if crash:
        ctypes.string_at(0)
    return pid
request()
for i in range(2):                 # twice: the restored program's pools are told again
    try:
        fp.checkpointed(request)(True)
    except fp.Recovered:
        print("recovered")
    print("next request:", type(request()).__name__)
"""

# A SQLite database listed first (its connection has no fileno()) kept the PostgreSQL one, after
# it, from being told
DJANGO_SQLITE_FIRST = DJANGO.replace(
    'settings.configure(DATABASES={"default": {',
    'settings.configure(DATABASES={"lite": {"ENGINE": "django.db.backends.sqlite3", '
    '"NAME": sys.argv[2] + "/x.sqlite3"}, "default": {',
).replace("    close_old_connections()\n",
          "    close_old_connections()\n    connections['lite'].cursor().execute('select 1')\n"
).replace("import close_old_connections, connection", "import close_old_connections, connection, connections")

SQLALCHEMY = """
import ctypes, sys, forkpoint as fp
from sqlalchemy import create_engine, text
engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{sys.argv[1]}/postgres")
def request(crash=False):
    with engine.connect() as c:
        pid = c.execute(text("select pg_backend_pid()")).scalar()
    if crash:
        ctypes.string_at(0)
    return pid
request()
for i in range(2):
    try:
        fp.checkpointed(request)(True)
    except fp.Recovered:
        print("recovered")
    print("next request:", type(request()).__name__)
"""


@pytest.mark.parametrize("code", [DJANGO, DJANGO_SQLITE_FIRST, SQLALCHEMY],
                         ids=["django", "django-sqlite-first", "sqlalchemy"])
def test_the_request_after_a_restore_gets_a_fresh_connection(pg, code, tmp_path):
    r = run_py(code, tmp_path, str(pg), str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["recovered", "next request: int"] * 2, r.stdout + r.stderr[-2000:]
