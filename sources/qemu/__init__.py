"""QEMU plumbing shared by the QEMU source plugins.

::

    qmp         QmpConnection: qemu.qmp's asyncio client usable from blocking, threaded code
    control     disks, per-disk plans, bitmap actions, jobs and clean-up of a running VM
    bitmaps     the dirty-bitmap rules, as pure functions
    pushexport  the NBD export QEMU's backup job writes into (push mode)
"""
