"""Guard configuration from keyword arguments, GPUGUARD_* variables and YAML, validated up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuguard import ConfigError, GuardConfig


def test_precedence_kwargs_over_env_over_yaml(tmp_path: Path) -> None:
    path = tmp_path / "gpuguard.yaml"
    path.write_text(
        "checkpoint_dir: s3://from-yaml/run\nkeep: 5\nsync_every: 4\nhealth:\n  onset_s: 9\n  quiet_s: 11\n"
    )
    env = {"GPUGUARD_KEEP": "7", "GPUGUARD_HEALTH_QUIET_S": "12", "GPUGUARD_REPLICATED": "true"}
    config = GuardConfig.load(path, env=env, sync_every=8)
    assert config.checkpoint_dir == "s3://from-yaml/run"
    assert (config.keep, config.sync_every, config.replicated) == (7, 8, True)
    assert (config.health.onset_s, config.health.quiet_s) == (9, 12.0)


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint_dir: file:///ckpt\ncheckpoint_every_steps: 100\n")
    config = GuardConfig.load(env={"GPUGUARD_CONFIG": str(path), "GPUGUARD_CHECKPOINT_EVERY_S": "none"})
    assert config.checkpoint_every_steps == 100 and config.checkpoint_every_s is None


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        ({}, {}, r"checkpoint_dir: None is not valid; required"),
        ({"checkpoint_dir": "x", "keep": 0}, {}, r"keep: 0 is not valid; must be a whole number, 1 or greater"),
        ({"checkpoint_dir": "x", "sync_every": 2.5}, {}, r"sync_every: 2.5 is not valid"),
        (
            {"checkpoint_dir": "x", "reschedule_exit_code": 1},
            {},
            r"reschedule_exit_code: 1 is not valid; must be an exit code",
        ),
        ({"checkpoint_dir": "x", "restart_exit_code": 75}, {}, r"restart_exit_code: 75 is not valid; must differ"),
        ({"checkpoint_dir": "x", "degraded_grace_s": -1}, {}, r"degraded_grace_s: -1 is not valid"),
        ({"checkpoint_dir": "x", "kep": 3}, {}, r"kep: 3 is not valid; unknown setting; allowed: checkpoint_dir"),
        ({"checkpoint_dir": "x", "health": {"onset": 1}}, {}, r"health.onset: 1 is not valid; unknown setting"),
        (
            {"checkpoint_dir": "x", "health": {"fail_mode": "maybe"}},
            {},
            r"fail_mode: 'maybe' is not valid; allowed: 'open', 'closed'",
        ),
        (
            {"checkpoint_dir": "x", "health": {"onset_s": -1}},
            {},
            r"^health\.onset_s: -1 is not valid; must be a number",
        ),
        ({"checkpoint_dir": "x"}, {"GPUGUARD_HEALTH_ONSET_S": "-1"}, r"^health\.onset_s: -1.0 is not valid"),
        ({"checkpoint_dir": "x", "kubernetes": {"deadline_s": 0}}, {}, r"^kubernetes\.deadline_s: 0 is not valid"),
        ({"checkpoint_dir": "x"}, {"GPUGUARD_KEEP": "three"}, r"GPUGUARD_KEEP: 'three' is not valid; must be an int"),
        ({"checkpoint_dir": "x"}, {"GPUGUARD_REPLICATED": "perhaps"}, r"GPUGUARD_REPLICATED: 'perhaps' is not valid"),
        (
            {"checkpoint_dir": "x"},
            {"GPUGUARD_STORAGE_OPTIONS": "{not json"},
            r"GPUGUARD_STORAGE_OPTIONS: '\{not json' is not valid; must be YAML or JSON \(",
        ),
    ],
    ids=[
        "missing-dir",
        "keep",
        "sync-every",
        "exit-code",
        "same-codes",
        "grace",
        "typo",
        "health-typo",
        "fail-mode",
        "health-value",
        "env-health-value",
        "kubernetes-value",
        "env-int",
        "env-bool",
        "env-mapping-malformed",
    ],
)
def test_bad_settings_name_the_field(settings: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GuardConfig.load(env=env, **settings)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config_file: '.*nope.yaml' is not valid; no such file"):
        GuardConfig.load(tmp_path / "nope.yaml", env={})


def test_environment_words_are_not_yaml_booleans() -> None:
    config = GuardConfig.load(
        env={
            "GPUGUARD_CHECKPOINT_DIR": "x",
            "GPUGUARD_KUBERNETES_ENABLED": "off",
            "GPUGUARD_KUBERNETES_LEAVE": "evict",
            "GPUGUARD_DEVICES": "all",
        }
    )
    assert (config.kubernetes.enabled, config.kubernetes.leave, config.devices) == ("off", "evict", "all")
    with pytest.raises(ConfigError, match=r"GPUGUARD_KUBERNETES_LEAVE: 'quit' is not valid; allowed: exit, evict"):
        GuardConfig.load(env={"GPUGUARD_CHECKPOINT_DIR": "x", "GPUGUARD_KUBERNETES_LEAVE": "quit"})
