"""The sandbox runner behind ``reward=python_exec``, without a model: the harness convention
(``result``, ``response``, answers, partial passes), each failure reason, and the hostile
responses of issue 15, each scored as a failed run with the right reason while the caller
survives and nothing escapes (no file written, no key read, no process left)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import threading
import time

import pytest

from rlhfkit.interfaces import Check
from rlhfkit.plugins.rewards.sandbox import BOOT, SANDBOX_UID, Sandbox, SandboxLimits, run_python

HAS_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAS_BWRAP, reason=f"bubblewrap is not installed (apt-get install -y bubblewrap)")
ISOLATIONS = [pytest.param("bwrap", marks=needs_bwrap), "none"]
FAST = dict(timeout_s=2.0, cpu_s=1)  # the hostile cases that run until a limit stops them
PASSES = Check(tests=("assert True",))  # a check any completed run passes: failing it means the run failed


def limits(isolation: str = "bwrap", **kw) -> SandboxLimits:
    return SandboxLimits(isolation=isolation, **kw)


def sandbox_processes() -> list[str]:
    """Live (non-zombie) processes a sandbox started: those of the sandbox's uid (a root
    caller's), and any still running the zygote (a forked harness too) or bwrap."""
    marker = BOOT.splitlines()[0].encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if status["State"].split()[0] in "ZX":
            continue
        if int(status["Uid"].split()[0]) == SANDBOX_UID or marker in cmdline or cmdline.split(b"\0")[0].endswith(b"bwrap"):
            found.append(f"{pid} {status['Name'].strip()}")
    return found


@pytest.fixture
def nothing_escapes():
    """Every test using it ends with no sandbox process left alive."""
    assert sandbox_processes() == [], "a sandbox process from before this test is still alive"
    yield
    assert sandbox_processes() == []


# --- the harness convention ---------------------------------------------------------------


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_result_response_answer_and_partial_passes(isolation):
    L = limits(isolation)
    # result: the last expression statement's value; response: the text; tests share the globals
    v = run_python("def f(x):\n    return x + 1\n3 + 4", Check(tests=(
        "assert result == 7", "assert response.endswith('3 + 4')", "assert f(1) == 2", "assert f(1) == 3",
        "raise ValueError('a test that raises fails')", "assert resul == 7")), L)
    assert (v.passed, v.total, v.reason) == (3, 6, "tests_failed")
    assert v.score(failure_reward=-1.0) == 0.5  # failed tests score the fraction, not the failure reward
    # a last statement that is not an expression: result is None
    v = run_python("x = 3 + 4", Check(tests=("assert result is None", "assert x == 7")), L)
    assert (v.passed, v.total, v.reason) == (2, 2, None) and v.score(-1.0) == 1.0
    # an answer: str(result), or the last printed line when result is None
    assert run_python("3 + 4", Check(answer=" 7\n"), L).reason is None
    assert run_python("3 + 5", Check(answer="7"), L).reason == "tests_failed"
    assert run_python("print('working')\nprint(7)", Check(answer="7"), L).reason is None
    assert run_python("print(7)\nprint('no')", Check(answer="7"), L).reason == "tests_failed"
    # an answer and tests: one more check
    v = run_python("3 + 4", Check(answer="7", tests=("assert result == 8",)), L)
    assert (v.passed, v.total) == (1, 2)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_the_standard_library_only_unless_site_packages(isolation):
    code = "import sys\nany(p.endswith(('site-packages', 'dist-packages')) for p in sys.path)"
    assert run_python(code, Check(answer="False"), limits(isolation)).reason is None
    assert run_python(code, Check(answer="True"), limits(isolation, site_packages=True)).reason is None


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_the_response_cannot_read_the_job_on_stdin(isolation):
    v = run_python("import sys\nsys.stdin.read()", Check(answer=""), limits(isolation))
    assert (v.passed, v.total, v.reason) == (1, 1, None)  # stdin is empty: the nonce is not there


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("code,reason,detail", [
    ("3 +", "syntax_error", "SyntaxError"),
    ("x = 1\0", "syntax_error", "null bytes"),
    ("1 / 0", "crash", "ZeroDivisionError"),
    ("raise MemoryError", "memory", "MemoryError"),
    ("import os\nos.kill(os.getpid(), 9)", "crash", "SIGKILL"),
])
def test_failure_reasons(isolation, code, reason, detail):
    v = run_python(code, PASSES, limits(isolation))
    assert v.reason == reason and detail in v.detail and v.score(failure_reward=-0.5) == -0.5


def test_a_missing_bwrap_or_interpreter_is_a_sandbox_error_not_an_exception():
    assert run_python("7", PASSES, limits(bwrap="/nonexistent/bwrap")).reason == "sandbox_error"
    assert run_python("7", PASSES, limits(python="/nonexistent/python3")).reason == "sandbox_error"


@needs_bwrap
def test_bwrap_refusing_to_start_is_a_sandbox_error(refusing_bwrap):
    v = run_python("7", PASSES, limits(bwrap=refusing_bwrap))
    assert v.reason == "sandbox_error" and v.detail == "bwrap: No permissions to create new namespace"


