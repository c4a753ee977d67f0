"""virtq as a back-end tester: a conformance suite (``virtq check``) and a hostile driver
(``virtq fuzz``) for vhost-user back-ends.

Checks are plain functions over a :class:`CheckContext` (the back-end handle, options, and
sessions of virtq's hostile driver); :func:`run_checks` runs the catalogue and returns a
:class:`Report`::

    from virtq.check import CommandBackend, CheckOptions, run_checks

    with CommandBackend("qemu-storage-daemon ... addr.path={socket} ...") as backend:
        report = run_checks("blk", backend, options=CheckOptions(image=Path("disk.img")))
    assert report.exit_status == 0, report.failed()
"""

from virtq.check.backend import (
    Backend,
    BackendExit,
    BackendStartError,
    CommandBackend,
    SocketBackend,
)
from virtq.check.context import CheckContext, CheckOptions, Session
from virtq.check.model import (
    CATALOGUE,
    Check,
    CheckFailed,
    CheckResult,
    CheckSkipped,
    Level,
    Outcome,
    Report,
    check,
)
from virtq.check.runner import DEVICES, run_check, run_checks, select_checks

__all__ = [
    "CATALOGUE",
    "DEVICES",
    "Backend",
    "BackendExit",
    "BackendStartError",
    "Check",
    "CheckContext",
    "CheckFailed",
    "CheckOptions",
    "CheckResult",
    "CheckSkipped",
    "CommandBackend",
    "Level",
    "Outcome",
    "Report",
    "Session",
    "SocketBackend",
    "check",
    "run_check",
    "run_checks",
    "select_checks",
]
