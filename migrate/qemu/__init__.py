"""QEMU integration: the QMP client, the device-state handoff on each side,
the shim's path, and the lab that starts QEMU guests for tests and benchmarks."""
