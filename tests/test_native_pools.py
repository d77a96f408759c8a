"""C libraries' thread pools: OpenBLAS (numpy's wheels bundle it) and OpenMP (C built with -fopenmp).

Invariant protected: a program whose C libraries keep idle worker threads is checkpointed like one
without them (``import numpy`` alone started such a thread, and every checkpoint was refused), and
after a restore from a real segfault its next threaded call runs (it waited for ever for threads
the copy never had) and gives what the same program gives without forkpoint; the library then has
a pool again, as after ``os.fork()``. A thread of a library forkpoint cannot ask is still refused,
with a message that says whose it is.

Each program runs with and without forkpoint, in a subprocess with a timeout: a hang fails the run.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_py

pytestmark = pytest.mark.timeout(120)

# The same steps with and without forkpoint: a pool that runs, a product before the checkpoint,
# one after it, a real segfault after that (with forkpoint: a restore, and the product again).
PROGRAM = """
    import ctypes, os, signal, sys
    USE = sys.argv[1] == "forkpoint"
    START_FIRST = {start_first}
    if USE and START_FIRST:
        import forkpoint
        forkpoint.recover_on(signal.SIGSEGV)       # starts forkpoint before the library's pool
    {setup}
    def threads():
        return len(os.listdir("/proc/self/task"))
    print("pool before", threads() > 1, flush=True)
    if USE and not START_FIRST:
        import forkpoint
        forkpoint.recover_on(signal.SIGSEGV)       # starts forkpoint, with the pool running
    restored = 0
    if USE:
        forkpoint.tsetjmp(allow_threads=START_FIRST or None)
        restored = forkpoint.chkpt_status(forkpoint.CHKPT_RECOVERED)
    print("result", {compute}, flush=True)
    if USE and not restored:
        ctypes.string_at(0)
    print("pool after", threads() > 1)
    print("restored", restored)
