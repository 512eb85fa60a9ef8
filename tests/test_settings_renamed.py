"""Settings are an interface: a renamed setting's former FASHION_* variable keeps working (deprecated,
with a warning) until deployments have moved to the current name, which wins when both are set."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common import config
from services.common.config import BatchSettings, InferenceSettings, invalid_settings_message

RENAMED = [  # former variable, current variable, setting, a value, what the setting then holds
    ("FASHION_DECODE_PROCESSES", "FASHION_WORKER_PROCESSES", "worker_processes", "0", 0),
    ("FASHION_HELPERS_RUN_MODEL", "FASHION_WORKERS_RUN_MODEL", "workers_run_model", "false", False),
    ("FASHION_HELPER_NICE", "FASHION_WORKER_NICE", "worker_nice", "4", 4),
    ("FASHION_REPORT_KEEP_DAYS", "FASHION_RETENTION_DAYS", "retention_days", "30", 30.0),
    ("FASHION_BATCH_STALE_HOURS", "FASHION_BATCH_MAX_AGE_HOURS", "batch_max_age_hours", "12", 12.0),
    ("FASHION_ALERT_BATCH_MAX_AGE_H", "FASHION_BATCH_MAX_AGE_HOURS", "batch_max_age_hours", "30", 30.0),
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for former, current, *_ in RENAMED:
        monkeypatch.delenv(former, raising=False)
        monkeypatch.delenv(current, raising=False)
    monkeypatch.setattr(config, "_warned", set())  # each test sees its own warnings


def test_every_renamed_setting_is_listed() -> None:
    assert {former: current for former, (_, current) in config.RENAMED.items()} == \
        {former: current for former, current, *_ in RENAMED}


@pytest.mark.parametrize(("former", "current", "name", "value", "expected"), RENAMED, ids=[r[0] for r in RENAMED])
def test_the_former_variable_still_works_with_a_deprecation_warning(
        monkeypatch: pytest.MonkeyPatch, former: str, current: str, name: str, value: str, expected: object) -> None:
    monkeypatch.setenv(former, value)
    with pytest.warns(FutureWarning, match=f"{former} is deprecated .*set {current} instead"):
        settings = InferenceSettings()
    assert getattr(settings, name) == expected


@pytest.mark.parametrize(("former", "current", "name", "value", "expected"), RENAMED, ids=[r[0] for r in RENAMED])
def test_the_current_variable_wins_over_the_former(
        monkeypatch: pytest.MonkeyPatch, former: str, current: str, name: str, value: str, expected: object) -> None:
    monkeypatch.setenv(former, value)
    monkeypatch.setenv(current, str(InferenceSettings.model_fields[name].default))
    with pytest.warns(FutureWarning, match=f"{current} is set and wins"):
        settings = InferenceSettings()
    assert getattr(settings, name) == InferenceSettings.model_fields[name].default


def test_the_current_name_works_in_the_environment_and_in_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_WORKER_NICE", "3")
    assert InferenceSettings().worker_nice == 3
    assert InferenceSettings(worker_nice=5).worker_nice == 5


def test_only_the_services_that_have_the_setting_warn(monkeypatch: pytest.MonkeyPatch, recwarn) -> None:
    monkeypatch.setenv("FASHION_HELPER_NICE", "4")
    BatchSettings()
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_an_unusable_value_names_the_variable_that_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_HELPER_NICE", "abc")
    with pytest.raises(ValidationError) as former:
        InferenceSettings()
    assert invalid_settings_message(former.value).startswith("error: FASHION_HELPER_NICE='abc': ")
    monkeypatch.delenv("FASHION_HELPER_NICE")
    monkeypatch.setenv("FASHION_WORKER_NICE", "99")
    with pytest.raises(ValidationError) as current:
        InferenceSettings()
    assert invalid_settings_message(current.value) == \
        "error: FASHION_WORKER_NICE='99': Input should be less than or equal to 19"
