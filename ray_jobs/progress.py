"""What a run shows while it trains: one progress line, drawn by the process the user is looking at.

In-process (``ray.enabled: false``) rank 0's ``ProgressLine`` draws it directly. On Ray the user looks at
the driver (``acodm train``, or the entrypoint of ``ray job submit``) while rank 0 trains in a Ray Train
worker. Ray forwards worker output to the driver by default, and with it Ray's own output: start-up
lines, the controller's and raylet's messages, the ``[repeated 3x across cluster]`` folding, lines of
several processes interleaved out of order and prefixed with ``(RayTrainWorker pid=...)``. So the run's
own Ray starts with ``log_to_driver=False`` (``ray.log_to_driver``), and rank 0 sends what the user
should see to a ``ProgressRelay`` actor instead: its progress (the driver draws the same
``ProgressLine`` as the in-process path) and its ``acodm`` log records, plus every rank's warnings. The
driver polls the relay from a thread while ``TorchTrainer.fit`` blocks. Everything rank 0 logs also
goes to ``<run_dir>/run.log`` as before; every worker's full output stays in Ray's session logs.

Imports Ray only inside functions that are given a relay: a run without one never touches Ray here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

PROGRESS_FORMAT = "{desc} {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}]{postfix}"
PACKAGE_LOGGERS = ("envs", "agents", "ray_jobs", "analysis")
POLL_S = 0.5  # the driver's polling period, and the least time between two progress messages of rank 0
PROGRESS_RECORD = "acodm_progress"  # set on the progress line's log records: the relay sends the line itself
RELAYED_RECORD = "acodm_relayed"  # set on the records the driver re-emits: never sent to a relay again


class ProgressLine:
    """Rank 0's progress: ``train 120/200 (60%) [01:02<00:41], loss 4.1 | 15.2k tok/s | ... | top code 0.31``.

    One look everywhere, from tqdm's formatter (elapsed, ETA): on a terminal it is one live tqdm line on
    stderr, redrawn at most twice a second; where stderr is not a terminal (a redirected run, a job log)
    the same text is a plain INFO log record every ``train.log_interval`` steps and at every evaluation,
    so no carriage returns or ANSI codes reach files. Evaluation steps are logged in both cases, so the
    log always holds them.
    """

    def __init__(self, total: int, initial: int, interval: int, *, live: bool | None = None) -> None:
        """Start the clock at step ``initial`` (a resumed run's ETA uses only this session's rate).
        ``live`` (default: stderr is a terminal) draws the tqdm line."""
        from tqdm import tqdm

        self.total, self.initial, self.interval = total, initial, max(1, interval)
        self.start = time.perf_counter()
        self._tqdm = tqdm
        self.bar = (
            tqdm(total=total, initial=initial, desc="train", bar_format=PROGRESS_FORMAT, dynamic_ncols=True,
                 mininterval=POLL_S)
            if (sys.stderr.isatty() if live is None else live) else None
        )

    def text(self, step: int, postfix: str) -> str:
        """The line for ``step`` (without drawing it)."""
        elapsed = time.perf_counter() - self.start
        return self._tqdm.format_meter(step, self.total, elapsed, prefix="train", bar_format=PROGRESS_FORMAT,
                                       postfix=postfix, initial=self.initial)

    def update(self, step: int, postfix: str, *, force: bool = False) -> None:
        """Move to ``step``; ``force`` logs the line whatever the interval (evaluation steps)."""
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
            if force:
                self.bar.clear()
                log.info("%s", self.text(step, postfix), extra={PROGRESS_RECORD: True})
                self.bar.refresh()
        elif force or step % self.interval == 0 or step >= self.total:
            log.info("%s", self.text(step, postfix), extra={PROGRESS_RECORD: True})

    def clear(self) -> None:
        """Take the live line off the terminal for a moment (a log record is about to be written)."""
        if self.bar is not None:
            self.bar.clear()

    def refresh(self) -> None:
        """Draw the live line again after ``clear``."""
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        """End the live line (a terminal gets its final state)."""
        if self.bar is not None:
            self.bar.close()


def si(x: float) -> str:
    """``15234.0`` -> ``15.2k`` (NaN stays ``nan``)."""
    if not math.isfinite(x):
        return "nan"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


# --------------------------------------------------------------------------------------------- relay
class ProgressRelay:
    """A mailbox between the workers and the driver (a Ray actor, zero CPUs): workers ``put`` batches of
    messages, the driver ``take``s them all. Calls from one worker run in the order it made them."""

    def __init__(self) -> None:
        self._items: list[tuple[Any, ...]] = []

    def put(self, items: list[tuple[Any, ...]]) -> None:
        """Append messages (``("start", total, initial, interval)``, ``("progress", step, postfix, force)``,
        ``("log", levelno, logger_name, rank, text)``)."""
        self._items.extend(items)

    def take(self) -> list[tuple[Any, ...]]:
        """Every message since the last call, oldest first."""
        items, self._items = self._items, []
        return items


class RelayedProgress:
    """Rank 0's side of the progress line on Ray: the messages a ``ProgressLine`` would get, sent to the
    relay (fire and forget, never waiting on the driver): every ``train.log_interval`` steps, evaluations
    and the last step (the lines a log keeps), and in between at most every ``POLL_S`` seconds (for a
    live line). The line is also logged here, as a ``ProgressLine`` off a terminal logs it, for ``run.log``."""

    def __init__(self, relay: Any, total: int, initial: int, interval: int) -> None:
        """Tell the driver the run's length, where this session starts, and the logging interval."""
        self.relay, self.total, self.interval = relay, total, max(1, interval)
        self.local = ProgressLine(total, initial, interval, live=False)
        self._last = 0.0
        self._pending: tuple[Any, ...] | None = None
        relay.put.remote([("start", total, initial, interval)])

    def update(self, step: int, postfix: str, *, force: bool = False) -> None:
        """Send ``step``'s line now if it matters or enough time has passed; else keep it as the latest."""
        self.local.update(step, postfix, force=force)
        self._pending = ("progress", step, postfix, force)
        now = time.monotonic()
        if force or step >= self.total or step % self.interval == 0 or now - self._last >= POLL_S:
            self._send(now)

    def _send(self, now: float) -> None:
        if self._pending is not None:
            self.relay.put.remote([self._pending])
            self._pending, self._last = None, now

    def close(self) -> None:
        """Send the latest line if it was held back."""
        self._send(time.monotonic())


