"""Scheduled runs: the Batch service processes the inbox on a cron expression or an interval, like
the batch runner of the monitoring guide (cron / Task Scheduler; docs/monitoring-and-logging-guide.md).
Each run writes logs/batch_runner_<ts>.log.

FASHION_BATCH_SCHEDULE is a 5-field cron expression in the service's local time ("0 2 * * *":
nightly at 02:00), or an interval: "every 30m", "@every 2h", "90s", "45" (seconds). Empty turns
scheduled runs off. A run that comes due while the previous scheduled job is still active is
skipped (and says so in its log). Of the runs that came due while the service was down, the last one
runs at start (FASHION_BATCH_CATCH_UP), once some scheduled job has run before.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, tzinfo

from croniter import croniter
from dateutil import tz

from services.batch.jobs import JobQueue
from services.batch.paths import FolderMissing, PathRefused
from services.batch.records import JobRecord
from services.batch.reports import RunnerLog
from services.batch.store import StoreUnavailable

log = logging.getLogger(__name__)
_INTERVAL = re.compile(r"^(?:@?every\s+)?(\d+(?:\.\d+)?)\s*(s|sec|secs|m|min|mins|h|hr|hrs|d|day|days)?$", re.I)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_INTERVAL_S = 1.0
JOB_POLL_S = 0.2
MAX_SLEEP_S = 60.0
"""The longest single sleep before a run: the wall clock is read again after each (set back or forward)."""


def local_zone() -> tzinfo:
    """The service's local time zone (TZ, else the system's), with its daylight-saving rules."""
    return tz.tzlocal()


def local_time(ts: float) -> datetime:
    """Unix time `ts` as an aware local datetime (which of a repeated hour's two 01:30s it is, too)."""
    return datetime.fromtimestamp(ts, local_zone())


def _second_of_a_repeated_time(due: datetime) -> bool:
    """Whether aware `due` is the second time its zone shows its wall time (the hour the clocks go back)."""
    if due.tzinfo is None:
        return False
    wall = due.replace(tzinfo=None).replace(tzinfo=due.tzinfo)
    return tz.datetime_ambiguous(wall) and due.utcoffset() != tz.enfold(wall, fold=0).utcoffset()


class Clock:
    """The wall clock scheduled runs read and sleep by: the one seam a test replaces with a clock it moves."""

    def time(self) -> float:
        """Unix time now."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class Schedule:
    text: str
    cron: str | None = None
    interval_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> Schedule | None:
        """None for an empty text. Raises ValueError naming the problem, also for a schedule whose due times
        cannot be computed (February 30, an interval beyond the calendar)."""
        text = (text or "").strip()
        if not text:
            return None
        m = _INTERVAL.match(text)
        if m:
            seconds = float(m.group(1)) * _UNIT_S[(m.group(2) or "s")[0].lower()]
            if seconds < MIN_INTERVAL_S:
                raise ValueError(f"batch schedule {text!r}: the interval must be at least {MIN_INTERVAL_S:g}s")
            schedule = cls(text, interval_s=seconds)
        elif len(text.split()) == 5 and croniter.is_valid(text):
            schedule = cls(text, cron=text)
        else:
            raise ValueError(f"batch schedule {text!r} is neither a 5-field cron expression (e.g. \"0 2 * * *\") "
                             "nor an interval (e.g. \"every 30m\", \"90s\")")
        now = local_time(time.time())
        try:  # what the scheduled runs compute, once at start: a schedule that cannot be computed never runs
            schedule.next_after(now)
            schedule.previous_due(now)
        except (ValueError, OverflowError, OSError) as exc:
            raise ValueError(f"batch schedule {text!r} never comes due: its next or previous run time cannot be "
                             f"computed ({exc}): a date that does not exist (February 30, April 31) or an "
                             "interval too long") from None
        return schedule

    def next_after(self, when: datetime) -> datetime:
        """The first due time after `when` (aware: in its zone; naive: local time, naive)."""
        if self.interval_s is not None:  # in elapsed time, whatever the clocks of the zone do meanwhile
            return datetime.fromtimestamp(when.timestamp() + self.interval_s, when.tzinfo)
        assert self.cron is not None
        due = croniter(self.cron, when).get_next(datetime)
        if "*" not in self.cron.split()[1] and _second_of_a_repeated_time(due):
            # The night the clocks go back a wall time comes twice (01:30 EDT, then 01:30 EST): a run at fixed
            # hours happens at the first only, as cron's; one on every hour ("0 * * * *") runs in both.
            due = croniter(self.cron, due).get_next(datetime)
        return due

    def previous_due(self, when: datetime) -> datetime:
        """The last due time before `when` (for an interval: one interval ago)."""
        if self.interval_s is not None:
            return datetime.fromtimestamp(when.timestamp() - self.interval_s, when.tzinfo)
        assert self.cron is not None
        return croniter(self.cron, when).get_prev(datetime)

    def describe(self) -> str:
        if self.interval_s is not None:
            return f"every {self.interval_s:g} seconds"
        return f"cron {self.cron!r} (local time)"


class ScheduledRuns:
    """Submits a job for the inbox whenever the schedule comes due. Due times are aware local datetimes
    (croniter's in the local zone: a night the clocks change runs at the wall time it names); each is waited
    for in sleeps of at most MAX_SLEEP_S against the wall clock, never one long sleep of a computed length."""

    def __init__(self, schedule: Schedule, queue: JobQueue, clock: Clock | None = None) -> None:
        self.schedule = schedule
        self.queue = queue
        self.settings = queue.settings
        self.clock = clock or Clock()
        self._runs: set[asyncio.Task[None]] = set()

    async def run_forever(self) -> None:
        """Until cancelled. Never ends silently: a failure is logged as an error, with the reason."""
        try:
            await self._run()
        except Exception:
            log.exception("Scheduled runs of %s stopped: no scheduled run happens until the service restarts",
                          self.settings.batch_inbox)
        finally:
            for task in list(self._runs):
                task.cancel()

    async def _run(self) -> None:
        last_due = self.clock.time()
        if (missed := await asyncio.to_thread(self.missed_run, local_time(last_due))) is not None:
            log.warning("The scheduled run due at %s did not happen (the service was down): running it now",
                        missed.strftime("%Y-%m-%d %H:%M:%S"))
            self._start(missed, caught_up=True)
        log.info("Scheduled runs of %s: %s", self.settings.batch_inbox, self.schedule.describe())
        while True:
            # From the previous due time too: a run is never due twice.
            due = self.schedule.next_after(local_time(max(self.clock.time(), last_due)))
            while (left := due.timestamp() - self.clock.time()) > 0:
                await self.clock.sleep(min(left, MAX_SLEEP_S))
            last_due = due.timestamp()
            self._start(due)

    def missed_run(self, now: datetime) -> datetime | None:
        """The due time of the last run missed before `now` (None: none, catching up is off, or no scheduled
        job ever ran here: a first start does not process the inbox at once)."""
        if not self.settings.batch_catch_up:
            return None
        try:
            latest = self.queue.store.latest_created("schedule")
        except StoreUnavailable as exc:  # the schedule itself keeps going
            log.warning("Cannot tell whether a scheduled run was missed: %s", exc)
            return None
        previous = self.schedule.previous_due(now)
        return previous if latest is not None and latest < previous.timestamp() else None

    def unfinished_run(self, key: str) -> JobRecord | None:
        """An earlier scheduled run's job not finished yet, whichever process started it (read from the jobs
        database: one interrupted by a restart and resumed counts too); the job of this due time's key, submitted
        by another replica a moment ago, does not."""
        return next((job for job in self.queue.store.unfinished()
                     if job.trigger == "schedule" and not (key and job.idempotency_key == key)), None)

    def _start(self, due: datetime, caught_up: bool = False) -> None:
        task = asyncio.ensure_future(self.fire(due, caught_up))
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    async def fire(self, due: datetime | None = None, caught_up: bool = False) -> JobRecord | None:
        """One scheduled run, with its own batch_runner log. Returns the job (None when skipped or failed: the
        runner log and the service log say why). Replicas sharing a PostgreSQL jobs database submit the run of
        one due time as one job (its idempotency key)."""
        runner_log = RunnerLog(self.settings)
        job: JobRecord | None = None
        try:
            runner_log.started(schedule=self.schedule.describe(),
                               inbox=self.queue.root.display(self.settings.batch_inbox))
            if caught_up and due is not None:
                runner_log.line("Catching up the run due at %s, missed while the service was down",
                                due.strftime("%Y-%m-%d %H:%M:%S"))
            key = f"schedule {due.isoformat()}" if due is not None and self.queue.store.shared else ""
            if (previous := await asyncio.to_thread(self.unfinished_run, key)) is not None:
                runner_log.line("✗ Previous run (job %s) is still %s: this run is skipped", previous.job_id,
                                previous.state.name)
                return None
            try:
                self.queue.root.folder(self.settings.batch_inbox, "inbox", create=True)
                spec = self.queue.spec(self.settings.batch_inbox, recursive=self.settings.batch_recursive,
                                       idempotency_key=key)
            except (PathRefused, FolderMissing) as exc:
                runner_log.line("✗ Cannot process the inbox: %s", str(exc))
                log.error("Scheduled run skipped: %s", exc)
                return None
            job = await self.queue.submit(spec, trigger="schedule")
            runner_log.line("Started batch job %s", job.job_id)
            while not job.state.finished:
                await asyncio.sleep(JOB_POLL_S)
                job = await asyncio.to_thread(self.queue.get, job.job_id)
            runner_log.outcome(job)
            return job
        except asyncio.CancelledError:
            if job is not None:
                job = self.queue.get(job.job_id)
            if job is not None and job.state.finished:
                runner_log.outcome(job)
            else:
                runner_log.line("Batch runner stopped with the service%s", f"; job {job.job_id} resumes at the next "
                                "start" if job is not None else "")
            raise
        except Exception as exc:  # anything else (the jobs database lost, a bug): said, never a silent task
            runner_log.line("✗ Batch failed: %s%s", str(exc) or type(exc).__name__,
                            f" (job {job.job_id} goes on)" if job is not None else "")
            log.exception("Scheduled run failed%s", f" (job {job.job_id})" if job is not None else "")
            return None
        finally:
            runner_log.line("Next run: %s", self.schedule.next_after(local_time(self.clock.time())).strftime(
                "%Y-%m-%d %H:%M:%S"))
            runner_log.close()
