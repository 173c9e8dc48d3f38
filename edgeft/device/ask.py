"""`edgeft ask BUNDLE "question"`: verify the bundle, then answer with its runtime. Torch-free.

Retrieval modes: `prompt` puts the best-matching manual passage into the prompt (as a system turn,
rendered by the model's own chat template) and cites it; `cite` answers from the model alone and
cites the passage beside the answer so the technician can check it; `off` does neither.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from edgeft.device.bundle import Bundle, open_runtime
from edgeft.runtime.retrieval import BM25, Hit, split_passages

RETRIEVAL_MODES = ("prompt", "cite", "off")


@dataclass(frozen=True)
class Answer:
    text: str
    hit: Hit | None  # the manual passage used or cited
    tokens: int  # generated tokens
    seconds: float  # wall time of the generation

    def render(self) -> str:
        """The answer and, when a passage was found, its citation."""
        if self.hit is None:
            return self.text
        return f"{self.text}\n  [source: {self.hit.passage.citation()}: \"{self.hit.passage.text}\"]"


class Asker:
    """A bundle's runtime, prompt formatter and manual index, opened once for many questions."""

    def __init__(self, bundle: Bundle, retrieval: str = "cite", max_new_tokens: int | None = None,
                 threads: int | None = None):
        if retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval {retrieval!r}; valid: {', '.join(RETRIEVAL_MODES)}")
        self.bundle = bundle
        self.fmt = bundle.formatter()  # from the verified bytes
        manual = bundle.manual_text()
        self.index = BM25(split_passages(manual, bundle.spec["manual"])) if retrieval != "off" and manual else None
        self.retrieval = retrieval if self.index else "off"
        self.max_new_tokens = max_new_tokens or bundle.spec["runtime"]["max_new_tokens"]
        self.rt = open_runtime(bundle, threads=threads)
        self.n_ctx = bundle.spec["runtime"]["n_ctx"]

    def ask(self, question: str) -> Answer:
        """Answer one question (greedy), with the manual passage it used or cites."""
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

    def close(self) -> None:
        self.rt.close()
        self.bundle.close()


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
        print(asker.ask(q).render(), file=stdout, flush=True)
        n += 1
    return n
