"""Where a result came from: the header every result file of the library starts with."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from metalearn.allocator import reusing_freed_memory


def run_header(argv: list[str] | None = None) -> dict:
    """Where a result came from: command, commit, machine and versions."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=Path(__file__).parent, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD") or None
    # Tracked files changed since that commit: the result is not the commit's alone. The
    # result files of benchmarks/results are outputs, not code: a sequence of benchmarks
    # rewrites them as it goes.
    changed = None if commit is None else bool(git(
        "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
        ":(top,exclude)benchmarks/results"))
    return {
        "command": " ".join(["metalearn", *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit,
        "uncommitted_changes": changed,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Changes the speed of the same code (metalearn.allocator).
        "malloc_reuse": reusing_freed_memory(),
    }
