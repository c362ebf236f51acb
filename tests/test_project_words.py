"""The project's files speak of the software, not of how it was made.

Chronology belongs to git: documents, code, tests and configs say what the software does and what was measured,
dated or with a commit id where the date matters, never the working steps that made it. A
"session" in the imaging sense (a BIDS `ses-` folder, one visit to a scanner) is allowed on a line that says so.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Split so that this file does not match itself.
WORDS = re.compile(
    r"\b(" + "ses" + r"sions?|" + "iss" + r"ues? #?\d+|" + "hel" + r"pers?|" + "this mach" + r"ine)\b",
    re.IGNORECASE,
)
IMAGING_SENSE = re.compile(r"BIDS|\bses-|scanning session", re.IGNORECASE)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".json", ""}


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = []
    for name in out.splitlines():
        path = ROOT / name
        if path.suffix in TEXT_SUFFIXES and path.is_file() and path.stat().st_size < 2_000_000:
            files.append(path)
    return files


def process_words(paths: list[Path]) -> list[str]:
    """`file:line: text` for every line that speaks of how the project was made."""
    hits = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            if WORDS.search(line) and not IMAGING_SENSE.search(line):
                name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    return hits


def test_no_process_words_in_the_repository():
    hits = process_words(_tracked_files())
    assert not hits, "process words (say what the software does; dates or commits for chronology):\n" + "\n".join(
        hits[:40])


def test_the_check_finds_a_process_word(tmp_path):
    sample = tmp_path / "notes.md"
    sample.write_text("fine line\nas measured in " + "ses" + "sion 4\nBIDS ses-01 session folder\n")
    assert [h.split(": ", 1)[1] for h in process_words([sample])] == ["as measured in " + "ses" + "sion 4"]
