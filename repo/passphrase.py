"""Passphrases: where a command's passphrase comes from, and the key scrypt stretches it to.

Every command that opens a repository by passphrase pays for scrypt once: 0.15 s and 64 MiB
at the parameters of new key records. :func:`derive_ahead` starts that work in a child
process before the command line has loaded its modules (0.1 s of imports that would
otherwise come first, on the same core). :func:`scrypt` then takes the result derived ahead
when it is asked for exactly the same passphrase, salt and parameters, and derives afresh for
anything else: a guess made ahead can only save time, never change what a passphrase opens.

This module is imported before everything else of a command (:mod:`vmrepo.cli.ahead`), so it
imports nothing heavy at its top.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from .errors import NoPassphrase

#: What scrypt's parameters in a key record may cost (a damaged or hostile record must not
#: exhaust the host): ``256 * n * r`` bytes (its 128 n r byte array, twice over) below
#: 2 GiB, the bound OpenSSL's scrypt was given before libsodium's computed it.
SCRYPT_MAX_MEMORY = (1 << 31) - 1

#: prctl(2): a signal the child gets when its parent dies.
_PR_SET_PDEATHSIG = 1

#: scrypt's parameters after the passphrase: salt, n, r, p.
Params = tuple[bytes, int, int, int]


class _Child:
    """A child process deriving keys ahead: each arrives on a pipe, in the order asked, as
    one byte (1: derived, 0: failed) and 32 bytes. A process of its own rather than a
    thread: scrypt on a thread slowed the imports it runs beside by a third (in one address
    space; from another process, by a twentieth), and the thread would leave a malloc
    arena of its own behind for the command's threads to share."""

    RECORD = 33

    def __init__(self, pid: int, fd: int, count: int) -> None:
        self.pid = pid
        self.fd: int | None = fd
        self.count = count
        self.keys: list[bytes | None] = []
        self.lock = threading.Lock()

    def key(self, index: int) -> bytes | None:
        """The ``index``-th key, waiting for it; None if the child did not derive it."""
        with self.lock:
            while len(self.keys) <= index and self.fd is not None:
                record = self._read()
                if record is None:
                    self.reap()
                    break
                self.keys.append(record[1:] if record[0] == 1 else None)
            if len(self.keys) >= self.count:
                self.reap()
            return self.keys[index] if index < len(self.keys) else None

    def _read(self) -> bytes | None:
        assert self.fd is not None
        record = b""
        while len(record) < self.RECORD:
            try:
                part = os.read(self.fd, self.RECORD - len(record))
            except InterruptedError:
                continue
            if not part:
                return None
            record += part
        return record

    def reap(self, stop: bool = False) -> None:
        """Close the pipe and wait for the child (killed first if ``stop``); once."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            if stop:
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


#: Derivations started ahead and not yet taken, by passphrase and parameters: the child
#: deriving each and its place in the child's order.
_ahead: dict[tuple[str, Params], tuple[_Child, int]] = {}
_children: list[_Child] = []
_ahead_lock = threading.Lock()


def stop_ahead() -> None:
    """Stop every derivation started ahead and forget the keys not taken (once the
    repository is open, or at exit): no child outlives its use, and no key lingers."""
    with _ahead_lock:
        _ahead.clear()
        children = list(_children)
        _children.clear()
    for child in children:
        with child.lock:
            child.reap(stop=True)
            child.keys.clear()


atexit.register(stop_ahead)  # a child nobody asked of is stopped when the program ends


def passphrase_from_env(env: Mapping[str, str]) -> str | None:
    """The passphrase from ``VMREPO_PASSWORD_FILE`` (its first line) or the first line
    ``VMREPO_PASSWORD_COMMAND`` prints; None if neither is set."""
    path = env.get("VMREPO_PASSWORD_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise NoPassphrase(f"cannot read the passphrase file {path}: {why}") from None
    command = env.get("VMREPO_PASSWORD_COMMAND")
    if command:
        import subprocess

        res = subprocess.run(command, shell=True, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise NoPassphrase(f"the passphrase command failed with exit code "
                               f"{res.returncode}")
        return res.stdout.splitlines()[0] if res.stdout else ""
    return None


def _bound(n: int, r: int, p: int) -> int:
    """The memory OpenSSL's scrypt is given for these parameters; ValueError for parameters
    that are not scrypt's or cost more than :data:`SCRYPT_MAX_MEMORY`."""
    if not (n >= 2 and n & (n - 1) == 0 and r >= 1 and p >= 1 and r * p < 1 << 30):
        raise ValueError(f"n={n} r={r} p={p} are not scrypt parameters")
    bound = 256 * n * r + (1 << 20)
    if bound > SCRYPT_MAX_MEMORY:
        raise ValueError(f"scrypt parameters n={n} r={r} p={p} need more than 2 GiB")
    return bound


