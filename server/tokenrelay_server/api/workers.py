"""`serve --workers N`: N gateway processes on one port (issue 10).

One Python process drives one core; N worker processes, each a whole
gateway (its own event loop, gRPC server, Redis connections and replica id),
bind the same port with SO_REUSEPORT and the kernel spreads incoming
connections over them (one connection stays on one worker). This is grpc's
own recipe (examples/python/multiprocessing): the workers are started before
any gRPC object exists in the parent, and here they are even spawned (a
fresh interpreter each, never a fork), so no gRPC runtime is ever copied.
This module imports nothing of grpc.

The workers are replicas of one deployment: they share only Redis (hence
`--store redis`, config/settings.py), a stream a worker generates is leased
to its replica id, and a resume may land on any worker.

The supervisor (`supervise`, the parent process):

- resolves the port: it binds a socket of its own with SO_REUSEPORT
  (bound, never listening, so it takes no connection) and keeps it for its
  whole life. With port 0 that picks the port every worker then binds; with
  a given port it makes sure nothing else holds it (a plain bind first), and
  in both cases no other program can take the port while a worker restarts.
  It prints `port N` once (port 0), when every worker serves.
- starts worker 0, waits until it serves, then the others: a mistake that
  only shows at startup (a TLS file that does not load) is reported once,
  by the first worker, and nothing else is started.
- forwards SIGTERM and SIGINT as one SIGTERM to every worker: each drains
  as a single gateway does (drain_grace_s), and ignores any further signal
  (Ctrl-C reaches the whole process group; `timeout` and systemd signal
  every process), so only the supervisor decides to hurry: a SIGINT while
  draining (Ctrl-C again), or the drain outlasting drain_grace_s +
  STOP_MARGIN_S, kills the workers (SIGKILL); a SIGTERM while draining
  changes nothing (one stop may deliver two). It exits 0 when every worker
  drained and exited 0, else 1. SIGHUP is forwarded (every worker
  reloads its TLS files and the config file's keys).
- restarts a worker that dies while serving (a crash, the OOM killer,
  kill -9) after `restart_delay` of its crashes in a row (0 s for the first,
  then doubling from 0.5 s up to 30 s; a worker that served STABLE_S counts
  from 0 again). The restarted worker has a new replica id. The dead one's
  streams are taken over as a dead replica's are (engine/takeover.py): the
  supervisor deletes its heartbeat (`forget_replica`; else it would lapse
  only after heartbeat_ttl_s) and the first resume of each stream, on any
  worker, continues it from the stored log.
- does not restart a worker that exits before it serves with a
  configuration error (status 2), nor the first start of any worker, nor
  after MAX_STARTUP_FAILURES restarts in a row that never served: it says
  why, stops the other workers and exits with that worker's status.
- asks each worker to die with it (PR_SET_PDEATHSIG on Linux): a supervisor
  killed with SIGKILL leaves no orphan serving the port; they drain.

Worker i serves Prometheus metrics (if asked for) on metrics_port + i
(metrics_port 0: each picks a free port and logs it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from tokenrelay_server.config.problems import ConfigError, ConfigProblem
from tokenrelay_server.config.settings import Settings, flag_of

log = logging.getLogger("tokenrelay.workers")

# How long the supervisor waits on Redis to delete a dead worker's heartbeat
# before it gives up (the heartbeat then lapses by itself).
FORGET_TIMEOUT_S = 2.0


def forget_replica(settings: Settings, replica_id: str) -> bool:
    """Delete the heartbeat of a worker that died (it can renew it no more),
    so its streams are taken over on their next resume at once, not once the
    heartbeat lapses. Best effort: False (and a warning) when Redis does not
    answer within FORGET_TIMEOUT_S; the heartbeat then lapses by itself."""
    import asyncio

    from tokenrelay_server.store.connect import connect
    from tokenrelay_server.store.heartbeat import RedisHeartbeats

    async def forget() -> None:
        client = connect(
            settings.redis_url,
            cluster=settings.redis_cluster,
            socket_timeout=FORGET_TIMEOUT_S,
            socket_connect_timeout=FORGET_TIMEOUT_S,
        )
        try:
            async with asyncio.timeout(FORGET_TIMEOUT_S):
                await RedisHeartbeats(client, prefix=settings.redis_prefix).stop(replica_id)
        finally:
            await client.aclose()

    try:
        asyncio.run(forget())
    except Exception as error:  # (HeartbeatUnavailable, TimeoutError, a bad URL, …)
        log.warning(
            "could not delete the heartbeat of replica %s (%s: %s); its streams are taken "
            "over once it lapses (heartbeat_ttl_s %g)",
            replica_id,
            type(error).__name__,
            error,
            settings.heartbeat_ttl_s,
        )
        return False
    return True


CONFIG_ERROR_STATUS = 2  # what `serve` exits with on a configuration mistake
STABLE_S = 30.0  # a worker that served this long starts its crash count afresh
MAX_STARTUP_FAILURES = 5  # restarts in a row that never served before giving up
STOP_MARGIN_S = 30.0  # beyond drain_grace_s, for the generations' own shutdown
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


def restart_delay(crashes_in_a_row: int) -> float:
    """Seconds before restarting a worker that died: at once the first time
    (its streams wait for it), then 0.5 s doubling up to 30 s."""
    if crashes_in_a_row <= 1:
        return 0.0
    return float(min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (crashes_in_a_row - 2)))


@dataclass(frozen=True, slots=True)
class ExitVerdict:
    """What the supervisor does about a worker that died unasked: restart it
    after `restart_in_s`, or stop every worker and exit with `stop_with`;
    and the worker's counts from now on."""

    restart_in_s: float | None
    stop_with: int | None
    crashes: int
    startup_failures: int


