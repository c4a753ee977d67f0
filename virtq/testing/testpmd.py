"""Run ``dpdk-testpmd`` as a vhost-user-net back-end (or as DPDK's own C virtio-user
front-end, the benchmark baseline) and drive its interactive prompt.

testpmd is talked to through a **pty**, not pipes: on a pipe its stdout is block-buffered
and the ``testpmd>`` prompt that ends every answer never arrives.  Two roles:

* :meth:`TestPmd.vhost` -- ``net_vhost0`` listening on a Unix socket (``client=0``): the
  back-end virtq's :class:`~virtq.devices.NetDevice` connects to.  ``rxonly`` counts the
  frames the front-end transmits; ``io`` with a single port sends every received frame back
  out of the same port (a loopback); ``txonly`` floods the front-end.
* :meth:`TestPmd.virtio_user` -- ``net_virtio_user0`` connecting to such a socket: DPDK's
  C driver for the same device, to compare against.

Neither needs hugepages (``--no-huge``; ``--in-memory`` is incompatible with it, so
``--no-shconf`` keeps two instances from sharing runtime files).  16384 mbufs need
``-m 128``.  With two cores each instance gets both lcores and a different main lcore, so
the two forwarding lcores land on different CPUs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pty
import re
import select
import stat
import subprocess
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from virtq.testing.runners import BackendError, kill_process, require_binary

PROMPT = b"testpmd> "
_FORWARD_MODES = frozenset({"io", "mac", "macswap", "rxonly", "txonly", "flowgen", "csum",
                            "icmpecho", "5tswap"})
_STAT_FIELDS = ("RX-packets", "RX-missed", "RX-bytes", "RX-errors", "RX-nombuf",
                "TX-packets", "TX-errors", "TX-bytes")
_STAT_RE = re.compile(rb"(RX-packets|RX-missed|RX-bytes|RX-errors|RX-nombuf|TX-packets|"
                      rb"TX-errors|TX-bytes):\s+(\d+)")
_FWD_STREAM_RE = re.compile(
    r"Forward Stats for RX Port=\s*\d+/Queue=\s*(\d+) -> TX Port=\s*\d+/Queue=\s*(\d+)"
    r"\s*-+\s*RX-packets:\s*(\d+)\s+TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)")
_LOG_LIMIT = 64 * 1024  # bytes of output kept for error messages


def _finalize(proc: subprocess.Popen[bytes], master: int) -> None:
    warnings.warn(f"dpdk-testpmd (pid {proc.pid}) was not stopped", ResourceWarning,
                  stacklevel=2)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    os.close(master)


@dataclass(frozen=True)
class PortStats:
    """``show port stats`` counters of one port (since start or ``clear port stats``)."""

    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


class TestPmd:
    """One ``dpdk-testpmd`` process on a pty.  Build it with :meth:`vhost` or
    :meth:`virtio_user`; ``with`` (or :meth:`start` / :meth:`stop`) runs it.

    Every command waits for the next prompt and returns what testpmd printed in between.
    :meth:`stop` quits politely, then kills by pid; the pty and (for the back-end) the
    socket file are always released.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        args: list[str],
        *,
        socket_path: str | os.PathLike[str],
        role: str,
        timeout: float = 30.0,
    ) -> None:
        self.args = args
        self.socket_path = Path(socket_path)
        self.role = role
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._master: int | None = None
        self._buf = bytearray()
        self._log = bytearray()
        self.banner = ""  # everything printed up to the first prompt
        self.forwarding = False

    # -- construction ---------------------------------------------------------------------

    @staticmethod
    def _eal(main_lcore: int, lcores: str, memory_mb: int) -> list[str]:
        return ["--no-huge", "-m", str(memory_mb), "--no-pci", "--no-shconf",
                "--no-telemetry", "-l", lcores, "--main-lcore", str(main_lcore)]

    @staticmethod
    def _app(forward_mode: str, mbufs: int, extra: list[str]) -> list[str]:
        if forward_mode not in _FORWARD_MODES:
            raise BackendError(f"unknown testpmd forward mode {forward_mode!r}")
        return ["--", "-i", f"--total-num-mbufs={mbufs}", f"--forward-mode={forward_mode}",
                *extra]

    @staticmethod
    def _queues(queues: int) -> list[str]:
        if not isinstance(queues, int) or isinstance(queues, bool) or not 1 <= queues <= 128:
            raise BackendError(f"queues={queues!r}: net_vhost serves 1..128 queue pairs")
        return [f"--rxq={queues}", f"--txq={queues}"] if queues > 1 else []

    @classmethod
    def vhost(
        cls,
        socket_path: str | os.PathLike[str],
        *,
        forward_mode: str = "rxonly",
        main_lcore: int = 0,
        lcores: str = "0,1",
        memory_mb: int = 128,
        mbufs: int = 16384,
        txpkts: int | None = None,
        queues: int = 1,
        mbuf_size: int | None = None,
        timeout: float = 30.0,
    ) -> Self:
        """A vhost-user-net back-end listening on ``socket_path``, serving ``queues`` queue
        pairs (``net_vhost0,queues=N`` and ``--rxq=N --txq=N``: with ``io`` forwarding
        stream k is rx queue k -> tx queue k, so what a front-end sends on its transmitq k
        comes back on its receiveq k).  ``mbuf_size``: bytes of data room per mbuf
        (``--mbuf-size``); a frame longer than that is a chain of mbufs in testpmd."""
        binary = require_binary("dpdk-testpmd", "dpdk-dev")
        extra = [f"--txpkts={txpkts}"] if txpkts else []
        extra += cls._queues(queues)
        if mbuf_size is not None:
            extra.append(f"--mbuf-size={mbuf_size}")
        args = [binary, *cls._eal(main_lcore, lcores, memory_mb),
                # The per-connection vhost messages would flood the pty.
                "--log-level=lib.vhost.config:warning",
                "--vdev", f"net_vhost0,iface={socket_path},queues={queues},client=0",
                *cls._app(forward_mode, mbufs, extra)]
        return cls(args, socket_path=socket_path, role="vhost", timeout=timeout)

    @classmethod
    def virtio_user(
        cls,
        socket_path: str | os.PathLike[str],
        *,
        forward_mode: str = "txonly",
        main_lcore: int = 1,
        lcores: str = "0,1",
        memory_mb: int = 128,
        mbufs: int = 16384,
        queue_size: int = 256,
        txpkts: int | None = None,
        queues: int = 1,
        timeout: float = 30.0,
        packed_vq: bool = False,
        in_order: bool | None = None,
        mrg_rxbuf: bool | None = None,
    ) -> Self:
        """DPDK's C virtio-user front-end connecting to a back-end at ``socket_path``, with
        ``queues`` queue pairs (it plays the controlq itself: VQ_PAIRS_SET becomes
        SET_VRING_ENABLE, as virtq does).  ``packed_vq``: ask for VIRTIO_F_RING_PACKED;
        ``in_order`` / ``mrg_rxbuf``: ask for VIRTIO_F_IN_ORDER / VIRTIO_NET_F_MRG_RXBUF or
        not (None: the driver's default, which asks for both).  The driver takes each only
        when the back-end offers it."""
        binary = require_binary("dpdk-testpmd", "dpdk-dev")
        extra = [f"--txpkts={txpkts}"] if txpkts else []
        extra += cls._queues(queues)
        # virtio_user's devargs (drivers/net/virtio/virtio_user_ethdev.c).
        ring_args = f",packed_vq={int(packed_vq)}"
        for name, value in (("in_order", in_order), ("mrg_rxbuf", mrg_rxbuf)):
            if value is not None:
                ring_args += f",{name}={int(value)}"
        args = [binary, *cls._eal(main_lcore, lcores, memory_mb),
                "--vdev", f"net_virtio_user0,path={socket_path},queues={queues},"
                f"queue_size={queue_size}" + ring_args,
                *cls._app(forward_mode, mbufs, extra)]
        return cls(args, socket_path=socket_path, role="virtio-user", timeout=timeout)

    # -- process --------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """testpmd's pid while it runs (None otherwise)."""
        return None if self.proc is None else self.proc.pid

    def start(self) -> Self:
        """Start testpmd on a pseudo-terminal and return once it shows its prompt (and, as a
        vhost back-end, once its socket exists).  Raises
        :class:`~virtq.testing.runners.BackendError` when it is running already, exits, or is not
        ready within ``timeout`` seconds (the message ends with its output)."""
        if self.proc is not None:
            raise BackendError("testpmd is already running")
        if self.role == "vhost":
            # A SIGKILLed back-end leaves its socket file; bind() would fail on it.
            self.socket_path.unlink(missing_ok=True)
        master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(
                self.args, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                start_new_session=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._master = master
        self._finalizer = weakref.finalize(self, _finalize, self.proc, master)
        try:
            self.banner = self._read_until_prompt(self.timeout)
            self._check_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_ready(self) -> None:
        if self.role == "vhost":
            # The vhost PMD binds its socket when testpmd starts the port, before the prompt.
            deadline = time.monotonic() + 5
            while not self._is_socket():
                if time.monotonic() > deadline:
                    raise BackendError(f"testpmd printed its prompt but {self.socket_path} "
                                       f"is not a socket:\n{self.output_tail()}")
                time.sleep(0.01)
        elif "Configuring Port 0" not in self.banner:
            raise BackendError("virtio-user testpmd has no port 0 (could it connect to "
                               f"{self.socket_path}?):\n{self.output_tail()}")

    def _is_socket(self) -> bool:
        try:
            return stat.S_ISSOCK(self.socket_path.stat().st_mode)
        except FileNotFoundError:
            return False

    def _read_until_prompt(self, timeout: float) -> str:
        master = self._master
        if master is None:
            raise BackendError("testpmd is not running")
        deadline = time.monotonic() + timeout
        while True:
            end = self._buf.find(PROMPT)
            if end >= 0:
                out = bytes(self._buf[:end])
                del self._buf[: end + len(PROMPT)]
                return out.decode(errors="replace").replace("\r\n", "\n")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(f"testpmd: no prompt within {timeout} s:\n"
                                   f"{self.output_tail()}")
            ready, _, _ = select.select([master], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: the slave side closed (testpmd exited)
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                code = self.proc.wait(timeout=5) if self.proc is not None else None
                raise BackendError(f"testpmd exited (status {code}):\n{self.output_tail()}")
            self._buf += data
            self._log += data
            if len(self._log) > _LOG_LIMIT:
                del self._log[: len(self._log) - _LOG_LIMIT]

    def output_tail(self, nbytes: int = 3000) -> str:
        """The last ``nbytes`` of everything testpmd printed (for error messages)."""
        return bytes(self._log[-nbytes:]).decode(errors="replace").replace("\r\n", "\n")

    def cmd(self, line: str, timeout: float = 10.0) -> str:
        """Send one command; return its output (up to the next prompt).  Raises
        :class:`~virtq.testing.runners.BackendError` when testpmd is not running, exits, or shows
        no prompt within ``timeout`` seconds."""
        if self._master is None:
            raise BackendError("testpmd is not running")
        os.write(self._master, line.encode() + b"\n")
        out = self._read_until_prompt(timeout)
        # The prompt's line editor echoes the command; drop that first line.
        return out.split("\n", 1)[1] if "\n" in out else ""

    # -- commands -------------------------------------------------------------------------

    def start_forwarding(self) -> None:
        """``start``: forward packets in the current mode.  Raises like :meth:`cmd`."""
        self.cmd("start")
        self.forwarding = True

    def stop_forwarding(self) -> None:
        """``stop``: stop forwarding (testpmd prints its counters).  Raises like :meth:`cmd`."""
        self.cmd("stop")
        self.forwarding = False

    def set_forward_mode(self, mode: str) -> None:
        """Change the forwarding mode (stops forwarding first; call :meth:`start_forwarding`
        again).  Raises :class:`~virtq.testing.runners.BackendError` for an unknown mode or when
        testpmd refuses it."""
        if mode not in _FORWARD_MODES:
            raise BackendError(f"unknown testpmd forward mode {mode!r}")
        self.stop_forwarding()
        out = self.cmd(f"set fwd {mode}")
        if "Set " not in out:
            raise BackendError(f"set fwd {mode} failed: {out.strip()}")

    def port_stats(self, port: int = 0) -> PortStats:
        """Port ``port``'s packet and byte counters (``show port stats``).  Raises
        :class:`~virtq.testing.runners.BackendError` when the output lacks one."""
        out = self.cmd(f"show port stats {port}")
        found = {m.group(1).decode(): int(m.group(2)) for m in _STAT_RE.finditer(out.encode())}
        missing = [f for f in _STAT_FIELDS if f not in found]
        if missing:
            raise BackendError(f"show port stats {port}: no {', '.join(missing)} in {out!r}")
        return PortStats(*(found[f] for f in _STAT_FIELDS))

    def fwd_stats(self) -> dict[int, tuple[int, int, int]]:
        """Per forwarding stream since forwarding started, keyed by its rx queue:
        ``(rx_packets, tx_packets, tx_dropped)`` (``show fwd stats all``; testpmd prints a
        stream only when it has more streams than ports and the stream moved something, so
        a queue missing here moved nothing)."""
        out = self.cmd("show fwd stats all")
        found: dict[int, tuple[int, int, int]] = {}
        for m in _FWD_STREAM_RE.finditer(out):
            found[int(m.group(1))] = (int(m.group(3)), int(m.group(4)), int(m.group(5)))
        return found

    def clear_stats(self) -> None:
        """Zero every port's counters.  Forwarding is paused meanwhile: the vhost PMD's
        lcore read-modify-writes its counters on every poll, even an empty one, so a reset
        from the prompt's thread is lost when it lands between that load and store."""
        was = self.forwarding
        if was:
            self.stop_forwarding()
        self.cmd("clear port stats all")
        if was:
            self.start_forwarding()

    def link_up(self, port: int = 0) -> bool:
        """Whether port ``port``'s link is up (``show port info``).  Raises
        :class:`~virtq.testing.runners.BackendError` when the output says nothing about it."""
        out = self.cmd(f"show port info {port}")
        m = re.search(r"Link status: (\w+)", out)
        if m is None:
            raise BackendError(f"show port info {port}: no link status in {out!r}")
        return m.group(1) == "up"

    def wait_link(self, up: bool = True, timeout: float = 10.0, port: int = 0) -> None:
        """Until port ``port``'s link is ``up`` (a front-end connected and set DRIVER_OK) or
        down (it went away).  Raises :class:`~virtq.testing.runners.BackendError` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.link_up(port) != up:
            if time.monotonic() > deadline:
                raise BackendError(f"link of port {port} not {'up' if up else 'down'} "
                                   f"after {timeout} s")
            time.sleep(0.02)

    def wait_rx_packets(self, count: int, timeout: float = 10.0, port: int = 0) -> PortStats:
        """Until port ``port`` has received at least ``count`` packets; returns the stats
        (callers compare for equality: more would be a duplicate)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.port_stats(port)
            if stats.rx_packets >= count or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)

    # -- teardown -------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL, as a crash would; the back-end's socket file stays behind."""
        if self.proc is not None:
            kill_process(self.proc, 10)

    def stop(self) -> None:
        """Quit (``stop`` then ``quit``), or kill the process if it does not exit; release
        the pty and remove the back-end's socket.  Quit a virtio-user front-end before its
        back-end: the other way round the front-end dies of SIGPIPE."""
        proc, master = self.proc, self._master
        if proc is None:
            return
        self._finalizer.detach()
        try:
            if proc.poll() is None and master is not None:
                with contextlib.suppress(OSError):
                    os.write(master, b"quit\n")
                self._drain_until_exit(proc, master, 10.0)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if master is not None:
                os.close(master)
            self.proc = None
            self._master = None
            self._buf.clear()
            if self.role == "vhost":
                self.socket_path.unlink(missing_ok=True)

    def _drain_until_exit(self, proc: subprocess.Popen[bytes], master: int,
                          timeout: float) -> None:
        # Keep reading so testpmd never blocks writing its shutdown messages to a full pty.
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""
                if data:
                    self._log += data
                else:
                    time.sleep(0.01)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
