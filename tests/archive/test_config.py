from pathlib import Path

import pytest
from pydantic import ValidationError

from archive.config import CallerRule, DuplicatePolicyValues, Settings


class TestSettings:
    def test_defaults_work_without_configuration(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("PACS_TRIAGE_CONFIG", raising=False)
        settings = Settings()
        assert settings.ae_title == "PACS_TRIAGE"
        assert settings.dicom_port == 11112
        assert settings.resolved_database_url == f"sqlite:///{settings.data_dir / 'index.sqlite'}"
        assert settings.duplicate_policy is DuplicatePolicyValues.KEEP_FIRST

    def test_environment_overrides_defaults(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PACS_TRIAGE_AE_TITLE", "ARCHIVE1")
        monkeypatch.setenv("PACS_TRIAGE_DICOM_PORT", "104")
        monkeypatch.setenv("PACS_TRIAGE_ALLOWED_CALLERS", '[{"ae_title": "CT1"}]')
        settings = Settings()
        assert settings.ae_title == "ARCHIVE1"
        assert settings.dicom_port == 104
        assert settings.allowed_callers == [CallerRule(ae_title="CT1")]

    def test_toml_file_is_read(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        config = tmp_path / "node.toml"
        config.write_text(
            'ae_title = "FROMTOML"\nopen_on_loopback = false\n'
            '[[allowed_callers]]\nae_title = "MR1"\nhosts = ["10.1.0.0/16"]\n'
        )
        monkeypatch.setenv("PACS_TRIAGE_CONFIG", str(config))
        settings = Settings()
        assert settings.ae_title == "FROMTOML"
        assert settings.allowed_callers[0].hosts == ["10.1.0.0/16"]

    def test_environment_wins_over_toml(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        config = tmp_path / "node.toml"
        config.write_text('ae_title = "FROMTOML"\n')
        monkeypatch.setenv("PACS_TRIAGE_CONFIG", str(config))
        monkeypatch.setenv("PACS_TRIAGE_AE_TITLE", "FROMENV")
        assert Settings().ae_title == "FROMENV"

    def test_ae_title_longer_than_16_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="at most 16 characters"):
            Settings(ae_title="A" * 17)

    def test_invalid_caller_network_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="does not appear to be an IPv4 or IPv6 network"):
            CallerRule(ae_title="CT1", hosts=["10.1.2.300/24"])


class TestCallerPolicy:
    def test_loopback_open_by_default(self) -> None:
        assert Settings().caller_allowed("ANYONE", "127.0.0.1")
        assert Settings().caller_allowed("ANYONE", "::1")

    def test_unknown_remote_caller_refused_by_default(self) -> None:
        assert not Settings().caller_allowed("ANYONE", "10.0.0.7")

    def test_listed_caller_from_its_network_allowed(self) -> None:
        settings = Settings(
            open_on_loopback=False,
            allowed_callers=[CallerRule(ae_title="CT1", hosts=["10.0.0.0/24"])],
        )
        assert settings.caller_allowed("CT1", "10.0.0.7")
        assert not settings.caller_allowed("CT1", "10.0.1.7")
        assert not settings.caller_allowed("CT2", "10.0.0.7")
        assert not settings.caller_allowed("CT1", "127.0.0.1")
