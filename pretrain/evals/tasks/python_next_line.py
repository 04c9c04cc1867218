"""Items of the python_next_line task, built from the embedded corpus's held-out source files.

The held-out split is the one the corpus builder uses (pretrain.data.embedded: a stable hash of
each file's path), so a model trained on the embedded corpus has never seen these files. Each
item: the `context_lines` lines before a line of code, the true line and three lines drawn from
other held-out files. Deterministic for a given seed and Python installation.
"""

from __future__ import annotations

import random
from typing import Any


def _is_code(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 8 and not stripped.startswith("#")


def build(num_items: int = 400, context_lines: int = 8, seed: int = 0, **_: Any):
    """A datasets.DatasetDict with one `test` split of multiple-choice items."""
    import datasets

    from pretrain.data.embedded import VAL_FRACTION, stdlib_documents
    from pretrain.data.text import is_validation

    files = [(doc_id, text.splitlines()) for doc_id, text in stdlib_documents()
             if doc_id.endswith(".py") and is_validation(doc_id, VAL_FRACTION)]
    if len(files) < 2:
        raise RuntimeError("python_next_line: fewer than two held-out source files in this Python installation")
    rng = random.Random(seed)
    pool = [(f, line) for f, (_, lines) in enumerate(files) for line in lines if _is_code(line)]
    positions = [(f, i) for f, (_, lines) in enumerate(files)
                 for i in range(context_lines, len(lines)) if _is_code(lines[i])]
    rng.shuffle(positions)
    items = []
    for f, i in positions[:num_items]:
        lines = files[f][1]
        truth = lines[i]
        distractors: list[str] = []
        while len(distractors) < 3:
            g, line = pool[rng.randrange(len(pool))]
            if g != f and line != truth and line not in distractors:
                distractors.append(line)
        choices = distractors + [truth]
        rng.shuffle(choices)
        items.append({"context": "\n".join(lines[i - context_lines:i]) + "\n", "choices": choices,
                      "label": choices.index(truth), "source": files[f][0]})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})
