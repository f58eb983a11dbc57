"""A fork server for tests/test_benchmarks.py: `python` commands of the benchmark scripts, without the imports.

The benchmark scripts start some 40 Python processes; each spends seconds importing torch and timm
before a smoke-sized step that takes a fraction of that. The server imports them once, then forks a
child per command, which runs it as ``python ARGS`` would (``-m MODULE`` or a script file), with the
caller's working folder, environment and stdin/stdout/stderr (passed over the socket), and returns its
exit status. The scripts' bash code and command lines are unchanged: only $PYTHON points here.

    python tests/_pyserver.py serve SOCKET     # the server (imports, then answers until SIGTERM)
    python -S tests/_pyserver.py SOCKET ARGS   # a client: what the scripts run as "$PYTHON" ARGS
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys

PRELOAD = ("torch", "vitslim", "timm", "vitslim.cli", "vitslim.zoo", "vitslim.export", "vitslim.train",
           "vitslim.train.engine",
           "vitslim.measure.compare", "vitslim.methods.prune_merge", "sklearn.datasets", "matplotlib.pyplot")


def client(path: str, args: list[str]) -> int:
    """Send ARGS, the working folder, the environment and fds 0-2; wait for the exit status."""
    request = json.dumps({"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        socket.send_fds(sock, [struct.pack("!I", len(request))], [0, 1, 2])
        sock.sendall(request)
        status = b""
        while len(status) < 4:
            chunk = sock.recv(4 - len(status))
            if not chunk:
                return 255  # the server went away
            status += chunk
    code = struct.unpack("!i", status)[0]
    return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it


def _run(argv: list[str]) -> int:
    """``python ARGV`` in this (forked) process: -m MODULE or a script path."""
    import runpy
    import traceback

    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001  (report it as python would, then exit 1)
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _handle(conn: socket.socket) -> None:
    """Child of the server: read one request, fork the command, send back its exit status."""
    header, fds, _, _ = socket.recv_fds(conn, 4, 3)
    while len(header) < 4:
        header += conn.recv(4 - len(header))
    size, body = struct.unpack("!I", header)[0], b""
    while len(body) < size:
        body += conn.recv(size - len(body))
    request = json.loads(body)
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = request["argv"]
        if not argv or not (argv[0] == "-m" and len(argv) > 1 or os.path.isfile(argv[0])):
            os.execv(sys.executable, [sys.executable, *argv])  # anything else: a real python
        os._exit(_run(argv))
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))


def _reap() -> None:
    """Collect finished handlers (their CPU time then counts in this server's children)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _stop(*_) -> None:
    """SIGTERM: wait for the running commands, then exit."""
    try:
        while True:
            os.wait()
    except ChildProcessError:
        os._exit(0)


def serve(path: str) -> None:
    """Import the heavy modules once, then fork a handler per connection until terminated."""
    import importlib
    import signal

    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (a command that needs it will say why)
            pass
    signal.signal(signal.SIGTERM, _stop)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(8)
        print("ready", flush=True)
        while True:
            conn, _ = server.accept()
            sys.stdout.flush()
            _reap()
            if os.fork() == 0:
                server.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                try:
                    _handle(conn)
                finally:
                    os._exit(0)
            conn.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
