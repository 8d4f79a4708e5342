"""Errors of the NBD library.

::

    NbdError
     ├── NbdConnectError    the peer cannot be reached or a socket cannot be served
     ├── NbdProtocolError   the peer broke the protocol, or the connection dropped
     └── NbdRequestError    the server answered a request with an error (carries errno)
"""

from __future__ import annotations


class NbdError(Exception):
    """Base of the NBD library's errors."""


class NbdConnectError(NbdError):
    """A connection could not be made, or a listening socket could not be set up."""


class NbdProtocolError(NbdError):
    """The peer broke the protocol (or the connection dropped)."""


class NbdRequestError(NbdError):
    """The server answered a request with an error."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno
