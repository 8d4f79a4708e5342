"""Source plugins for vmrepo: where the bytes of a VM's disks come from.

The interface every source implements is in :mod:`vmrepo.sources.base`.
Sources are registered through the ``vmrepo.sources`` entry-point group,
the built-in ones too. This package is a leaf: it never imports the core.
"""
