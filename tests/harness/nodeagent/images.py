"""Image names -> the host environment that plays that image.

The image-map file is JSON: ``{"<repository prefix>": {"env": {...}, "command": [...],
"args": [...], "workingDir": "..."}}``. ``env`` is the image's ENV (container env wins
over it; ``PATH`` must be complete); ``command``/``args`` are its ENTRYPOINT/CMD, used
when the container does not give them. The file is re-read for every container start,
so a test can add an image while the agent runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageSpec:
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    working_dir: str = ""


def repository(image: str) -> str:
    """``reg:5000/org/name:tag@sha256:..`` -> ``reg:5000/org/name``."""
    name = image.split("@", 1)[0]
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > last_slash else name


def _matches(repo: str, key: str) -> bool:
    return repo == key or repo.startswith(key + "/") or repo.endswith("/" + key)


def resolve(image: str, image_map: dict[str, Any]) -> ImageSpec | None:
    """The longest matching key wins; None means "cannot pull this image"."""
    repo = repository(image)
    keys = sorted((k for k in image_map if _matches(repo, k)), key=len, reverse=True)
    if not keys:
        return None
    entry = image_map[keys[0]]
    return ImageSpec(
        env={str(k): str(v) for k, v in entry.get("env", {}).items()},
        command=[str(c) for c in entry.get("command", [])],
        args=[str(a) for a in entry.get("args", [])],
        working_dir=str(entry.get("workingDir", "")),
    )


def load(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}
