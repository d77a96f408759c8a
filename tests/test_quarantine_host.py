"""Issue 15: the quarantine's scope, and the host scope with real programs and a real gunicorn.

Each program runs in a subprocess with ``XDG_RUNTIME_DIR`` pointing at a private directory of the
test, so host stores never mix between tests (or with the user's own).
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import (
    clean_env,
    free_port,
    http,
    program,
    run_py,
    server_log,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

HEADER = """
    import ctypes, os, signal, sys, time
    import forkpoint as fp
"""

# Crashes once per program on a key starting with "poison" (a persistent counter survives the
# rollback), so whether the second program crashes or refuses says where failures are counted.
ONCE = HEADER + """
    fp.recover_on(signal.SIGSEGV, quarantine_after=2)
    crashes = fp.persist_int("crashes")
    for key in sys.argv[1:]:
        fp.tsetjmp()
        try:
            with fp.processing(key):
                if key.startswith("poison") and crashes.value < 1:
                    crashes.add()
                    ctypes.string_at(0)
                print("served", key, flush=True)
        except fp.Quarantined:
            print("refused", key, flush=True)
"""


def _rundir(tmp_path: Path) -> str:
    run = tmp_path / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    os.chmod(run, 0o700)
    return str(run)


def host_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"XDG_RUNTIME_DIR": _rundir(tmp_path), "FORKPOINT_QUARANTINE": "host",
            "FORKPOINT_SERVICE": "svc", **extra}


def cli(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forkpoint", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**env))


def test_bad_settings_are_refused_clearly_and_the_program_goes_on(tmp_path):
    r = run_py(HEADER + """
    for kw in [dict(quarantine="hots"), dict(quarantine="redis://"), dict(quarantine="redis://h:99999/0"),
               dict(quarantine="redis://h:6379/x"), dict(quarantine=7), dict(quarantine_ttl=-1),
               dict(quarantine_ttl="soon"), dict(quarantine_ttl=float("nan")), dict(quarantine_keys="clear"),
               dict(service="")]:
        try:
            fp.configure(**kw)
            print("accepted", kw)
        except fp.ConfigurationError as e:
            print("refused:", e)
    fp.configure(quarantine="redis://:secret@localhost:1/2", quarantine_ttl=30, quarantine_keys="plain")
    fp.configure(quarantine="process")
    fp.start()
    try:
        fp.configure(quarantine="host")
    except fp.ConfigurationError as e:
        print("refused:", e)
    fp.configure(quarantine_ttl=60)           # the time to live may change at any time
    print("still running", fp.is_quarantined("x"))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == ("refused: quarantine: unknown quarantine scope 'hots': expected 'process', 'host' or "
                      "'redis://HOST[:PORT][/DB]'")
    assert out[1] == "refused: quarantine: bad Redis URL 'redis://': no host"
    assert out[2].startswith("refused: quarantine: bad Redis URL 'redis://h:99999/0'")
    assert out[3] == "refused: quarantine: bad Redis URL 'redis://h:6379/x': the database must be a number, got 'x'"
    assert out[4] == ("refused: quarantine must be a str ('process', 'host' or 'redis://HOST:PORT/DB'), "
                      "not int")
    assert out[5] == "refused: quarantine_ttl must be a positive number of seconds or None, got -1"
    assert out[6] == "refused: quarantine_ttl must be a positive number of seconds or None, got 'soon'"
    assert out[7] == "refused: quarantine_ttl must be a positive number of seconds or None, got nan"
    assert out[8] == "refused: quarantine_keys must be 'hashed' or 'plain', got 'clear'"
    assert out[9] == "refused: service must be a non-empty str, got ''"
    assert out[10] == "refused: quarantine can only be set before the first checkpoint"
    assert out[11] == "still running False"
    assert "secret" not in r.stdout + r.stderr


def test_a_bad_environment_is_refused_at_start_with_its_name(tmp_path):
    r = run_py(HEADER + """
    try:
        fp.start()
    except fp.ConfigurationError as e:
        print("refused:", e)
    print("still running")
    """, tmp_path, FORKPOINT_QUARANTINE="redis://localhost:6379/zero")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "refused: FORKPOINT_QUARANTINE: bad Redis URL 'redis://localhost:6379/zero': the database must be a "
        "number, got 'zero'", "still running"]


