"""Answers grounded in the manual: retrieve, prompt with numbered passages, verify the citation. Torch-free.

One module builds the retrieval-augmented prompt for tuning (the data stage), for the bench and for
`edgeft ask`, so a model tuned with retrieval sees on the device exactly the prompt shape it was
tuned on, from the same retriever settings (recorded in the data artifact and the bundle).

The contract the model is tuned to:
  system  INSTRUCTION
  user    "Manual passages:\\n[1] heading: text\\n[2] ...\\n\\nQuestion: ..."
  answer  "<answer from the passages> [n]"  or exactly ABSTAIN when no passage answers it.
The runtime then checks what the model cannot be trusted to: the question's identifiers (codes,
model names, part numbers: tokens with digits) must appear in a retrieved passage, else it abstains
without asking the model; a cited passage must exist and hold the answer's key tokens, else the
answer is shown as not verified.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from edgeft.errors import UserError
from edgeft.runtime.retrieval import BM25, STOPWORDS, Hit, split_passages, tokenize

FORMAT_VERSION = 1  # bump when the prompt or answer contract below changes: tuned models are refused
INSTRUCTION = ("Answer the question from the manual passages. End the answer with the number of the passage "
               "it comes from, like [2]. If the passages do not answer it, reply: The manual does not cover this.")
ABSTAIN = "The manual does not cover this."
_CITE = re.compile(r"\[(\d+)\]")
_IDENT = re.compile(r"[A-Za-z0-9]+(?:[-/.][A-Za-z0-9]+)*")
# answer statuses
ANSWERED = "answered"  # cited passage exists and holds the answer's key tokens
UNVERIFIED = "unverified"  # an answer the runtime could not tie to a retrieved passage
ABSTAINED = "abstained"  # the model said the manual does not cover it
NOT_IN_MANUAL = "not_in_manual"  # the runtime found the question's identifiers in no retrieved passage


@dataclass(frozen=True)
class Spec:
    """The retriever and prompt settings a model is tuned with; the device must use the same ones."""

    k: int = 3  # passages in the prompt
    max_words: int = 80  # longer manual lines are cut into parts of at most this many words
    k1: float = 1.5  # BM25 term saturation
    b: float = 0.75  # BM25 length normalisation
    format: int = FORMAT_VERSION  # prompt/answer contract version

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Spec:
        """Read a recorded spec; an unknown key, a wrong type or another contract version is refused."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: retrieval settings must be a JSON object")
        names = {f.name: f.type for f in fields(cls)}
        bad = sorted(set(d) - set(names))
        if bad:
            raise UserError(f"{where}: unknown retrieval setting(s) {', '.join(bad)}; known: {', '.join(names)}")
        for key, val in d.items():
            want = float if names[key] in ("float", float) else int
            if not isinstance(val, (int, float)) or isinstance(val, bool) or (want is int and not isinstance(val, int)):
                raise UserError(f"{where}: retrieval setting '{key}' must be a number ({want.__name__}), got {val!r}")
        spec = cls(**d)
        if spec.format != FORMAT_VERSION:
            raise UserError(f"{where}: the model was tuned with retrieval prompt format {spec.format}, this runtime "
                            f"speaks format {FORMAT_VERSION}; rebuild the bundle with this edgeft version")
        if spec.k < 1 or spec.max_words < 0:
            raise UserError(f"{where}: retrieval k must be >= 1 and max_words >= 0, got k={spec.k} "
                            f"max_words={spec.max_words}")
        return spec


@dataclass(frozen=True)
class Judgement:
    status: str  # ANSWERED | UNVERIFIED | ABSTAINED | NOT_IN_MANUAL
    text: str  # the answer without its citation mark (ABSTAIN for the two abstentions)
    cited: Hit | None  # the passage the answer cites, when it names one that was retrieved
    missing: tuple[str, ...] = ()  # why not verified / not in manual: the tokens nowhere to be found

    @property
    def abstained(self) -> bool:
        return self.status in (ABSTAINED, NOT_IN_MANUAL)


