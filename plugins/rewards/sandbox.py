"""Run an untrusted program (a policy's response) and a prompt's tests in a sandbox, and say
how many tests passed: the runner behind ``reward=python_exec``, usable without a model.

The harness convention (check data is written against it)
--------------------------------------------------------
The response text runs as a Python module in a fresh globals dict. Then two names are bound
in those globals: ``response`` (the text) and ``result`` (the value of the response's last
statement if it is an expression statement, else None, like a notebook's ``_``). Then each
test statement runs in the same globals, one by one: it passes unless it raises (an
``AssertionError`` or any other exception). A reference ``answer`` is one more check: it
passes iff ``str(result).strip() == answer.strip()`` (when ``result`` is None: the last
line the response printed). ``Verdict.passed / Verdict.total`` is the fraction passed.

The verdict comes from the harness, after every check ran: it prints a per-call random nonce
(given on stdin, never on the command line or in the environment) with the counts as the
last line of stdout, then leaves with ``os._exit(0)``. A response that exits (``sys.exit``,
``os._exit``, a signal) before that prints no verdict, and fails as a ``crash``.

Isolation (``isolation="bwrap"``)
---------------------------------
bubblewrap runs the harness with no network and fresh IPC/UTS/PID/user/cgroup namespaces,
only the system directories (:data:`SYSTEM_DIRS`, the interpreter's prefix) bound
read-only (no home, data, /var or /run: no host files or unix sockets), a private
size-capped tmpfs as ``/tmp`` (the cwd, HOME and TMPDIR) and ``/dev/shm``, no capabilities,
no further user namespaces, a scrubbed environment (only PATH, HOME, TMPDIR, LANG), its
own session, and ``--die-with-parent``.
When the caller is root, the sandbox runs as an unused uid (:data:`SANDBOX_UID`): a root
sandbox would still own root's files (``~/.netrc``) and escape RLIMIT_NPROC. Every call
ends with the sandbox's PID namespace torn down: its init (bwrap's reaper) is killed with
the caller's process group and the call waits until it is gone, so no process outlives it.

The harness sets the rlimits on itself before the response runs (they bind the response and
every process it forks): CPU seconds, address space, file size, no core files, and
processes. Inside bwrap's user namespace, RLIMIT_NPROC counts only the sandbox's own
processes (its init, bwrap's reaper, included), whatever the caller's uid. The caller enforces the wall
time and the output cap (stdout + stderr), killing the sandbox when either is exceeded.

``isolation="none"`` runs the same harness in a plain subprocess (own session, temporary
cwd, scrubbed environment, the same rlimits) for trusted code only: it has the host's
network and files, and a process that leaves the session survives the call.
"""

from __future__ import annotations

import json
import marshal
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Check
from rlhfkit.settings import Invalid, bounded, one_of

REASONS = ("timeout", "memory", "crash", "syntax_error", "tests_failed", "output_limit", "sandbox_error")
"""Why a verification did not pass every check. ``tests_failed`` still scores the fraction
passed; the others are failed runs (``failure_reward``)."""

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
"""PATH inside the sandbox, and where ``python`` is looked up."""
SANDBOX_UID = 2_000_000_000
"""The uid a root caller's sandbox runs as: one no account or service uses (nobody's 65534
may own host processes and files)."""
INSTALL = "apt-get install -y bubblewrap"


class SandboxError(ConfigError):
    """The sandbox cannot run at all (bwrap refuses to start): a setup problem, not a response's."""


