"""Text attacks: one greedy substitution engine behind a word-level ("word") and a character-level
("char") attack.

The engine (:func:`greedy_substitute`), for a batch of texts and a :class:`TextObjective`:

1. scores every clean text and, for word importance, every text with one editable word replaced by
   ``[UNK]`` -- all in ONE objective call; importance = loss(masked) - loss(clean);
2. walks each sample's positions in decreasing importance (at most ``max_positions``); in every round
   each unfinished sample offers all candidates for its next position, and the candidates of the whole
   batch are scored in ONE objective call (never one text at a time);
3. keeps the best candidate when it raises the loss; stops a sample when it is fooled, when its
   positions run out, or when the budget is used. An edit that would use the last unit of budget
   without fooling is not committed at once: the best such edit over the remaining positions is kept
   aside and applied at the end (so with a budget of one word the walk finds the best single
   substitution over all visited positions, with an early exit as soon as one fools).

Candidates for identical requests are computed once (a batch of class-template captions asks the masked
LM once per unique text), and the objectives encode each unique string once per call; scores stay per
sample (``owners``), so samples that share a text but not an objective state are attacked separately.

Words are whitespace-separated tokens; leading and trailing punctuation stay attached and untouched
("a photo of a t-shirt." -> the word "t-shirt", the suffix "."), and whitespace is preserved.
Stop words (a fixed English list in ``candidates.py``) are matched case-insensitively: they are never
edited and never offered as substitutes.

PROTECTION RULE (class names are the label). ``perturb(texts, objective, protected=...)`` takes the
words of the label set (evaluation passes the dataset's class-name words; multi-word names and hyphen
parts are split into words). Editing a class-name word, or turning a prompt into another class name or
a near-synonym of one, changes the label and is not an adversarial example. One rule holds for EVERY
text attack, enforced by :class:`TextAttack` rather than by each attack:

* a protected word is never edited, deleted or merged: :meth:`TextAttack.filters` makes it
  non-editable and rejects any candidate that is a protected word or is not a single word (a
  multi-word WordNet lemma would shift the words after it);
* :meth:`TextAttack.perturb` then checks every output against its input (:func:`label_words_kept`:
  the same number of words, and the same word at every position that holds a protected word in
  either text) and raises :class:`LabelChangeError` if an attack broke the rule, so a new attack
  cannot return a label change silently.

On top of that rule, "word" bans more substitutes: none of the plural/singular forms of a protected
word, and no word whose GloVe cosine to any protected word is >= ``protect_cos`` (default 0.65).
``protect_cos`` is separate from ``cos_threshold`` on purpose: in 50-d GloVe a cosine of 0.5 is
topical relatedness, not synonymy -- at 0.5 the Fashion-MNIST class names would ban 2458 words
including "photo" itself (0.53 to the class set) and "picture"; at 0.65 they still ban the plurals
and near-synonyms ("shirts", "t-shirts", "trousers", "pants", "sweater", "shoe", "sneakers", "boots",
"jacket"). With ``candidates="wordnet"``, no WordNet synonym of a protected word (nor its inflections)
is offered either ("bag" bans "handbag", "purse", "pocketbook"). "char" edits only the other words
(a typo of a class name is a label edit too: "5" -> "k" leaves the digits prompt naming no class).

With ``protected=None`` nothing is protected beyond stop words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from pydantic import Field, field_validator

from mmcoa.attacks.base import Attack, AttackParams, TextObjective, register_attack
from mmcoa.attacks.candidates import (
    STOP_WORDS,
    CandidateSource,
    CharEdits,
    GloveNeighbours,
    WordVectors,
    create_source,
    levenshtein,
    list_sources,
    load_word_vectors,
    match_case,
    split_token,
    word_variants,
)

MASK = "[UNK]"


class LabelChangeError(RuntimeError):
    """A text attack returned a prompt whose class-name words differ from the clean prompt's."""


