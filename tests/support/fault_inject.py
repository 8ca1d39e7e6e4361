"""Run a stage with a simulated full disk: ``python tests/support/fault_inject.py SUBSTRING NTH -m stages.X``.

The NTH call of ``stages.common.io.atomic_path`` (the one writer every output and checkpoint goes
through) whose target contains SUBSTRING lets the stage write its temporary, then cuts the largest
file written to half its size and raises ``OSError(ENOSPC)``, as a write that hits a full disk
does. Everything else about the stage is real.
"""

from __future__ import annotations

import contextlib
import errno
import os
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path


def main() -> None:
    substring, nth, flag, module = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    assert flag == "-m"
    sys.path.insert(0, os.getcwd())
    from stages.common import io

    real = io.atomic_path
    seen = 0

    @contextlib.contextmanager
    def full_disk(path: str | Path) -> Iterator[Path]:
        nonlocal seen
        with real(path) as tmp:
            yield tmp
            if substring in str(path):
                seen += 1
                if seen == nth:
                    files = [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]
                    victim = max(files, key=lambda p: p.stat().st_size)
                    with open(victim, "r+b") as fh:
                        fh.truncate(victim.stat().st_size // 2)
                    print(f"fault_inject: ENOSPC while writing {path}", file=sys.stderr)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(victim))

    io.atomic_path = full_disk
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
