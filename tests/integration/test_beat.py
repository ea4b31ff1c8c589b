"""Beat killed and started again: no schedule entry is lost, none fires twice.

A real ``celery beat`` (as the Procfile runs it, with its schedule file in a temporary
directory) sends to a private Redis that no worker reads, so every task it sends stays
in the ``default`` queue: the messages themselves say what was sent, and when (each
resend task expires 10 s after it was sent).
"""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest
import redis

from .conftest import ROOT, RUN, wait_for
from .test_chaos import PrivateRedis

pytestmark = [pytest.mark.integration, pytest.mark.sqlite_pass_only]

RESEND_TASK = "labs.tasks.operations_resend"
INTERVAL = 2  # seconds: RESEND_INTERVAL_SECONDS of this test's beat
EXPIRES = timedelta(seconds=10)  # settings.CELERY_BEAT_SCHEDULE["operations-resend"]


class Beat:
    """A real ``celery beat`` process, started and killed by its PID."""

    def __init__(self, broker_url: str, schedule: str):
        self.broker_url = broker_url
        self.schedule = schedule
        self.log = ROOT / "test-artifacts" / f"beat-{RUN}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log.parent.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "CELERY_BROKER_URL": self.broker_url,
            "REDIS_URL": self.broker_url,
            "RESEND_INTERVAL_SECONDS": str(INTERVAL),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "portal", "beat", "--loglevel", "INFO"]
            + ["--schedule", self.schedule],
            cwd=ROOT,
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: nothing is flushed."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def resend_sends(client: redis.Redis) -> list[datetime]:
    """When each resend task now in the queue was sent, oldest first."""
    sent = []
    for raw in client.lrange("default", 0, -1):
        headers = json.loads(raw)["headers"]
        if headers["task"] == RESEND_TASK:
            sent.append(datetime.fromisoformat(headers["expires"]) - EXPIRES)
    return sorted(sent)


@pytest.fixture
def beat_redis():
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


def test_beat_killed_and_started_again_keeps_the_sweeper_once_per_interval(beat_redis, tmp_path):
    client = redis.Redis.from_url(beat_redis.url)
    beat = Beat(beat_redis.url, str(tmp_path / "celerybeat-schedule"))
    try:
        beat.start()
        wait_for(lambda: len(resend_sends(client)) >= 3, timeout=40, what="3 sweeps")
        beat.kill()
        before = resend_sends(client)
        time.sleep(INTERVAL + 1)
        assert resend_sends(client) == before  # the killed beat is gone: nothing more

        beat.start()  # the same schedule file, as a restarted service finds it
        wait_for(
            lambda: len(resend_sends(client)) >= len(before) + 3,
            timeout=40,
            what="3 sweeps after the restart",
        )
    finally:
        beat.kill()
    after = resend_sends(client)[len(before) :]
    # Not lost: the sweeper runs after the restart. Not doubled: never two sends within
    # half an interval (a duplicated entry, or a second beat, would send in pairs).
    assert len(after) >= 3
    sends = before + after
    gaps = [(b - a).total_seconds() for a, b in zip(sends, sends[1:], strict=False)]
    assert min(gaps) >= INTERVAL / 2, gaps
    # Nothing but this schedule's entries was sent (reconcile's interval is a minute).
    tasks = {json.loads(raw)["headers"]["task"] for raw in client.lrange("default", 0, -1)}
    assert tasks <= {RESEND_TASK, "labs.tasks.reconcile_all"}
