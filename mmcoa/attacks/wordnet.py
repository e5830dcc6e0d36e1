"""WordNet 3.0 synonyms, read offline (a candidate source of the word attack).

Data: the Debian packages wordnet-base (``data.*``, ``index.*``, ``*.exc`` under /usr/share/wordnet)
and wordnet-sense-index (``index.sense``), read with nltk's ``WordNetCorpusReader``. nltk reads a
corpus only from a root under one of its data folders (``NLTK_DATA``; symlinks are resolved, so the
files are copied, not linked) that also holds a ``lexnames`` file, which Debian does not ship: it is
written here from the table of lexicographer files documented in WordNet's lexnames(5).
The copy lives in ``$MMCOA_DATA`` (default ``~/.cache/mmcoa``) ``/nltk_data/corpora/wordnet``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from functools import lru_cache
from pathlib import Path

from mmcoa.data.registry import default_root

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = (
    "data.adj", "data.adv", "data.noun", "data.verb",
    "index.adj", "index.adv", "index.noun", "index.verb", "index.sense",
    "adj.exc", "adv.exc", "noun.exc", "verb.exc",
)

# lexnames(5): file number, name; the syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb)
# follows from the name's prefix.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class WordNetMissing(ValueError):
    """WordNet's files are not installed; the message says how to install them."""


def lexnames_text() -> str:
    return "".join(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def cache_root() -> Path:
    """The nltk data folder of the copy: ``nltk_data`` under the project's data root."""
    return default_root() / "nltk_data"


def prepare_corpus(source: Path = WORDNET_DIR, data_root: Path | None = None) -> Path:
    """Copy WordNet's files (once) and write ``lexnames`` into ``<data_root>/corpora/wordnet``."""
    missing = [f for f in WORDNET_FILES if f != "index.sense" and not (source / f).is_file()]
    if missing:
        raise WordNetMissing(
            f"WordNet not found ({source}/{missing[0]} is missing): run `apt-get install wordnet-base wordnet-sense-index`"
        )
    root = (data_root or cache_root()) / "corpora" / "wordnet"
    root.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:
        src, dst = source / name, root / name
        if src.is_file() and (not dst.is_file() or dst.stat().st_size != src.stat().st_size):
            tmp = dst.with_suffix(dst.suffix + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    lex = root / "lexnames"
    if not lex.is_file() or lex.read_text() != lexnames_text():
        lex.write_text(lexnames_text())
    return root


@lru_cache(maxsize=1)
def load_wordnet():
    """nltk's WordNet reader over the prepared copy (loaded once per process).

    The reader skips nltk's map from another WordNet version's synsets, which serves the multilingual
    (OMW) data only and would read index.sense twice (half the load time)."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise WordNetMissing("WordNet candidates need the package nltk: pip install nltk") from err

    class EnglishWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None

    root = prepare_corpus()
    data_root = str(root.parent.parent)
    if data_root not in nltk.data.path:
        nltk.data.path.append(data_root)
    with warnings.catch_warnings():  # "multilingual functions are not available": no OMW, as intended
        warnings.simplefilter("ignore", UserWarning)
        return EnglishWordNet(str(root), None)


def synonyms(word: str) -> list[str]:
    """Lemma names of every synset of ``word`` (all parts of speech), in WordNet's order, lowercase,
    multi-word lemmas with spaces; the word itself excluded."""
    wn = load_wordnet()
    w = word.lower()
    out: dict[str, None] = {}
    for synset in wn.synsets(w):
        for lemma in synset.lemma_names():
            name = lemma.replace("_", " ").lower()
            if name != w:
                out[name] = None
    return list(out)
