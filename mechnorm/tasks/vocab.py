"""The one word-level vocabulary shared by every task, and its tokenizer.

Every word any task can produce is listed here, so token ids are fixed by this file:
special tokens first, then the task words in sorted order. The zoo models were trained on
these ids; changing a word list changes the ids and invalidates them (``tests/test_zoo.py``
checks that the shipped tokenizers still match).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Literal

PAD, BOS, EOS, UNK, CLS, MASK = "[PAD]", "[BOS]", "[EOS]", "[UNK]", "[CLS]", "[MASK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, CLS, MASK)

# --- agreement: nouns as (singular, plural), transitive verbs as (3sg, plural) ---
NOUNS = (
    ("key", "keys"), ("cabinet", "cabinets"), ("author", "authors"), ("dog", "dogs"),
    ("teacher", "teachers"), ("picture", "pictures"), ("book", "books"), ("car", "cars"),
    ("doctor", "doctors"), ("student", "students"), ("table", "tables"), ("window", "windows"),
    ("box", "boxes"), ("friend", "friends"), ("painting", "paintings"), ("manager", "managers"),
    ("girl", "girls"), ("boy", "boys"), ("farmer", "farmers"), ("house", "houses"),
    ("child", "children"), ("man", "men"), ("woman", "women"), ("song", "songs"),
)
VERBS = (
    ("likes", "like"), ("sees", "see"), ("owns", "own"), ("knows", "know"),
    ("finds", "find"), ("loves", "love"), ("helps", "help"),
)
PREPOSITIONS = ("to", "near", "behind", "on", "under", "beside", "with", "from", "of")
PREDICATES = ("old", "new", "red", "big", "small", "broken", "here", "there", "ready", "famous")
COPULAS = ("is", "are")  # singular, plural
AGREEMENT_WORDS = ("the", "that", ".", *COPULAS, *PREPOSITIONS, *PREDICATES, *(w for p in NOUNS + VERBS for w in p))

# --- key-value recall ---
KEYS = tuple("abcdefghijklmnopqrstuvwxyz")
VALUES = tuple(str(d) for d in range(10))
RECALL_WORDS = (*KEYS, *VALUES)

# --- sentiment lexicon ---
POSITIVE = ("good", "great", "excellent", "wonderful", "brilliant", "superb", "lovely", "fun")
NEGATIVE = ("bad", "awful", "terrible", "boring", "dull", "poor", "weak", "horrible")
NEUTRAL_ADJECTIVES = ("long", "short", "french", "recent", "modern", "quiet", "loud", "black", "white", "italian")
TOPICS = ("film", "movie", "plot", "acting", "story", "music", "cast", "ending", "script", "dialogue", "camera")
FILLERS = ("overall", "honestly", "frankly", "really", "quite")
LEXICON_WORDS = ("the", "was", "not", "and", *POSITIVE, *NEGATIVE, *NEUTRAL_ADJECTIVES, *TOPICS, *FILLERS)

TokenizerKind = Literal["lm", "cls"]


@lru_cache(maxsize=None)
def vocabulary() -> dict[str, int]:
    """Word -> id for the shared vocabulary (special tokens first, then sorted words).

    Example:
        >>> vocabulary()["[PAD]"], vocabulary()["is"] > 5
        (0, True)
    """
    words = sorted(set(AGREEMENT_WORDS) | set(RECALL_WORDS) | set(LEXICON_WORDS))
    return {word: i for i, word in enumerate((*SPECIAL_TOKENS, *words))}


def ids(words: Iterable[str]) -> list[int]:
    """Token ids of ``words``; a word outside the vocabulary is an error, not ``[UNK]``.

    Example:
        >>> ids(["the", "key"]) == [vocabulary()["the"], vocabulary()["key"]]
        True
    """
    vocab = vocabulary()
    try:
        return [vocab[w] for w in words]
    except KeyError as err:
        raise KeyError(f"{err.args[0]!r} is not in the task vocabulary (mechnorm/tasks/vocab.py).") from None


def token_id(word: str) -> int:
    """The id of one word or special token.

    Example:
        >>> token_id("[BOS]")
        1
    """
    return ids([word])[0]


def tokenizer(kind: TokenizerKind = "lm"):
    """A ``transformers`` fast tokenizer over the shared vocabulary.

    ``kind="lm"`` prepends ``[BOS]`` (its ``bos_token``); ``kind="cls"`` prepends ``[CLS]``
    (``bos_token`` and ``cls_token`` are both ``[CLS]``, so code that "prepends BOS" gets
    the classifier token). Words are split on whitespace; unknown words become ``[UNK]``.
    Save it next to a model with ``tokenizer(kind).save_pretrained(folder)``.

    Example:
        >>> tok = tokenizer("lm")
        >>> tok.decode(tok("the key is")["input_ids"])
        '[BOS] the key is'
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if kind not in ("lm", "cls"):
        raise ValueError(f"kind must be 'lm' or 'cls', got {kind!r}.")
    backend = Tokenizer(models.WordLevel(dict(vocabulary()), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS if kind == "lm" else CLS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        mask_token=MASK,
        add_bos_token=True,
        padding_side="right",
        model_max_length=64,
        # HookedEncoder.to_tokens reads token_type_ids; causal LMs take none.
        model_input_names=["input_ids", "attention_mask"] if kind == "lm" else ["input_ids", "token_type_ids", "attention_mask"],
    )
