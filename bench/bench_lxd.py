"""Side by side with LXD 5.0.2 (issue 18). Part 1, compatibility both ways: Debian's ``lxd``
installed if missing, one daemon started in a network namespace of its own
(``testrigs/lxd.py``), the LXD-made fixtures made again, each imported here and started, our
exports imported into LXD and started there, everything torn down (daemon, namespace, loop
device, directories). The work is ``bench/lxd_fixtures.py``; this is the bench's entry point,
so that the timing comparisons (part 2, not written yet) run after it in the same run.

    python bench/bench_lxd.py [--out DIR] [--json FILE] [--skip-fixtures]

Exit 0 when every row of the compatibility table passes; the table is printed as markdown
(``bench/README.md``, "LXD compatibility").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lxd_fixtures  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return lxd_fixtures.main(argv)


if __name__ == "__main__":
    sys.exit(main())
