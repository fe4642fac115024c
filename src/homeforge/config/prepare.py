"""The `prepare` stage's schema: inputs, cleaning, dedup, PII, augmentation, split, tokenizer, report."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, field_validator

from homeforge import paths
from homeforge.config.base import Section, encrypt_field


class InputFields(Section):
    """Which fields of structured inputs (.jsonl/.json/.csv/.tsv/.parquet) hold what."""

    text: str = Field("text", description="text field (kind text/classification)")
    label: str = Field("label", description="label field (kind classification)")
    image: str = Field("image", description="image path field (kind image-classification, CSV/JSONL inputs; relative "
                       "paths are read from the listing file's folder)")
    messages: str = Field("messages", description="chat messages field (OpenAI shape); alpaca/sharegpt fields are detected")
    id: str | None = Field(None, description="optional record id field (kept in the cleaned records)")
    missing_label: Literal["error", "drop"] = Field(
        "error", description="kind classification, a record without a label: error (stop, naming file and line, nothing "
                             "written) or drop (reason missing_label, listed in drops.jsonl)")


class CleanConfig(Section):
    """Normalisation and quality filters (docs/data.md); 0 or null switches a filter off."""

    unicode_form: Literal["NFKC_CJK", "NFKC", "NFC", None] = Field(
        "NFKC_CJK", description="Unicode normalisation: NFKC_CJK = NFKC but full-width punctuation/signs, the ideographic "
                                "space and ellipses kept as typed (full-width letters and digits still fold to ASCII)")
    strip_control: bool = Field(True, description="remove control characters and ANSI colour codes")
    strip_html: bool = Field(True, description="remove HTML tag remnants and unescape entities")
    remove_urls: bool = Field(False, description="remove URLs")
    collapse_whitespace: bool = Field(True, description="collapse runs of spaces and blank lines")
    min_chars: int = Field(20, ge=0, description="drop texts shorter than this (characters; a CJK character counts cjk_char_weight)")
    max_chars: int = Field(200_000, ge=0, description="drop texts longer than this (characters; 0 = no limit)")
    cjk_char_weight: float = Field(3.0, ge=1, le=10, description="characters one CJK character counts for in min_chars and short_line_chars")
    min_words: int = Field(3, ge=0, description="drop texts with fewer words (a CJK character is a word)")
    max_symbol_ratio: float | None = Field(0.3, ge=0, le=1, description="drop if more than this fraction are symbols (prose punctuation, CJK included, is text)")
    max_digit_ratio: float | None = Field(0.3, ge=0, le=1, description="drop if more than this fraction are digits")
    max_dup_line_fraction: float | None = Field(0.3, ge=0, le=1, description="drop if more than this fraction of lines repeat")
    max_top_ngram_fraction: float | None = Field(0.2, ge=0, le=1, description="drop if the most frequent word 3-gram (CJK: character cjk_ngram-gram) covers more than this fraction")
    cjk_ngram: int = Field(5, ge=2, le=20, description="character n-gram size of the repetition filter for CJK text")
    max_short_line_fraction: float | None = Field(0.7, ge=0, le=1, description="drop if more than this fraction of lines are short")
    short_line_chars: int = Field(10, ge=1, description="a line shorter than this is 'short' (characters; CJK weighted)")


class DedupConfig(Section):
    """Exact (normalised hash) and near-duplicate (MinHash LSH) removal; the first copy is kept."""

    exact: bool = Field(True, description="drop exact duplicates (after normalisation, case and spacing ignored)")
    near: bool = Field(True, description="drop near duplicates (MinHash LSH, datasketch)")
    threshold: float = Field(0.8, gt=0, lt=1, description="estimated Jaccard similarity above which two texts are near duplicates")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    ngram: int = Field(5, ge=1, description="word shingle size for spaced scripts")
    char_ngram: int = Field(2, ge=1, description="character shingle size for text that is mostly CJK (bigrams: most Chinese words are two characters)")
    seed: int = Field(1, description="MinHash seed")


def _pii_types() -> tuple[str, ...]:
    from homeforge.data.pii import TYPES

    return TYPES


class PIIConfig(Section):
    """PII desensitisation: detectors, user patterns and terms, placeholder or keyed pseudonym."""

    enabled: bool = Field(True, description="scrub personal data")
    types: list[str] = Field(
        default_factory=lambda: list(_pii_types()),
        description="built-in detectors to run (all by default; see docs/data.md for what each one finds)",
    )
    mode: Literal["placeholder", "pseudonym"] = Field(
        "placeholder", description="placeholder: <EMAIL>; pseudonym: <EMAIL_3f9a...>, HMAC-SHA256 keyed by a secret"
    )
    secret_env: str = Field("HOMEFORGE_PII_SECRET", validate_default=True,
                            description="environment variable holding the pseudonym secret, >= 16 characters (never logged)")
    patterns: dict[str, str] = Field(default_factory=dict, description="extra detectors as {TYPE: regex}")
    terms: list[str] = Field(default_factory=list, description="names/terms to replace (type NAME)")
    terms_file: str | None = Field(None, description="file with one name/term per line (type NAME)")

    @field_validator("types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        allowed = _pii_types()
        unknown = [t for t in v if t not in allowed]
        if unknown:
            hints = [h for t in unknown for h in difflib.get_close_matches(t.upper(), allowed, n=1)]
            raise ValueError(f"unknown PII type{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                             + (f" (did you mean {', '.join(map(repr, hints))}?)" if hints else "")
                             + f"; allowed: {', '.join(allowed)} (user detectors go in pii.patterns)")
        return v

    @field_validator("secret_env")
    @classmethod
    def _secret_present(cls, v: str, info) -> str:
        """pseudonym mode needs its secret: fail when the config is loaded, before any work."""
        if info.data.get("enabled", True) and info.data.get("mode") == "pseudonym":
            value = paths.env(v) or ""
            if len(value) < 16:
                state = "is not set" if not value else f"has only {len(value)} characters"
                raise ValueError(
                    f"pii.mode=pseudonym needs a secret of at least 16 characters in ${v}, and ${v} {state}; "
                    f"set it with: export {v}=$(python -c 'import secrets; print(secrets.token_hex(32))') "
                    "(keep it: the same secret gives the same pseudonyms), or use pii.mode=placeholder")
        return v


class AugmentConfig(Section):
    """EDA-style augmentation of the train split (off by default); seeded, reproducible."""

    enabled: bool = Field(False, description="add augmented copies of train records (kinds text, classification)")
    copies: int = Field(1, ge=1, le=16, description="augmented copies per train record")
    alpha: float = Field(0.1, gt=0, le=0.5, description="fraction of words each operation touches")
    ops: list[Literal["swap", "delete", "insert", "synonym"]] = Field(
        default_factory=lambda: ["swap", "delete", "insert", "synonym"], description="operations chosen from at random"
    )
    synonyms_file: str | None = Field(None, description="synonyms file: one group per line, words separated by commas or tabs")
    seed: int = Field(0, description="augmentation seed")


class SplitConfig(Section):
    """Deterministic split by content hash."""

    val: float = Field(0.05, ge=0, lt=0.5, description="validation fraction")
    test: float = Field(0.0, ge=0, lt=0.5, description="test fraction")
    salt: str = Field("", description="salt mixed into the split hash (change to draw another split)")


class PrepTokenizerConfig(Section):
    """Train a byte-level BPE on the train split, or reuse a model directory's tokenizer."""

    from_dir: str | None = Field(None, description="model or tokenizer directory whose tokenizer (and chat template) to use")
    vocab_size: int = Field(8192, ge=260, le=1_000_000, description="vocabulary size when training")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a merge")
    max_length: int | None = Field(None, ge=8, description="truncate chat/classification records to this many tokens")


