"""Tokenise a corpus once and cut it into evaluation windows of L tokens.

Tokens are cached per (corpus, tokenizer), not per L: the windows for any context length are
slices of the same token stream, so a context-length sweep tokenises each corpus once.
The cache is one safetensors file (token ids, per-token UTF-8 byte end offsets, tokens per
text) with the corpus description in its metadata.

A model whose tokenizer puts a BOS token before every text (Gemma's does, SmolLM2's does not)
gets windows that start with it, as it was trained: BOS and the next L - 1 text tokens
(docs/datasets.md, Windows). The cache holds text tokens only; the BOS is placed when windows
are cut, and the tokenizer's fingerprint, which covers its BOS rule, keys the cache.

Bytes: a window scores tokens 1..L-1. Its num_bytes is the UTF-8 length of the text those
tokens cover (token offsets from the fast tokenizer): from the end of token 0 to the end of
token L-1; behind a BOS, from the end of the text token before the window (the text's start
for its first window). Taken from end offsets, the spans of consecutive windows tile the text,
whitespace between tokens belongs to the token after it, and a byte split across tokens is
counted once.
"""
import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache import atomic_path
from .corpora import STREAM_SEPARATOR, Corpus, DatasetError


@dataclass
class Windows:
    input_ids: torch.Tensor  # LongTensor [n, L]
    byte_ends: np.ndarray  # int64 [n, L]: each token's UTF-8 end offset in its text
    dataset: str
    description: str  # the corpus, and whether each window starts with a BOS token
    num_documents: int
    corpus_windows: int  # windows the whole corpus gives at this L (before max_windows)
    bos_token_id: Optional[int] = None  # the token 0 of every window, or None: all text

    @property
    def num_bytes(self) -> list:
        """UTF-8 bytes of the text of each window's scored tokens 1..L-1."""
        return self.scored_bytes(1)

    def scored_bytes(self, first_token: int) -> list:
        """UTF-8 bytes of the text of each window's tokens first_token..L-1 (first_token >= 1:
        the text between the end of token first_token - 1 and the end of the window)."""
        return (self.byte_ends[:, -1] - self.byte_ends[:, first_token - 1]).tolist()


def leading_bos(tokenizer) -> Optional[int]:
    """The BOS id the tokenizer puts before a text, None when it puts none: decided by the
    tokenizer itself, as the model was trained."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("x").input_ids
    return bos if bos is not None and ids[:1] == [bos] else None


def window_layout(context_length: int, bos_token_id: Optional[int]) -> str:
    """What a window holds, for the description recorded with the windows."""
    if bos_token_id is None:
        return f"windows of {context_length} text tokens, no BOS"
    return (f"windows of the BOS token (id {bos_token_id}) and {context_length - 1} text "
            "tokens")


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would give other ids (vocab, merges, normalisation)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DatasetError(f"the tokenizer {type(tokenizer).__name__} is not a fast (Rust) "
                           "tokenizer; byte counts need its token offsets")
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def cached_tokens(corpus_loader, corpus_key: str, tokenizer, folder):
    """(ids int32, byte_ends int64, tokens per text, metadata), tokenising on the first call.

    corpus_loader() is called only on a cache miss, so a cached corpus is never read.
    """
    path = folder / f"{corpus_key}-{tokenizer_fingerprint(tokenizer)}.safetensors"
    if not path.is_file():
        corpus = corpus_loader()
        ids, byte_ends, lengths = _tokenize(corpus, tokenizer)
        metadata = {"dataset": corpus.name, "description": corpus.description,
                    "num_documents": str(len(corpus.documents))}
        with atomic_path(path) as tmp:
            save_file({"ids": torch.from_numpy(ids), "byte_ends": torch.from_numpy(byte_ends),
                       "text_lengths": torch.from_numpy(lengths)}, str(tmp), metadata=metadata)
    with safe_open(str(path), framework="np") as stored:
        return (stored.get_tensor("ids"), stored.get_tensor("byte_ends"),
                stored.get_tensor("text_lengths"), stored.metadata())


def _tokenize(corpus: Corpus, tokenizer):
    texts = corpus.documents if corpus.per_document else [STREAM_SEPARATOR.join(corpus.documents)]
    all_ids, all_ends, lengths = [], [], []
    for text in texts:
        # No BOS/EOS: a window is a plain slice of running text, the same for every method.
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                            return_attention_mask=False, verbose=False)
        char_ends = np.array([end for _, end in encoded["offset_mapping"]], dtype=np.int64)
        all_ids.append(np.asarray(encoded["input_ids"], dtype=np.int32))
        all_ends.append(_char_to_byte_offsets(text)[char_ends])
        lengths.append(len(char_ends))
    return (np.concatenate(all_ids), np.concatenate(all_ends),
            np.asarray(lengths, dtype=np.int64))


def _char_to_byte_offsets(text: str) -> np.ndarray:
    """offsets[i] = UTF-8 length of text[:i], for i in 0..len(text)."""
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def cut_windows(ids, byte_ends, text_lengths, context_length: int, max_windows=None,
                bos_token_id=None):
    """(input_ids [n, L], each token's UTF-8 end offset [n, L], windows in the whole corpus)
    for non-overlapping windows inside each text; max_windows takes that many evenly spaced
    over the corpus. With bos_token_id, a window is that token and L - 1 text tokens, all of
    them scored (the BOS token's end offset is where the first text token's text begins)."""
    text_tokens = context_length - (bos_token_id is not None)
    starts, text_starts = [], []
    text_start = 0
    for length in text_lengths.tolist():
        starts.extend(range(text_start, text_start + length - text_tokens + 1, text_tokens))
        text_starts.append(text_start)
        text_start += length
    starts = np.asarray(starts, dtype=np.int64)
    total = len(starts)
    if max_windows is not None and max_windows < total:
        # The middle of each of max_windows equal strata: spread over the whole corpus.
        starts = starts[((np.arange(max_windows) + 0.5) * total / max_windows).astype(np.int64)]
    offsets = starts[:, None] + np.arange(text_tokens)
    input_ids = torch.from_numpy(ids[offsets].astype(np.int64))
    ends = byte_ends[offsets]
    if bos_token_id is None:
        return input_ids, ends, total
    # Every text token is scored: its text begins where the token before it ends, or at the
    # start of its text (byte offsets count from each text's start).
    begins = np.where(np.isin(starts, text_starts), 0, byte_ends[np.maximum(starts - 1, 0)])
    bos = torch.full((len(starts), 1), bos_token_id, dtype=torch.long)
    return (torch.cat([bos, input_ids], dim=1),
            np.concatenate([begins[:, None], ends], axis=1), total)


def source_key(*parts) -> str:
    """A short file-name-safe key for a corpus source (name, file identity, text field)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
