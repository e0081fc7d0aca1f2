"""64 varied sentences (short, long, punctuation, unicode) for embedding comparisons."""

from __future__ import annotations

_SUBJECTS = ["A man", "The committee", "Our new intern", "A small dog", "The Paris office", "Der Kunde",
             "La tormenta", "The quantum computer"]
_ACTIONS = ["is eating food in the park", "approved the budget after a long debate about priorities",
            "wrote unit tests for the batching queue", "barked at the delivery van!",
            "moved to a larger building near the river", "hat die Rechnung noch nicht bezahlt",
            "dejó sin luz a miles de hogares durante la noche", "factored a 2048-bit number (allegedly) — 🚀"]

SENTENCES: list[str] = [f"{s} {a}." if i % 3 else f"{s} {a}, and then " + " ".join(["more words"] * (i % 7 + 1))
                        for i, (s, a) in enumerate((s, a) for s in _SUBJECTS for a in _ACTIONS)]
assert len(SENTENCES) == 64