def after_exit(
    exitcode: int | None,
    *,
    served_s: float | None,
    first_start: bool,
    crashes: int,
    startup_failures: int,
    delays: Callable[[int], float] = restart_delay,
) -> ExitVerdict:
    """The decision about a worker that exited while the supervisor was not
    stopping. `served_s`: how long it served (None: it never did);
    `first_start`: the deployment has not served yet; `crashes` and
    `startup_failures`: its deaths and its restarts that never served, in a
    row, before this one.

    A worker that never served is not restarted when this was the first
    start (the configuration is wrong, or the port), when it exited with a
    configuration error, or after MAX_STARTUP_FAILURES such restarts in a
    row: the supervisor stops with its status (1 for a death by signal).
    Otherwise it is restarted after `delays(crashes in a row)`, a worker
    that served STABLE_S counting from 0 again."""
    if served_s is None:
        startup_failures += 1
        if (
            first_start
            or exitcode == CONFIG_ERROR_STATUS
            or startup_failures >= MAX_STARTUP_FAILURES
        ):
            status = exitcode if exitcode is not None and exitcode > 0 else 1
            return ExitVerdict(None, status, crashes, startup_failures)
    elif served_s >= STABLE_S:
        crashes = 0
    crashes += 1
    return ExitVerdict(delays(crashes), None, crashes, startup_failures)


def describe_exit(exitcode: int | None) -> str:
    """`exited with status 1`, `killed by SIGKILL` (multiprocessing gives -N
    for a death by signal N)."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


@dataclass
class WorkerLink:
    """What a worker process is handed: who it is and the pipe on which it
    tells the supervisor it serves. Pickled into the spawned process."""

    index: int
    count: int
    supervisor_pid: int
    conn: Connection

    @property
    def label(self) -> str:
        return f"worker {self.index} of {self.count}"

    def die_with_supervisor(self) -> None:
        """SIGTERM this worker (a drain) when the supervisor dies, however it
        dies (Linux; elsewhere an orphaned worker serves until stopped)."""
        if not sys.platform.startswith("linux"):
            return
        libc_name = ctypes.util.find_library("c")
        if libc_name is None:
            return
        pr_set_pdeathsig = 1
        ctypes.CDLL(libc_name, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != self.supervisor_pid:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    def ready(self, port: int, replica_id: str) -> None:
        """This worker serves on `port` as replica `replica_id`."""
        self.conn.send(("ready", port, replica_id))


WorkerTarget = Callable[[Settings, WorkerLink], None]


@dataclass
class _Seat:
    """One of the N places; its process changes with every restart."""

    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False
    replica_id: str = ""
    ready_at: float = 0.0
    crashes: int = 0  # deaths in a row (reset after STABLE_S of serving)
    startup_failures: int = 0  # restarts in a row that never served
    restart_at: float | None = None
    exitcode: int | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.exitcode is None

    @property
    def stopped_cleanly(self) -> bool:
        """Drained and exited 0, or never started, or stopped by the
        supervisor's SIGTERM while still starting (it had no stream)."""
        if self.process is None or self.exitcode == 0:
            return True
        return not self.ready and self.exitcode == -signal.SIGTERM

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, never listening: the
    port every worker binds (with port 0, a free one). A port that another
    program holds, even with SO_REUSEPORT (another `serve --workers`), is
    refused by a plain bind first: connections would be shared with it."""
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as error:
            raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
        chosen = probe.getsockname()[1]
    hold = socket.socket(family, kind, proto)
    try:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hold.bind((address[0], chosen, *address[2:]))
    except OSError as error:
        hold.close()
        raise OSError(f"cannot listen on {host}:{chosen}: {error.strerror}") from None
    return hold


def worker_settings(settings: Settings, index: int, port: int) -> Settings:
    """Worker `index`'s settings: the shared port; metrics on metrics_port + index."""
    update: dict[str, object] = {"port": port, "workers": 1}
    if settings.metrics_port:
        update["metrics_port"] = settings.metrics_port + index
    return settings.model_copy(update=update)