def test_failures_count_wherever_they_happened_on_the_host(tmp_path):
    env = host_env(tmp_path)
    a = run_py(ONCE, tmp_path, "poison", **env)
    assert a.returncode == 0, a.stderr
    assert a.stdout.splitlines() == ["served poison"]          # one failure: not yet quarantined
    b = run_py(ONCE, tmp_path, "poison", "ok", **env)
    assert b.returncode == 0, b.stderr
    assert b.stdout.splitlines() == ["refused poison", "served ok"]    # the second failure anywhere
    c = run_py(ONCE, tmp_path, "ok", "poison", **env)
    assert c.stdout.splitlines() == ["served ok", "refused poison"], c.stderr   # no crash at all
    assert "quarantined input 'poison'" in b.stderr
    # another service shares nothing
    d = run_py(ONCE, tmp_path, "poison", **host_env(tmp_path, FORKPOINT_SERVICE="other"))
    assert d.stdout.splitlines() == ["served poison"], d.stderr
    # at process scope (the default) each program counts its own
    e = run_py(ONCE, tmp_path, "poison", **{**env, "FORKPOINT_QUARANTINE": "process"})
    assert e.stdout.splitlines() == ["served poison"], e.stderr


def test_the_host_store_is_private_and_holds_no_key_text(tmp_path):
    env = host_env(tmp_path)
    r = run_py(HEADER + """
    fp.quarantine("GET /secret-path?token=abc")
    print(fp.is_quarantined("GET /secret-path?token=abc"), fp.quarantined())
    """, tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True ['GET /secret-path?token=abc']"   # the program knows its own keys
    d = Path(env["XDG_RUNTIME_DIR"]) / "forkpoint-quarantine"
    files = list(d.iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert b"secret-path" not in files[0].read_bytes()
    # another user can read neither the directory nor the store
    other = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                            "cat", str(files[0])], capture_output=True, text=True, timeout=10)
    assert other.returncode != 0 and "Permission denied" in other.stderr
    # with quarantine_keys="plain" the user asks for the text to be stored
    p = run_py(HEADER + """
    fp.configure(quarantine_keys="plain")
    fp.quarantine("GET /shown")
    print(fp.quarantined())
    """, tmp_path, **env)
    assert p.stdout.strip().endswith("'GET /shown']"), p.stderr
    assert b"GET /shown" in files[0].read_bytes()