class TextAttack(Attack):
    """Text attacks: ``perturb(texts [N], objective, protected=None) -> texts [N]``.

    Subclasses implement ``forward(texts, objective, protected)`` (``protected``: the lowercase
    protected words, :func:`protected_words`) and ``_filters(protected)``, their own word filters;
    they get the protection rule (module docstring) from :meth:`filters`. The template method
    ``perturb`` returns the texts unchanged for an empty batch or a zero budget, and checks every
    output against the rule.
    """

    kind = "text"

    def perturb(self, texts: list[str], objective: TextObjective, protected: Iterable[str] | None = None) -> list[str]:
        texts, prot = list(texts), protected_words(protected)
        out = super().perturb(texts, objective, protected=prot)
        broken = [(a, b) for a, b in zip(texts, out) if not label_words_kept(a, b, prot)]
        if broken:
            clean, adv = broken[0]
            raise LabelChangeError(f"attack '{self.name}' edited a class-name word: {clean!r} -> {adv!r}")
        return out

    def forward(self, texts: list[str], objective: TextObjective, protected: frozenset[str] = frozenset()) -> list[str]:
        raise NotImplementedError

    def unchanged(self, texts: list[str]) -> list[str]:
        return list(texts)

    def _filters(self, protected: frozenset[str]) -> tuple[Callable[[str], bool], Callable[[str, str], bool]]:
        """The attack's own ``(editable(word), accept(original, candidate))``."""
        raise NotImplementedError

    def filters(self, protected: Iterable[str] | None) -> tuple[Callable[[str], bool], Callable[[str, str], bool]]:
        """The attack's filters under the protection rule: a protected word is not editable, and a
        candidate is one word that is not a protected word."""
        prot = protected_words(protected)
        own_editable, own_accept = self._filters(prot)

        def editable(word: str) -> bool:
            return word.lower() not in prot and own_editable(word)

        def accept(orig: str, cand: str) -> bool:
            one_word = bool(cand) and not any(ch.isspace() for ch in cand)
            return one_word and cand.lower() not in prot and own_accept(orig, cand)

        return editable, accept


# --- texts as words --------------------------------------------------------------------------


class Words:
    """A text split on whitespace into words, each with its punctuation kept aside.

    ``cores`` are the editable words; ``render(cores)`` rebuilds the text with the original
    whitespace and punctuation around the (possibly replaced) words.
    """

    def __init__(self, text: str):
        self.text = text
        self.parts = re.split(r"(\s+)", text)
        self.slots: list[tuple[int, str, str]] = []  # (index into parts, prefix, suffix)
        self.cores: list[str] = []
        for i in range(0, len(self.parts), 2):
            prefix, core, suffix = split_token(self.parts[i])
            if core:
                self.slots.append((i, prefix, suffix))
                self.cores.append(core)

    def render(self, cores: list[str]) -> str:
        parts = list(self.parts)
        for (i, prefix, suffix), core in zip(self.slots, cores):
            parts[i] = prefix + core + suffix
        return "".join(parts)

    def replaced(self, j: int, word: str) -> str:
        cores = list(self.cores)
        cores[j] = word
        return self.render(cores)


def protected_words(protected: Iterable[str] | None) -> frozenset[str]:
    """Class names -> lowercase words: "ankle boot" -> {ankle, boot}; "t-shirt" -> {t-shirt, shirt}.
    Idempotent: the words of a set of protected words are that set."""
    out: set[str] = set()
    for name in protected or ():
        for token in str(name).lower().split():
            core = split_token(token)[1]
            if core:
                out.add(core)
                out.update(p for p in re.split(r"[-']", core) if len(p) >= 3)
    return frozenset(out)


def label_words_kept(clean: str, adv: str, protected: frozenset[str]) -> bool:
    """True when ``adv`` has as many words as ``clean`` and the same word at every position where
    either holds a protected word: no class-name word edited, deleted, merged or introduced."""
    a, b = Words(clean).cores, Words(adv).cores
    if len(a) != len(b):
        return False
    return all(x == y for x, y in zip(a, b) if x.lower() in protected or y.lower() in protected)


# --- the engine ------------------------------------------------------------------------------


_Request = tuple[tuple[str, ...], int]  # (the words the candidates are computed from, position)
_Edit = tuple[int, int, str, int]  # (sample, position, new word, new total cost)
_Scored = tuple[float, bool, str, int]  # (loss, fooled, new word, new total cost)