class RelayLogHandler(logging.Handler):
    """Sends the records of acodm's packages to the relay: a worker's own terminal is nobody's terminal
    when Ray does not forward it (``log_to_driver=False``)."""

    def __init__(self, relay: Any, rank: int, level: int) -> None:
        """``level``: INFO on rank 0 (the run's story), WARNING elsewhere (only what needs attention)."""
        super().__init__(level)
        self.relay, self.rank = relay, rank

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record's text (its traceback included) on the relay; the progress line's own records
        stay here (``RelayedProgress`` sends the line)."""
        if getattr(record, PROGRESS_RECORD, False) or getattr(record, RELAYED_RECORD, False):
            return
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self.relay.put.remote([("log", record.levelno, record.name, self.rank, text)])
        except Exception:  # a broken relay must not break training; logging's own policy
            self.handleError(record)


@contextlib.contextmanager
def relay_logs(relay: Any | None, rank: int) -> Iterator[None]:
    """For the block, send this worker's acodm log records to ``relay`` (nothing when it is None)."""
    if relay is None:
        yield
        return
    handler = RelayLogHandler(relay, rank, logging.INFO if rank == 0 else logging.WARNING)
    for name in PACKAGE_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > handler.level:
            logger.setLevel(handler.level)
    try:
        yield
    finally:
        for name in PACKAGE_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        _flush(relay)


def _flush(relay: Any, timeout_s: float = 10.0) -> None:
    """Wait until the relay has taken everything this process sent (a worker's calls run in the order it
    made them, so an empty one returns after them): Ray Train ends the workers when the run ends, and
    calls still in flight would be lost with them."""
    import ray  # a worker of the relay's Ray (only reached with a relay)

    try:
        ray.get(relay.put.remote([]), timeout=timeout_s)
    except Exception as exc:  # the driver went away: nobody to show the lines to
        log.debug("progress relay not flushed: %s", exc)


class _Pump:
    """The driver's side: draws the relayed progress and writes the relayed records through this
    process's logging (the user's console handler; not ``run.log``, which rank 0 writes itself)."""

    def __init__(self, relay: Any, *, live: bool | None = None) -> None:
        self.relay, self.live = relay, live
        self.bar: ProgressLine | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="acodm-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self.drain()

    def drain(self) -> None:
        """Take and show everything the relay holds (the relay gone: nothing)."""
        import ray

        try:
            items = ray.get(self.relay.take.remote(), timeout=30)
        except Exception as exc:  # the relay died with Ray or a node: the run's own error will say why
            log.debug("progress relay unreachable: %s", exc)
            return
        for item in items:
            self._show(item)

    def _show(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "start":
            if self.bar is not None:  # a restarted worker group starts a new session of the line
                self.bar.close()
            _, total, initial, interval = item
            self.bar = ProgressLine(total, initial, interval, live=self.live)
        elif kind == "progress" and self.bar is not None:
            _, step, postfix, force = item
            self.bar.update(step, postfix, force=force)
        elif kind == "log":
            _, levelno, name, rank, text = item
            logger = logging.getLogger(name)
            if not logger.isEnabledFor(levelno):  # e.g. `acodm --quiet`: the driver shows warnings only
                return
            record = logger.makeRecord(
                name, levelno, f"(rank {rank})", 0, "%s", (text,), None, extra={RELAYED_RECORD: True}
            )
            if rank != 0:
                record.msg, record.args = "rank %d: %s", (rank, text)
            if self.bar is not None:
                self.bar.clear()
            logger.handle(record)
            if self.bar is not None:
                self.bar.refresh()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.drain()  # what the workers sent last (their final records, the last step)
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def relay_to_driver(*, live: bool | None = None) -> Iterator[Any]:
    """On the driver, around ``TorchTrainer.fit``: a ``ProgressRelay`` actor for the workers (pass the
    handle in ``train_loop_config``), drawn and logged here while the block runs, and removed after.
    ``live`` as ``ProgressLine``'s."""
    import ray

    relay = ray.remote(num_cpus=0)(ProgressRelay).remote()
    pump = _Pump(relay, live=live)
    pump.start()
    try:
        yield relay
    finally:
        pump.stop()
        ray.kill(relay)
