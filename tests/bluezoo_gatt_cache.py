"""BlueZoo with the GATT objects of a device kept across its connections, as BlueZ keeps them.

BlueZoo 1.0.2 exports a remote device's GATT service, characteristic and descriptor objects on
every Connect and never removes them, so the second Connect of the same device fails (the object
paths are taken: sd-bus error 17, EEXIST). BlueZ keeps a device's GATT objects between
connections (its GATT cache) at the same paths. Here an object path that is already exported
keeps its first object; the later one is accepted without a second export, so a lock can be
connected, disconnected and connected again, as an on-demand lock is.

Run exactly like the `bluezoo` command: `python3 tests/bluezoo_gatt_cache.py ARGS…`.
"""

import sys

from bluezoo import bluezoo


class _Kept:
    """The handle of an object whose path was already exported: stopping it stops nothing."""

    def stop(self):
        pass


def _patch(service):
    export, remove = service.export_object, service.remove_object
    exported = {}

    def export_once(self, path, obj):
        if path in exported:
            self.manager_export_handles[obj] = _Kept()
            return
        export(self, path, obj)
        exported[path] = obj

    def remove_once(self, obj):
        for path, first in list(exported.items()):
            if first is obj:
                del exported[path]
        remove(self, obj)

    service.export_object = export_once
    service.remove_object = remove_once


if __name__ == "__main__":
    _patch(bluezoo.BluezMockService)
    sys.argv[0] = "bluezoo"
    sys.exit(bluezoo.main())
