"""Run the catalogue against a back-end: :func:`run_checks`."""

from __future__ import annotations

import fnmatch
import time
import traceback
from collections.abc import Callable, Iterable

from virtq.check import blk as _blk  # noqa: F401 - registers the checks
from virtq.check import fs as _fs  # noqa: F401
from virtq.check import generic as _generic  # noqa: F401
from virtq.check import net as _net  # noqa: F401
from virtq.check import rng as _rng  # noqa: F401
from virtq.check.backend import Backend, BackendStartError, CommandBackend
from virtq.check.context import CheckContext, CheckOptions
from virtq.check.devices import PROFILES
from virtq.check.model import (
    CATALOGUE,
    Check,
    CheckFailed,
    CheckResult,
    CheckSkipped,
    Outcome,
    Report,
)
from virtq.errors import ArgumentError, DeviceError
from virtq.testing.hostile_driver import HostileDriver
from virtq.transport.vhost_user import VhostUserConnectError, VhostUserError
from virtq.transport.vhost_user import protocol as P

__all__ = ["DEVICES", "run_check", "run_checks", "select_checks"]

DEVICES = tuple(PROFILES)
#: The order groups run (and are shown) in: the handshake first, the device last.
GROUPS = ("feat", "vu", "ring", "notify")


def select_checks(device: str, only: Iterable[str] = ()) -> list[Check]:
    """The checks for ``device``, optionally only those matching ``only`` (ids or
    shell patterns such as ``ring.*``).  Raises :class:`ArgumentError` for an unknown
    device or a pattern that matches nothing."""
    if device not in PROFILES:
        raise ArgumentError("device", device, f"must be one of {', '.join(PROFILES)}")
    order = list(CATALOGUE)
    checks = sorted((c for c in CATALOGUE.values() if c.applies_to(device)),
                    key=lambda c: (GROUPS.index(c.group) if c.group in GROUPS else len(GROUPS),
                                   order.index(c.id)))
    patterns = list(only)
    if patterns:
        for p in patterns:
            if not any(fnmatch.fnmatchcase(c.id, p) for c in checks):
                raise ArgumentError("only", p, f"matches no {device} check")
        checks = [c for c in checks if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
    return checks


def run_check(chk: Check, ctx: CheckContext) -> CheckResult:
    """Run one check; never raises for what the back-end does."""
    result = CheckResult(chk.id, chk.title, chk.clause, chk.level, Outcome.PASS)
    t0 = time.monotonic()
    log_at = ctx.backend.log_size() if isinstance(ctx.backend, CommandBackend) else 0
    try:
        note = chk.func(ctx)
        result.message = note or ""
    except CheckFailed as exc:
        result.outcome, result.message, result.evidence = Outcome.FAIL, exc.message, \
            exc.evidence
    except CheckSkipped as exc:
        result.outcome, result.message = Outcome.SKIP, str(exc)
    except (VhostUserConnectError, BackendStartError) as exc:
        result.outcome, result.message = Outcome.ERROR, f"cannot reach the back-end: {exc}"
    except (VhostUserError, DeviceError, EOFError, ConnectionError) as exc:
        # The back-end refused, hung up or stopped answering in the middle of the check.
        result.outcome = Outcome.FAIL
        result.message = f"{type(exc).__name__}: {exc}{ctx.backend_state()}"
    except Exception as exc:
        result.outcome = Outcome.ERROR
        result.message = f"{type(exc).__name__}: {exc}"
        result.evidence = {"traceback": traceback.format_exc(limit=6)}
    finally:
        try:
            ctx.close()
        except Exception as exc:  # a failing close must not hide the result
            result.evidence["close"] = f"{type(exc).__name__}: {exc}"
    end = ctx.backend.poll()
    if end is not None:
        result.evidence["backend"] = end.describe()
        if end.signal is not None and result.outcome is not Outcome.SKIP:
            result.outcome = Outcome.FAIL
            result.message = (f"the back-end {end.describe()} during this check"
                              + (f" ({result.message})" if result.message else ""))
    if result.outcome in (Outcome.FAIL, Outcome.ERROR) and isinstance(ctx.backend,
                                                                      CommandBackend):
        said = ctx.backend.log_since(log_at).strip()
        if said:
            result.evidence["backend_log"] = said[-800:]
    result.seconds = time.monotonic() - t0
    return result


def _detect_exit_on_disconnect(backend: Backend, options: CheckOptions, report: Report) -> bool:
    """One bare handshake: records what is offered and whether the back-end exits when its
    front-end goes away (virtiofsd does; it is then restarted before every session)."""
    backend.ensure_running()
    try:
        with HostileDriver.connect(backend.socket_path, timeout=options.timeout) as drv:
            fe = drv.frontend
            fe.set_owner()
            report.offered_features = fe.get_features()
            if report.offered_features >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                report.protocol_features = fe.get_protocol_features()
    except VhostUserConnectError as exc:
        raise BackendStartError(f"cannot connect to {backend.socket_path}: {exc}") from exc
    except (VhostUserError, EOFError, OSError) as exc:
        report.notes.append(f"the first handshake failed: {exc}")
    if isinstance(backend, CommandBackend) and backend.wait_exit(1.0) is not None:
        report.notes.append("the back-end exits when its front-end disconnects; it was "
                            "restarted before every connection")
        return True
    return False


def run_checks(device: str, backend: Backend, *, options: CheckOptions | None = None,
               only: Iterable[str] = (),
               on_result: Callable[[CheckResult], None] | None = None) -> Report:
    """Run every check that applies to ``device`` against ``backend`` (which must be
    reachable: :class:`BackendStartError` otherwise).  ``on_result`` sees each result as
    it is made (for progress output)."""
    options = options or CheckOptions()
    checks = select_checks(device, only)
    report = Report(device, backend.describe())
    exits = _detect_exit_on_disconnect(backend, options, report)
    for chk in checks:
        if chk.fresh and backend.restartable:
            backend.restart()
        ctx = CheckContext(device, PROFILES[device], backend, options,
                           exits_on_disconnect=exits)
        result = run_check(chk, ctx)
        report.results.append(result)
        if on_result is not None:
            on_result(result)
    return report