def record_params(record: Mapping[str, Any]) -> Params | None:
    """The scrypt parameters a passphrase is tried with on a key record (None for a record
    no passphrase opens: a key file's); KeyError, TypeError, ValueError, OverflowError or
    AttributeError for a damaged one. Unlocking and the guess made ahead both read records
    through it, so they try the same ones."""
    kdf = record["kdf"]
    if kdf.get("algorithm") != "scrypt":
        return None
    return bytes(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"])


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """scrypt itself: libsodium's (through PyNaCl), a third faster than OpenSSL's on the
    same parameters and the same result; OpenSSL's (hashlib) where PyNaCl's libsodium was
    built without scrypt. Either runs without the interpreter's lock."""
    bound = _bound(n, r, p)
    from nacl import bindings

    if not bindings.has_crypto_pwhash_scryptsalsa208sha256:
        import hashlib

        return hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                              maxmem=bound)
    # What libsodium allocates: its array of n blocks and two more, its p blocks, a block
    # of work space.
    memory = 128 * r * (n + 2) + 128 * r * p + 256 * r + 64
    return bindings.crypto_pwhash_scryptsalsa208sha256_ll(
        passphrase.encode(), salt, n, r, p, dklen=32, maxmem=memory)


def scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """scrypt (RFC 7914) of ``passphrase``: 32 bytes; ValueError for parameters that are not
    scrypt's or cost more than :data:`SCRYPT_MAX_MEMORY`, checked before anything is
    allocated. The result of :func:`derive_ahead` for the same inputs if there is one
    (waiting for it), taken once."""
    _bound(n, r, p)
    with _ahead_lock:
        started = _ahead.pop((passphrase, (salt, n, r, p)), None)
    if started is not None:
        child, index = started
        key = child.key(index)
        if key is not None:
            import logging

            logging.getLogger(__name__).debug("the passphrase's key was derived ahead")
            return key
    return _derive(passphrase, salt, n, r, p)


#: Signals held back while the child is made (the CLI's interrupts).
_HELD = {signal.SIGINT, signal.SIGTERM}


def _child(prctl: Any, parent: int, read_end: int, write_end: int, passphrase: str,
           todo: Sequence[Params], held: Any) -> NoReturn:
    """The child of :func:`derive_ahead`: derive, send, and exit without ever running the
    parent's code; killed with the parent (``PR_SET_PDEATHSIG``)."""
    status = 1
    try:
        for number in _HELD:
            signal.signal(number, signal.SIG_DFL)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == parent:  # else the parent is gone already
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            os.close(read_end)
            for salt, n, r, p in todo:
                try:
                    record = b"\x01" + _derive(passphrase, salt, n, r, p)
                except Exception:  # noqa: BLE001 - the parent derives afresh, and reports
                    record = bytes(_Child.RECORD)
                os.write(write_end, record)
            status = 0
    finally:
        os._exit(status)


def derive_ahead(passphrase: str, params: Sequence[Params]) -> bool:
    """Start scrypt of ``passphrase`` for each of ``params`` in turn, in a child process
    (``fork``: call it before the program starts threads), for :func:`scrypt` to take;
    whether one started. Parameters scrypt would refuse are left out (scrypt refuses them
    again when asked), as are those already being derived."""
    todo: list[Params] = []
    with _ahead_lock:
        for salt, n, r, p in params:
            try:
                _bound(n, r, p)
            except ValueError:
                continue
            if (passphrase, (salt, n, r, p)) not in _ahead and (salt, n, r, p) not in todo:
                todo.append((salt, n, r, p))
        if not todo:
            return False
        # Imported before the fork: the child must not import (another thread's import in
        # progress would hold the import lock in the child for good).
        from nacl import bindings  # noqa: F401
        from vmrepo.storage import libc

        prctl = libc.function("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                                        ctypes.c_ulong, ctypes.c_ulong])
        parent = os.getpid()
        # No Ctrl-C or SIGTERM between the pipe and the child's registration: one there would
        # leak the pipe and the child, or run the caller's code in the child.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            read_end, write_end = os.pipe()
            try:
                pid = os.fork()
            except OSError:
                os.close(read_end)
                os.close(write_end)
                return False
            if pid == 0:
                _child(prctl, parent, read_end, write_end, passphrase, todo, held)
            os.close(write_end)
            child = _Child(pid, read_end, len(todo))
            _children.append(child)
            for index, params_ in enumerate(todo):
                _ahead[passphrase, params_] = (child, index)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return True