@dataclass
class _State:
    """One sample's walk: its current words, loss and cost, the positions left in this pass, and the
    look-ahead (the best edit that would use the last unit of budget, applied when the walk ends)."""

    doc: Words
    cores: list[str]
    loss: float
    queue: list[int]
    order: list[int]
    cost: int = 0
    passes_done: int = 0
    changed_in_pass: bool = False
    look: list[str] | None = None
    look_loss: float = float("-inf")
    done: bool = False

    def next_request(self, original_context: bool) -> _Request:
        """Take the next position; candidates come from the original or the current words."""
        j = self.queue.pop(0)
        words = self.doc.cores if original_context else self.cores
        return tuple(words), j

    def edits(self, j: int, cands: list[str], cost: Callable[[str, str], int], budget: int,
              restore_case: bool) -> Iterator[tuple[str, int, str]]:
        """(new word, new total cost, text) for each distinct candidate at ``j`` that changes the word
        and stays within the budget (the cost of a word is counted against its original form)."""
        current, orig = self.cores[j], self.doc.cores[j]
        base = self.cost - cost(orig, current)
        seen = set()
        for cand in cands:
            new = match_case(current, cand) if restore_case else cand
            if new == current or new in seen:
                continue
            new_cost = base + cost(orig, new)
            if new_cost > budget:
                continue
            seen.add(new)
            cores = list(self.cores)
            cores[j] = new
            yield new, new_cost, self.doc.render(cores)

    def update(self, j: int, best: _Scored | None, budget: int, passes: int) -> None:
        """Apply this round's best edit ``(loss, fooled, new word, new cost)`` at ``j``, if any: a fooling
        edit ends the walk; an improving one is committed, or kept aside if it uses the last unit of
        budget. Then end the pass when its positions are used up."""
        if best is not None:
            value, is_fooled, new, new_cost = best
            if is_fooled:
                self.cores[j], self.cost, self.loss, self.done = new, new_cost, value, True
                return
            if value > self.loss and value > self.look_loss:
                if new_cost >= budget:
                    self.look = list(self.cores)
                    self.look[j] = new
                    self.look_loss = value
                else:
                    self.cores[j], self.cost, self.loss = new, new_cost, value
                    self.look, self.look_loss, self.changed_in_pass = None, float("-inf"), True
        if not self.queue:
            self.end_pass(passes, budget)

    def end_pass(self, passes: int, budget: int) -> None:
        """Walk the positions again if passes and budget remain and the pass changed something;
        otherwise finish, applying the look-ahead if one was kept."""
        self.passes_done += 1
        if self.passes_done < passes and self.changed_in_pass and self.cost < budget:
            self.queue, self.changed_in_pass = list(self.order), False
        else:
            if self.look is not None:
                self.cores = self.look
            self.done = True


@dataclass
class EngineStats:
    """How the last run went: objective calls and texts scored (for tests and benchmarks)."""

    calls: int = 0
    texts: int = 0
    rounds: int = 0
    per_round: list[int] = field(default_factory=list)


def _score(objective: TextObjective, texts: list[str], owners: list[int], stats: EngineStats):
    out = objective(texts, torch.tensor(owners, dtype=torch.long))
    stats.calls += 1
    stats.texts += len(texts)
    loss = out.loss.detach().float().cpu().tolist()
    fooled = [False] * len(texts) if out.fooled is None else out.fooled.detach().cpu().bool().tolist()
    return loss, fooled


def _rank_positions(positions: list[int], masked_loss: list[float], max_positions: int | None) -> list[int]:
    """Editable positions by decreasing loss with the word masked (ties in text order), at most
    ``max_positions``: the clean loss is the same for every position, so this is importance order."""
    order = [j for _, _, j in sorted(zip((-v for v in masked_loss), range(len(masked_loss)), positions))]
    return order[:max_positions] if max_positions else order


