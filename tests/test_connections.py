"""The program's connections to servers across a rollback.

Invariant protected: what a rolled-back step began on a connection to a server (a database
transaction, a command whose reply it never read) ends as it would have without forkpoint, where
the crash closed the connection and the server dropped it: it is never committed by a later step,
and no later step reads a reply meant for the rolled-back one. A connection the step did not use
is kept, and so are the connections a server accepted (their clients get the server's answer).

The server is a real process: a transactional key-value store over TCP or a Unix socket, which
applies a connection's writes at COMMIT and drops them when the connection ends without one.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import clean_env, program, run_py

pytestmark = pytest.mark.timeout(60)

SERVER = r"""
import os, socket, sys, threading

store, lock, count = {}, threading.Lock(), [0]

def serve(conn, who):
    pending = None
    f = conn.makefile("rwb", buffering=0)
    try:
        for raw in f:
            cmd, *args = raw.decode().split()
            if cmd == "BEGIN":
                reply = "ERROR already in a transaction" if pending is not None else "OK"
                pending = {} if pending is None else pending
            elif cmd == "SET":
                with lock:
                    (store if pending is None else pending)[args[0]] = args[1]
                reply = "OK"
            elif cmd == "COMMIT":
                with lock:
                    store.update(pending or {})
                pending, reply = None, "OK"
            elif cmd == "GET":
                with lock:
                    reply = "VALUE " + (pending or {}).get(args[0], store.get(args[0], "-"))
            elif cmd == "WHO":
                reply = f"CONNECTION {who}"
            else:
                reply = "ERROR unknown command"
            f.write((reply + "\n").encode())
    except OSError:
        pass
    finally:
        conn.close()          # the connection's open transaction goes with it

if sys.argv[1] == "tcp":
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    where = str(srv.getsockname()[1])
else:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(sys.argv[2])
    where = sys.argv[2]
srv.listen()
print(where, flush=True)
while True:
    c, _ = srv.accept()
    count[0] += 1
    threading.Thread(target=serve, args=(c, count[0]), daemon=True).start()
"""

# A client that reconnects when its connection is gone, as database and Redis clients do.
CLIENT = r"""
import ctypes, os, signal, socket, sys

class Client:
    def __init__(self, where):
        self.where = where
        self.connect()
    def connect(self):
        if self.where.isdigit():
            self.sock = socket.create_connection(("127.0.0.1", int(self.where)))
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(self.where)
        self.f = self.sock.makefile("rwb", buffering=0)
    def send(self, line):
        self.f.write((line + "\n").encode())
    def call(self, line):
        for attempt in (1, 2):
            try:
                self.send(line)
                reply = self.f.readline()
                if reply:
                    return reply.decode().strip()
            except OSError:
                pass
            self.sock.close()
            self.connect()
        raise RuntimeError("no reply")

USE = sys.argv[2] == "forkpoint"
if USE:
    import forkpoint as fp
db = Client(sys.argv[1])
"""


@pytest.fixture(params=["tcp", "unix"])
def server(request, tmp_path):
    path = program(SERVER, tmp_path, "kvserver.py")
    sock = f"/tmp/fp-kv-{tmp_path.name[-20:]}.sock"        # short: AF_UNIX paths
    proc = subprocess.Popen([sys.executable, str(path), request.param, sock], stdout=subprocess.PIPE,
                            text=True, env=clean_env())
    try:
        where = proc.stdout.readline().strip()
        assert where, "the server did not start"
        yield where
    finally:
        proc.kill()
        proc.wait()
        Path(sock).unlink(missing_ok=True)


def _both(code: str, tmp_path: Path, where: str) -> dict[str, str]:
    """The program's last lines with forkpoint, and the server's state after the same program
    without it (which the crash ends)."""
    out = {}
    for mode in ("forkpoint", "plain"):
        r = run_py(CLIENT + textwrap.dedent(code), tmp_path, where, mode)
        if mode == "forkpoint":
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == -11, r.stderr
        out[mode] = r.stdout
    return out


def test_a_rolled_back_transaction_is_not_committed_by_the_next_one(server, tmp_path):
    """The rolled-back step's BEGIN and SET stay open on the server; without the reset the next
    step's COMMIT committed them (balance 666)."""
    code = """
    db.call("SET balance 100")
    def transfer(amount, crash):
        assert db.call("BEGIN") == "OK"
        db.call(f"SET balance {amount}")
        if crash:
            ctypes.string_at(0)
        assert db.call("COMMIT") == "OK"
    if not USE:
        transfer(666, True)
    try:
        fp.checkpointed(transfer)(666, True)
    except fp.Recovered:
        print("recovered")
    print("next BEGIN:", db.call("BEGIN"))
    db.call("SET note innocent")
    db.call("COMMIT")
    print("balance:", db.call("GET balance"))
    """
    out = _both(code, tmp_path, server)
    assert out["forkpoint"].splitlines() == ["recovered", "next BEGIN: OK", "balance: VALUE 100"]
    r = run_py(CLIENT + 'print(db.call("GET balance"))', tmp_path, server, "plain")
    assert r.stdout.strip() == "VALUE 100", r.stdout      # as the plain program's crash left it


