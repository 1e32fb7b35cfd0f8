"""A photd configuration file for tests that run real daemons over a simulated night."""

from __future__ import annotations

import json
from pathlib import Path


def write_config(path: Path, night: Path, work: Path, **daemon: object) -> Path:
    """Write ``path``: watch the night's raw folder, its catalog, quick timers, JSON logs.

    ``daemon`` overrides or adds ``[daemon]`` keys.
    """
    settings = {"rescan_interval_s": 2.0, "truncated_timeout_s": 4.0, "log_format": "json",
                "settle_s": 0.2, **daemon}
    lines = ["[paths]", f"watch = [{str(night / 'raw')!r}]", f"work = {str(work)!r}",
             f"catalog = {str(night / 'catalog.ecsv')!r}", "[daemon]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
