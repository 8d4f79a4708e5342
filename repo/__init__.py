"""vmrepo: deduplicating backups of QEMU/KVM virtual machine disks.

The core lives here: repository format, chunking pipeline, manifests,
snapshots, restore, locks and the command line. Sources of disk data are in
:mod:`vmrepo.sources` and object stores in :mod:`vmrepo.storage`; the core
depends on their interfaces, never the other way round.
"""

__version__ = "0.1.0"