def _initial_states(texts: list[str], objective: TextObjective, editable: Callable[[str], bool],
                    max_positions: int | None, stats: EngineStats) -> list[_State]:
    """Round 0: score the clean texts and every single-word [UNK] mask in ONE call, and start each
    sample's walk over its positions in importance order (done at once if fooled or nothing to edit)."""
    docs = [Words(t) for t in texts]
    positions = [[j for j, w in enumerate(d.cores) if editable(w)] for d in docs]
    call, owners = list(texts), list(range(len(texts)))
    for i, d in enumerate(docs):
        for j in positions[i]:
            call.append(d.replaced(j, MASK))
            owners.append(i)
    loss, fooled = _score(objective, call, owners, stats)
    states, at = [], len(texts)
    for i, d in enumerate(docs):
        order = _rank_positions(positions[i], loss[at : at + len(positions[i])], max_positions)
        at += len(positions[i])
        states.append(_State(d, list(d.cores), loss[i], list(order), order, done=fooled[i] or not order))
    return states


def _propose(source: CandidateSource, requests: list[_Request], k: int,
             accept: Callable[[str, str], bool]) -> dict[_Request, list[str]]:
    """Candidates per request, asking the source once per distinct request (in first-seen order)."""
    unique = list(dict.fromkeys(requests))
    return dict(zip(unique, source.propose(unique, k, accept)))


def _expand_candidates(states: list[_State], active: list[int], requests: list[_Request],
                       proposed: dict[_Request, list[str]], cost: Callable[[str, str], int], budget: int,
                       restore_case: bool) -> tuple[list[str], list[int], list[_Edit]]:
    """The round's texts to score, their owners, and the edit behind each, sample by sample."""
    call, owners, meta = [], [], []
    for i, req in zip(active, requests):
        j = req[1]
        for new, new_cost, text in states[i].edits(j, proposed[req], cost, budget, restore_case):
            call.append(text)
            owners.append(i)
            meta.append((i, j, new, new_cost))
    return call, owners, meta


def _best_per_sample(meta: list[_Edit], loss: list[float], fooled: list[bool]) -> dict[int, _Scored]:
    """Per sample, the best scored edit as ``(loss, fooled, new word, new cost)``: fooling first, then
    the highest loss; the first one wins a tie."""
    best: dict[int, tuple[tuple[bool, float], int]] = {}  # sample -> ((fooled, loss), index into meta)
    for r, (i, _, _, _) in enumerate(meta):
        key = (fooled[r], loss[r])
        if i not in best or key > best[i][0]:
            best[i] = (key, r)
    return {i: (loss[r], fooled[r], meta[r][2], meta[r][3]) for i, (_, r) in best.items()}


def greedy_substitute(
    texts: list[str],
    objective: TextObjective,
    *,
    source: CandidateSource,
    k: int,
    budget: int,
    cost: Callable[[str, str], int],
    editable: Callable[[str], bool],
    accept: Callable[[str, str], bool],
    max_positions: int | None = None,
    passes: int = 1,
    original_context: bool = True,
    restore_case: bool = True,
    stats: EngineStats | None = None,
) -> list[str]:
    """The greedy engine shared by every text attack (see the module docstring).

    Args:
        source: proposes candidates for (words, position) requests, batched.
        k: candidates per position.
        budget: the largest total ``cost`` allowed; ``cost(original word, new word)`` per word
            (1 for any change in word attacks, the edit distance in character attacks).
        editable: which original words may be edited.
        accept: the candidate filter handed to the source.
        passes: how many times a sample may walk its positions (character attacks edit a word again).
        original_context: candidates are computed from the original text (BERT-Attack) rather than
            from the current one.
        restore_case: give candidates the capitalisation of the word they replace.
    Returns the adversarial texts, in order.
    """
    stats = stats if stats is not None else EngineStats()
    if len(texts) == 0 or budget <= 0:
        return list(texts)
    states = _initial_states(texts, objective, editable, max_positions, stats)
    while active := [i for i, st in enumerate(states) if not st.done]:
        stats.rounds += 1
        requests = [states[i].next_request(original_context) for i in active]
        proposed = _propose(source, requests, k, accept)
        call, owners, meta = _expand_candidates(states, active, requests, proposed, cost, budget, restore_case)
        stats.per_round.append(len(call))
        loss, fooled = _score(objective, call, owners, stats) if call else ([], [])
        best = _best_per_sample(meta, loss, fooled)
        for i, (_, j) in zip(active, requests):
            states[i].update(j, best.get(i), budget, passes)
    return [st.doc.render(st.cores) for st in states]