class ReportConfig(Section):
    """Quality report thresholds."""

    min_class_fraction: float = Field(0.05, ge=0, lt=1, description="warn when a class has less than this fraction of records")
    max_class_loss: float = Field(0.3, ge=0, le=1, description="warn when filters and dedup drop more than this fraction of a class's records")
    corr_threshold: float = Field(0.95, gt=0, le=1, description="report numeric column pairs with |Pearson r| above this")
    max_named_errors: int = Field(200, ge=1, description="bad files/lines named individually in the report")


class ImagePrepConfig(Section):
    """Kind image-classification: decode check, metadata stripping, near-dedup, training shards."""

    size: int = Field(64, ge=8, le=1024, description="side of the square uint8 copies in the training shards")
    near_dedup: bool = Field(True, description="drop near-duplicate images (perceptual hash)")
    phash_distance: int = Field(4, ge=0, le=32, description="near-duplicate: at most this many of 64 pHash bits differ")
    shard_size: int = Field(4096, ge=1, description="images per .npy shard")
    thumbnails: int = Field(8, ge=0, le=32, description="thumbnails per class in the report's grid")


class PrepareConfig(Section):
    """Data preparation: ingest -> clean -> PII scrub -> dedup -> report -> split -> tokenize."""

    inputs: list[str] = Field(default_factory=list, description="files, folders or globs; 'builtin:stdlib-docstrings' for the built-in corpus")
    output_dir: str = Field("homeforge-runs/data", description="dataset artifact directory")
    kind: Literal["text", "chat", "classification", "image-classification"] = Field("text", description="dataset kind")
    fields: InputFields = Field(default_factory=InputFields)
    encodings: list[str] = Field(
        default_factory=lambda: ["utf-8"], description="encodings tried in order for text files (a BOM is always honoured)"
    )
    max_builtin_chars: int = Field(2_500_000, ge=10_000, description="characters taken from a builtin corpus")
    encrypt: bool = encrypt_field("the dataset's records and token shards")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    image: ImagePrepConfig = Field(default_factory=ImagePrepConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenizer: PrepTokenizerConfig = Field(default_factory=PrepTokenizerConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    strict: bool = Field(False, description="stop at the first malformed line or unreadable file instead of counting it")
    workers: int | None = Field(None, ge=1, description="worker processes (default: CPU cores)")