@dataclass
class Supervisor:
    settings: Settings
    target: WorkerTarget
    port: int
    announce_port: Callable[[int], None]
    clock: Callable[[], float] = time.monotonic
    delays: Callable[[int], float] = restart_delay
    seats: list[_Seat] = field(default_factory=list)
    stopping: bool = False
    stop_deadline: float = math.inf
    status: int | None = None  # set when the supervisor decided to exit with it
    announced: bool = False

    def __post_init__(self) -> None:
        self.seats = [_Seat(index) for index in range(self.settings.workers)]
        self._context = multiprocessing.get_context("spawn")

    # -- processes -----------------------------------------------------------------

    def start(self, seat: _Seat) -> None:
        parent, child = self._context.Pipe(duplex=False)
        link = WorkerLink(seat.index, len(self.seats), os.getpid(), child)
        process = self._context.Process(
            target=self.target,
            args=(worker_settings(self.settings, seat.index, self.port), link),
            name=f"tokenrelay-worker-{seat.index}",
        )
        process.start()
        child.close()  # the worker's end; EOF here when it exits
        seat.process, seat.conn = process, parent
        seat.ready, seat.replica_id, seat.exitcode, seat.restart_at = False, "", None, None
        log.info("worker %d starting (pid %s)", seat.index, process.pid)

    def signal_all(self, signum: signal.Signals) -> None:
        for seat in self.seats:
            if seat.alive and seat.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(seat.pid, signum)

    def begin_stop(self, status: int | None = None) -> None:
        if self.stopping:
            return
        self.stopping = True
        if status is not None:
            self.status = status
        for seat in self.seats:
            seat.restart_at = None
        self.stop_deadline = self.clock() + self.settings.drain_grace_s + STOP_MARGIN_S
        self.signal_all(signal.SIGTERM)

    def kill_all(self, why: str) -> None:
        if any(seat.alive for seat in self.seats):
            log.warning("%s: killing the workers (SIGKILL)", why)
        self.signal_all(signal.SIGKILL)
        if self.status is None:
            self.status = 1

    # -- events --------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP: forwarded to the workers")
            self.signal_all(signal.SIGHUP)
            return
        if self.stopping:
            # Only a SIGINT hurries a drain (Ctrl-C again): a SIGTERM may come
            # twice for one stop (`timeout` signals the command and its process
            # group; systemd every process) and the stop stays graceful.
            if signum == signal.SIGINT:
                self.kill_all("SIGINT while draining")
            else:
                log.info("%s: already draining", signal.Signals(signum).name)
            return
        log.info(
            "%s: draining %d workers (open streams get %.0f s)",
            signal.Signals(signum).name,
            sum(seat.alive for seat in self.seats),
            self.settings.drain_grace_s,
        )
        self.begin_stop()

    def on_message(self, seat: _Seat) -> None:
        assert seat.conn is not None
        try:
            message = seat.conn.recv()
        except (EOFError, OSError):
            seat.conn.close()
            seat.conn = None  # the exit itself is seen on the sentinel
            return
        if message[0] == "ready":
            _, _, seat.replica_id = message
            seat.ready, seat.ready_at, seat.startup_failures = True, self.clock(), 0
            log.info(
                "worker %d serving (pid %s, replica %s)", seat.index, seat.pid, seat.replica_id
            )
            if self.stopping:  # it came up while the others drain: it drains too
                if seat.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(seat.pid, signal.SIGTERM)
                return
            if seat.index == 0:
                for other in self.seats[1:]:
                    if other.process is None:
                        self.start(other)
            if not self.announced and all(s.ready for s in self.seats):
                self.announced = True
                self.announce_port(self.port)

    def on_exit(self, seat: _Seat) -> None:
        assert seat.process is not None
        seat.process.join()
        seat.exitcode = seat.process.exitcode
        if seat.conn is not None:
            # A "ready" it sent just before dying still counts.
            with contextlib.suppress(EOFError, OSError):
                # on_message drops the pipe at its EOF.
                while seat.conn is not None and seat.conn.poll():
                    self.on_message(seat)
        if seat.conn is not None:
            seat.conn.close()
            seat.conn = None
        how = describe_exit(seat.exitcode)
        if seat.replica_id and seat.exitcode != 0:
            # It died serving (a clean exit deleted its own): its streams
            # are taken over on their next resume, on any replica, at once.
            forget_replica(self.settings, seat.replica_id)
        if self.stopping:
            level = logging.INFO if seat.exitcode == 0 else logging.WARNING
            log.log(level, "worker %d (pid %s) %s", seat.index, seat.pid, how)
            return
        now = self.clock()
        verdict = after_exit(
            seat.exitcode,
            served_s=now - seat.ready_at if seat.ready else None,
            first_start=not self.announced,
            crashes=seat.crashes,
            startup_failures=seat.startup_failures,
            delays=self.delays,
        )
        seat.crashes, seat.startup_failures = verdict.crashes, verdict.startup_failures
        if verdict.stop_with is not None:
            log.error(
                "worker %d (pid %s) %s before it served; not restarting it: stopping",
                seat.index,
                seat.pid,
                how,
            )
            self.begin_stop(verdict.stop_with)
            return
        assert verdict.restart_in_s is not None
        log.warning(
            "worker %d (pid %s, replica %s) %s; restarting it in %.1f s (its streams are "
            "taken over on their next resume)",
            seat.index,
            seat.pid,
            seat.replica_id or "-",
            how,
            verdict.restart_in_s,
        )
        seat.restart_at = now + verdict.restart_in_s

    # -- the loop ------------------------------------------------------------------

    def run(self, wakeup: socket.socket, pending_signals: list[int]) -> int:
        self.start(self.seats[0])
        while any(seat.alive for seat in self.seats) or (
            not self.stopping and any(seat.restart_at is not None for seat in self.seats)
        ):
            now = self.clock()
            due = [seat.restart_at for seat in self.seats if seat.restart_at is not None]
            deadlines = [*due, self.stop_deadline]
            timeout = max(0.0, min(deadlines) - now) if min(deadlines) < math.inf else None
            watched: dict[object, tuple[str, _Seat | None]] = {wakeup: ("signal", None)}
            for seat in self.seats:
                if seat.alive and seat.process is not None:
                    watched[seat.process.sentinel] = ("exit", seat)
                    if seat.conn is not None:
                        watched[seat.conn] = ("message", seat)
            ready = wait(list(watched), timeout)  # type: ignore[arg-type]
            # Signals and messages first: a "ready" sent just before an exit counts.
            for item in ready:
                kind, whose = watched[item]
                if kind == "signal":
                    with contextlib.suppress(BlockingIOError):
                        wakeup.recv(4096)
                    while pending_signals:
                        self.on_signal(pending_signals.pop(0))
                elif kind == "message" and whose is not None and whose.conn is not None:
                    self.on_message(whose)
            for item in ready:
                kind, whose = watched[item]
                if kind == "exit" and whose is not None and whose.exitcode is None:
                    self.on_exit(whose)
            now = self.clock()
            if self.stopping and now >= self.stop_deadline:
                self.kill_all(f"the drain took longer than {self.settings.drain_grace_s:.0f} s")
                self.stop_deadline = math.inf
            for seat in self.seats:
                if not self.stopping and seat.restart_at is not None and now >= seat.restart_at:
                    self.start(seat)
        if self.status is not None:
            return self.status
        return 0 if all(seat.stopped_cleanly for seat in self.seats) else 1