# --- word substitution -----------------------------------------------------------------------


class WordParams(AttackParams):
    word_budget: int = Field(1, ge=0, description="Most words changed per text")
    candidates: str = Field("glove", description="Candidate source: glove | mlm | wordnet | char")
    k: int = Field(10, ge=1, description="Candidates per position")
    cos_threshold: float = Field(0.5, ge=-1, le=1, description="GloVe: least cosine of a neighbour")
    mlm_name: str = Field("bert-base-uncased", description="Masked LM (hub name or local dir) for mlm")
    max_positions: int | None = Field(None, ge=1, description="Most positions tried, by importance; None: all")
    min_word_cos: float | None = Field(None, ge=-1, le=1, description="Least GloVe cosine original/substitute")
    protect_cos: float | None = Field(0.65, ge=-1, le=1, description="Ban words this close to a protected word")

    @field_validator("candidates")
    @classmethod
    def _known_source(cls, name: str) -> str:
        if name not in list_sources():
            raise ValueError(f"unknown candidate source '{name}'; registered: {', '.join(list_sources())}")
        return name


@register_attack("word")
class WordSubstitution(TextAttack):
    """Greedy word substitution: BERT-Attack (Li et al., EMNLP 2020) with ``candidates="mlm"``, or
    TextFooler-style GloVe neighbours (Jin et al., AAAI 2020) with ``candidates="glove"``.

    Threat model: at most ``word_budget`` words of each text replaced, each by one of ``k``
    candidates (masked-LM predictions at the word's sub-word positions, or GloVe 6B-50d neighbours
    with cosine >= ``cos_threshold``); stop words and protected words are never edited, and protected
    words, their inflections and their GloVe neighbours (cosine >= ``protect_cos``) are never
    substitutes (module docstring). ``min_word_cos`` optionally requires a GloVe cosine between the
    original and the substitute (the similarity constraint, at word level: no sentence encoder is
    available offline). Importance: replacing a word by [UNK]. MMCoA's training attack is
    ``word_budget=1, k=10`` with bert-base-uncased and the embedding-KL objective.

    ``perturb(texts [N], objective, protected=None) -> texts [N]``.
    """

    Params = WordParams

    def __init__(self, **params):
        super().__init__(**params)
        self._source: CandidateSource | None = None
        self.stats = EngineStats()

    @property
    def source(self) -> CandidateSource:
        if self._source is None:
            p = self.params
            self._source = create_source(p.candidates, p)
        return self._source

    @source.setter
    def source(self, value: CandidateSource) -> None:
        self._source = value

    def _vectors(self) -> WordVectors:
        src = self._source
        if isinstance(src, GloveNeighbours):
            return src.vectors
        return load_word_vectors()

    def _filters(self, prot: frozenset[str]):
        p = self.params
        banned = set().union(*(word_variants(w) for w in prot)) if prot else set()
        for w in prot:  # the source's own equivalents of a class name (WordNet: its synonyms)
            banned.update(*(word_variants(r) for r in self.source.related(w)))
        vectors = self._vectors() if (p.min_word_cos is not None or (prot and p.protect_cos is not None)) else None
        prot_mat = None
        if vectors is not None and prot and p.protect_cos is not None:
            vecs = [vectors.vector(w) for w in prot]
            vecs = [v for v in vecs if v is not None]
            prot_mat = np.stack(vecs) if vecs else None
        near_cache: dict[str, bool] = {}

        def near_protected(word: str) -> bool:
            if prot_mat is None:
                return False
            if word not in near_cache:
                v = vectors.vector(word)
                near_cache[word] = v is not None and float((prot_mat @ v).max()) >= p.protect_cos
            return near_cache[word]

        def editable(word: str) -> bool:
            return word.lower() not in STOP_WORDS

        def accept(orig: str, cand: str) -> bool:
            c = cand.lower()
            if c == orig.lower() or c in STOP_WORDS or c in banned:
                return False
            if p.min_word_cos is not None:
                cos = vectors.cosine(orig, c)
                if cos is None or cos < p.min_word_cos:
                    return False
            return not near_protected(c)

        return editable, accept

    def is_identity(self) -> bool:
        return self.params.word_budget == 0

    def forward(self, texts: list[str], objective: TextObjective, protected: frozenset[str] = frozenset()) -> list[str]:
        p = self.params
        editable, accept = self.filters(protected)
        self.stats = EngineStats()
        return greedy_substitute(
            list(texts), objective, source=self.source, k=p.k, budget=p.word_budget,
            cost=lambda a, b: int(a != b), editable=editable, accept=accept,
            max_positions=p.max_positions, passes=1, original_context=True, restore_case=True, stats=self.stats,
        )

    def neighbourhood(self, text: str, protected: Iterable[str] | None = None) -> list[str]:
        """Every text one substitution away (same candidates and filters): for exhaustive search."""
        editable, accept = self.filters(protected)
        d = Words(text)
        requests = [(tuple(d.cores), j) for j, w in enumerate(d.cores) if editable(w)]
        out = []
        for (_, j), cands in zip(requests, self.source.propose(requests, self.params.k, accept)):
            out.extend(d.replaced(j, match_case(d.cores[j], c)) for c in cands)
        return list(dict.fromkeys(out))


