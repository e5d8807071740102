"""QEMU integration: the QMP client, the device-state handoff on each side,
the shim's path, and the lab that starts QEMU guests for tests and benchmarks."""


def resume_hint(qmp_path: str = "SOURCE_QMP_SOCKET") -> str:
    """The command a person runs to resume a paused source QEMU by hand (the
    agents never do it themselves once the destination may run the guest)."""
    return f"`python -m migrate.qemu {qmp_path} cont`"