def test_a_directory_planted_by_another_user_is_refused_and_the_program_keeps_its_own(tmp_path):
    planted = tmp_path / f"forkpoint-quarantine-{os.geteuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    env = {"FORKPOINT_QUARANTINE": "host", "FORKPOINT_SERVICE": "svc", "TMPDIR": str(tmp_path),
           "XDG_RUNTIME_DIR": ""}
    r = run_py(ONCE.replace("crashes.value < 1", "crashes.value < 2"), tmp_path, "poison", "ok", **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["refused poison", "served ok"]     # its own quarantine worked
    assert r.stderr.count("unavailable") == 1, r.stderr                  # one warning, not one per use
    assert "is not a private directory" in r.stderr
    assert list(planted.iterdir()) == []                                 # nothing written there


def test_recorded_by_the_shepherd_even_when_the_process_is_killed_and_listed_with_host_and_worker(tmp_path):
    env = host_env(tmp_path)
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGKILL, quarantine_after=2)
    for key in ["job-9", "job-9", "job-10"]:
        fp.tsetjmp()
        try:
            with fp.processing(key):
                if key == "job-9":
                    os.kill(os.getpid(), signal.SIGKILL)    # the process can record nothing itself
                print("served", key, flush=True)
        except fp.Quarantined:
            print("refused", key, flush=True)
    print("pid", os.getpid(), flush=True)
    """, tmp_path, **env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == ["refused job-9", "refused job-9", "served job-10"], lines
    pid = lines[-1].split()[1]
    listing = cli("quarantine", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    assert "service 'svc' (host)" in out and "quarantined: 1" in out, out
    assert "(hashed key)" in out
    host = os.uname().nodename
    assert out.count(f"on host {host} worker {pid}: SIGKILL, killed by SIGKILL") == 2, out
    js = json.loads(cli("quarantine", "list", "--json", env=env).stdout)
    (rep,) = js
    (entry,) = rep["quarantined"]
    assert entry["failures"] == 2 and entry["key"] is None
    # release by the key's text: the store keeps the service's hashing key, not the text
    rel = cli("quarantine", "release", "job-9", env=env)
    assert rel.returncode == 0 and "'job-9' released" in rel.stdout, rel.stdout + rel.stderr
    again = cli("quarantine", "release", "job-9", env=env)
    assert again.returncode == 1 and "was not quarantined" in again.stdout
    after = cli("quarantine", "list", env=env).stdout
    assert "quarantined: none" in after and f"by operator uid {os.geteuid()}" in after, after
    served = run_py(HEADER + "    print(fp.is_quarantined('job-9'))", tmp_path, **env)
    assert served.stdout.strip() == "False"


def test_a_damaged_host_store_is_rebuilt_never_trusted(tmp_path):
    env = host_env(tmp_path)
    r = run_py(HEADER + """
    fp.quarantine("a")
    fp.quarantine("b")
    path = fp._qhost.HostStore("svc")._locate()
    print(path, flush=True)
    """, tmp_path, **env)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    data = bytearray(path.read_bytes())
    data[512 + 20] ^= 0xFF                    # a stray write in the first slot ("a")
    path.write_bytes(bytes(data))
    r = run_py(HEADER + """
    print(fp.is_quarantined("a"), fp.is_quarantined("b"))    # a reader checks every slot
    fp.quarantine("c")                                       # a writer rebuilds, and says so
    print(fp.is_quarantined("a"), fp.is_quarantined("b"), fp.is_quarantined("c"))
    """, tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["False True", "False True True"]
    assert "was damaged (1 damaged entry dropped): rebuilt" in r.stderr
    path.write_bytes(b"garbage" * 1000)       # a store of the wrong size and content
    r = run_py(HEADER + """
    print(fp.is_quarantined("b"))
    fp.recover_on(signal.SIGSEGV, quarantine_after=1)
    fp.tsetjmp()
    try:
        with fp.processing("d"):
            ctypes.string_at(0)
    except fp.Quarantined:
        print("refused d")
    """, tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["False", "refused d"]
    assert "has 7000 bytes" in r.stderr and "rebuilt" in r.stderr
    path.write_bytes(b"")                      # truncated: a reader must not die of SIGBUS
    r = run_py(HEADER + "    print(fp.is_quarantined('d'))", tmp_path, **env)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_a_full_host_store_releases_the_oldest_and_says_who(tmp_path):
    env = host_env(tmp_path)
    r = run_py(HEADER + """
    for i in range(1030):
        fp.quarantine(f"k{i}")
    print(len(fp.quarantined()), fp.is_quarantined("k0"), fp.is_quarantined("k6"), fp.is_quarantined("k1029"))
    """, tmp_path, **env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1024", "False", "True", "True"]
    assert "quarantine full (1024 keys): released the oldest" in r.stderr
    assert "evicted: host quarantine full" in cli("quarantine", "list", env=env).stdout


def test_quarantine_ttl_lets_a_key_back_in(tmp_path):
    env = host_env(tmp_path, FORKPOINT_QUARANTINE_TTL="0.3")
    r = run_py(HEADER + """
    fp.recover_on(signal.SIGSEGV, quarantine_after=1)
    fp.tsetjmp()
    try:
        with fp.processing("p"):
            if not fp.chkpt_status(fp.CHKPT_RECOVERED):
                ctypes.string_at(0)
    except fp.Quarantined:
        print("refused p", flush=True)
    while fp.is_quarantined("p"):
        time.sleep(0.05)
    print("back", flush=True)
    # q must still be quarantined when the listing below runs, however late that is: with the
    # 0.3 s TTL it expired before a slow CLI start (under load) read the store.
    fp.configure(quarantine_ttl=None)
    fp.quarantine("q")                       # the next write removes what expired, and says so
    """, tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["refused p", "back"]
    out = cli("quarantine", "list", env=env).stdout
    assert "expired (quarantine_ttl)" in out and "quarantined: 1" in out, out


def test_release_by_program_and_by_operator_through_the_program_or_the_store(tmp_path):
    env = host_env(tmp_path)
    from conftest import Lines, start_py
    proc = start_py(HEADER + """
    fp.start()
    fp.quarantine("x")
    fp.quarantine("y")
    fp.quarantine("z")
    print("ready", os.getpid(), flush=True)
    sys.stdin.readline()
    print("x", fp.is_quarantined("x"), "y", fp.is_quarantined("y"), flush=True)
    while fp.is_quarantined("z"):         # released in the host store by an operator: it follows
        time.sleep(0.02)
    print("released y", fp.release("y"), fp.release("y"), "z", fp.release("z"), flush=True)
    """, tmp_path, **env)
    lines = Lines(proc)
    pid = lines.until("ready").split()[1]
    try:
        out = cli("quarantine", "list", "--pid", pid, env={})
        assert out.returncode == 0, out.stderr
        assert "as program" in out.stdout and "'x'" in out.stdout and "[host]" in out.stdout, out.stdout
        rel = cli("quarantine", "release", "x", "--pid", pid, env={})
        assert rel.returncode == 0 and "released" in rel.stdout, rel.stderr
        direct = cli("quarantine", "release", "z", env=env)
        assert direct.returncode == 0 and "'z' released" in direct.stdout, direct.stdout + direct.stderr
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert lines.next() == "x False y True"
        assert lines.next(timeout=20) == "released y True False z False"
    finally:
        proc.stdin.close()
        proc.wait(20)
    listing = cli("quarantine", "list", env=env).stdout
    assert f"by operator uid {os.geteuid()}" in listing and f"via program {pid}" in listing, listing
    assert f"by program {pid} on" in listing, listing


WSGI = """
    import ctypes, json, os
    import forkpoint as fp

    crashed = fp.persist_int("crashed")

    @fp.checkpointed(key=lambda path: path, quarantine_after=2)
    def view(path):
        # A worker crashes on the poisoned path at most once: so the second crash is always on
        # another worker, and only a quarantine shared between workers can stop a third.
        if path == "/poison" and not crashed.value:
            crashed.add()
            ctypes.string_at(0)
        return {"pid": os.getpid(), "path": path}

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        status, body = "200 OK", b"ready"
        if path != "/__ready__":
            try:
                body = json.dumps(view(path)).encode()
            except fp.Recovered as e:
                status, body = "500 Internal Server Error", json.dumps({"pid": os.getpid(),
                                                                        "recovered": e.reason}).encode()
            except fp.Quarantined:
                status, body = "503 Service Unavailable", json.dumps({"pid": os.getpid()}).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
