"""mypy on src/ against a baseline that may only shrink.

    python scripts/typecheck.py            # fails on any error not in mypy-baseline.txt
    python scripts/typecheck.py --update   # rewrite the baseline (after fixing errors; never to admit new ones)

An error is keyed by file, error code and message, without its line number, so that editing a file does not turn
its known errors into new ones; the same error twice in a file counts twice. mypy itself has no baseline mode, and
a blanket `ignore_errors` would hide new errors in the same files.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "mypy-baseline.txt"
LINE = re.compile(r"^(?P<file>[^:]+):\d+(?::\d+)?: error: (?P<message>.*?)\s*(?:\[(?P<code>[a-z-]+)\])?$")


def current_errors() -> Counter[str]:
    done = subprocess.run([sys.executable, "-m", "mypy", "src/ahm", "--no-error-summary", "--no-pretty",
                           "--show-error-codes"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"mypy failed to run:\n{done.stderr or done.stdout}")
    errors: Counter[str] = Counter()
    for line in done.stdout.splitlines():
        match = LINE.match(line)
        if match:
            errors[f"{match['file']}: [{match['code'] or 'misc'}] {match['message']}"] += 1
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the baseline with the current errors")
    args = parser.parse_args()
    errors = current_errors()
    if args.update:
        BASELINE.write_text("".join(f"{key}\n" for key in sorted(errors.elements())))
        print(f"mypy baseline: {sum(errors.values())} errors")
        return 0
    known = Counter(BASELINE.read_text().splitlines()) if BASELINE.is_file() else Counter()
    new = errors - known
    fixed = known - errors
    for key in sorted(new.elements()):
        print(f"new: {key}")
    print(f"mypy: {sum(errors.values())} errors, {sum(known.values())} in the baseline, {sum(new.values())} new, "
          f"{sum(fixed.values())} fixed" + (" (run with --update to shrink the baseline)" if fixed else ""))
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