# --- character edits -------------------------------------------------------------------------


class CharParams(AttackParams):
    char_budget: int = Field(1, ge=0, description="Most character edits per text (Levenshtein)")
    max_candidates: int | None = Field(100, ge=1, description="Edits tried per position; None: all")
    max_positions: int | None = Field(None, ge=1, description="Most words tried, by importance; None: all")
    seed: int = Field(0, description="Seed of the deterministic candidate sampling")


@register_attack("char")
class CharEdit(TextAttack):
    """Greedy character edits in the spirit of Charmer (Abad Rocamora et al., ICML 2024), the attack
    the LEAF robust text encoder trains against.

    Threat model: the total Levenshtein distance between each original word and its edited form,
    summed over the text, is at most ``char_budget``; an edit inserts, deletes or substitutes one
    lowercase letter; stop words and protected (class-name) words are not edited, and an edit that
    spells a protected word is rejected (the protection rule, module docstring). Each round offers,
    per word, up to ``max_candidates`` single edits of its current form (sampled deterministically
    with ``seed``); a word may be edited again in later passes while budget remains.

    ``perturb(texts [N], objective, protected=None) -> texts [N]``.
    """

    Params = CharParams

    def __init__(self, **params):
        super().__init__(**params)
        self.source = CharEdits(self.params.seed)
        self.stats = EngineStats()

    def _filters(self, prot: frozenset[str]):
        def editable(word: str) -> bool:
            return word.lower() not in STOP_WORDS

        def accept(orig: str, cand: str) -> bool:
            return True

        return editable, accept

    @property
    def _k(self) -> int:
        return self.params.max_candidates or 10**9

    def is_identity(self) -> bool:
        return self.params.char_budget == 0

    def forward(self, texts: list[str], objective: TextObjective, protected: frozenset[str] = frozenset()) -> list[str]:
        p = self.params
        editable, accept = self.filters(protected)
        self.stats = EngineStats()
        return greedy_substitute(
            list(texts), objective, source=self.source, k=self._k, budget=p.char_budget,
            cost=levenshtein, editable=editable, accept=accept, max_positions=p.max_positions,
            passes=max(1, p.char_budget), original_context=False, restore_case=False, stats=self.stats,
        )

    def neighbourhood(self, text: str, protected: Iterable[str] | None = None) -> list[str]:
        """Every text one character edit away (same sampling and filters)."""
        editable, accept = self.filters(protected)
        d = Words(text)
        requests = [(tuple(d.cores), j) for j, w in enumerate(d.cores) if editable(w)]
        out = []
        for (_, j), cands in zip(requests, self.source.propose(requests, self._k, accept)):
            out.extend(d.replaced(j, c) for c in cands)
        return list(dict.fromkeys(out))