"""


@pytest.mark.parametrize("scope", ["host", "process"])
def test_gunicorn_workers_share_a_host_quarantine_with_no_configuration(tmp_path, scope):
    """`gunicorn -w 3` with host scope: the 500s for one poisoned key before the first 503, across
    all workers, are exactly quarantine_after; the workers share by default (their process group
    leader, the master, has one command line). At process scope a third worker crashes too."""
    (tmp_path / "wsgiapp.py").write_text(textwrap.dedent(WSGI))
    port = free_port()
    env = {"XDG_RUNTIME_DIR": _rundir(tmp_path), "FORKPOINT_QUARANTINE": scope}
    proc = start_server([sys.executable, "-m", "gunicorn", "-w", "3", "--timeout", "30", "-b",
                         f"127.0.0.1:{port}", "wsgiapp:app"], tmp_path, port, **env)
    try:
        statuses, crashed_on = [], []
        for _ in range(300):
            status, body = http(port, "/poison")
            statuses.append(status)
            if status == 500:
                crashed_on.append(json.loads(body)["pid"])
            if status == 503 or len(crashed_on) == 3:
                break
        assert 0 not in statuses, server_log(tmp_path)
        if scope == "host":
            assert statuses.count(500) == 2 and statuses[-1] == 503, (statuses, server_log(tmp_path))
            assert len(set(crashed_on)) == 2                     # two workers crashed, one each
            after = [http(port, "/poison") for _ in range(30)]
            assert {s for s, _ in after} == {503}
            assert http(port, "/fine")[0] == 200
        else:
            assert statuses.count(500) == 3 and 503 not in statuses, statuses
        assert _booted_three_only(tmp_path), server_log(tmp_path)       # no worker was lost
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


SERVICE = HEADER + """
    s = fp._runtime.runtime().quarantine_settings()
    print(s.service_source, "|", s.service, flush=True)
