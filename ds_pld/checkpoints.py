"""Checkpoint folders on disk: which checkpoint a resume may load, and keeping only the newest few.

DeepSpeed writes a checkpoint's files; ds_pld marks it complete afterwards with `ds_pld_meta.json` (step, world size,
the size of every file) and only then moves `latest`, atomically. So a folder without its metadata was never
finished, a file of another size than was written is damaged, and each way `latest` itself can be bad has its own
message. Nothing here needs DeepSpeed or a process group: the trainer, the exporter and the tests read these too.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ds_pld.config_errors import ConfigError

META_FILE = "ds_pld_meta.json"
LATEST_FILE = "latest"


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename, so a reader sees the old content or the new, never a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def checkpoint_files(tag_dir: Path) -> dict[str, int]:
    """Every file of a checkpoint folder but our metadata, with its size: what a resume checks is all there."""
    return {str(path.relative_to(tag_dir)): path.stat().st_size for path in sorted(tag_dir.rglob("*"))
            if path.is_file() and path.name != META_FILE and not path.name.startswith(f".{META_FILE}.tmp")}


def checkpoint_problem(tag_dir: Path) -> str | None:
    """Why the checkpoint in `tag_dir` cannot be resumed (unfinished, unreadable metadata, a file missing or of
    another size than was written), or None if it is intact. Checkpoints written before sizes were recorded are
    checked for their metadata only."""
    meta_file = tag_dir / META_FILE
    if not meta_file.is_file():
        return f"checkpoint {str(tag_dir)!r} is incomplete (no {META_FILE}): it was not finished"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"checkpoint {str(tag_dir)!r} has an unreadable {META_FILE} ({err})"
    for name, size in (meta.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"checkpoint file {str(path)!r} is missing"
        if path.stat().st_size != size:
            return f"checkpoint file {str(path)!r} has {path.stat().st_size} bytes, {size} were written"
    return None


def _meta(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / META_FILE).read_text(encoding="utf-8"))


def _latest_tag(load_dir: Path) -> tuple[str | None, str | None]:
    """(tag that `latest` names, problem with `latest` itself); each way `latest` can be bad has its own message."""
    latest = load_dir / LATEST_FILE
    try:
        tag = latest.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{str(latest)!r} holds garbage (not UTF-8 text), not a checkpoint name"
    except OSError as err:
        return None, f"{str(latest)!r} cannot be read ({err})"
    if not tag or len(tag) > 255 or "/" in tag or tag in (".", "..") or not tag.isprintable():
        return None, f"{str(latest)!r} holds garbage ({tag[:40]!r}), not a checkpoint name"
    if not (load_dir / tag).is_dir():
        return tag, f"{str(latest)!r} names checkpoint {tag!r}, but the folder {str(load_dir / tag)!r} is missing"
    return tag, None


def resolve_checkpoint(load_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(metadata of the checkpoint to resume, warning). The one `latest` names if it is intact; otherwise the newest
    intact one, with a warning that names what was wrong (the bad file, or `latest` itself). (None, None) when
    nothing was ever checkpointed here; a ConfigError when checkpoints exist but none is intact."""
    load_dir = Path(load_dir)
    latest = load_dir / LATEST_FILE
    tag, problem = _latest_tag(load_dir) if latest.exists() else (None, None)
    if tag is not None and problem is None:
        problem = checkpoint_problem(load_dir / tag)
        if problem is None:
            return _meta(load_dir / tag), None
    others = [path for path in load_dir.iterdir() if path.is_dir() and path.name != tag
              and (path / META_FILE).is_file()] if load_dir.is_dir() else []
    intact = [path for path in others if checkpoint_problem(path) is None]
    if not latest.exists():
        if not intact:
            return None, None
        problem = f"{str(latest)!r} is missing"
    if not intact:
        raise ConfigError(f"{problem}, and {str(load_dir)!r} holds no other intact checkpoint to resume from; "
                          "start a new run (without --resume, or another --output_dir)")
    best = max(intact, key=lambda path: int(_meta(path).get("global_steps", -1)))  # intact: readable metadata
    return _meta(best), f"{problem}; resuming from the newest intact checkpoint {str(best)!r} instead"


def read_checkpoint_meta(load_dir: str | Path, tag: str | None = None) -> dict[str, Any] | None:
    """The metadata of the checkpoint `tag` (default: the one `latest` names), or None if there is none yet; a
    ConfigError naming the problem if that checkpoint is not intact (see `resolve_checkpoint` for falling back)."""
    load_dir = Path(load_dir)
    if tag is None:
        if not (load_dir / LATEST_FILE).exists():
            return None
        tag, problem = _latest_tag(load_dir)
        if problem is not None:
            raise ConfigError(problem)
    problem = checkpoint_problem(load_dir / tag)
    if problem is not None:
        raise ConfigError(f"{problem} and cannot be resumed")
    return _meta(load_dir / tag)


def prune_checkpoints(load_dir: str | Path, keep: int) -> list[Path]:
    """Remove complete checkpoints older than the newest `keep` complete ones (0: keep all). Called after a newer
    checkpoint is complete and `latest` names it, so what `latest` names and the fallbacks before it survive."""
    load_dir = Path(load_dir)
    if keep < 1:
        return []
    steps = {}
    for path in load_dir.iterdir():
        if path.is_dir() and (path / META_FILE).is_file():
            try:
                steps[path] = int(_meta(path)["global_steps"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable metadata: not ours to judge here, left alone
    complete = sorted(steps, key=steps.__getitem__, reverse=True)
    latest_tag, _ = _latest_tag(load_dir) if (load_dir / LATEST_FILE).exists() else (None, None)
    removed = [path for path in complete[keep:] if path.name != latest_tag]
    for path in removed:
        (path / META_FILE).unlink()  # first: a half-removed folder is an unfinished one, never resumed
        shutil.rmtree(path)
    return removed