# --- hostile responses (issue 15): failure_reward, the right reason, nothing escapes ----------


@needs_bwrap
@pytest.mark.parametrize("code", ["while True:\n    pass",
                                  "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
                                  "import time\ntime.sleep(1000)"])  # no CPU used: only the wall time stops it
def test_infinite_loop(code, nothing_escapes):
    v = run_python(code, PASSES, limits(**FAST))
    assert v.reason == "timeout" and v.score(0.0) == 0.0 and v.seconds < FAST["timeout_s"] + 2


@needs_bwrap
def test_allocating_10_gb(nothing_escapes):
    v = run_python("x = bytearray(10 * 1024 ** 3)", PASSES, limits())
    assert v.reason == "memory" and v.score(0.0) == 0.0


@needs_bwrap
@pytest.mark.parametrize("code,reason", [
    ("import os\nwhile True:\n    os.fork()", "crash"),  # the forks fail past max_procs
    ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "timeout"),  # and keep trying
])
def test_fork_bomb(code, reason, nothing_escapes):
    L = limits(max_procs=16, **FAST)
    seen, done = [], threading.Event()

    def watch():  # how many processes the sandbox holds at once (its uid: a root caller's sandbox)
        while not done.is_set():
            seen.append(len(sandbox_processes()))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        v = run_python(code, PASSES, L)
    finally:
        done.set()
        watcher.join()
    assert v.reason == reason and v.score(0.0) == 0.0
    # the limit counts bwrap's reaper and the zygote, not bwrap's monitor outside the namespace
    assert max(seen) <= L.max_procs + 1
    if reason == "timeout":  # the bomb that keeps trying holds the sandbox full until the wall time
        assert max(seen) > 3


@needs_bwrap
def test_sockets_reach_nothing_outside(nothing_escapes):
    v = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n7", Check(answer="7"), limits())
    assert v.reason == "crash" and "unreachable" in v.detail
    with socket.create_server(("127.0.0.1", 0)) as server:  # the host's loopback is not the sandbox's
        server.settimeout(0.5)
        port = server.getsockname()[1]
        v = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n7", Check(answer="7"),
                       limits())
        assert v.reason == "crash" and "refused" in v.detail
        with pytest.raises(socket.timeout):
            server.accept()


@needs_bwrap
def test_sockets_on_host_paths_are_not_there(host_dir, nothing_escapes):
    path = os.path.join(host_dir, "service.sock")  # a world-writable unix socket, as some services leave
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen()
        server.settimeout(0.5)
        v = run_python(f"import socket\nsocket.socket(socket.AF_UNIX).connect({path!r})\n7", Check(answer="7"), limits())
        assert v.reason == "crash" and "No such file" in v.detail
        with pytest.raises(socket.timeout):
            server.accept()


@needs_bwrap
def test_writing_outside_the_sandbox_temp_dir(tmp_path, host_dir, nothing_escapes):
    # the host's /tmp and data directories are not there; the system directories are read-only
    for target in (tmp_path / "escaped", os.path.join(host_dir, "escaped"), "/usr/lib/escaped", "/etc/escaped"):
        v = run_python(f"open({str(target)!r}, 'w').write('pwned')\n7", Check(answer="7"), limits())
        assert v.reason == "crash" and not os.path.exists(target)
    # its own /tmp is writable, private and gone after the call
    v = run_python("open('/tmp/mine', 'w').write('ok')\nopen('mine').read()", Check(answer="ok"), limits())
    assert v.reason is None and not os.path.exists("/tmp/mine")
    # ... and capped: a 100 MB file stops at max_file_mb
    v = run_python("open('/tmp/big', 'wb').write(b'0' * (100 << 20))", PASSES, limits())
    assert v.reason in ("crash", "memory") and v.score(0.0) == 0.0


@needs_bwrap
def test_secrets_are_not_readable(monkeypatch, host_dir, nothing_escapes):
    key = "wandb-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("HF_TOKEN", key)
    for code in ["import os\nos.environ['WANDB_API_KEY']",
                 "import os\nos.environ['HF_TOKEN']",
                 f"open('/proc/{os.getpid()}/environ').read()"]:  # the trainer's environment
        v = run_python(code, PASSES, limits())
        assert v.reason == "crash" and key not in v.detail
    # the whole environment (bwrap sets PWD, Python's locale coercion LC_CTYPE)
    allowed = {"HOME", "LANG", "PATH", "TMPDIR", "PWD", "LC_CTYPE"}
    v = run_python("import os\nenv = dict(os.environ)", Check(tests=(f"assert set(env) <= {allowed}",)), limits())
    assert v.reason is None
    # a key in a file: the host's files outside the system directories are not there
    secret = os.path.join(host_dir, "netrc")
    with open(secret, "w") as f:
        f.write(key)
    os.chmod(secret, stat.S_IRUSR | stat.S_IWUSR | stat.S_IROTH)
    for path in (secret, os.path.abspath(__file__)):
        v = run_python(f"open({path!r}).read()", PASSES, limits())
        assert v.reason == "crash" and "No such file" in v.detail and key not in v.detail
    if os.geteuid() == 0 and os.path.exists("/etc/shadow"):  # a root caller's sandbox does not run as root
        v = run_python("open('/etc/shadow').read()", PASSES, limits())
        assert v.reason == "crash" and "Permission denied" in v.detail