@dataclass
class SandboxLimits:
    """How one verification is isolated and bounded (``reward.<field>`` under ``reward=python_exec``)."""

    timeout_s: float = bounded(5.0, gt=0, le=3600)
    """Wall time of one verification, from the fork of its harness in the warm sandbox; then it
    is killed: ``timeout``. (A sandbox's own start has a separate allowance, :data:`STARTUP_S`.)"""
    cpu_s: int = bounded(3, ge=1, le=3600)
    """CPU seconds of each sandboxed process (RLIMIT_CPU): ``timeout`` when exceeded."""
    memory_mb: int = bounded(512, ge=64, le=1 << 20)
    """Address space of each sandboxed process, MiB (RLIMIT_AS): an allocation past it is ``memory``."""
    max_procs: int = bounded(32, ge=4, le=4096)
    """Processes in the sandbox, its init (bwrap's reaper) and the interpreter included
    (RLIMIT_NPROC in the sandbox's user namespace): a fork bomb's forks fail past it."""
    max_file_mb: int = bounded(16, ge=1, le=1 << 20)
    """Largest file a sandboxed process may write (RLIMIT_FSIZE), and the size of its /tmp and /dev/shm, MiB."""
    max_output_kb: int = bounded(256, ge=1, le=1 << 20)
    """Output read from the sandbox (stdout + stderr), KiB; past it the sandbox is killed: ``output_limit``."""
    isolation: str = one_of("bwrap", "none")
    """``bwrap``: bubblewrap (no network, read-only system directories only, private /tmp, PID namespace).
    ``none``: a plain subprocess with the same limits, UNSAFE, for trusted code only."""
    bwrap: str = "bwrap"
    """The bubblewrap program (a name looked up on PATH, or a path)."""
    site_packages: bool = False
    """Let the program import the interpreter's installed packages (numpy, ...); off: the
    standard library only (``python -S``), the same on every machine, and faster to start."""
    python: str = "python3"
    """The interpreter that runs the harness, looked up on the sandbox's PATH
    (/usr/local/bin:/usr/bin:/bin) unless a path; it must be readable by an unprivileged uid."""

    def validate_sandbox(self) -> None:
        """Raise :class:`Invalid` (field, value, fix) if the sandbox's programs are missing."""
        if self.isolation == "bwrap" and shutil.which(self.bwrap) is None:
            raise Invalid("bwrap", self.bwrap, f"bubblewrap is not installed (no such program): run `{INSTALL}`, or "
                          "set reward.isolation=none to run trusted code without a sandbox (unsafe)")
        if shutil.which(self.python, path=SANDBOX_PATH) is None:
            raise Invalid("python", self.python, f"no such interpreter on the sandbox's PATH ({SANDBOX_PATH}): "
                          "install python3 there or give its path")


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification."""

    passed: int
    """Checks (tests, and the answer) that passed."""
    total: int
    """Checks run: the prompt's tests, plus one for a reference answer."""
    reason: str | None
    """None: every check passed; else one of :data:`REASONS`."""
    detail: str = ""
    """What failed, in a line (an exception, an exit status, bwrap's message)."""
    seconds: float = 0.0

    @property
    def completed(self) -> bool:
        """The harness ran every check (passed or not) and reported it."""
        return self.reason in (None, "tests_failed")

    def score(self, failure_reward: float) -> float:
        """The fraction of checks passed, or ``failure_reward`` for a failed run."""
        return self.passed / self.total if self.completed and self.total else failure_reward


# Runs as __main__ in a child the zygote (below) forks per verification; reads its job (a
# marshalled dict) from stdin. Only built-in modules (ast and json would double the zygote's
# start-up), and nothing the response can reach before it runs but its globals.
HARNESS = r'''
import _ast, marshal, os, resource, sys
job = marshal.loads(sys.stdin.buffer.read())
_null = os.open(os.devnull, os.O_RDONLY); os.dup2(_null, 0); os.close(_null)
nonce = job["nonce"]
sys.stdout.write(nonce + " start\n"); sys.stdout.flush()
for kind, soft, hard in ((resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, job["cpu_s"], job["cpu_s"] + 1),
                         (resource.RLIMIT_AS, job["memory_mb"] << 20, job["memory_mb"] << 20),
                         (resource.RLIMIT_FSIZE, job["max_file_mb"] << 20, job["max_file_mb"] << 20),
                         (resource.RLIMIT_NPROC, job["max_procs"], job["max_procs"])):
    resource.setrlimit(kind, (soft, hard))

def verdict(status, passed=0, total=0):
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os.write(1, ("\n%s %s %d %d\n" % (nonce, status, passed, total)).encode())
    os._exit(0)

def note(e):
    try:
        line = "".join(__import__("traceback").format_exception_only(type(e), e)).strip().splitlines()[-1]
    except BaseException:
        line = type(e).__name__
    try:
        os.write(2, (line[:500] + "\n").encode(errors="replace"))
    except BaseException:
        pass

class Tail:
    """sys.stdout, remembering the end of what was printed (an answer may be printed)."""
    def __init__(self, stream):
        self._stream, self._tail = stream, ""
    def write(self, s):
        n = self._stream.write(s)
        self._tail = (self._tail + str(s))[-4096:]
        return n
    def last_line(self):
        lines = self._tail.rstrip("\n").rsplit("\n", 1)
        return lines[-1]
    def __getattr__(self, name):
        return getattr(self._stream, name)

try:
    tree = compile(job["code"], "<response>", "exec", _ast.PyCF_ONLY_AST)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
    body = compile(tree, "<response>", "exec")
    tail = compile(_ast.Expression(last.value), "<response>", "eval") if last else None
except MemoryError as e:
    note(e); verdict("memory")
except Exception as e:  # SyntaxError, ValueError (null bytes), RecursionError (deep nesting)
    note(e); verdict("syntax_error")

out = sys.stdout = Tail(sys.stdout)
scope = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(body, scope)
    result = eval(tail, scope) if tail is not None else None
except MemoryError as e:
    note(e); verdict("memory")
except Exception as e:  # SystemExit and KeyboardInterrupt end the process: no verdict, a crash
    note(e); verdict("crash")

passed = total = 0
if job["answer"] is not None:
    total += 1
    try:
        passed += (str(result) if result is not None else out.last_line()).strip() == job["answer"].strip()
    except MemoryError as e:
        note(e); verdict("memory")
    except Exception as e:
        note(e)
scope["response"], scope["result"] = job["code"], result
for i, test in enumerate(job["tests"]):
    total += 1
    try:
        exec(compile(test, "<test %d>" % i, "exec"), scope)
        passed += 1
    except MemoryError as e:
        note(e); verdict("memory")
    except Exception as e:
        note(e)
verdict("ok", passed, total)
'''

