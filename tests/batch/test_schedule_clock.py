"""When scheduled runs fire, in a real time zone (America/New_York, through TZ) on a clock the test moves:
the schedule reads the wall clock through one seam (schedule.Clock), so a night when the clocks change
runs in milliseconds. And failures of the scheduler itself are said, never a silent dead task."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from services.batch.events import JobEvents
from services.batch.jobs import JobQueue
from services.batch.runner import JobRunner
from services.batch.schedule import MAX_SLEEP_S, Clock, Schedule, ScheduledRuns
from services.batch.sqlite_store import SqliteJobStore
from services.common.config import BatchSettings

pytestmark = pytest.mark.timeout(60)
NEW_YORK = ZoneInfo("America/New_York")


@pytest.fixture
def new_york() -> Iterator[None]:
    """This process in New York time (TZ, as a service started with TZ=America/New_York)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


class MovedClock(Clock):
    """A wall clock that moves only when the schedule sleeps on it; every sleep recorded."""

    def __init__(self, start: datetime, until: datetime) -> None:
        self.now, self.until = start.timestamp(), until.timestamp()
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert self.now < self.until, "the schedule never fired"
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class RecordedRuns(ScheduledRuns):
    """Scheduled runs that record when they fire (the wall clock then, and the due time) instead of submitting."""

    def __init__(self, schedule: str, clock: Clock, settings: BatchSettings, runs: int = 1) -> None:
        parsed = Schedule.parse(schedule)
        assert parsed is not None
        super().__init__(parsed, SimpleNamespace(settings=settings), clock)  # type: ignore[arg-type]
        self.fired: list[tuple[float, datetime]] = []
        self.enough = asyncio.Event()
        self._runs_wanted = runs

    def fire(self, due: datetime | None = None, caught_up: bool = False) -> Coroutine[None, None, None]:  # type: ignore[override]
        """Recorded when called (when the scheduler starts the run: its task would run a moment later)."""
        assert due is not None
        self.fired.append((self.clock.time(), due))
        if len(self.fired) >= self._runs_wanted:
            self.enough.set()
        return asyncio.sleep(0)


def _fire(schedule: str, start: datetime, runs: int, tmp_path: Path) -> tuple[RecordedRuns, MovedClock]:
    clock = MovedClock(start, until=start.replace(year=start.year + 1))
    settings = BatchSettings(data_root=tmp_path / "data", log_dir=tmp_path / "logs", batch_catch_up=False)
    scheduled = RecordedRuns(schedule, clock, settings, runs)

    async def until_fired() -> None:
        task = asyncio.ensure_future(scheduled.run_forever())
        await asyncio.wait({task, asyncio.ensure_future(scheduled.enough.wait())}, timeout=20,
                           return_when=asyncio.FIRST_COMPLETED)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(until_fired())
    return scheduled, clock


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def test_the_night_clocks_go_back_a_nightly_run_fires_at_its_wall_time_not_an_hour_early(
        new_york: None, tmp_path: Path) -> None:
    start = datetime(2026, 11, 1, 0, 30, tzinfo=NEW_YORK)  # 00:30 EDT; at 02:00 EDT it is 01:00 EST again
    scheduled, clock = _fire("0 2 * * *", start, 2, tmp_path)
    # 02:00 EST is 07:00 UTC: 6.5 hours after 00:30 EDT (the repeated hour included), not 5.5.
    assert [_utc(at) for at, _ in scheduled.fired] == ["2026-11-01 07:00", "2026-11-02 07:00"]
    assert [due.strftime("%Y-%m-%d %H:%M %Z") for _, due in scheduled.fired] == [
        "2026-11-01 02:00 EST", "2026-11-02 02:00 EST"]
    assert all(at == due.timestamp() for at, due in scheduled.fired)  # at the due time, never before it
    assert max(clock.sleeps) <= MAX_SLEEP_S  # the wall clock is read again at least every minute