def test_no_step_reads_the_reply_meant_for_a_rolled_back_command(server, tmp_path):
    """The rolled-back step sent GET a and died before reading the reply; the restored program's
    GET b read "VALUE 1" (a's) before the reset."""
    code = """
    db.call("SET a 1"); db.call("SET b 2")
    def ask(crash):
        db.send("GET a")
        import time; time.sleep(0.1)        # the reply is there, unread
        if crash:
            ctypes.string_at(0)
        return db.f.readline()
    if not USE:
        ask(True)
    try:
        fp.checkpointed(ask)(True)
    except fp.Recovered:
        print("recovered")
    print("b:", db.call("GET b"))
    print("a:", db.call("GET a"))
    """
    out = _both(code, tmp_path, server)
    assert out["forkpoint"].splitlines() == ["recovered", "b: VALUE 2", "a: VALUE 1"]


def test_a_connection_the_step_did_not_use_is_kept(server, tmp_path):
    """Only a used connection is shut down: one the step did not touch stays the same connection
    (TCP counts its bytes; a Unix socket cannot be counted, so it is always renewed). With
    ``reset_connections=False`` even a used one is kept."""
    r = run_py(CLIENT + textwrap.dedent("""
    print("before:", db.call("WHO"))
    def step(use, crash):
        if use:
            db.call("GET x")
        if crash:
            ctypes.string_at(0)
    for use in (False, True):
        try:
            fp.checkpointed(step)(use, True)
        except fp.Recovered:
            print(f"used={use}:", db.call("WHO"))
    fp.configure(reset_connections=False)
    try:
        fp.checkpointed(step)(True, True)
    except fp.Recovered:
        print("kept:", db.call("WHO"))
    """), tmp_path, server, "forkpoint")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    if server.isdigit():
        assert lines == ["before: CONNECTION 1", "used=False: CONNECTION 1", "used=True: CONNECTION 2",
                         "kept: CONNECTION 2"], r.stdout
    else:
        assert lines == ["before: CONNECTION 1", "used=False: CONNECTION 2", "used=True: CONNECTION 3",
                         "kept: CONNECTION 3"], r.stdout
    assert r.stderr.count("shut down the connection(s) to") == 1 + (not server.isdigit()), r.stderr


SERVING = """
import ctypes, socket, sys
import forkpoint as fp
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
print(srv.getsockname()[1], flush=True)

@fp.checkpointed
def handle(conn):
    body = conn.recv(100)            # the request, read inside the step
    if body.startswith(b"crash"):
        ctypes.string_at(0)
    conn.sendall(b"200 " + body)

for _ in range(2):
    conn, _ = srv.accept()
    try:
        handle(conn)
    except fp.Recovered:
        conn.sendall(b"500")
    conn.close()
"""


