"""Build locks of torch's JIT extensions, checked before DeepSpeed builds or loads an op (its CPU shared-memory
all-reduce is built at the first `init_distributed` on a machine).

torch takes `<extensions dir>/<py..._cpu|cu...>/<op>/lock` while it builds an op and waits, silently and for good,
while that file exists. A rank killed mid-build (SIGKILL, the OOM killer, a second Ctrl-C) leaves it behind, and every
later run on the machine then hangs at start-up printing nothing. Before DeepSpeed gets there, each lock is judged:
- a build process is alive in the op's folder: the run waits on it, and says so;
- no build process here and the lock is older than a build can take ($DS_PLD_BUILD_LOCK_STALE_S, default 600 s):
  a build was killed; the lock is removed, with one line naming it, and the op is built again;
- otherwise (a young lock; on a shared home directory the builder may be on another node): the run waits, and says
  which file it waits on and what to do if nobody is building.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

STALE_ENV = "DS_PLD_BUILD_LOCK_STALE_S"
DEFAULT_STALE_S = 600.0


def extensions_root() -> Path:
    """Where torch builds JIT extensions: $TORCH_EXTENSIONS_DIR, else torch's default."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def building_in(folder: Path) -> bool:
    """Whether a live process on this machine works in `folder` (torch runs ninja and the compiler there)."""
    import psutil

    target = folder.resolve()
    for process in psutil.process_iter():
        try:
            if Path(process.cwd()).resolve() == target:
                return True
        except (psutil.Error, OSError):
            continue
    return False


def op_folders(root: Path, op: str = "*") -> list[Path]:
    """The op build folders under `root`: `<root>/<op>` when $TORCH_EXTENSIONS_DIR names the root (torch adds no
    per-Python folder then), `<root>/<py..._cpu|cu...>/<op>` under torch's default root."""
    if not root.is_dir():
        return []
    return sorted(path for path in {*root.glob(op), *root.glob(f"*/{op}")} if path.is_dir())


def op_locks(root: Path) -> list[Path]:
    return [folder / "lock" for folder in op_folders(root) if (folder / "lock").is_file()]


def check_build_locks(root: Path | None = None, stale_after_s: float | None = None,
                      say: Callable[[str], None] = print) -> list[Path]:
    """Judge every build lock under `root` as the module docstring says; returns the locks removed."""
    root = extensions_root() if root is None else root
    stale_after_s = float(os.environ.get(STALE_ENV, DEFAULT_STALE_S)) if stale_after_s is None else stale_after_s
    removed = []
    for lock in op_locks(root):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue  # released meanwhile
        op = lock.parent.name
        if building_in(lock.parent):
            say(f"[ds_pld] waiting for a build of {op} in progress on this machine (lock {lock})")
        elif age > stale_after_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            say(f"[ds_pld] removed a stale build lock {lock}: {age:.0f} s old and no build process alive (a build "
                f"was killed); {op} is built again")
        else:
            say(f"[ds_pld] {op} is locked by {lock} ({age:.0f} s old) with no build process on this machine: waiting "
                f"for it (a build on another node?); if nothing is building {op}, delete that file")
    return removed
