"""Tokenise a corpus once and cut it into evaluation windows of L tokens.

Tokens are cached per (corpus, tokenizer), not per L: the windows for any context length are
slices of the same token stream, so a context-length sweep tokenises each corpus once.
The cache is one safetensors file (token ids, per-token UTF-8 byte end offsets, tokens per
text) with the corpus description in its metadata.

Bytes: a window scores tokens 1..L-1. Its num_bytes is the UTF-8 length of the text those
tokens cover, from the end of token 0 to the end of token L-1 (token offsets from the fast
tokenizer). Taken from end offsets, the spans of consecutive windows tile the text, whitespace
between tokens belongs to the token after it, and a byte split across tokens is counted once.
"""
import hashlib
import json
from dataclasses import dataclass

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
    description: str
    num_documents: int
    corpus_windows: int  # windows the whole corpus gives at this L (before max_windows)

    @property
    def num_bytes(self) -> list:
        """UTF-8 bytes of the text of each window's scored tokens 1..L-1."""
        return self.scored_bytes(1)

    def scored_bytes(self, first_token: int) -> list:
        """UTF-8 bytes of the text of each window's tokens first_token..L-1 (first_token >= 1:
        the text between the end of token first_token - 1 and the end of the window)."""
        return (self.byte_ends[:, -1] - self.byte_ends[:, first_token - 1]).tolist()


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


def cut_windows(ids, byte_ends, text_lengths, context_length: int, max_windows=None):
    """(input_ids [n, L], each token's byte end offset [n, L], windows in the whole corpus)
    for non-overlapping windows inside each text; max_windows takes that many evenly spaced
    over the corpus."""
    starts = []
    text_start = 0
    for length in text_lengths.tolist():
        starts.extend(range(text_start, text_start + length - context_length + 1, context_length))
        text_start += length
    starts = np.asarray(starts, dtype=np.int64)
    total = len(starts)
    if max_windows is not None and max_windows < total:
        # The middle of each of max_windows equal strata: spread over the whole corpus.
        starts = starts[((np.arange(max_windows) + 0.5) * total / max_windows).astype(np.int64)]
    offsets = starts[:, None] + np.arange(context_length)
    input_ids = torch.from_numpy(ids[offsets].astype(np.int64))
    return input_ids, byte_ends[offsets], total


def source_key(*parts) -> str:
    """A short file-name-safe key for a corpus source (name, file identity, text field)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
