"""Evaluation data (docs/datasets.md): corpora cut into windows of L tokens.

    validate_dataset(name, data_file)      # cheap; call before loading a model
    windows = load_windows(name, tokenizer, context_length, max_windows=16)

Stream corpora (enwiki-sample, brown, wikitext, c4, local files) are joined with "\n\n" and cut
into consecutive non-overlapping windows; book corpora (pd-books, pg19) are cut per book, the
tail of each book shorter than L being dropped. Windows hold text tokens and no EOS; they
start with a BOS token when the model's tokenizer puts one before every text (Gemma's).
"""
from pathlib import Path

from cabattn.checks import is_integer, lookup, positive_int

from ..cache import cache_dir as default_cache_dir
from ..hub import hub_reachable
from .corpora import (DATASETS, HUB_DATASETS, LOCAL_SUFFIXES, OFFLINE_DATASETS, PARSER_VERSION,
                      DatasetError, FetchError, hub_corpus, local_corpus, offline_corpus)
from .windows import (Windows, cached_tokens, cut_windows, leading_bos, source_key,
                      window_layout)

__all__ = ["DATASETS", "OFFLINE_DATASETS", "HUB_DATASETS", "LOCAL_SUFFIXES", "DatasetError",
           "FetchError", "Windows", "available_datasets", "check_data_file", "validate_dataset",
           "leading_bos", "load_windows"]


def available_datasets() -> tuple:
    """Every dataset name: the offline corpora first, then the hub ones (need network)."""
    return OFFLINE_DATASETS + HUB_DATASETS


def validate_dataset(name: str, data_file=None) -> None:
    """Raise DatasetError now, before any model is loaded, if name / data_file cannot work.

    With data_file the text comes from that file and name is only the label in the results.
    """
    if data_file is not None:
        if not isinstance(name, str) or not name.strip():
            raise DatasetError("a --data-file needs a dataset name to label its results")
        path = Path(data_file)
        if not path.is_file():
            raise DatasetError(f"data file {str(path)!r} does not exist")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DatasetError(f"data file {str(path)!r} must end in one of "
                               f"{', '.join(LOCAL_SUFFIXES)}")
        return
    lookup("dataset", name, dict.fromkeys(available_datasets()), error=DatasetError,
           hint=f"or give a local {'/'.join(LOCAL_SUFFIXES)} file with --data-file")
    if name in HUB_DATASETS and not hub_reachable():
        raise DatasetError(f"dataset {name!r} comes from the Hugging Face hub, which is "
                           f"unreachable from here; use an offline corpus "
                           f"({', '.join(OFFLINE_DATASETS)}; e.g. --datasets pd-books "
                           f"--max-windows 8) or a local file with --data-file")


def check_data_file(name: str, data_file, text_field: str = "text") -> None:
    """Read and parse a --data-file as the run will (DatasetError naming the file and line),
    so that its problems surface before any model is loaded."""
    validate_dataset(name, data_file)
    local_corpus(name, Path(data_file), text_field)


def load_windows(name: str, tokenizer, context_length: int, max_windows=None, data_file=None,
                 text_field: str = "text", cache_dir=None) -> Windows:
    """The windows of L = context_length tokens of a dataset (max_windows evenly spaced), each
    starting with the tokenizer's BOS token when it puts one before a text.

    The first call for a corpus fetches/parses it and tokenises it (cached); later calls for
    the same tokenizer, at any L, read the cached tokens.
    """
    validate_dataset(name, data_file)
    if not is_integer(context_length) or context_length < 2:
        raise DatasetError(f"context length {context_length!r} must be an integer >= 2")
    if max_windows is not None and positive_int(max_windows):
        raise DatasetError(f"max_windows {max_windows!r} must be a positive integer or None")
    root = default_cache_dir(cache_dir)
    if data_file is not None:
        path = Path(data_file).resolve()
        stat = path.stat()
        key = f"file-{path.stem}-" + source_key(str(path), stat.st_size, stat.st_mtime_ns,
                                                text_field)
        loader = lambda: local_corpus(name, path, text_field)  # noqa: E731
    elif name in OFFLINE_DATASETS:
        key = f"{name}-v{PARSER_VERSION}"
        loader = lambda: offline_corpus(name, root)  # noqa: E731
    else:
        key = name
        loader = lambda: hub_corpus(name)  # noqa: E731
    ids, byte_ends, text_lengths, metadata = cached_tokens(loader, key, tokenizer,
                                                           root / "tokens")
    bos = leading_bos(tokenizer)
    input_ids, window_byte_ends, total = cut_windows(ids, byte_ends, text_lengths,
                                                     context_length, max_windows, bos)
    if total == 0:
        raise DatasetError(f"dataset {name!r} has no window of {context_length} tokens (its "
                           f"longest text has {int(text_lengths.max(initial=0))}); use a "
                           "shorter context length")
    return Windows(input_ids=input_ids, byte_ends=window_byte_ends, dataset=name,
                   description=f"{metadata['description']}; {window_layout(context_length, bos)}",
                   num_documents=int(metadata["num_documents"]), corpus_windows=total,
                   bos_token_id=bos)