def check_worker_host(settings: Settings) -> None:
    """SO_REUSEPORT is a Linux/BSD socket option; refuse clearly elsewhere."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError(
            [
                ConfigProblem(
                    "",
                    f"{settings.workers} workers need SO_REUSEPORT, which this system lacks",
                    None,
                    flag_of("workers"),
                )
            ]
        )


def supervise(
    settings: Settings,
    target: WorkerTarget,
    *,
    announce_port: Callable[[int], None],
    delays: Callable[[int], float] = restart_delay,
) -> int:
    """Run `settings.workers` workers (`target(settings, link)` in spawned
    processes) on one port until they are stopped; the exit status.
    `delays`: seconds before a restart, by crashes in a row (tests: none)."""
    check_worker_host(settings)
    hold = reserve_port(settings.host, settings.port)
    port = int(hold.getsockname()[1])
    pending: list[int] = []
    wakeup, wake_writer = socket.socketpair()
    wakeup.setblocking(False)
    wake_writer.setblocking(False)
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    old_fd = signal.set_wakeup_fd(wake_writer.fileno())

    def record(signum: int, _frame: object) -> None:
        pending.append(signum)

    for signum in handled:
        signal.signal(signum, record)
    supervisor = Supervisor(settings, target, port, announce_port, delays=delays)
    log.info(
        "supervising %d workers on %s:%d (SO_REUSEPORT)", settings.workers, settings.host, port
    )
    try:
        return supervisor.run(wakeup, pending)
    finally:
        if any(seat.alive for seat in supervisor.seats):  # an exception in the loop
            supervisor.kill_all("the supervisor stops")
        signal.set_wakeup_fd(old_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        wakeup.close()
        wake_writer.close()
        hold.close()