_VERDICT = re.compile(r"(\S+) (ok|syntax_error|memory|crash) (\d+) (\d+)")

# The warm sandbox's init, loaded by BOOT (`python -I [-S] -c BOOT`) inside bwrap (or a plain
# subprocess). It reads length-prefixed marshalled messages on stdin: first the set-up
# (the harness's source, the limits), answered "ready"; then one job per verification, each
# answered with the harness's exit status, stdout and stderr. Per job it forks a fresh child
# that runs HARNESS with three new pipes as stdin/stdout/stderr and no other descriptor, so
# the response never holds the channel to the caller. The zygote is not dumpable: a response
# running as the same uid can neither ptrace it nor open its /proc/<pid>/{mem,fd}. After
# every job it kills every other process of the sandbox (kill(-1) in the PID namespace; the
# child's process group without one), reaps them (it is their subreaper) and empties the
# private /tmp and /dev/shm, so each job starts from the state the first one saw. Anything it
# cannot clean, it exits on: the caller starts a fresh sandbox.
ZYGOTE = r'''
import ctypes, io, marshal, os, resource, selectors, signal, sys, time, _ast
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of a job are ours to reap
libc.prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/mem or fd for the jobs

def read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            os._exit(0)  # the caller closed the channel
        buf += chunk
    return buf

def recv():
    return read_exact(int.from_bytes(read_exact(4), "big"))

def send(obj):
    data = marshal.dumps(obj, 4)
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(1, data):]

setup = marshal.loads(recv())
harness = compile(setup["harness"], "<harness>", "exec")
pidns, timeout_s, cap, scratch = setup["pidns"], setup["timeout_s"], setup["cap"], setup["scratch"]
send("ready")

def child(job_r, out_w, err_w):
    os.setsid()
    os.dup2(job_r, 0); os.dup2(out_w, 1); os.dup2(err_w, 2)
    os.closerange(3, 1 << 16)
    libc.prctl(4, 1, 0, 0, 0)  # the job itself may be dumpable (its own /proc/self)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    code = 1
    try:  # as the interpreter would run it as __main__
        exec(harness, {"__name__": "__main__", "__builtins__": __builtins__})
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            try:
                print(e.code, file=sys.stderr)
            except BaseException:
                pass
    except BaseException as e:
        try:
            print("%s: %s" % (type(e).__name__, e), file=sys.stderr)
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code & 0xFF)

def kill_rest(pid):
    try:
        if pidns:
            os.kill(-1, signal.SIGKILL)  # every process of the sandbox but its init and this one
        else:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    while True:  # reap them (orphans come to the subreaper); without a PID namespace only the exited
        try:
            if os.waitpid(-1, 0 if pidns else os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break

def empty(path):
    with os.scandir(path) as entries:
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                empty(e.path)
                os.rmdir(e.path)
            else:
                os.unlink(e.path)

def run(job):
    job_r, job_w = os.pipe(); out_r, out_w = os.pipe(); err_r, err_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            child(job_r, out_w, err_w)
        finally:
            os._exit(70)
    for fd in (job_r, out_w, err_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    chunks, size, killed, status = {out_r: [], err_r: []}, 0, None, None
    os.set_blocking(job_w, False)
    sel = selectors.DefaultSelector()
    for fd in (out_r, err_r, pidfd):
        sel.register(fd, selectors.EVENT_READ)
    sel.register(job_w, selectors.EVENT_WRITE)
    while {out_r, err_r} & set(sel.get_map()):
        left = t0 + timeout_s - time.monotonic()
        if left <= 0:
            killed = "timeout"
            break
        for key, _ in sel.select(left):
            fd = key.fd
            if fd == job_w:
                try:
                    job = job[os.write(job_w, job):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    job = b""
                if not job:
                    sel.unregister(job_w); os.close(job_w); job_w = None
            elif fd == pidfd:  # the job's process ended: nothing it left may go on writing
                sel.unregister(pidfd)
                status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                kill_rest(pid)
            else:
                data = os.read(fd, 1 << 16)
                if not data:
                    sel.unregister(fd)
                    continue
                chunks[fd].append(data)
                size += len(data)
        if size > cap:
            killed = "output_limit"
            break
    sel.close()
    if status is None:  # out of time or output, or it closed its pipes and lives on: end it and all it left
        os.kill(pid, signal.SIGKILL)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        kill_rest(pid)
    for fd in (out_r, err_r, pidfd, job_w):
        if fd is not None:
            os.close(fd)
    dirty = False
    try:
        for path in scratch:
            empty(path)
    except OSError:  # a file it cannot remove: this sandbox ends after answering
        dirty = True
    return {"status": status, "killed": killed, "out": b"".join(chunks[out_r]), "err": b"".join(chunks[err_r]),
            "dirty": dirty}

while True:
    reply = run(recv())  # the job, passed on as the harness's stdin
    send(reply)
    if reply["dirty"]:
        os._exit(0)
'''