class Grounder:
    """A manual indexed with `spec`: retrieval, the prompt, and the checks on an answer."""

    def __init__(self, manual_text: str, source: str, spec: Spec):
        self.spec = spec
        self.index = BM25(split_passages(manual_text, source, spec.max_words), k1=spec.k1, b=spec.b)

    def retrieve(self, question: str) -> list[Hit]:
        return self.index.search(question, k=self.spec.k)

    def messages(self, question: str, hits: list[Hit]) -> list[dict]:
        """The chat turns of a grounded question (the model's chat template renders them)."""
        return [{"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": user_turn(question, hits)}]

    def unsupported(self, question: str, hits: list[Hit]) -> tuple[str, ...]:
        """The question's identifiers that no retrieved passage contains (empty: the manual may answer it)."""
        have = set().union(*(_passage_tokens(h) for h in hits)) if hits else set()
        return tuple(t for t in identifiers(question) if t not in have)

    def fit(self, fmt, question: str, hits: list[Hit], room: int) -> tuple[list[int], list[Hit]]:
        """Prompt ids (rendered by `fmt`, a PromptFormatter) with as many passages as fit in `room` tokens:
        the last ones dropped first, the question never cut. With one passage left and still over `room`,
        that prompt comes back: the caller decides whether a shorter answer may do."""
        n = len(hits)
        while True:
            ids = fmt.prompt_ids(self.messages(question, hits[:n]))
            if len(ids) <= room or n <= 1:
                return ids, hits[:n]
            n -= 1

    def precheck(self, question: str, hits: list[Hit]) -> Judgement | None:
        """The abstention the runtime makes without the model: nothing retrieved, or an identifier of the
        question in no retrieved passage. None: ask the model."""
        missing = self.unsupported(question, hits)
        if missing or not hits:
            return Judgement(NOT_IN_MANUAL, ABSTAIN, None, missing)
        return None

    def judge(self, question: str, hits: list[Hit], answer: str, precheck: bool = True) -> Judgement:
        """What the runtime makes of the model's answer to a grounded prompt (the pre-check first, unless
        `precheck=False`: the model's own answer, judged alone)."""
        pre = self.precheck(question, hits) if precheck else None
        if pre is not None:
            return pre
        if is_abstention(answer):
            return Judgement(ABSTAINED, ABSTAIN, None)
        body, n = split_citation(answer)
        cited = hits[n - 1] if n is not None and 1 <= n <= len(hits) else None
        if cited is None:
            return Judgement(UNVERIFIED, body, None, ("citation",))
        lacking = unsupported_tokens(body, cited)
        return Judgement(UNVERIFIED if lacking else ANSWERED, body, cited, lacking)


def user_turn(question: str, hits: list[Hit]) -> str:
    lines = [f"[{i}] {h.passage.heading}: {h.passage.text}" if h.passage.heading else f"[{i}] {h.passage.text}"
             for i, h in enumerate(hits, 1)]
    return "Manual passages:\n" + "\n".join(lines or ["(none found)"]) + f"\n\nQuestion: {question}"


def target(answer: str, cite: int | None) -> str:
    """The answer a grounded model is tuned to give: the answer citing passage `cite`, or ABSTAIN."""
    return ABSTAIN if cite is None else f"{answer.strip()} [{cite}]"


def is_abstention(text: str) -> bool:
    return "manual does not cover" in " ".join(text.lower().split())


def split_citation(text: str) -> tuple[str, int | None]:
    """The answer without its citation marks, and the last passage number it cites (None: none)."""
    marks = _CITE.findall(text)
    return " ".join(_CITE.sub(" ", text).split()), (int(marks[-1]) if marks else None)


def identifiers(question: str) -> list[str]:
    """Identifier tokens of a question: codes, model and part numbers (words holding a digit, 3+ chars)."""
    out = []
    for word in _IDENT.findall(question):
        if any(c.isdigit() for c in word) and len(word) >= 3:
            out += [t for t in tokenize(word) if any(c.isdigit() for c in t) and t not in out]
    return out


def unsupported_tokens(answer: str, hit: Hit, share: float = 0.5) -> tuple[str, ...]:
    """Key tokens of `answer` the passage lacks: every token with a digit must be there, and at least
    `share` of its other content words; returns the missing ones when that fails (empty: supported)."""
    have = _passage_tokens(hit)
    toks = [t for t in tokenize(answer) if t not in STOPWORDS]
    digits = [t for t in toks if any(c.isdigit() for c in t)]
    words = [t for t in toks if t not in digits]
    missing_digits = [t for t in digits if t not in have]
    missing_words = [t for t in words if t not in have]
    if missing_digits or (words and len(missing_words) > (1 - share) * len(words)) or not toks:
        return tuple(missing_digits + missing_words) or ("empty answer",)
    return ()


def _passage_tokens(hit: Hit) -> set[str]:
    return set(tokenize(f"{hit.passage.heading} {hit.passage.text}"))


def oracle(index: BM25, question: str, answer: str, key: str | None = None) -> int | None:
    """The passage that answers `question`: the best-ranked one holding `key` when there is a key,
    else the one whose words cover most of the answer (F1 over content tokens); None when none does."""
    scores = index.scores(question)
    if key:
        k = " ".join(tokenize(key))
        cands = [i for i, toks in enumerate(index.tokens) if k in " ".join(toks)]
        return max(cands, key=lambda i: (scores[i], -i)) if cands else None
    ans = set(tokenize(answer))
    if not ans:
        return None
    best, best_f = None, 0.0
    for i, have in enumerate(index.text_tokens):
        common = len(ans & have)
        if common:
            f = 2 * common / (len(ans) + len(have))
            if f > best_f or (f == best_f and best is not None and scores[i] > scores[best]):
                best, best_f = i, f
    return best if best_f >= 0.3 else None
