"""Object-store backends for vmrepo.

A backend stores immutable objects under validated keys. The interface and
its guarantees are in :mod:`vmrepo.storage.base`; the error tree is in
:mod:`vmrepo.storage.errors`. Backends are registered through the
``vmrepo.storage`` entry-point group, the built-in ones too.

This package is a leaf: it never imports the vmrepo core.
"""