"""


def _both(tmp_path: Path, setup: str, compute: str, start_first: bool = False,
          **env: str) -> tuple[list[str], list[str]]:
    code = PROGRAM.format(setup=setup, compute=compute, start_first=start_first)
    runs = []
    for mode in ("plain", "forkpoint"):
        r = run_py(code, tmp_path, mode, timeout=60, **env)
        assert r.returncode == 0, f"{mode}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        runs.append(r.stdout.splitlines())
    return runs[0], runs[1]


def _check(plain: list[str], fp: list[str]) -> None:
    assert plain[0] == "pool before True", plain          # the scenario has a pool to end
    result = plain[1]
    assert plain == ["pool before True", result, "pool after True", "restored 0"]
    # Once before the segfault, once in the restored process: the same value, and a pool again.
    assert fp == ["pool before True", result, result, "pool after True", "restored 1"], fp


@pytest.mark.parametrize("start_first", [False, True], ids=["numpy-first", "start-first-allow-threads"])
def test_numpy_with_openblas_threads_is_checkpointed_and_multiplies_after_a_restore(tmp_path, start_first):
    """numpy-first: its pool alone refused the start. start-first (the refusal's advice) with
    allow_threads=True: the restored process's first threaded product waited for ever."""
    pytest.importorskip("numpy")
    setup = """
    import numpy as np
    a = np.arange(360000, dtype=float).reshape(600, 600) / 360000
    a @ a                                          # OpenBLAS's threads have worked once
    """
    plain, fp = _both(tmp_path, setup, "float((a @ a).sum())", start_first, OPENBLAS_NUM_THREADS="2")
    _check(plain, fp)


def _build(tmp_path: Path, name: str, source: str, *flags: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc to build the C library")
    c = tmp_path / f"{name}.c"
    c.write_text(source)
    lib = tmp_path / f"lib{name}.so"
    r = subprocess.run([gcc, "-O1", "-shared", "-fPIC", *flags, "-o", str(lib), str(c), "-lpthread"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"gcc {' '.join(flags)} failed: {r.stderr.strip()[:300]}")
    return lib


PARALLEL_SUM = """
double parallel_sum(int n) {
    double s = 0;
    #pragma omp parallel for reduction(+:s)
    for (int i = 0; i < n; i++) s += i * 0.5;
    return s;
}
"""


def test_an_openmp_extensions_pool_is_ended_and_its_next_parallel_loop_runs_after_a_restore(tmp_path):
    lib = _build(tmp_path, "psum", PARALLEL_SUM, "-fopenmp")
    setup = f"""
    lib = ctypes.CDLL({str(lib)!r})
    lib.parallel_sum.restype = ctypes.c_double
    lib.parallel_sum(1_000_000)                    # OpenMP's pool has run once
    """
    plain, fp = _both(tmp_path, setup, "lib.parallel_sum(2_000_000)", OMP_NUM_THREADS="2")
    _check(plain, fp)


IDLE_THREAD = """
#include <pthread.h>
#include <unistd.h>
static void *idle(void *arg) { for (;;) pause(); return arg; }
void start_idle(void) { pthread_t t; pthread_create(&t, 0, idle, 0); pthread_detach(t); }
"""


def test_a_thread_of_another_c_library_is_still_refused_with_a_message_that_says_whose(tmp_path):
    lib = _build(tmp_path, "idle", IDLE_THREAD)
    r = run_py(f"""
        import ctypes, forkpoint
        forkpoint.start()
        ctypes.CDLL({str(lib)!r}).start_idle()
        try:
            forkpoint.tsetjmp()
        except forkpoint.ThreadsAlive as e:
            print("refused:", e)
        print("still running")
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "refused: 1 other thread(s) alive (native threads)" in r.stdout, r.stdout
    assert "native threads are a C library's" in r.stdout, r.stdout
    assert r.stdout.rstrip().endswith("still running"), r.stdout


def test_a_function_read_from_the_symbol_table_is_where_the_dynamic_linker_put_it(tmp_path):
    """numpy 2.5's OpenBLAS hides its at-fork handler; forkpoint finds it in the library's
    ``.symtab``. An address read that way is called at a checkpoint, so it must be exact: for every
    function the library also exports, it is the address ``dlsym`` gives."""
    pytest.importorskip("numpy")
    r = run_py("""
        import ctypes, os
        import numpy
        from forkpoint import _elfsym, _procfs
        path = next(p for p in _procfs.mapped_libraries() if "openblas" in p.lower())
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
        names = ["openblas_get_config", "scipy_openblas_get_config64_", "scipy_openblas_get_config",
                 "openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "blas_thread_shutdown_"]
        checked = 0
        for name in names:
            exported = getattr(lib, name, None)
            if exported is not None:
                found = _elfsym.hidden_function(path, lib, name)
                assert found == ctypes.cast(exported, ctypes.c_void_p).value, (name, found)
                checked += 1
        print("checked", checked)
        print("shutdown found", _elfsym.hidden_function(path, lib, "blas_thread_shutdown_") is not None)
        print("made-up name", _elfsym.hidden_function(path, lib, "no_such_function_here"))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert int(lines[0].split()[1]) >= 1, r.stdout
    assert lines[1:] == ["shutdown found True", "made-up name None"], r.stdout


HIDDEN = """
__attribute__((visibility("hidden"))) int hidden_answer(void) { return 42; }
int exported_answer(void) { return hidden_answer() - 1; }
"""


def test_a_hidden_function_is_found_in_the_symbol_table_and_called_or_not_at_all(tmp_path):
    """The ``.symtab`` path on any machine (numpy 2.5's OpenBLAS needs it): a function a library
    built here hides from ``dlsym`` is found and called (it answers 42); the same library with its
    symbol table stripped gives no address at all, rather than a guess."""
    lib = _build(tmp_path, "hidden", HIDDEN)
    stripped = tmp_path / "libstripped.so"
    strip = shutil.which("strip")
    if strip is None:
        pytest.skip("no strip to remove the symbol table")
    subprocess.run([strip, "--strip-all", "-o", str(stripped), str(lib)], check=True, timeout=30)
    r = run_py(f"""
        import ctypes
        from forkpoint import _elfsym
        for path in ({str(lib)!r}, {str(stripped)!r}):
            lib = ctypes.CDLL(path)
            print("exported", lib.exported_answer(), "dlsym", hasattr(lib, "hidden_answer"))
            address = _elfsym.hidden_function(path, lib, "hidden_answer")
            print("found", None if address is None else ctypes.CFUNCTYPE(ctypes.c_int)(address)())
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["exported 41 dlsym False", "found 42",
                                     "exported 41 dlsym False", "found None"], r.stdout