"""


def _service_in_group(tmp_path, shell: str) -> tuple[str, str]:
    """Run the program under ``sh -c shell`` as the leader of a new process group; return (where the
    service came from, the service)."""
    path = program(SERVICE, tmp_path)
    out = tmp_path / "out"
    subprocess.run(["sh", "-c", shell, "sh", sys.executable, str(path), str(out)], env=clean_env(),
                   start_new_session=True, timeout=30, check=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "\n" not in (out.read_text() if out.exists() else ""):
        time.sleep(0.05)
    source, _, service = out.read_text().strip().partition(" | ")
    return source, service


def test_the_default_service_is_the_process_group_leaders_command_line(tmp_path):
    """Issue 15: the workers of one server share a host quarantine with no configuration, because
    the default service is the command line of their process group's leader (the master)."""
    source, service = _service_in_group(tmp_path, '"$1" "$2" > "$3"; :')   # sh stays, as the leader
    assert source.startswith("command line of process group leader"), source
    assert service == f'sh -c "$1" "$2" > "$3"; : sh {sys.executable} {tmp_path / "prog.py"} {tmp_path / "out"}'


def test_without_a_group_leader_the_default_service_is_the_programs_command_line(tmp_path):
    """A group whose leader has exited (a shell that started the program in the background and
    left) still gives every program a service: its own command line."""
    source, service = _service_in_group(tmp_path, '"$1" "$2" > "$3" &')    # sh exits at once
    assert source == "the program's own command line", source
    assert service == f"{sys.executable} {tmp_path / 'prog.py'}"



def test_signals_still_reach_the_program_at_host_scope(tmp_path):
    """Host scope changes nothing else: SIGTERM to the face still ends the program as usual."""
    from conftest import Lines, start_py
    proc = start_py(HEADER + """
    fp.start()
    print("up", fp.is_quarantined("k"), flush=True)
    time.sleep(60)
    """, tmp_path, **host_env(tmp_path))
    lines = Lines(proc)
    assert lines.until("up") == "up False"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == -signal.SIGTERM


def test_the_cli_escapes_what_came_from_a_program(tmp_path):
    env = host_env(tmp_path, FORKPOINT_QUARANTINE_KEYS="plain", FORKPOINT_SERVICE="svc\x1b]0;owned\x07")
    r = run_py(HEADER + """
    fp.quarantine("GET /\\x1b[2J\\x1b[31mred")
    """, tmp_path, **env)
    assert r.returncode == 0, r.stderr
    out = cli("quarantine", "list", env=env)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "\\x1b[2J" in out.stdout and "svc\\x1b]0;owned\\x07" in out.stdout, out.stdout



ASGI = """
    import json, os
    import forkpoint as fp

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = {"pid": os.getpid(), "service": fp._runtime.runtime().quarantine_settings().service}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
"""


def test_uvicorn_workers_are_one_service_with_no_configuration(tmp_path):
    """uvicorn spawns its workers (their command lines differ), in its own process group: they
    resolve the same service, the supervisor's command line. (The app only asks; forkpoint starts in
    such workers through forkpoint.asgi.protect, which deals with their thread: the test below.)"""
    (tmp_path / "asgiapp.py").write_text(textwrap.dedent(ASGI))
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--workers", "2", "--port", str(port),
            "asgiapp:app"]
    proc = start_server(argv, tmp_path, port, XDG_RUNTIME_DIR=_rundir(tmp_path), FORKPOINT_QUARANTINE="host")
    try:
        seen: dict[int, str] = {}
        for _ in range(400):
            got = json.loads(http(port, "/")[1])
            seen[got["pid"]] = got["service"]
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen
        assert set(seen.values()) == {" ".join(argv)}, seen
    finally:
        stop_server(proc, signal.SIGINT)


PROTECTED = """
    import ctypes, json, os
    import forkpoint as fp
    import forkpoint.wsgi

    crashed = fp.persist_int("crashed")

    def raw(environ, start_response):
        # at most one crash per worker on the poisoned path, as above
        if environ["PATH_INFO"] == "/poison" and not crashed.value:
            crashed.add()
            ctypes.string_at(0)
        body = json.dumps({"pid": os.getpid()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    app = forkpoint.wsgi.protect(raw, mode=os.environ["MODE"], quarantine_after=2)
"""