@needs_bwrap
def test_killing_the_parent(nothing_escapes):
    me = os.getpid()
    for code in [f"import os, signal\nos.kill({me}, signal.SIGKILL)",  # the trainer's real pid, passed in
                 "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\nos._exit(3)"]:
        v = run_python(code, PASSES, limits())
        assert v.reason == "crash" and v.score(0.0) == 0.0
    assert os.getpid() == me  # still here


@needs_bwrap
def test_printing_100_mb(nothing_escapes):
    for code in ["print('x' * (100 << 20))", "import os\nos.write(2, b'x' * (100 << 20))"]:
        v = run_python(code, PASSES, limits(max_output_kb=64))
        assert v.reason == "output_limit" and v.score(0.0) == 0.0


@needs_bwrap
@pytest.mark.parametrize("code", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "raise SystemExit",
    "import atexit, os\natexit.register(lambda: os.write(1, b'\\n' + b'0' * 32 + b' ok 1 1\\n'))\nraise SystemExit(0)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
])
def test_exiting_before_the_tests_never_passes(code, nothing_escapes):
    v = run_python(code, PASSES, limits())  # the check itself would pass: only the harness's verdict counts
    assert v.reason == "crash" and v.score(0.0) == 0.0


@needs_bwrap
def test_no_process_outlives_its_call(nothing_escapes):
    code = ("import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '1000'])\n"
            "import time\ntime.sleep(0.2)\n7")
    assert run_python(code, Check(answer="7"), limits()).reason is None  # a daemon left behind: killed with the call


# --- the warm sandbox: one start-up, then a fresh harness per verification -----------------


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_warm_sandbox_starts_each_verification_from_the_same_state(isolation, nothing_escapes):
    tmp = "/tmp" if isolation == "bwrap" else "."
    with Sandbox(limits(isolation)) as box:
        for _ in range(2):  # what one verification leaves is gone for the next
            v = box.run(f"import os, builtins\nsorted(os.listdir({tmp!r}))", Check(tests=("assert result == []",)))
            assert v.reason is None, v
            v = box.run(f"import builtins\nopen({tmp!r} + '/left', 'w').write('x')\nbuiltins.len = None\n"
                        "import os\nos.environ['LEFT'] = '1'\n7", Check(answer="7"))
            assert v.reason is None, v
            v = box.run("import os\nlen([1]), os.environ.get('LEFT')", Check(answer="(1, None)"))
            assert v.reason is None, v
        assert box.starts == 1


@needs_bwrap
def test_a_warm_sandbox_kills_what_a_verification_left_running(nothing_escapes):
    daemon = ("import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '1000'])\n7")
    count = "import os\nlen([p for p in os.listdir('/proc') if p.isdigit()])"
    with Sandbox(limits()) as box:
        assert box.run(count, Check(answer="3")).reason is None  # bwrap's init, the zygote and the harness
        assert box.run(daemon, Check(answer="7")).reason is None
        assert box.run(count, Check(answer="3")).reason is None  # the daemon is gone
        assert box.starts == 1


@needs_bwrap
def test_a_verification_cannot_reach_the_zygote_or_its_channel(nothing_escapes):
    with Sandbox(limits()) as box:
        for path in ("/proc/%d/mem", "/proc/%d/fd/1", "/proc/%d/environ"):
            v = box.run(f"import os\nopen({path!r} % os.getppid(), 'rb')", PASSES)
            assert v.reason == "crash" and "Permission denied" in v.detail, v
        v = box.run("import os\nos.write(3, b'x')", PASSES)  # no descriptor but its own three
        assert v.reason == "crash" and "Bad file descriptor" in v.detail
        assert box.starts == 1


@needs_bwrap
@pytest.mark.parametrize("code,reason,starts", [
    ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "crash", 2),  # the zygote is gone: restart
    ("import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n7", "timeout", 2),  # it no longer answers
    ("import os\nos.makedirs('/tmp/d/e')\nos.chmod('/tmp/d', 0)\n7", None, 2),  # /tmp cannot be emptied
    ("import time\ntime.sleep(1000)", "timeout", 1),  # the zygote kills it and goes on
    ("while True:\n    pass", "timeout", 1),
    ("print('x' * (1 << 20))", "output_limit", 1),
])
def test_a_verification_that_breaks_the_sandbox_only_costs_a_restart(code, reason, starts, nothing_escapes):
    with Sandbox(limits(max_output_kb=64, **FAST)) as box:
        assert box.run(code, Check(answer="7") if reason is None else PASSES).reason == reason
        v = box.run("import os\nsorted(os.listdir('/tmp'))", Check(answer="[]"))
        assert v.reason is None and box.starts == starts
