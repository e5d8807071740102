"""QEMU integration: the QMP client (qmp), the device-state handoff on each
side (source, dest), the shim's path (shim), QMP by hand (__main__), and the
lab that starts QEMU guests for tests, benchmarks and examples/qemu/ (lab,
and localrun: the whole migration on this machine). resume_hint below is the
one wording of how a person resumes a paused source QEMU."""


def resume_hint(qmp_path: str = "SOURCE_QMP_SOCKET") -> str:
    """The command a person runs to resume a paused source QEMU by hand (the
    agents never do it themselves once the destination may run the guest)."""
    return f"`python -m migrate.qemu {qmp_path} cont`"
