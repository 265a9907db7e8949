"""One settings object, built once from ``IMGCLF_*`` variables (or CLI flags) and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_repo: Path = Field(default=Path("models"), description="IMGCLF_MODEL_REPO: the model repository")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in cls.model_fields:
            key = f"IMGCLF_{field.upper()}"
            if key in env:
                values[field] = env[key]
        values |= {k: v for k, v in overrides.items() if v is not None}
        return cls.model_validate(values)
