"""The progress line and log records that rank 0 relays to the driver (``ray_jobs.progress``)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from ray_jobs.progress import ProgressRelay, RelayedProgress, relay_logs, relay_to_driver


class _Remote:
    """Stands in for an actor method: ``.remote(items)`` calls the local object at once."""

    def __init__(self, fn: Any) -> None:
        self.remote = fn


class LocalRelay:
    """A ``ProgressRelay`` handle without Ray: ``put.remote`` and ``take.remote`` on a local relay."""

    def __init__(self) -> None:
        self.relay = ProgressRelay()
        self.put = _Remote(self.relay.put)
        self.take = _Remote(self.relay.take)


def test_rank_0_sends_forced_and_last_steps_at_once_and_throttles_the_rest(caplog) -> None:
    caplog.set_level(logging.INFO, logger="ray_jobs.progress")
    relay = LocalRelay()
    progress = RelayedProgress(relay, total=50, initial=0, interval=10)
    for step in range(1, 51):
        progress.update(step, f"loss {step}", force=step == 25)
    progress.close()
    items = relay.relay.take()
    assert items[0] == ("start", 50, 0, 10)
    sent = [item[1] for item in items[1:]]
    assert {10, 20, 25, 30, 40, 50} <= set(sent)  # the log interval, the evaluation, the last step
    assert len(sent) < 20, "50 steps in well under a second: the updates in between are throttled"
    assert sent == sorted(sent)
    # run.log's copy: a plain record every log interval and at the evaluation, as off a terminal
    lines = [r.getMessage() for r in caplog.records if r.name == "ray_jobs.progress"]
    assert [line.split(" (")[0] for line in lines] == [
        "train 10/50", "train 20/50", "train 25/50", "train 30/50", "train 40/50", "train 50/50",
    ]


def test_the_line_held_back_is_sent_when_the_throttle_allows_or_on_close() -> None:
    relay = LocalRelay()
    progress = RelayedProgress(relay, total=100, initial=40, interval=10)
    progress.update(41, "a")  # the first update is sent
    progress.update(42, "b")  # within POLL_S of it: held back until close
    progress.close()
    assert relay.relay.take() == [("start", 100, 40, 10), ("progress", 41, "a", False), ("progress", 42, "b", False)]


def test_relay_logs_sends_rank_0_info_and_other_ranks_warnings_but_not_the_progress_records() -> None:
    relay = LocalRelay()
    logger = logging.getLogger("ray_jobs.some_module")
    with relay_logs(relay, rank=0):
        logger.info("resumed at step %d", 48)
        logger.debug("not sent")
        logging.getLogger("ray_jobs.progress").info("train 1/2", extra={"acodm_progress": True})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    with relay_logs(relay, rank=1):
        logger.info("rank 1's info stays in its own log")
        logger.warning("loss is NaN")
    logger.warning("after the block: not sent")
    items = relay.relay.take()
    assert [item[:4] for item in items] == [
        ("log", logging.INFO, "ray_jobs.some_module", 0),
        ("log", logging.ERROR, "ray_jobs.some_module", 0),
        ("log", logging.WARNING, "ray_jobs.some_module", 1),
    ]
    assert items[0][4] == "resumed at step 48"
    assert items[1][4].startswith("failed\nTraceback") and "ValueError: boom" in items[1][4]
    assert items[2][4] == "loss is NaN"


@pytest.mark.ray
def test_the_driver_shows_what_the_workers_relay_in_order(ray_session, caplog, request) -> None:
    caplog.set_level(logging.INFO)
    # a logger at WARNING, as `acodm --quiet` makes every logger (not with caplog.set_level: that would
    # raise the level of its capture handler too)
    quiet = logging.getLogger("envs.quiet")
    quiet.setLevel(logging.WARNING)
    request.addfinalizer(lambda: quiet.setLevel(logging.NOTSET))
    with relay_to_driver(live=False) as relay:
        relay.put.remote([("start", 20, 0, 10), ("log", logging.INFO, "ray_jobs.driver", 0, "resumed at step 0")])
        for step in range(1, 21):
            relay.put.remote([("progress", step, f"loss {step}", step == 15)])
        relay.put.remote([("log", logging.WARNING, "envs.env", 1, "a domain ran out"),
                          ("log", logging.INFO, "envs.quiet", 0, "below the driver's level: not shown")])
        time.sleep(0.1)
    shown = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith(("ray_jobs", "envs"))]
    assert shown[0] == ("ray_jobs.driver", logging.INFO, "resumed at step 0")
    assert [m.split(",")[0].split(" [")[0] for n, _, m in shown if n == "ray_jobs.progress"] == [
        "train 10/20 (50%)", "train 15/20 (75%)", "train 20/20 (100%)"]
    assert shown[-1] == ("envs.env", logging.WARNING, "rank 1: a domain ran out")  # nothing from envs.quiet
    # re-emitted records carry the mark that keeps a relay handler from sending them again
    assert all(getattr(r, "acodm_relayed", False) for r in caplog.records if r.name in ("ray_jobs.driver", "envs.env"))
