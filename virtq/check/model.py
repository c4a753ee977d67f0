"""What a check is, what it returns, and the report of a run.

A check is a plain function ``func(ctx) -> str | None`` registered with :func:`check`: it
passes by returning (optionally a note), fails by raising :class:`CheckFailed` with
evidence, skips by raising :class:`CheckSkipped`.  Any other exception is an *error*: the
check itself could not run.  A back-end that hangs up or stops answering in the middle of
a check has failed it (that is a result), unless the check says otherwise.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from virtq.errors import ArgumentError, VirtqError

if TYPE_CHECKING:
    from virtq.check.context import CheckContext

__all__ = [
    "CATALOGUE",
    "Check",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "Level",
    "Outcome",
    "Report",
    "check",
]


class Level(enum.StrEnum):
    """How strong the rule is: a MUST failure makes ``virtq check`` exit 1."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    INFO = "info"


class Outcome(enum.StrEnum):
    """What running a check gave: ``pass``, ``fail`` (the back-end broke the rule), ``skip`` (it
    does not apply) or ``error`` (the check could not run)."""
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    ERROR = "error"


class CheckFailed(VirtqError):
    """The back-end broke the rule.  ``evidence``: what was sent, what came back, the bytes
    that differ (JSON-able values)."""

    def __init__(self, message: str, **evidence: Any) -> None:
        super().__init__(message)
        self.message = message
        self.evidence = evidence


class CheckSkipped(VirtqError):
    """The rule does not apply (a feature was not offered, an input was not given)."""


CheckFunc = Callable[["CheckContext"], "str | None"]


@dataclass(frozen=True)
class Check:
    """One rule.  ``id`` is stable across releases (reports are compared by it)."""

    id: str
    title: str
    clause: str
    level: Level
    func: CheckFunc = field(repr=False, compare=False)
    #: Device types it applies to; empty: every device.
    devices: frozenset[str] = frozenset()
    #: Wants a freshly started back-end (when the back-end is started by the tool).
    fresh: bool = False

    @property
    def group(self) -> str:
        """The part of the id before the first dot (``blk``, ``vu``, ...)."""
        return self.id.split(".", 1)[0]

    def applies_to(self, device: str) -> bool:
        """Whether the check runs for ``device`` (a check for no device in particular runs for
        all)."""
        return not self.devices or device in self.devices


#: Every registered check, by id, in registration order (the order they run in).
CATALOGUE: dict[str, Check] = {}


def check(id: str, *, title: str, clause: str, level: Level | str,
          devices: tuple[str, ...] = (), fresh: bool = False) -> Callable[[CheckFunc], CheckFunc]:
    """Register ``func`` as a check (a decorator).  A ``func`` without a docstring gets one
    made of the id, level, title and clause, and what a check returns and raises (the API
    reference documents each check by it).  Raises :class:`ArgumentError` for a duplicate
    id."""

    def register(func: CheckFunc) -> CheckFunc:
        if id in CATALOGUE:
            raise ArgumentError("id", id, "a check with this id is already registered")
        CATALOGUE[id] = Check(id, title, clause, Level(level), func, frozenset(devices),
                              fresh)
        if func.__doc__ is None:
            # Written here once, from the words the catalogue has anyway, rather than again
            # in every check's body where it could drift from the title and clause.
            func.__doc__ = (
                f"The check ``{id}`` ({Level(level)}): {title}.  {clause}  Returns a note "
                "for the report, or None.  Raises :class:`~virtq.check.model.CheckFailed` "
                "(with the evidence) when the back-end breaks the rule, "
                ":class:`~virtq.check.model.CheckSkipped` when it does not apply.")
        return func

    return register


@dataclass
class CheckResult:
    id: str
    title: str
    clause: str
    level: Level
    outcome: Outcome
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def group(self) -> str:
        """The part of the id before the first dot."""
        return self.id.split(".", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (the evidence made JSON-able)."""
        d = asdict(self)
        d["level"] = str(self.level)
        d["outcome"] = str(self.outcome)
        d["seconds"] = round(self.seconds, 3)
        d["evidence"] = _jsonable(self.evidence)
        return d


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass
class Report:
    """The results of one ``virtq check`` run, with what the back-end offered."""

    device: str
    backend: str
    results: list[CheckResult] = field(default_factory=list)
    offered_features: int | None = None
    protocol_features: int | None = None
    notes: list[str] = field(default_factory=list)

    def by_id(self) -> dict[str, CheckResult]:
        """The results by check id."""
        return {r.id: r for r in self.results}

    def outcomes(self) -> dict[str, str]:
        """``{id: outcome}``: what a test asserts about a back-end."""
        return {r.id: str(r.outcome) for r in self.results}

    def failed(self, level: Level | None = None) -> list[str]:
        """The ids of the checks that failed (of ``level`` only, when given)."""
        return [r.id for r in self.results if r.outcome is Outcome.FAIL
                and (level is None or r.level is level)]

    @property
    def exit_status(self) -> int:
        """0: every MUST check passed (or was skipped); 1: a MUST check failed; 2: a MUST
        check could not run (error) and none failed."""
        must = [r for r in self.results if r.level is Level.MUST]
        if any(r.outcome is Outcome.FAIL for r in must):
            return 1
        if any(r.outcome is Outcome.ERROR for r in must):
            return 2
        return 0

    def counts(self) -> dict[str, int]:
        """How many checks had each outcome (every outcome present, 0 when none)."""
        out = {str(o): 0 for o in Outcome}
        for r in self.results:
            out[str(r.outcome)] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: the back-end, its features, the exit status, every
        result."""
        return {
            "device": self.device,
            "backend": self.backend,
            "offered_features": None if self.offered_features is None
            else f"{self.offered_features:#x}",
            "protocol_features": None if self.protocol_features is None
            else f"{self.protocol_features:#x}",
            "exit_status": self.exit_status,
            "counts": self.counts(),
            "notes": self.notes,
            "results": [r.to_dict() for r in self.results],
        }

    def to_json(self) -> str:
        """The report as indented JSON text (``virtq check --json``)."""
        return json.dumps(self.to_dict(), indent=2)
