"""Cut line-per-sentence text (LM1B shards, or any plain text) into a folder of .txt documents for
``dbl.data.TextDataModule``: every ``--lines`` consecutive non-empty lines become one document, so the
data module's validation split (by document) holds out whole stretches of text.

    python tools/text_folder.py --out runs/data/lm1b-standin-docs --lines 50 \\
        --archive ../shared/data/lm1b-standin/1-billion-word-language-modeling-benchmark-r13output.tar.gz \\
        --member training-monolingual.tokenized.shuffled/news.en-00001-of-00100

Inputs: plain files as arguments, or members of a .tar.gz (``--archive`` with one or more ``--member``
suffixes). Writes ``<out>/doc-00000.txt`` ... and refuses an out folder that already has .txt files.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path


def read_lines(paths: list[str], archive: str | None, members: list[str]) -> list[str]:
    lines: list[str] = []
    for path in paths:
        lines += Path(path).read_text(encoding="utf-8").splitlines()
    if archive:
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            for suffix in members:
                found = [n for n in names if n.endswith(suffix)]
                if len(found) != 1:
                    sys.exit(f"text_folder: {len(found)} members of {archive} end with {suffix!r}; give a unique suffix")
                lines += tar.extractfile(found[0]).read().decode("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="plain text files, one sentence (or paragraph) per line")
    parser.add_argument("--archive", help="a .tar.gz to read members from")
    parser.add_argument("--member", action="append", default=[], help="suffix of a member of --archive (repeatable)")
    parser.add_argument("--lines", type=int, default=50, help="lines per document")
    parser.add_argument("--out", required=True, help="the folder to write the .txt documents to")
    args = parser.parse_args(argv)
    if args.lines < 1:
        sys.exit(f"text_folder: --lines must be >= 1, got {args.lines}")
    if not args.files and not args.archive:
        sys.exit("text_folder: give text files, or --archive with --member")
    out = Path(args.out)
    if out.exists() and any(out.glob("*.txt")):
        sys.exit(f"text_folder: {out} already has .txt files; choose another --out or empty it")
    lines = read_lines(args.files, args.archive, args.member)
    if not lines:
        sys.exit("text_folder: the inputs have no non-empty lines")
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for count, start in enumerate(range(0, len(lines), args.lines), start=1):
        (out / f"doc-{count - 1:05d}.txt").write_text("\n".join(lines[start:start + args.lines]) + "\n", encoding="utf-8")
    print(f"text_folder: {len(lines)} lines -> {count} documents in {out}")


if __name__ == "__main__":
    main()
