"""The records' parse in a process of its own (hub config `parse_process`), beside the hub's store.

One hub worker runs its MQTT session and its store in one Python process: the store's SQLite work drops the GIL,
the parse (JSON, canonical check, chain hashes: about half of the worker's CPU per record) holds it, and threads
of one process cannot overlap the two (docs/scale.md, "Overlapping parse and store"). A child process can: while
the worker's store thread inserts and commits one burst, the child runs intake.prepare() on the bulk messages read
meanwhile, and the store thread takes each one's result already made (`take()`), leaving it the topic and signature
checks (intake.parse(prepared=...)) and a MessagePack decode.

What it changes, and what not:
- The same result: prepare() is the very function parse() runs in the thread; a batch it does not take (a record to
  reject, an envelope to refuse) comes back None and goes through the strict pass in the worker, as before. The key
  registry, the topic check and the signature check stay in the worker.
- Nothing waits on it that need not: the MQTT thread hands a payload to a writer thread (a queue; it never blocks
  on the pipe), a reader thread collects the answers. The alert lane's messages never go there: an alert is parsed
  in the worker at once, never behind a backlog in the child's queue; nor do messages under MIN_BYTES (a steady
  fleet's few records each), parsed in the worker as they come.
- A child that dies, hangs up or answers garbage costs nothing but speed: every payload it has not answered is
  parsed in the worker (`take()` returns NOT_SUBMITTED), the death is logged and counted (`restarts`), and a new
  child starts at the next submit, at most once per RESTART_S.

Wire between the two, over the child's stdin and stdout: frames of a 12-byte header (payload length, ticket; little
endian) and the payload; the child answers each frame in order with the ticket and intake.PREPARED's MessagePack,
having said first that it is ready (an empty frame, ticket 2**64 - 1).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any

import msgspec

from customs_edge.hub import intake

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IQ")  # payload length, ticket
_READY = (1 << 64) - 1  # the child's first frame, empty: imports done
PIPE_BYTES = 1 << 20  # each pipe's buffer (F_SETPIPE_SZ; Linux's default is 64 KiB, a quarter of one bulk message)
RESTART_S = 10.0  # at most one new child per this many seconds
HANG_S = 30.0  # a child that has not answered a message taken this long after: hung, killed, parsed in the worker
# A smaller message is parsed in the worker, as it arrives: for a few records the hand-off's wake-ups (writer, child,
# reader, the store thread's) cost the worker about what the parse does and add latency to a steady fleet's
# one-record messages (docs/scale.md, "The parse in a process of its own"); a backlog's batches are 100-500 records.
MIN_BYTES = 16 * 1024
NOT_SUBMITTED: Any = intake.NOT_PREPARED  # take(): parse it here


class ParseProcess:
    """intake.prepare() in a child process: submit() payloads as they arrive, take() each one's result later, in
    any order, from another thread."""

    def __init__(self, command: list[str] | None = None) -> None:
        self._command = command or [sys.executable, "-m", "customs_edge.hub.parser"]
        self._lock = threading.Condition()
        self._tickets: dict[int, tuple[int, bytes | str]] = {}  # id(payload) -> (ticket, payload), while submitted
        self._wanted: dict[int, int] = {}  # ticket -> the child generation it went to, until taken
        self._results: dict[int, bytes] = {}  # ticket -> the child's answer, until taken
        self._next = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._generation = 0  # of the live child: a ticket of an older one is never answered
        self._started_at = -RESTART_S
        self._sendq: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._closed = False
        self._ready = 0  # the generation whose child said it is ready
        self.restarts = 0  # children that died, hung or answered garbage
        self.submitted = 0
        self.parsed = 0  # results taken from a child

    def start(self, timeout: float = 30.0) -> bool:
        """Start the child now and wait until it is ready (its imports take about a second of CPU), rather than at
        the first submit(), which starts one if none runs. Returns whether it is ready."""
        with self._lock:
            if not self._alive_locked():
                return False
            generation = self._generation
            deadline = time.monotonic() + timeout
            while self._ready != generation and self._generation == generation and time.monotonic() < deadline:
                self._lock.wait(0.5)
            return self._ready == generation

    def submit(self, payload: bytes | str) -> None:
        """Queue a records payload for the child (starting one if none runs). Never blocks."""
        with self._lock:
            if self._closed or id(payload) in self._tickets or not self._alive_locked():
                return
            ticket = self._next
            self._next += 1
            self._tickets[id(payload)] = (ticket, payload)
            self._wanted[ticket] = self._generation
            self.submitted += 1
            self._sendq.put((ticket, payload.encode() if isinstance(payload, str) else payload))

    def take(self, payload: bytes | str) -> intake.Prepared | None:
        """What the child's intake.prepare() gave for this payload (waiting for it), or NOT_SUBMITTED: parse it
        here (never submitted, or its child died or hung first)."""
        with self._lock:
            entry = self._tickets.pop(id(payload), None)  # the entry holds the payload: its id is no other's
            if entry is None:
                return NOT_SUBMITTED
            ticket = entry[0]
            deadline = time.monotonic() + HANG_S
            while (ticket not in self._results and self._wanted[ticket] == self._generation
                   and self._proc is not None and time.monotonic() < deadline):
                self._lock.wait(1.0)
            del self._wanted[ticket]
            answer = self._results.pop(ticket, None)
        if answer is None:
            if time.monotonic() >= deadline:
                self._died(f"no answer in {HANG_S:.0f} s")
            return NOT_SUBMITTED
        try:
            result: intake.Prepared | None = intake.PREPARED.decode(answer)
        except msgspec.DecodeError:  # a child that answers garbage is no child of ours: parse it here
            self._died("an undecodable answer")
            return NOT_SUBMITTED
        self.parsed += 1
        return result

    @property
    def pid(self) -> int | None:
        """The live child's process id (None: none runs)."""
        with self._lock:
            return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
            self._sendq.put(None)  # its writer closes the child's stdin: EOF, the child exits
            self._lock.notify_all()
        if proc is not None:
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- the child

    def _alive_locked(self) -> bool:
        if self._proc is not None:
            return True
        if time.monotonic() - self._started_at < RESTART_S:
            return False
        self._started_at = time.monotonic()
        try:
            proc = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as exc:
            log.error("parse process did not start; parsing in the worker", extra={"error": repr(exc)})
            return False
        assert proc.stdin is not None and proc.stdout is not None
        for f in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):  # a larger pipe: fewer wake-ups per message
                fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._generation += 1
        self._proc = proc
        self._sendq = queue.SimpleQueue()  # a dead child's queue dies with its writer
        threading.Thread(target=_write, args=(proc.stdin, self._sendq), name="hub-parse-write", daemon=True).start()
        threading.Thread(target=self._read, args=(proc, self._generation), name="hub-parse-read", daemon=True).start()
        log.info("parse process started", extra={"pid": proc.pid})
        return True

    def _read(self, proc: subprocess.Popen[bytes], generation: int) -> None:
        stdout = proc.stdout
        assert stdout is not None
        why = "it exited"
        try:
            while (head := _read_exactly(stdout, _HEADER.size)) is not None:
                size, ticket = _HEADER.unpack(head)
                body = _read_exactly(stdout, size)
                if body is None:
                    why = "a truncated answer"
                    break
                with self._lock:
                    if ticket == _READY:
                        self._ready = generation
                        self._lock.notify_all()
                    elif ticket in self._wanted:  # not given up meanwhile
                        self._results[ticket] = body
                        self._lock.notify_all()
        except (OSError, ValueError) as exc:
            why = repr(exc)
        finally:
            with contextlib.suppress(OSError):
                stdout.close()
        with self._lock:
            if self._generation != generation or self._closed:
                return
        self._died(why)

    def _died(self, why: str) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            self._generation += 1  # its outstanding tickets: parsed in the worker
            self.restarts += 1
            self._sendq.put(None)
            self._lock.notify_all()
        proc.kill()  # dead already, or hung: either way its pipes close and its threads end
        proc.wait()
        log.error("parse process lost; its messages are parsed in the worker, a new one starts in at most"
                  f" {RESTART_S:.0f} s", extra={"pid": proc.pid, "reason": why, "returncode": proc.returncode})


