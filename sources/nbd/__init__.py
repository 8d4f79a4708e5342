"""The NBD protocol as a library: wire constants, a client and a server.

Used by the source plugins (pulling disks from QEMU, qemu-nbd and libvirt
exports; receiving QEMU's push) and by the core (exporting snapshots, writing
images through qemu-nbd). It imports nothing else of vmrepo, so either side
may depend on it.

::

    protocol   constants and wire structures of the NBD protocol
    errors     NbdError and its subclasses
    client     NbdClient: fixed newstyle, structured replies, meta contexts, pipelined I/O
    server     NbdServer and the Export interface it serves
"""