BOOT = (
    "# rlhfkit sandbox: reads the zygote (rlhfkit.plugins.rewards.sandbox.ZYGOTE) on stdin\n"
    "import os\n"
    "def _read(n):\n"
    "    b = b''\n"
    "    while len(b) < n:\n"
    "        c = os.read(0, n - len(b))\n"
    "        if not c:\n"
    "            os._exit(0)\n"
    "        b += c\n"
    "    return b\n"
    "exec(compile(_read(int.from_bytes(_read(4), 'big')), '<zygote>', 'exec'))\n"
)
"""The sandbox's command line (``python -I [-S] -c BOOT``): a short loader, so that ``ps``
shows a readable line; the zygote's source comes as the first message on stdin."""

STARTUP_S = 10.0
"""How long a sandbox may take to start (bwrap, the interpreter, the zygote) before it counts as broken."""
GRACE_S = 2.0
"""Wall time past ``timeout_s`` after which the caller stops waiting for the zygote's answer."""


class Sandbox:
    """A warm sandbox: one bwrap (or, with ``isolation="none"``, plain) process whose init,
    the zygote, forks a fresh harness for every verification, so the sandbox and the
    interpreter start once rather than per verification. Each verification still starts
    from the same state: the zygote kills every process the previous one left and empties
    its private /tmp (the zygote enforces the wall time and the output cap too). A verification
    that kills or stops the zygote, or leaves a file it cannot remove, ends the sandbox; the
    next call starts a fresh one. Not thread-safe: one per
    worker. ``with Sandbox(limits) as box: box.run(code, check)``."""

    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self.proc: subprocess.Popen | None = None
        self.info_fd: int | None = None
        self.home: tempfile.TemporaryDirectory | None = None
        self.starts = 0
        """Sandboxes started (the first call, and after each one that ended)."""
        self.start_seconds = 0.0
        """Wall time spent starting them."""

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, code: str, check: Check) -> Verdict:
        """Run ``code`` then ``check``'s tests (and answer) under the harness convention;
        return how many checks passed, or why the run failed. Never raises for anything the
        code does; returns only once every process it started is gone."""
        t0 = time.monotonic()
        limits = self.limits
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            problem = self._start()
            self.starts += 1
            self.start_seconds += time.monotonic() - t0
            if problem:
                self.close()
                return Verdict(0, 0, "sandbox_error", problem, time.monotonic() - t0)
        nonce = secrets.token_hex(16)
        job = marshal.dumps({
            "nonce": nonce, "code": code, "tests": list(check.tests), "answer": check.answer, "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb, "max_file_mb": limits.max_file_mb, "max_procs": limits.max_procs,
        }, 4)  # version 4: read by every Python 3 the sandbox may run
        reply = self._ask(job, time.monotonic() + limits.timeout_s + GRACE_S)
        seconds = time.monotonic() - t0
        if not isinstance(reply, dict):  # the zygote died (the program killed it) or hung (stopped)
            self.close()
            if reply == "timeout":
                return Verdict(0, 0, "timeout", f"still running after timeout_s={limits.timeout_s:g}", seconds)
            return Verdict(0, 0, "crash", "ended before the checks completed (the sandbox was killed)", seconds)
        if reply["dirty"]:  # it left a file the zygote cannot remove: the next verification starts afresh
            self.close()
        return _classify(nonce, reply["status"], reply["out"], reply["err"], reply["killed"], limits, seconds)

    def _start(self) -> str | None:
        """Start the sandbox and its zygote; None when ready, else what went wrong."""
        limits = self.limits
        python = shutil.which(limits.python, path=SANDBOX_PATH)
        if python is None:
            return f"no interpreter {limits.python!r} on {SANDBOX_PATH}"
        argv, user = [python, "-I", *([] if limits.site_packages else ["-S"]), "-c", BOOT], None
        bwrap = limits.isolation == "bwrap"
        if bwrap:
            path = shutil.which(limits.bwrap)
            if path is None:
                return f"no bwrap: {INSTALL}"
            info = os.pipe()
            argv, user = _unprivileged([path, *_bwrap_options(limits, python, info[1]), *argv])
            env, home, scratch = {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8"}, "/", ["/tmp", "/dev/shm"]
        else:
            info = None
            self.home = tempfile.TemporaryDirectory(prefix="rlhfkit-sandbox-")
            home = scratch_dir = self.home.name
            env, scratch = {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}, [scratch_dir]
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=home, env=env,
                start_new_session=True, pass_fds=(info[1],) if info else (), user=user, group=user,
                extra_groups=[] if user is not None else None,
            )
        except OSError as e:
            for fd in info or ():
                os.close(fd)
            return f"cannot start {argv[0]}: {e}"
        if info:
            os.close(info[1])
            self.info_fd = info[0]
        zygote = ZYGOTE.encode()
        try:
            self.proc.stdin.write(len(zygote).to_bytes(4, "big") + zygote)
        except (BrokenPipeError, OSError):
            pass  # it is gone: the set-up below finds out why
        setup = marshal.dumps({"harness": HARNESS, "pidns": bwrap, "timeout_s": limits.timeout_s,
                               "cap": limits.max_output_kb << 10, "scratch": scratch}, 4)
        if self._ask(setup, time.monotonic() + max(STARTUP_S, limits.timeout_s)) == "ready":
            return None
        err = self._stderr()
        return err or f"the sandbox exited (status {self.proc.poll()}) before it was ready"

    def _ask(self, message: bytes, deadline: float) -> Any:
        """Send one message to the zygote and read its answer; ``"timeout"`` or ``None`` (gone)."""
        proc = self.proc
        try:
            proc.stdin.write(len(message).to_bytes(4, "big") + message)
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        fd, buf, need = proc.stdout.fileno(), b"", 4
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while len(buf) < need:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return "timeout"
                data = os.read(fd, max(need - len(buf), 1 << 16))
                if not data:
                    return None
                buf += data
                if need == 4 and len(buf) >= 4:
                    need = 4 + int.from_bytes(buf[:4], "big")
        try:
            return marshal.loads(buf[4:need])
        except (ValueError, EOFError, TypeError):
            return None

    def _stderr(self) -> str:
        """The last line the sandbox wrote on stderr (bwrap's own errors), once it is gone."""
        self._kill()
        try:
            err = self.proc.stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return err.splitlines()[-1][:300] if err else ""

    def _kill(self) -> None:
        if self.proc is None:
            return
        _kill_group(self.proc)
        self.proc.wait()
        if self.info_fd is not None:
            _wait_gone(_read_child_pid(self.info_fd))
            self.info_fd = None

    def close(self) -> None:
        """End the sandbox: every process it holds is gone when this returns."""
        if self.proc is not None:
            self._kill()
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None
        if self.info_fd is not None:
            os.close(self.info_fd)
            self.info_fd = None
        if self.home is not None:
            self.home.cleanup()
            self.home = None