def _write(stdin: IO[bytes], q: queue.SimpleQueue[tuple[int, bytes] | None]) -> None:
    """The writer thread: each queued payload to the child, framed; at None (or a child gone), close its stdin."""
    try:
        while (item := q.get()) is not None:
            ticket, data = item
            stdin.write(_HEADER.pack(len(data), ticket))
            stdin.write(data)
            stdin.flush()
    except (OSError, ValueError):  # the child is gone: the reader says so
        pass
    finally:
        with contextlib.suppress(OSError, ValueError):
            stdin.close()


def _read_exactly(f: IO[bytes], n: int) -> bytes | None:
    """n bytes from f, or None at EOF before them (a blocking BufferedReader's read(n) returns short only at EOF)."""
    data = f.read(n)
    return data if len(data) == n else None


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The child: answer each frame on stdin with intake.prepare() of its payload, in order, until EOF."""
    encode = msgspec.msgpack.Encoder().encode
    stdout.write(_HEADER.pack(0, _READY))
    stdout.flush()
    while (head := _read_exactly(stdin, _HEADER.size)) is not None:
        size, ticket = _HEADER.unpack(head)
        payload = _read_exactly(stdin, size)
        if payload is None:
            return
        try:
            prepared = intake.prepare(payload)
        except Exception:  # the worker's strict pass names what is wrong
            prepared = None
        answer = encode(prepared)
        stdout.write(_HEADER.pack(len(answer), ticket) + answer)
        stdout.flush()


if __name__ == "__main__":
    # A terminal's Ctrl-C and systemd's stop signal the whole group: the worker stops, its child goes at the EOF
    # that follows (a child killed first would cost the worker's last burst a parse of its own, and a logged error)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)
