"""BM25 over manual text: find the passage that answers a question, to put in the prompt and cite.

Pure Python. The manual is split into sections at blank lines; a section's first line is its
heading when more lines follow, and each following line (a fact, a step) is one passage indexed
with its heading, so "E964" or "VX-200" in a question finds the line that states it. A line longer
than `max_words` (a whole manual section on one line) is cut at sentence ends into parts of at most
that many words (a single longer sentence is cut at the bound). Scores are
Okapi BM25 (k1 = 1.5, b = 0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5))).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

_TOKEN = re.compile(r"[a-z0-9]+")
# Question words and glue: they match every passage and only blur the ranking.
STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it its my of on or the this to what "
    "when where which who why with you your should".split())


@dataclass(frozen=True)
class Passage:
    text: str  # the passage itself
    heading: str  # its section heading ('' when the section is one paragraph)
    line: int  # 1-based line of the passage in the source text
    source: str  # file name, for the citation
    part: int = 0  # which part of a line cut at max_words (0 = the whole line, else 1, 2, ...)

    def citation(self) -> str:
        """Where the passage comes from, as a reader would look it up."""
        where = f"{self.source}:{self.line}" + (f" part {self.part}" if self.part else "")
        return f"{where} ({self.heading})" if self.heading else where


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


def tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric runs minus stopwords ('VX-200' -> 'vx', '200')."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS]


def split_passages(text: str, source: str = "manual.txt", max_words: int = 0) -> list[Passage]:
    """Sections at blank lines; a multi-line section's first line heads one passage per later line.
    max_words > 0 cuts longer lines into parts (sentence-aligned where the sentences allow)."""
    out: list[Passage] = []
    section: list[tuple[int, str]] = []

    def add(t: str, heading: str, n: int) -> None:
        parts = cut(t, max_words)
        out.extend(Passage(p, heading, n, source, j + 1 if len(parts) > 1 else 0) for j, p in enumerate(parts))

    for i, raw in enumerate(text.splitlines() + [""], start=1):
        line = raw.strip()
        if line:
            section.append((i, line))
            continue
        if len(section) == 1:
            add(section[0][1], "", section[0][0])
        elif section:
            for n, t in section[1:]:
                add(t, section[0][1], n)
        section = []
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def cut(line: str, max_words: int) -> list[str]:
    """`line` as consecutive parts of at most `max_words` words, whole sentences where they fit."""
    if max_words <= 0 or len(line.split()) <= max_words:
        return [line]
    parts: list[list[str]] = [[]]
    for sentence in _SENTENCE_END.split(line):
        words = sentence.split()
        while words:
            room = max_words - len(parts[-1])
            if len(words) > room and parts[-1]:  # the sentence does not fit: start a new part
                parts.append([])
                continue
            parts[-1] += words[:max_words]
            words = words[max_words:]
    return [" ".join(p) for p in parts if p]


class BM25:
    """An Okapi BM25 index over passages."""

    def __init__(self, passages: list[Passage], k1: float = 1.5, b: float = 0.75):
        self.passages = passages
        self.k1, self.b = k1, b
        self.tokens = [tokenize(f"{p.heading} {p.text}") for p in passages]  # heading + text, in order
        self._tf = [Counter(t) for t in self.tokens]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = sum(self._len) / len(self._len) if self._len else 0.0
        df: Counter = Counter()
        for tf in self._tf:
            df.update(tf.keys())
        n = len(passages)
        self.idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> BM25:
        """Index a text file."""
        path = Path(path)
        return cls(split_passages(path.read_text(encoding="utf-8", errors="replace"), path.name))

    @cached_property
    def text_tokens(self) -> list[set[str]]:
        """Each passage's own words (heading left out), for matching an answer against it."""
        return [set(tokenize(p.text)) for p in self.passages]

    def scores(self, query: str) -> list[float]:
        """BM25 score of every passage for `query`."""
        terms = [t for t in tokenize(query) if t in self.idf]
        out = []
        for tf, n in zip(self._tf, self._len):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * n / self._avg) if self._avg else self.k1
            for t in terms:
                f = tf.get(t, 0)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
            out.append(s)
        return out

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """The `k` best passages with a positive score, best first (ties keep manual order)."""
        scored = [(s, i) for i, s in enumerate(self.scores(query)) if s > 0]
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [Hit(self.passages[i], s) for s, i in scored[:k]]