def run_python(code: str, check: Check, limits: SandboxLimits) -> Verdict:
    """One verification in a sandbox of its own (:class:`Sandbox`, started and ended for it)."""
    with Sandbox(limits) as box:
        return box.run(code, check)


def _unprivileged(argv: list[str]) -> tuple[list[str], int | None]:
    """``argv`` run as :data:`SANDBOX_UID` when the caller is root: through util-linux's
    ``setpriv`` (Popen then vforks; its own ``user=`` forks, copying a trainer's page tables:
    ~100 ms for 1 GB resident), else with Popen's ``user=``. Returns (argv, Popen's user)."""
    if os.geteuid() != 0:
        return argv, None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return argv, SANDBOX_UID
    uid = str(SANDBOX_UID)
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", *argv], None


SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""The host directories the sandbox sees (read-only), with the interpreter's own prefix:
what a program and the standard library need, and no home, data, /var, /run or sockets."""


def _bwrap_options(limits: SandboxLimits, python: str, info_fd: int) -> list[str]:
    size = str(limits.max_file_mb << 20)
    return [
        "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL", "--die-with-parent",
        "--new-session", *_system_binds(python), "--proc", "/proc", "--dev", "/dev",
        "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm", "--chdir", "/tmp",
        "--clearenv", "--setenv", "PATH", SANDBOX_PATH, "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
        "--setenv", "LANG", "C.UTF-8", "--hostname", "sandbox", "--info-fd", str(info_fd), "--",
    ]


def _system_binds(python: str) -> list[str]:
    """bwrap options that mount :data:`SYSTEM_DIRS` read-only (a merged-/usr symlink as a
    symlink), and the prefix of ``python`` (``/opt/py311`` for ``/opt/py311/bin/python3``)
    where it lies outside them."""
    out: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            out += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            out += ["--ro-bind", path, path]
    for exe in (python, os.path.realpath(python)):
        prefix = os.path.dirname(os.path.dirname(exe))
        if prefix not in ("", "/") and not any(prefix == d or prefix.startswith(d + "/") for d in SYSTEM_DIRS):
            out += ["--ro-bind", prefix, prefix]
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group the sandbox was started in (bwrap, or the plain harness and
    what it forked). bwrap's reaper dies with it (--die-with-parent), and the kernel then kills
    every process of its PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_child_pid(fd: int) -> int | None:
    """The host pid of the sandbox's init, from bwrap's --info-fd JSON."""
    try:
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read() or b"{}").get("child-pid")
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int | None, timeout: float = 5.0) -> None:
    """Wait until ``pid`` has exited (gone, or a zombie: a PID namespace's init becomes one
    only after every process of its namespace is dead); SIGKILL it after ``timeout``."""
    if pid is None:
        return
    end = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        if time.monotonic() > end:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                return
        time.sleep(0.002)


def _classify(nonce: str, status: int, out: bytes, err: bytes, killed: str | None, limits: SandboxLimits,
              seconds: float) -> Verdict:
    text, errors = out.decode(errors="replace"), err.decode(errors="replace").strip()
    last_err = errors.splitlines()[-1][:300] if errors else ""
    if killed == "timeout":
        return Verdict(0, 0, "timeout", f"still running after timeout_s={limits.timeout_s:g}", seconds)
    if killed == "output_limit":
        return Verdict(0, 0, "output_limit", f"more than max_output_kb={limits.max_output_kb} of output", seconds)
    if not text.startswith(f"{nonce} start\n"):  # the harness never ran: the sandbox failed
        return Verdict(0, 0, "sandbox_error", last_err or f"exit status {status} before the harness started", seconds)
    m = _VERDICT.fullmatch(text.rstrip("\n").rsplit("\n", 1)[-1])
    if status == 0 and m and m.group(1) == nonce:
        kind, passed, total = m.group(2), int(m.group(3)), int(m.group(4))
        if kind != "ok":
            return Verdict(0, 0, kind, last_err, seconds)
        return Verdict(passed, total, None if passed == total else "tests_failed", last_err if passed < total else "",
                       seconds)
    # no verdict: the process ended (or was ended) before every check ran
    sig = -status if status < 0 else 0
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and seconds >= limits.cpu_s):
        return Verdict(0, 0, "timeout", f"CPU time past cpu_s={limits.cpu_s}", seconds)
    if "MemoryError" in errors or "Cannot allocate memory" in errors:
        return Verdict(0, 0, "memory", last_err, seconds)
    how = f"killed by signal {signal.Signals(sig).name}" if sig in signal.valid_signals() and sig else f"exit status {status}"
    return Verdict(0, 0, "crash", f"ended before the checks completed ({how}){': ' + last_err if last_err else ''}",
                   seconds)