def _booted_three_only(tmp_path) -> bool:
    """Whether gunicorn booted its three workers and no more (none replaced). It spawns them a
    random fraction of 0.1 s apart, and each logs its boot itself: a quick test could look before
    the third had (2 of 3 lines, in a fresh venv's run, all within the same second)."""
    wait_for(lambda: server_log(tmp_path).count("Booting worker") >= 3, timeout=10)
    return server_log(tmp_path).count("Booting worker") == 3

@pytest.mark.parametrize("mode", ["transaction", "restart"])
def test_gunicorn_wsgi_protect_shares_a_host_quarantine(tmp_path, mode):
    """The same as above through ``forkpoint.wsgi.protect`` (issue 11), in both of its modes."""
    pytest.importorskip("forkpoint.wsgi", reason="forkpoint.wsgi (issue 11) is not on this branch")
    (tmp_path / "wsgiapp.py").write_text(textwrap.dedent(PROTECTED))
    port = free_port()
    proc = start_server([sys.executable, "-m", "gunicorn", "-w", "3", "--timeout", "30", "-b",
                         f"127.0.0.1:{port}", "wsgiapp:app"], tmp_path, port, MODE=mode,
                        XDG_RUNTIME_DIR=_rundir(tmp_path), FORKPOINT_QUARANTINE="host")
    try:
        statuses = []
        for _ in range(300):
            statuses.append(http(port, "/poison")[0])
            if statuses[-1] == 503 or statuses.count(500) == 3:
                break
        assert statuses.count(500) == 2 and statuses[-1] == 503, (statuses, server_log(tmp_path))
        assert {http(port, "/poison")[0] for _ in range(20)} == {503}
        assert http(port, "/fine")[0] == 200
        assert _booted_three_only(tmp_path), server_log(tmp_path)       # no worker was lost
    finally:
        assert stop_server(proc) == 0, server_log(tmp_path)


def test_a_lookup_made_before_the_store_existed_sees_a_quarantine_at_once(tmp_path):
    """The first request of a worker may ask before anything created the host store (a restart-mode
    server checks the key before forkpoint starts): the lookup creates it, so it needs no second
    look to see a quarantine made a moment later elsewhere."""
    from conftest import Lines, start_py
    env = host_env(tmp_path)
    proc = start_py(HEADER + """
    print("first", fp.is_quarantined("k"), flush=True)
    sys.stdin.readline()
    print("then", fp.is_quarantined("k"), flush=True)
    """, tmp_path, **env)
    lines = Lines(proc)
    try:
        assert lines.next() == "first False"
        r = run_py(HEADER + "    fp.quarantine('k')", tmp_path, **env)
        assert r.returncode == 0, r.stderr
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert lines.next() == "then True"
    finally:
        proc.stdin.close()
        proc.wait(20)


ASGI_PROTECTED = """
    import ctypes, json, os
    import forkpoint as fp
    import forkpoint.asgi

    crashed = fp.persist_int("crashed")

    async def raw(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        if scope["path"] == "/poison" and not crashed.value:      # at most once per worker
            crashed.add()
            ctypes.string_at(0)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"pid": os.getpid()}).encode()})

    app = forkpoint.asgi.protect(raw, quarantine_after=2)
"""


def test_uvicorn_workers_with_asgi_protect_share_a_host_quarantine(tmp_path):
    """uvicorn --workers 2 and forkpoint.asgi.protect (issue 11): the failed requests for one
    poisoned key before the first 503, across both workers, are quarantine_after."""
    (tmp_path / "asgiapp.py").write_text(textwrap.dedent(ASGI_PROTECTED))
    port = free_port()
    proc = start_server([sys.executable, "-m", "uvicorn", "--loop", "asyncio", "--workers", "2", "--port",
                         str(port), "asgiapp:app"], tmp_path, port,
                        XDG_RUNTIME_DIR=_rundir(tmp_path), FORKPOINT_QUARANTINE="host")
    try:
        statuses = []
        for _ in range(300):
            statuses.append(http(port, "/poison")[0])
            if statuses[-1] == 503 or len([s for s in statuses if s != 200]) == 3:
                break
        failed = [s for s in statuses if s not in (200, 503)]      # a 500, or a closed connection
        assert len(failed) == 2 and statuses[-1] == 503, (statuses, server_log(tmp_path))
        assert {http(port, "/poison")[0] for _ in range(10)} == {503}
        assert http(port, "/fine")[0] == 200
    finally:
        stop_server(proc, signal.SIGINT)
