"""The ack channel: how a vLLM worker's model process tells its main process a job is committed.

On the vLLM engine a flush task does not wait for its jobs: it starts them in a
thread of the model process and returns, so the next flush's jobs join the
engine at its next step. The flush's return then says nothing about commits,
and the messages must still be acknowledged only after their rows are
committed. So the model process reports each job on this channel once its
outcome is committed (``ack``), or once its run gave up without committing
(``requeue``: the database stayed away past ``CQ_DB_RETRY_S``), and the main
process, which holds the messages, acknowledges or requeues exactly those.

The channel is a Unix stream socket the main process listens on (made before
the pool forks) and each model process connects to when it starts. The kernel
closes a dead process's end, so the main process reads end-of-file the moment
its model process dies, by SIGKILL or the OOM killer: it then requeues every
message it still holds at once, as a dead flush does on the static engine.
A job's report is one line, written whole under a lock, so reports of threads
that commit at once never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: The verbs of a report line: ``ack "<job id>"`` or ``requeue "<job id>"`` (JSON strings).
ACK, REQUEUE = "ack", "requeue"

#: Called for each report line: the job id, and True when its outcome is committed.
OnReport = Callable[[str, bool], None]
#: Called when a model process's connection ends (the process died or exited).
OnLost = Callable[[], None]


class AckChannel:
    """A socket the main process listens on and each model process reports its commits to."""

    def __init__(self) -> None:
        # Linux's abstract namespace: no file to clean up, nothing another user can open.
        self.address = f"\0cq-acks-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(8)
        self._listener.setblocking(False)
        #: The main process's end of each model process's connection, with its unread bytes.
        self._peers: dict[socket.socket, bytearray] = {}
        self._on_report: OnReport | None = None
        self._on_lost: OnLost | None = None
        self._hub: Any = None
        # The model process's end:
        self._writer: socket.socket | None = None
        self._write_lock = threading.Lock()

    # The main process's side.

    def watch(self, hub: Any, on_report: OnReport, on_lost: OnLost) -> None:
        """Read reports on ``hub`` (kombu's event loop); again after it was reset."""
        self._hub, self._on_report, self._on_lost = hub, on_report, on_lost
        hub.add_reader(self._listener.fileno(), self._accept)
        for peer in self._peers:
            hub.add_reader(peer.fileno(), self._read, peer)

    @property
    def connected(self) -> int:
        """How many model processes are connected now."""
        return len(self._peers)

    def _accept(self) -> None:
        try:
            peer, _ = self._listener.accept()
        except BlockingIOError:
            return
        peer.setblocking(False)
        self._peers[peer] = bytearray()
        if self._hub is not None:
            self._hub.add_reader(peer.fileno(), self._read, peer)

    def _read(self, peer: socket.socket) -> None:
        try:
            data = peer.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(peer)
            return
        buffer = self._peers[peer]
        buffer += data
        *lines, rest = bytes(buffer).split(b"\n")
        self._peers[peer] = bytearray(rest)
        for line in lines:
            self._dispatch(line)

    def _dispatch(self, line: bytes) -> None:
        verb, _, quoted = line.decode(errors="replace").partition(" ")
        try:
            job_id = json.loads(quoted)
        except ValueError:
            job_id = None
        if verb not in (ACK, REQUEUE) or not isinstance(job_id, str):
            log.error("ignoring a malformed ack-channel line %r", line[:80])
            return
        if self._on_report is not None:
            self._on_report(job_id, verb == ACK)

    def _close(self, peer: socket.socket) -> None:
        """A model process's connection ended: it died or exited; give back what it held."""
        if self._hub is not None:
            self._hub.remove_reader(peer.fileno())
        self._peers.pop(peer, None)
        peer.close()
        if self._on_lost is not None:
            self._on_lost()

    def drain(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Read reports without the event loop until ``done()`` or ``timeout_s``; True if done.

        A warm shutdown waits here for the running jobs' commits before the broker
        connection closes (the event loop no longer runs then).
        """
        deadline = time.monotonic() + timeout_s
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not self._peers:
                return done()
            readable, _, _ = select.select([self._listener, *self._peers], [], [], min(left, 1.0))
            for ready in readable:
                if ready is self._listener:
                    self._accept()
                else:
                    self._read(ready)
        return True

    # The model process's side.

    def connect(self) -> None:
        """Connect this (model) process to its main process's channel."""
        writer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        writer.connect(self.address)
        self._writer = writer

    def report(self, job_ids: Sequence[str], *, committed: bool) -> None:
        """Tell the main process that these jobs' outcomes are committed (or not: requeue)."""
        if self._writer is None:
            raise RuntimeError("this process is not connected to its ack channel")
        verb = ACK if committed else REQUEUE
        with self._write_lock:
            for job_id in job_ids:
                # JSON-quoted: a stray message's task id may hold a newline or a space.
                self._writer.sendall(f"{verb} {json.dumps(job_id)}\n".encode())
