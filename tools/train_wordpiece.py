"""Train a lowercase WordPiece vocabulary on the training sentences of an LM1B-layout archive.

    python tools/train_wordpiece.py ../shared/data/lm1b-standin/1-billion-word-language-modeling-benchmark-r13output.tar.gz \\
        --vocab-size 4096 --out ~/.cache/dbl-assets/standin-wordpiece-4096

The sentences are Moses-detokenised first, exactly as ``dbl.data.LM1BDataModule`` does before its
tokenizer sees them. The output folder holds a BERT ``vocab.txt``: give it as
``data.init_args.tokenizer`` and set ``network.init_args.vocab_size`` to at least ``--vocab-size``.
A small vocabulary makes CPU runs affordable (the 30,522-way output layer of bert-base-uncased
costs most of a CPU step); the paper's runs use a standard pretrained tokenizer instead.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from fnmatch import fnmatch
from pathlib import Path

from dbl.data.lm1b import TOP_DIR, TRAIN_GLOB, detokenizer


def training_sentences(archive: Path):
    """Detokenised sentences of the archive's training shards, in archive order."""
    detok = detokenizer()
    with tarfile.open(archive) as tar:
        # archive order: the order decides the ids of equally frequent pieces
        members = [m for m in tar.getmembers() if m.isfile() and fnmatch(m.name, f"{TOP_DIR}/{TRAIN_GLOB}")]
        if not members:
            sys.exit(f"train_wordpiece: {archive} has no {TOP_DIR}/{TRAIN_GLOB} files; is it an LM1B-layout archive?")
        for member in members:
            for line in tar.extractfile(member).read().decode("utf-8").splitlines():
                if line.strip():
                    yield detok(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path, help="the LM1B release archive (or a stand-in in its layout)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True, help="folder for vocab.txt (created)")
    args = parser.parse_args(argv)
    if not args.archive.is_file():
        sys.exit(f"train_wordpiece: {args.archive} is not a file; give the path of the .tar.gz archive")
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(training_sentences(args.archive), vocab_size=args.vocab_size, show_progress=True)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_model(str(out))
    print(f"wrote {out / 'vocab.txt'} ({tokenizer.get_vocab_size()} entries)")


if __name__ == "__main__":
    main()
