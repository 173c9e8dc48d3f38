"""`edgeft ask BUNDLE "question"`: verify the bundle, then answer with its runtime. Torch-free.

Retrieval modes: `grounded` (the default for a model tuned with retrieval, whose bundle records the
retriever settings) puts the k best manual passages into the prompt exactly as the model was tuned on
them (edgeft.runtime.grounding), abstains without asking the model when the question names an
identifier no passage holds, and checks the passage the answer cites; `prompt` puts the best-matching
passage into the prompt (as a system turn, rendered by the model's own chat template) and cites it;
`cite` (the default otherwise) answers from the model alone and cites the passage beside the answer so
the technician can check it; `off` does neither.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass

from edgeft.constants import BUNDLE_FILE
from edgeft.device.bundle import Bundle, open_runtime
from edgeft.errors import UserError
from edgeft.runtime.grounding import (
    ABSTAIN,
    ANSWERED,
    NOT_IN_MANUAL,
    UNVERIFIED,
    Grounder,
    Judgement,
)
from edgeft.runtime.retrieval import BM25, Hit, split_passages

RETRIEVAL_MODES = ("grounded", "prompt", "cite", "off")


@dataclass(frozen=True)
class Answer:
    text: str  # grounded: the answer without its citation mark, or the abstention
    hit: Hit | None  # the manual passage used or cited (grounded: the retrieved one the answer cites)
    tokens: int  # generated tokens (0: the runtime abstained without asking the model)
    seconds: float  # wall time of the generation
    judgement: Judgement | None = None  # grounded: what the runtime made of the answer
    hits: tuple[Hit, ...] = ()  # grounded: the passages in the prompt, numbered [1], [2], ... in this order
    question: str = ""

    @property
    def status(self) -> str | None:
        """grounding.ANSWERED | UNVERIFIED | ABSTAINED | NOT_IN_MANUAL; None outside grounded mode."""
        return self.judgement.status if self.judgement else None

    def render(self) -> str:
        """The answer and, when a passage was found, its citation (grounded: what was or was not verified)."""
        j = self.judgement
        if j is None:
            return self.text if self.hit is None else f"{self.text}\n  {_source(self.hit)}"
        if j.status == NOT_IN_MANUAL:
            why = (f"no passage mentions {', '.join(_as_written(self.question, j.missing))}" if j.missing
                   else "no passage matches the question")
            return f"{ABSTAIN.rstrip('.')} ({why})."
        if j.status == ANSWERED:
            return f"{j.text}\n  {_source(j.cited)}"
        if j.status == UNVERIFIED:
            if not j.text:
                why = "the model gave no answer"
            elif j.cited is None:
                why = "it cites none of the passages it was given"
            else:
                why = (f"the passage it cites ({j.cited.passage.citation()}) does not hold "
                       f"{', '.join(_as_written(j.text, j.missing))}")
            return f"{j.text}\n  [could not verify this answer against the manual: {why}]"
        return ABSTAIN


class Asker:
    """A bundle's runtime, prompt formatter and manual index, opened once for many questions."""

    def __init__(self, bundle: Bundle, retrieval: str | None = None, max_new_tokens: int | None = None,
                 threads: int | None = None):
        self.bundle = bundle
        self.retrieval = choose_mode(bundle, retrieval)
        self.fmt = bundle.formatter()  # from the verified bytes
        manual = bundle.manual_text()
        self.grounder = (Grounder(manual, bundle.spec["manual"], bundle.grounding_spec())
                         if self.retrieval == "grounded" else None)
        self.index = (BM25(split_passages(manual, bundle.spec["manual"]))
                      if self.retrieval in ("prompt", "cite") and manual else None)
        if self.grounder is None and self.index is None:
            self.retrieval = "off"
        self.max_new_tokens = max_new_tokens or bundle.spec["runtime"]["max_new_tokens"]
        self.rt = open_runtime(bundle, threads=threads)
        self.n_ctx = bundle.spec["runtime"]["n_ctx"]

    def ask(self, question: str, precheck: bool = True) -> Answer:
        """Answer one question (greedy), with the manual passage it used or cites. `precheck=False` asks a
        grounded model even about identifiers no retrieved passage holds (to measure the model's own
        abstention)."""
        if self.grounder is not None:
            return self._grounded(question, precheck)
        hit = None
        if self.index is not None:
            hits = self.index.search(question, k=1)
            hit = hits[0] if hits else None
        messages = [{"role": "user", "content": question}]
        if hit is not None and self.retrieval == "prompt":
            heading = f" ({hit.passage.heading})" if hit.passage.heading else ""
            messages.insert(0, {"role": "system", "content": f"Manual{heading}: {hit.passage.text}"})
        ids = self.fmt.prompt_ids(messages)
        budget = self.n_ctx - len(ids)
        if budget < 1:
            ids = ids[-(self.n_ctx // 2):]  # an over-long question keeps its end, next to "Answer:"
            budget = self.n_ctx - len(ids)
        t0 = time.perf_counter()
        gen = self.rt.generate(ids, min(self.max_new_tokens, budget))
        text = self.fmt.decode(gen.tokens).strip()
        return Answer(text=text, hit=hit, tokens=len(gen.tokens), seconds=time.perf_counter() - t0)

    def _grounded(self, question: str, precheck: bool) -> Answer:
        """Retrieve; abstain without the model when the manual cannot hold the answer; else ask and judge."""
        g = self.grounder
        hits = g.retrieve(question)
        pre = g.precheck(question, hits) if precheck else None
        if pre is not None:
            return Answer(ABSTAIN, None, 0, 0.0, judgement=pre, hits=tuple(hits), question=question)
        # as many passages as leave room for a whole answer; with one left, whatever room remains
        ids, hits = g.fit(self.fmt, question, hits, self.n_ctx - self.max_new_tokens)
        if len(ids) >= self.n_ctx:
            raise UserError(f"the question with its best manual passage is {len(ids)} tokens, over this bundle's "
                            f"{self.n_ctx}-token context (runtime.n_ctx in {BUNDLE_FILE}); ask a shorter question")
        t0 = time.perf_counter()
        gen = self.rt.generate(ids, min(self.max_new_tokens, self.n_ctx - len(ids)))
        j = g.judge(question, hits, self.fmt.decode(gen.tokens).strip(), precheck)
        return Answer(j.text, j.cited, len(gen.tokens), time.perf_counter() - t0, judgement=j, hits=tuple(hits),
                      question=question)

    def close(self) -> None:
        self.rt.close()
        self.bundle.close()


def choose_mode(bundle: Bundle, requested: str | None) -> str:
    """The retrieval mode: what was asked for, else `grounded` for a model tuned with retrieval and `cite`
    otherwise. `grounded` on a closed-book model is refused; another mode on a grounded one is an override."""
    tuned = bundle.grounding_spec()
    if requested is None:
        return "grounded" if tuned else "cite"
    if requested not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval {requested!r}; valid: {', '.join(RETRIEVAL_MODES)}")
    if requested == "grounded" and tuned is None:
        raise UserError(f"{bundle.path}: --retrieval grounded: this bundle's model was not tuned for retrieval "
                        f"({BUNDLE_FILE} records no retrieval settings); use --retrieval cite, prompt or off, or "
                        "export a model tuned with data.retrieval_k > 0")
    if tuned is not None and requested != "grounded":
        print(f"edgeft: warning: the model in {bundle.path} was tuned for grounded prompts ({tuned.k} manual "
              f"passages); --retrieval {requested} overrides that, expect answers unlike its tuning",
              file=sys.stderr)
    return requested


def repl(asker: Asker, stdin=None, stdout=None) -> int:
    """Interactive mode: one question per line until EOF, 'exit' or 'quit'; returns questions answered."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        print(f"{asker.bundle.spec['variant']['name']} ({asker.bundle.spec['profile']['name']} bundle); "
              "ask a question, Ctrl-D or 'exit' ends", file=stdout)
    n = 0
    while True:
        if interactive:
            print("? ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        q = line.strip()
        if q.lower() in ("exit", "quit"):
            break
        if not q:
            continue
        try:
            answer = asker.ask(q)
        except UserError as e:  # one question the bundle cannot take (too long): the session goes on
            print(f"edgeft: error: {e}", file=sys.stderr, flush=True)
            continue
        print(answer.render(), file=stdout, flush=True)
        n += 1
    return n


def _source(hit: Hit) -> str:
    return f"[source: {hit.passage.citation()}: \"{hit.passage.text}\"]"


def _as_written(text: str, tokens: tuple[str, ...]) -> list[str]:
    """Tokens as `text` spells them ('e965' -> 'E965'), else as they are."""
    out = []
    for t in tokens:
        m = re.search(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])", text, re.IGNORECASE)
        out.append(m.group(0) if m else t)
    return out
