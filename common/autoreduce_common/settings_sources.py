"""Settings sources shared by the dispatcher and the runner."""

from __future__ import annotations

from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource


class LenientEnvSource(EnvSettingsSource):
    """Lists may be given as ``a,b`` as well as JSON (``["a","b"]``).

    The Job template passes broker hosts as ``host:port,host:port``; pydantic-settings
    would insist on JSON for a list field, so a value that is not JSON is handed to
    the field validators as the plain string they know how to split.
    """

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


class EnvFirstSettings(BaseSettings):
    """Settings where the environment wins over values passed in (a file's contents),
    and lists may be written ``a,b`` in the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (LenientEnvSource(settings_cls), init_settings)
