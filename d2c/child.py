"""One protocol for everything d2c runs in a child Python process.

Why child processes at all: both Darknet libraries are built with -Ofast, whose ELF constructor
switches on flush-to-zero for the loading process; they exit() or crash on some inputs; and
benchmarks need a fresh process per measurement (peak RSS, thread pools). So the engines, the
benchmark workers and the AlexeyAB runtime all live in children, and they share this one protocol.

How: the child builds one object from a factory named "module:callable" with pickled arguments,
then answers method calls on it. Messages are length-prefixed pickles on two private pipes (not
stdin/stdout, which C libraries print to); the child's own stdout/stderr go to a log file. An
error raised in the child comes back as the same d2c error class (others as EngineError); a dead
child (exit(), SIGSEGV, SIGFPE...) becomes an EngineError with its exit status and the end of
its log. Pickles are only ever read from our own pipe, never from a file.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from d2c import errors
from d2c.errors import D2CError, EngineError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def send(fd: int, message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack("<Q", len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]


def receive(fd: int) -> Any:
    """Read one length-prefixed pickle; EOFError when the other side is gone."""
    def read_exact(size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    (size,) = struct.unpack("<Q", read_exact(8))
    return pickle.loads(read_exact(size))  # only from our own parent/child pipe


def _factory(spec: str) -> Any:
    """The callable named "d2c.module:name" (only d2c's own modules: the names are constants in d2c)."""
    module, _, name = spec.partition(":")
    if not module.startswith("d2c.") or not name or name.startswith("_") and name != "_Handler":
        raise EngineError(f"child process: refusing factory {spec!r} (not a d2c callable)")
    return getattr(importlib.import_module(module), name)


def serve() -> None:
    """The child's loop: ("init", factory, args, kwargs) once, then ("call", name, args, kwargs)
    until ("close",) or EOF. Only public names count; a non-callable attribute returns its value."""
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    target: Any = None
    while True:
        try:
            message = receive(read_fd)
        except EOFError:
            break
        op = message[0]
        try:
            if op == "init":
                _, spec, args, kwargs = message
                target = _factory(spec)(*args, **kwargs)
                result: Any = None
            elif op == "close":
                close = getattr(target, "close", None)
                target = None
                if callable(close):
                    close()
                send(write_fd, ("ok", None))
                break
            elif op == "call" and target is not None and not message[1].startswith("_"):
                _, name, args, kwargs = message
                attr = getattr(target, name)
                result = attr(*args, **kwargs) if callable(attr) else attr
            else:
                raise EngineError(f"child process: unknown request {op!r}")
            send(write_fd, ("ok", result))
        except D2CError as exc:
            send(write_fd, ("error", type(exc).__name__, str(exc), exc.problems))
        except Exception as exc:  # noqa: BLE001 - reported to the parent as an EngineError
            send(write_fd, ("error", "EngineError", f"{type(exc).__name__}: {exc}", []))


class Child:
    """An object built by `factory(*args, **kwargs)` in a child interpreter; `call` runs its methods.

    `env` adds to the child's environment; `quiet=False` lets the child print to this terminal
    instead of its log file. `name` appears in every error message.
    """

    def __init__(self, factory: str, *args: Any, name: str, env: dict[str, str] | None = None,
                 quiet: bool = True, **kwargs: Any) -> None:
        self.name = name
        self._proc: subprocess.Popen | None = None
        self._dead: str | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"d2c-{name.split()[0].lower()}-", suffix=".log",
                                                delete=False)
        self.log_path = Path(self._log.name)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        child_env = dict(os.environ)
        child_env.setdefault("GLOG_minloglevel", "2")
        child_env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + child_env["PYTHONPATH"]
                                                       if child_env.get("PYTHONPATH") else "")
        child_env.update(env or {})
        output = self._log if quiet else None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from d2c.child import serve; serve()", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                env=child_env, close_fds=True)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._to_child, self._from_child = to_child_w, from_child_r
        try:
            self._request(("init", factory, args, kwargs), "starting")
        except BaseException:
            self.close()
            raise

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `method(*args, **kwargs)` on the child's object and return its (pickled) result."""
        return self._request(("call", method, args, kwargs), f"running {method}()")

    def _request(self, message: tuple, what: str) -> Any:
        if self._dead:
            raise EngineError(f"{self.name} is no longer running ({self._dead})")
        if self._proc is None:
            raise EngineError(f"{self.name} was closed")
        try:
            send(self._to_child, message)
            reply = receive(self._from_child)
        except (EOFError, BrokenPipeError, OSError):
            self._dead = self._death_reason()
            tail = self.log_tail()
            raise EngineError(f"{self.name} crashed while {what}: {self._dead}"
                              + (f"; last output:\n{tail}" if tail else "")) from None
        if reply[0] == "ok":
            return reply[1]
        _, cls_name, text, problems = reply
        cls = getattr(errors, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, D2CError)):
            cls = EngineError
        if cls is EngineError and not text.startswith(self.name):
            text = f"{self.name}: {text}"
        raise cls(text, problems)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def _death_reason(self) -> str:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"process exited with status {code}"

    def close(self) -> None:
        """Ask the child to close its object and stop; kill it after 30 s. Safe to call twice."""
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is not None:
            if proc.poll() is None and not self._dead:
                with contextlib.suppress(EOFError, OSError):
                    send(self._to_child, ("close",))
                    receive(self._from_child)
            for fd in (self._to_child, self._from_child):
                with contextlib.suppress(OSError):
                    os.close(fd)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self._log = None

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
