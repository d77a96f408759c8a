"""The kernel behaviour WSGI restart mode's rescue of a failed request's client relies on (``_parking``).

Invariant protected: a process that crashes is still alive, blocked inside faulthandler's report,
until the shepherd has read the report's first bytes, so its descriptors can be taken with
``pidfd_getfd``; once the report is read it dies by its own signal, as without forkpoint. If a
kernel ever let the whole report into the held fault socket at once, the shepherd would lose the
race with the crash and the client would get a closed connection instead of a 500: this test says
so before the end-to-end tests do.
"""
from __future__ import annotations

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("depth", [0, 30])
def test_a_crashing_process_waits_in_its_report_until_it_is_read(tmp_path, depth):
    r = run_py("""
    import ctypes, faulthandler, os, select, signal, socket, sys, time
    from forkpoint import _clone, _parking

    r, w = _parking.fault_channel()
    _parking.hold_reports(w)                      # as a program that parks requests does
    client, kept = socket.socketpair()          # stands for a request's client socket
    pid = os.fork()
    if pid == 0:
        os.close(r)
        faulthandler.enable(file=w, all_threads=True)
        def dive(n):
            if n == 0:
                ctypes.string_at(0)
            dive(n - 1)
        dive(int(sys.argv[1]))
        os._exit(0)
    os.close(w)
    select.select([r], [], [], 10)                # the report has begun
    time.sleep(0.2)                               # ample time to finish it, were it not held
    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    got = _clone.take_fd(pid, kept.fileno())
    taken = socket.socket(fileno=got)
    taken.sendall(b"500")                         # what the shepherd would write
    report = b""
    while chunk := os.read(r, 65536):
        report += chunk
    _, status = os.waitpid(pid, 0)
    print(state, client.recv(3).decode(), report.splitlines()[0].decode(),
          os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV)
    """, tmp_path, str(depth))
    assert r.returncode == 0, r.stderr
    state, answer, *header, died = r.stdout.split()
    assert state == "S", r.stdout                 # sleeping in its write, not exiting (Z, X)
    assert answer == "500"
    assert " ".join(header) == "Fatal Python error: Segmentation fault"
    assert died == "True"
