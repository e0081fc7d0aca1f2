"""Deterministic English-like corpus (stdlib only): the same seed gives the same sentences on any machine.

Copied from ../shared/bench/corpus.py so the repo is self-contained. `python bench/corpus.py --n 3 --print`.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys

DEFAULT_N = 2048
DEFAULT_SEED = 1234
MIN_WORDS = 10
MAX_WORDS = 60

_DET = ["the", "a", "this", "that", "every", "some", "our", "their", "each", "no"]
_ADJ = [
    "quick", "quiet", "large", "small", "ancient", "modern", "bright", "dark",
    "heavy", "light", "careful", "random", "public", "private", "local", "remote",
    "simple", "complex", "early", "late", "green", "cold", "warm", "busy", "empty",
    "strange", "familiar", "distant", "narrow", "broad", "steady", "fragile",
]
_NOUN = [
    "server", "river", "city", "engineer", "garden", "library", "protocol",
    "teacher", "window", "market", "mountain", "network", "report", "student",
    "kitchen", "train", "forest", "database", "painter", "harbor", "committee",
    "bridge", "storm", "village", "machine", "letter", "museum", "question",
    "battery", "journey", "signal", "planet", "contract", "recipe", "archive",
    "customer", "island", "theory", "sensor", "festival", "cluster", "model",
]
_VERB = [
    "builds", "moves", "reads", "writes", "measures", "crosses", "opens",
    "closes", "follows", "ignores", "repairs", "describes", "carries", "watches",
    "replaces", "explains", "collects", "sends", "receives", "protects", "tests",
    "visits", "computes", "encodes", "rejects", "improves", "loses", "finds",
]
_ADV = [
    "slowly", "quickly", "rarely", "often", "carefully", "silently", "badly",
    "happily", "suddenly", "eventually", "nearly", "always", "sometimes",
]
_PREP = ["near", "under", "behind", "across", "inside", "beyond", "before",
         "after", "without", "beside", "through", "around"]
_CONJ = ["and", "but", "while", "because", "although", "so", "until", "when"]


def _noun_phrase(r: random.Random) -> list[str]:
    words = [_DET[r.randrange(len(_DET))]]
    for _ in range(r.randrange(3)):
        words.append(_ADJ[r.randrange(len(_ADJ))])
    words.append(_NOUN[r.randrange(len(_NOUN))])
    if r.randrange(4) == 0:
        words += [_PREP[r.randrange(len(_PREP))], _DET[r.randrange(len(_DET))],
                  _NOUN[r.randrange(len(_NOUN))]]
    return words


def _clause(r: random.Random) -> list[str]:
    words = _noun_phrase(r)
    if r.randrange(3) == 0:
        words.append(_ADV[r.randrange(len(_ADV))])
    words.append(_VERB[r.randrange(len(_VERB))])
    words += _noun_phrase(r)
    if r.randrange(2) == 0:
        words += [_PREP[r.randrange(len(_PREP))], *_noun_phrase(r)]
    return words


def make_sentence(r: random.Random, target: int) -> str:
    words: list[str] = []
    while len(words) < target:
        if words:
            words.append(_CONJ[r.randrange(len(_CONJ))])
        words += _clause(r)
    words = words[:target]
    # avoid a dangling conjunction at the end (keeps the word count exact)
    if words[-1] in _CONJ:
        words[-1] = _NOUN[r.randrange(len(_NOUN))]
    s = " ".join(words)
    return s[0].upper() + s[1:] + "."


def make_corpus(n: int = DEFAULT_N, seed: int = DEFAULT_SEED,
                min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        target = min_words + r.randrange(max_words - min_words + 1)
        out.append(make_sentence(r, target))
    return out


def corpus_digest(sents: list[str]) -> str:
    return hashlib.sha256("\n".join(sents).encode()).hexdigest()[:16]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=DEFAULT_N)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--out", default=None, help="write one sentence per line")
    ap.add_argument("--print", action="store_true", help="print sentences to stdout")
    a = ap.parse_args(argv)
    sents = make_corpus(a.n, a.seed)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(sents) + "\n")
    if a.print:
        print("\n".join(sents))
    words = [len(s.split()) for s in sents]
    print(f"# n={len(sents)} seed={a.seed} words min/mean/max="
          f"{min(words)}/{sum(words)/len(words):.1f}/{max(words)} "
          f"sha256[:16]={corpus_digest(sents)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