def test_a_connection_the_program_accepted_still_gets_its_answer(tmp_path):
    """A server's client connection is the server's to answer: the step read the request and
    crashed, and the restored server still answers on it."""
    path = program(SERVING, tmp_path)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env())
    try:
        port = int(proc.stdout.readline())
        answers = []
        for body in (b"crash me", b"hello"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(body)
                answers.append(c.recv(100))
        assert answers == [b"500", b"200 hello"]
        assert proc.wait(timeout=20) == 0
        assert "shut down the connection" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def _free_server_port() -> int:
    """A free port outside the kernel's ephemeral range, as a server's configured port is."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in range(max(1024, low - 5000), low):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below the ephemeral range")


def test_a_server_that_closed_its_listener_still_answers_its_client(tmp_path):
    """A one-client server closes its listening socket once it has its client: the accepted
    connection can no longer be told by a listening port, but its port is a server's (outside the
    ephemeral range), not a client's. Taken for a client connection, it was shut down and the
    client got nothing instead of the 500."""
    port = _free_server_port()
    path = program(f"""
    import ctypes, socket
    import forkpoint as fp
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", {port}))
    srv.listen()
    print("ready", flush=True)
    conn, _ = srv.accept()
    srv.close()

    @fp.checkpointed
    def handle(conn):
        conn.recv(100)
        ctypes.string_at(0)

    try:
        handle(conn)
    except fp.Recovered:
        conn.sendall(b"500")
    conn.close()
    """, tmp_path)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env())
    try:
        assert proc.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"crash me")
            answer = c.recv(100)
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read()
        assert answer == b"500", err
        assert "shut down the connection" not in err
    finally:
        proc.kill()
        proc.wait()


def test_standard_output_on_a_stream_socket_is_never_shut_down(tmp_path):
    """A service's output is often a Unix stream socket to journald: named peer, unnamed self, as a
    connection to a server. It is written in every step, and must outlive every restore."""
    listen_path = f"/tmp/fp-journal-{tmp_path.name[-20:]}.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(listen_path)
    srv.listen()
    out = socket.socket(socket.AF_UNIX)
    out.connect(listen_path)
    journal, _ = srv.accept()
    path = program("""
    import ctypes, sys
    import forkpoint as fp
    def step(i):
        print("step", i, flush=True)
        ctypes.string_at(0)
    for i in range(3):
        try:
            fp.checkpointed(step)(i)
        except fp.Recovered:
            print("recovered", i, flush=True)
    print("done", flush=True)
    """, tmp_path)
    try:
        proc = subprocess.Popen([sys.executable, str(path)], stdout=out.fileno(), stderr=out.fileno(),
                                env=clean_env())
        out.close()
        journal.settimeout(30)
        got = b""
        while chunk := journal.recv(4096):
            got += chunk
        assert proc.wait(timeout=20) == 0
        lines = [ln for ln in got.decode().splitlines() if re.fullmatch(r"(step|recovered) \d|done", ln)]
        assert lines == ["step 0", "recovered 0", "step 1", "recovered 1", "step 2", "recovered 2", "done"]
        assert "shut down the connection" not in got.decode()
    finally:
        journal.close()
        srv.close()
        Path(listen_path).unlink(missing_ok=True)


def test_reset_connections_must_be_a_bool(tmp_path):
    r = run_py("""
    import forkpoint as fp
    try:
        fp.configure(reset_connections="no")
    except fp.ConfigurationError as e:
        print("refused:", e)
    """, tmp_path)
    assert r.stdout.strip() == "refused: reset_connections must be True or False, got 'no'", r.stderr


def test_redis_py_reads_no_reply_meant_for_a_rolled_back_command(redis_server, tmp_path):
    """A real redis-server and redis-py: the step blocks in BLPOP and its deadline restores the
    program. Redis answers a blocked client's next command only after the BLPOP, so the restored
    program's first GET read BLPOP's late reply (None) and the next GET read the first one's; with
    the connection shut down, redis-py's pool reconnects before lending it."""
    r = run_py(f"""
    import forkpoint as fp, redis
    r = redis.Redis(host="127.0.0.1", port={redis_server.port}, socket_timeout=10)
    r.set("a", "1"); r.set("b", "2")
    @fp.checkpointed(timeout=0.3)
    def take_job(queue):
        return r.blpop(queue, timeout=1)
    try:
        take_job("jobs")
    except fp.Recovered as e:
        print("recovered:", e.reason)
    print("b:", r.get("b"), "a:", r.get("a"))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["recovered: timeout", "b: b'2' a: b'1'"], r.stderr


def test_a_multiprocessing_manager_is_kept_when_the_step_left_nothing_on_it(tmp_path):
    """A manager's proxies never reconnect: shut down at every restore (a Unix socket), a shared
    dict that the rolled-back step never touched raised BrokenPipeError for ever after."""
    r = run_py("""
    import ctypes, multiprocessing as mp
    import forkpoint as fp
    if __name__ == "__main__":
        mgr = mp.Manager()
        shared = mgr.dict(done=0)
        def step(crash):
            if crash:
                ctypes.string_at(0)
        for crash in (False, True, False):
            try:
                fp.checkpointed(step)(crash)
            except fp.Recovered:
                print("recovered")
            shared["done"] += 1
            print("done:", shared["done"])
        print("new proxy:", len(mgr.list([1, 2])))
        mgr.shutdown()
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["done: 1", "recovered", "done: 2", "done: 3", "new proxy: 2"], r.stderr
    assert "connection(s) to" not in r.stderr, r.stderr


def test_a_multiprocessing_manager_call_the_step_left_unread_is_shut_down(tmp_path):
    """The step sent a request to the manager and died before reading its reply: that reply must
    not be read by the restored program's next call (it would get the rolled-back call's answer)."""
    r = run_py("""
    import ctypes, time, multiprocessing as mp
    import forkpoint as fp
    if __name__ == "__main__":
        mgr = mp.Manager()
        shared = mgr.dict(a=1, b=2)
        assert shared["a"] == 1                 # the proxy's connection is open
        def step(crash):
            conn = shared._tls.connection
            conn.send((shared._id, "__getitem__", ("a",), {}))
            time.sleep(0.2)                     # the reply is there, unread
            if crash:
                ctypes.string_at(0)
        try:
            fp.checkpointed(step)(True)
        except fp.Recovered:
            print("recovered")
        try:
            print("b:", shared["b"])
        except (OSError, EOFError) as e:
            print("b: cut", type(e).__name__)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "recovered", r.stdout
    assert r.stdout.splitlines()[1] != "b: 1", r.stdout          # never the rolled-back call's reply
    assert "connection(s) to" in r.stderr, r.stderr


def test_a_log_stream_to_journald_is_never_shut_down(tmp_path):
    """systemd.journal.stream() logs through a Unix stream connection to journald on a descriptor
    above 2: shut down at every restore, every later record was lost ("--- Logging error ---")."""
    listen_path = f"/tmp/fp-jstream-{tmp_path.name[-20:]}.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(listen_path)
    srv.listen()
    try:
        r = run_py(f"""
        import ctypes, logging, socket
        import forkpoint as fp
        from forkpoint import _connections
        _connections._JOURNAL_STREAM = {listen_path!r}     # journald's /run/systemd/journal/stdout
        s = socket.socket(socket.AF_UNIX)
        s.connect({listen_path!r})
        logging.basicConfig(stream=s.makefile("w", buffering=1), level=logging.INFO, format="%(message)s")
        def step(i):
            if i == 1:
                ctypes.string_at(0)
        for i in range(3):
            try:
                fp.checkpointed(step)(i)
            except fp.Recovered:
                pass
            logging.info("logged %d", i)
        s.close()
        """, tmp_path)
        journal, _ = srv.accept()
        journal.settimeout(10)
        got = b""
        while chunk := journal.recv(4096):
            got += chunk
        journal.close()
    finally:
        srv.close()
        Path(listen_path).unlink(missing_ok=True)
    assert r.returncode == 0, r.stderr
    assert "Logging error" not in r.stderr, r.stderr
    assert [ln for ln in got.decode().splitlines() if ln.startswith("logged")] == \
        ["logged 0", "logged 1", "logged 2"], got


def test_a_connection_its_server_closed_while_idle_is_not_called_used(tmp_path):
    """The peer's FIN counts one in tcpi_bytes_received: a connection the server closed after the
    checkpoint, which the rolled-back code never touched, was reported as used and cut."""
    r = run_py("""
    import socket, subprocess, sys, time
    import forkpoint as fp
    code = ("import socket, time\\n"
            "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(); print(l.getsockname()[1], flush=True)\\n"
            "c, _ = l.accept(); time.sleep(0.3); c.close(); time.sleep(5)\\n")
    srv = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    port = int(srv.stdout.readline())
    conn = socket.create_connection(("127.0.0.1", port))
    fp.tsetjmp()
    if not fp.history():
        time.sleep(0.8)
        fp.tlongjmp(1)
    print("restored", flush=True)
    srv.kill()
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["restored"]
    assert "shut down the connection" not in r.stderr, r.stderr


def test_a_connection_an_earlier_restore_cut_is_not_reported_again(tmp_path):
    """Restored twice, a checkpoint finds the connection its first restore shut down, its peer
    still open (FIN_WAIT2): closed from this side already, it is not shut down and reported again
    (its own FIN moved its count)."""
    r = run_py("""
    import ctypes, signal, socket
    import forkpoint as fp
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()                       # kept open by every copy: never closes
    fp.recover_on(signal.SIGSEGV)
    tries = fp.persist_int("tries")
    n = fp.tsetjmp(pin=True)
    if tries.add() <= 2:
        if tries.value == 1:
            c.sendall(b"request")                # the second attempt does not touch it
        ctypes.string_at(0)
    print("restores:", tries.value - 1)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "restores: 2", r.stdout
    assert r.stderr.count("shut down the connection(s) to") == 1, r.stderr