@pytest.mark.parametrize(("schedule", "start"), [
    ("0 * * * *", datetime(2026, 11, 1, 0, 30, tzinfo=NEW_YORK)),  # hourly through the repeated hour
    ("0 2 * * *", datetime(2026, 3, 7, 12, 0, tzinfo=NEW_YORK)),  # a wall time the spring night skips
    ("every 90m", datetime(2026, 11, 1, 0, 30, tzinfo=NEW_YORK)),  # elapsed time, whatever the clocks do
])
def test_due_times_are_croniters_in_the_local_zone(
        new_york: None, tmp_path: Path, schedule: str, start: datetime) -> None:
    scheduled, _ = _fire(schedule, start, 4, tmp_path)
    if schedule.startswith("every"):
        expected = [start.timestamp() + 5400 * i for i in range(1, 5)]
    else:
        it = croniter(schedule, start)
        expected = [it.get_next(datetime).timestamp() for _ in range(4)]
    assert [_utc(at) for at, _ in scheduled.fired] == [_utc(ts) for ts in expected]


def test_a_daily_time_the_night_has_twice_runs_once_as_with_cron(new_york: None, tmp_path: Path) -> None:
    """01:30 comes twice the night the clocks go back (EDT, then EST): a run at fixed hours happens at the first
    only, as cron's (croniter gives both, and the nightly job ran twice that night); an hourly one runs in both."""
    start = datetime(2026, 10, 31, 12, 0, tzinfo=NEW_YORK)
    daily, _ = _fire("30 1 * * *", start, 3, tmp_path / "daily")
    assert [due.strftime("%Y-%m-%d %H:%M %Z") for _, due in daily.fired] == [
        "2026-11-01 01:30 EDT", "2026-11-02 01:30 EST", "2026-11-03 01:30 EST"]
    hourly, _ = _fire("0 * * * *", start.replace(day=1, month=11, hour=0, minute=30), 2, tmp_path / "hourly")
    assert [due.strftime("%H:%M %Z") for _, due in hourly.fired] == ["01:00 EDT", "01:00 EST"]


def test_a_scheduler_that_cannot_go_on_says_so_as_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its next due time beyond the calendar (year 10000): logged as an error with the reason, and run_forever
    ends instead of leaving a task whose exception nobody retrieves."""
    end_of_time = datetime(9999, 12, 20, tzinfo=UTC)
    clock = MovedClock(end_of_time, until=end_of_time.replace(day=31))
    settings = BatchSettings(data_root=tmp_path / "data", log_dir=tmp_path / "logs", batch_catch_up=False)
    scheduled = RecordedRuns("every 30d", clock, settings)
    with caplog.at_level(logging.INFO, logger="services.batch.schedule"):
        asyncio.run(asyncio.wait_for(scheduled.run_forever(), 10))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "Scheduled runs of inbox stopped: no scheduled run happens until the service restarts"], caplog.text
    assert errors[0].exc_info is not None and "out of range" in str(errors[0].exc_info[1])


def test_a_scheduled_run_that_fails_writes_its_reason_to_the_runner_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failure other than a refused inbox (here the jobs database closed under it): the run's log ends with a
    ✗ line and the service log has the error; the scheduler goes on."""
    settings = BatchSettings(data_root=tmp_path / "data", log_dir=tmp_path / "logs", results_dir=tmp_path / "results",
                             log_stdout=False, batch_catch_up=False)
    store = SqliteJobStore(tmp_path / "db" / "jobs.db")
    queue = JobQueue(JobRunner(settings, store, JobEvents()))
    store.close()  # every query now fails
    scheduled = ScheduledRuns(Schedule("every 1h", interval_s=3600), queue)
    with caplog.at_level(logging.INFO, logger="services.batch.schedule"):
        assert asyncio.run(scheduled.fire(datetime.now().astimezone())) is None
    (runner_log,) = (tmp_path / "logs").glob("batch_runner_*.log")
    text = runner_log.read_text(encoding="utf-8")
    assert "] ✗ Batch failed: Cannot operate on a closed database." in text and "Next run: " in text, text
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == ["Scheduled run failed"]
