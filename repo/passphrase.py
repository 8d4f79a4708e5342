"""Passphrases: where a command's passphrase comes from, and the key scrypt stretches it to.

Every command that opens a repository by passphrase pays for scrypt once: 0.15 s and 64 MiB
at the parameters of new key records. :func:`derive_ahead` starts that work on a thread of
its own before the command line has loaded its modules (0.1 s of imports that would
otherwise come first, on the same core). :func:`scrypt` then takes the result derived ahead
when it is asked for exactly the same passphrase, salt and parameters, and derives afresh for
anything else: a guess made ahead can only save time, never change what a passphrase opens.

This module is imported before everything else of a command (:mod:`vmrepo.cli.ahead`), so it
imports nothing heavy at its top.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from .errors import NoPassphrase

#: What scrypt's parameters in a key record may cost (a damaged or hostile record must not
#: exhaust the host): ``256 * n * r`` bytes (its 128 n r byte array, twice over) below
#: 2 GiB, the bound OpenSSL's scrypt was given before libsodium's computed it.
SCRYPT_MAX_MEMORY = (1 << 31) - 1

#: scrypt's parameters after the passphrase: salt, n, r, p.
Params = tuple[bytes, int, int, int]


class _Derivation:
    """One scrypt run on the thread of :func:`derive_ahead`: its result once ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.key: bytes | None = None


#: Derivations started ahead and not yet taken, by passphrase and parameters.
_ahead: dict[tuple[str, Params], _Derivation] = {}
_ahead_lock = threading.Lock()


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
        started.done.wait()
        if started.key is not None:
            import logging

            logging.getLogger(__name__).debug("the passphrase's key was derived ahead")
            return started.key
    return _derive(passphrase, salt, n, r, p)


def derive_ahead(passphrase: str, params: Sequence[Params]) -> threading.Thread | None:
    """Start scrypt of ``passphrase`` for each of ``params`` in turn, on a daemon thread,
    for :func:`scrypt` to take; None if there is nothing to derive. Parameters scrypt
    would refuse are left out (scrypt refuses them again when asked)."""
    todo = []
    for salt, n, r, p in params:
        try:
            _bound(n, r, p)
        except ValueError:
            continue
        derivation = _Derivation()
        with _ahead_lock:
            if (passphrase, (salt, n, r, p)) in _ahead:
                continue
            _ahead[passphrase, (salt, n, r, p)] = derivation
        todo.append((salt, n, r, p, derivation))
    if not todo:
        return None

    def run() -> None:
        for salt, n, r, p, derivation in todo:
            try:
                derivation.key = _derive(passphrase, salt, n, r, p)
            except Exception:  # noqa: BLE001 - scrypt() derives afresh, and reports it
                pass
            finally:
                derivation.done.set()

    thread = threading.Thread(target=run, name="derive-ahead", daemon=True)
    thread.start()
    return thread
