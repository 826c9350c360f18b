"""eval.data: the offline corpora (fetched once into the cache folder with the registries' own
clients, then parsed), windows, the token cache, local files and bad inputs.

The first run on a machine fetches and parses the three corpora and tokenises them (a few
minutes); every later run reads the cache folder ($CABATTN_CACHE or ~/.cache/cabattn).
"""
import copy
import hashlib
import json
import re
import sys

import numpy as np
import pytest
import torch

from eval import data, models
from eval.cache import cache_dir
from eval.data.corpora import run_fetch_command
from eval.data.corpora import offline_corpus
from eval.data.windows import cut_windows, tokenizer_fingerprint

L = 256


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_model().tokenizer


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """SmolLM2's tokenizer made to put its BOS token (id 1) before every text, as Gemma's does."""
    changed = copy.deepcopy(tokenizer)
    changed.add_bos_token = True
    assert changed("x").input_ids[0] == changed.bos_token_id == 1
    return changed


@pytest.fixture(scope="module")
def corpora():
    return {name: offline_corpus(name, cache_dir()) for name in data.OFFLINE_DATASETS}


# ----------------------------------------------------------------------------- the corpora

def test_enwiki_sample_is_plain_article_text(corpora):
    corpus = corpora["enwiki-sample"]
    assert not corpus.per_document
    assert 90 <= len(corpus.documents) <= 110  # the dump's main-namespace, non-redirect pages
    text = "\n\n".join(corpus.documents)
    assert len(text.split()) > 400_000
    assert corpus.documents[0].startswith("Anarchism\n\n")
    assert not any(doc.startswith("AccessibleComputing") for doc in corpus.documents)  # redirect
    for markup in ("{{", "}}", "<ref", "</ref>", "[[Category:", "&nbsp;", "&quot;"):
        assert markup not in text, markup
    # Unbalanced markup in the dump (three tables, one image caption) makes the parser leave
    # those few spans as text; nothing more.
    for markup in ("[[", "thumb|", "[[File:", "'''"):
        assert text.count(markup) < 10, markup


def test_pd_books_are_the_seven_books_without_gutenberg_matter(corpora):
    corpus = corpora["pd-books"]
    assert corpus.per_document and len(corpus.documents) == 7
    titles = ["SENSE AND SENSIBILITY", "PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA",
              "NORTHANGER ABBEY", "Persuasion", "MOBY DICK; OR THE WHALE"]
    for title, book in zip(titles, corpus.documents):
        assert book.startswith(title), book[:80]
        assert 400_000 < len(book) < 1_300_000
        # Moby Dick's transcriber's notes (part of the etext) may name Project Gutenberg,
        # but nothing of its header, footer or licence is left.
        for matter in ("*** START", "*** END", "End of Project", "Gutenberg-tm", "LICENSE"):
            assert matter not in book, matter
        assert "\r" not in book
    assert corpus.documents[-1].rstrip().endswith("only found another\norphan.")


def test_brown_is_500_detokenised_documents(corpora):
    corpus = corpora["brown"]
    assert not corpus.per_document and len(corpus.documents) == 500
    text = "\n\n".join(corpus.documents)
    assert 950_000 < len(text.split()) < 1_100_000  # about a million words
    assert corpus.documents[0].startswith("The Fulton County Grand Jury said Friday an "
                                          "investigation of Atlanta's recent primary election "
                                          'produced "no evidence" that any irregularities')
    # No word/tag left (the text itself has a few slashes: "B.t.u./sq. ft.").
    assert not re.search(r"[A-Za-z.,]/(at|nn|nns|np|in|jj|vbd|cc|rb)(\s|$)", text)
    for leftover in ("``", "''", " ,", " .", ";;", "??", "!!", "Jr.."):
        assert leftover not in text, leftover


# ----------------------------------------------------------------------------- windows

@pytest.mark.parametrize("name", data.OFFLINE_DATASETS)
def test_windows_shape_and_bytes(name, tokenizer):
    windows = data.load_windows(name, tokenizer, L, max_windows=6)
    assert windows.input_ids.shape == (6, L) and windows.input_ids.dtype == torch.long
    assert windows.dataset == name and windows.description
    assert windows.num_documents == {"enwiki-sample": 106, "pd-books": 7, "brown": 500}[name]
    assert windows.corpus_windows > 1000
    # The bytes of the scored tokens 1..L-1; byte-level BPE decodes them exactly, barring a
    # character split at the window's first boundary.
    for ids, num_bytes in zip(windows.input_ids, windows.num_bytes):
        decoded = len(tokenizer.decode(ids[1:]).encode())
        assert abs(decoded - num_bytes) <= 3 and num_bytes >= L - 4


def test_max_windows_are_evenly_spaced_over_the_corpus(tokenizer):
    full = data.load_windows("brown", tokenizer, L)
    picked = data.load_windows("brown", tokenizer, L, max_windows=5)
    rows = {tuple(row.tolist()): i for i, row in enumerate(full.input_ids)}
    index = [rows[tuple(row.tolist())] for row in picked.input_ids]
    total = full.input_ids.shape[0]
    assert index == sorted(index) and len(set(index)) == 5
    stride = total / 5
    for k, i in enumerate(index):
        assert k * stride <= i < (k + 1) * stride  # one window in each fifth of the corpus
    assert picked.num_bytes == [full.num_bytes[i] for i in index]
    more = data.load_windows("brown", tokenizer, L, max_windows=10 * total)
    assert torch.equal(more.input_ids, full.input_ids)


def test_stream_windows_are_consecutive(tokenizer):
    windows = data.load_windows("enwiki-sample", tokenizer, L)
    text = "\n\n".join(offline_corpus("enwiki-sample", cache_dir()).documents)
    head = tokenizer(text[:20_000], add_special_tokens=False).input_ids
    assert windows.input_ids[:3].reshape(-1).tolist() == head[:3 * L]


def test_book_windows_never_cross_a_book():
    # Texts of 5, 3 and 9 tokens, L = 3: windows start at 0 | 5 | 8, 11, 14.
    ids = np.arange(17, dtype=np.int32)
    byte_ends = np.arange(17, dtype=np.int64) * 2 + 1
    input_ids, window_ends, total = cut_windows(ids, byte_ends, np.array([5, 3, 9]), 3)
    assert total == 5
    assert input_ids[:, 0].tolist() == [0, 5, 8, 11, 14]
    # the scored tokens 1..2 are two tokens of 2 bytes
    assert (window_ends[:, -1] - window_ends[:, 0]).tolist() == [4] * 5
    picked, _, _ = cut_windows(ids, byte_ends, np.array([5, 3, 9]), 3, max_windows=2)
    assert picked[:, 0].tolist() == [5, 11]  # the middles of the two halves (window 1 and 3)


def test_smollm2_windows_are_those_of_before_bos_handling(tokenizer):
    # Fingerprints of the windows the code gave before windows could start with a BOS token
    # (every pd-books window at L = 256, and 4 brown windows at L = 1024), ids and bytes.
    def fingerprint(windows):
        return (hashlib.sha256(windows.input_ids.numpy().tobytes()).hexdigest()[:16],
                hashlib.sha256(json.dumps(windows.num_bytes).encode()).hexdigest()[:16])

    books = data.load_windows("pd-books", tokenizer, 256)
    brown = data.load_windows("brown", tokenizer, 1024, max_windows=4)
    assert books.bos_token_id is None and "no BOS" in books.description
    assert books.input_ids.shape == (5123, 256)
    assert fingerprint(books) == ("2dea11b5f03994c8", "23707faba0b82ad7")
    assert fingerprint(brown) == ("ea6e40cc31cecbf7", "09e4cc413a3ad0d6")


def test_bos_windows_never_cross_a_book():
    # Texts of 5, 3 and 9 tokens, L = 3 behind a BOS (id 99): 2 text tokens a window, starting
    # at 0, 2 | 5 | 8, 10, 12, 14; every text token of a window is scored, from the end of the
    # token before it, or from its text's start (byte offsets start at 0 in every text).
    ids = np.arange(17, dtype=np.int32)
    byte_ends = np.concatenate([np.arange(1, 6), np.arange(1, 4), np.arange(1, 10)]) * 2
    input_ids, window_ends, total = cut_windows(ids, byte_ends, np.array([5, 3, 9]), 3,
                                                bos_token_id=99)
    num_bytes = (window_ends[:, -1] - window_ends[:, 0]).tolist()
    assert total == 7
    assert input_ids.tolist() == [[99, 0, 1], [99, 2, 3], [99, 5, 6], [99, 8, 9],
                                  [99, 10, 11], [99, 12, 13], [99, 14, 15]]
    assert num_bytes == [4] * 7  # two tokens of 2 bytes, the first window's from byte 0
    picked, picked_ends, _ = cut_windows(ids, byte_ends, np.array([5, 3, 9]), 3,
                                         max_windows=2, bos_token_id=99)
    picked_bytes = (picked_ends[:, -1] - picked_ends[:, 0]).tolist()
    assert picked[:, 1].tolist() == [2, 12] and picked_bytes == [4, 4]  # windows 1, 5


def test_bos_windows_of_a_real_tokenizer(tokenizer, bos_tokenizer, corpora, tmp_path):
    """A tokenizer that puts a BOS before a text gets windows of BOS and L - 1 text tokens,
    consecutive, all scored; the plain tokenizer's windows of the same file stay L text
    tokens. The two are cached under different keys: the fingerprint covers the BOS rule."""
    text = "\n\n".join(corpora["brown"].documents[:3])
    path = tmp_path / "three.txt"
    path.write_text(text, encoding="utf-8")
    assert tokenizer_fingerprint(bos_tokenizer) != tokenizer_fingerprint(tokenizer)
    plain = data.load_windows("mine", tokenizer, 64, data_file=path, cache_dir=tmp_path)
    windows = data.load_windows("mine", bos_tokenizer, 64, data_file=path, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokens").iterdir())) == 2
    ids = tokenizer(text, add_special_tokens=False).input_ids
    count = len(ids) // 63
    assert windows.bos_token_id == 1 and windows.input_ids.shape == (count, 64)
    assert (windows.input_ids[:, 0] == 1).all()
    assert windows.input_ids[:, 1:].reshape(-1).tolist() == ids[:count * 63]
    assert "BOS token (id 1) and 63 text tokens" in windows.description
    assert plain.bos_token_id is None and "64 text tokens, no BOS" in plain.description
    assert plain.input_ids.reshape(-1).tolist() == ids[:len(ids) // 64 * 64]
    # The scored bytes tile the text from its first byte: byte-level BPE decodes exactly.
    covered = tokenizer.decode(ids[:count * 63]).encode()
    assert sum(windows.num_bytes) == len(covered)
    assert windows.num_bytes[0] == len(tokenizer.decode(ids[:63]).encode())


def test_cache_hit_gives_identical_ids_without_reading_the_corpus(tokenizer, monkeypatch):
    first = data.load_windows("pd-books", tokenizer, L, max_windows=4)

    def refuse(*args):
        raise AssertionError("a cached corpus was read again")

    monkeypatch.setattr(data, "offline_corpus", refuse)
    again = data.load_windows("pd-books", tokenizer, L, max_windows=4)
    assert torch.equal(first.input_ids, again.input_ids) and first.num_bytes == again.num_bytes
    # Another L reuses the same tokens: no second tokenisation either.
    longer = data.load_windows("pd-books", tokenizer, 2 * L, max_windows=4)
    assert longer.input_ids.shape == (4, 2 * L)


# ----------------------------------------------------------------------------- local files

def test_local_txt_and_jsonl_files(tokenizer, corpora, tmp_path):
    documents = corpora["brown"].documents[:3]
    txt = tmp_path / "three.txt"
    txt.write_text("\n\n".join(documents), encoding="utf-8")
    jsonl = tmp_path / "three.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": doc}) + "\n"
                             for i, doc in enumerate(documents)), encoding="utf-8")
    from_txt = data.load_windows("mine", tokenizer, 64, data_file=txt, cache_dir=tmp_path)
    from_jsonl = data.load_windows("mine", tokenizer, 64, data_file=jsonl, text_field="body",
                                   cache_dir=tmp_path)
    ids = tokenizer(txt.read_text(), add_special_tokens=False).input_ids
    assert from_txt.input_ids.reshape(-1).tolist() == ids[:len(ids) // 64 * 64]
    assert torch.equal(from_txt.input_ids, from_jsonl.input_ids)
    assert from_txt.num_bytes == from_jsonl.num_bytes
    with pytest.raises(data.DatasetError, match="no field 'text'.*id, body"):
        data.load_windows("mine", tokenizer, 64, data_file=jsonl, cache_dir=tmp_path)


def test_local_file_shorter_than_a_window(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    with pytest.raises(data.DatasetError, match="no window of 64 tokens"):
        data.load_windows("short", tokenizer, 64, data_file=short, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- bad inputs

def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(data.DatasetError) as error:
        data.validate_dataset("wikitext-7")
    assert "wikitext-7" in str(error.value)
    for name in data.available_datasets():
        assert name in str(error.value)


@pytest.mark.parametrize("name", data.HUB_DATASETS)
def test_hub_dataset_while_offline_names_the_alternatives(name, monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    with pytest.raises(data.DatasetError) as error:
        data.validate_dataset(name)
    message = str(error.value)
    assert name in message and "--data-file" in message
    assert all(offline in message for offline in data.OFFLINE_DATASETS)


def test_bad_data_files(tmp_path):
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.validate_dataset("mine", data_file=tmp_path / "missing.txt")
    csv = tmp_path / "table.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(data.DatasetError, match=r"\.txt, \.jsonl, \.parquet"):
        data.validate_dataset("mine", data_file=csv)


@pytest.mark.parametrize("kwargs, message", [({"context_length": 1}, "context length 1"),
                                             ({"max_windows": 0}, "max_windows 0")])
def test_bad_sizes(kwargs, message, tmp_path):
    arguments = {"name": "brown", "tokenizer": None, "context_length": 64, **kwargs}
    with pytest.raises(data.DatasetError, match=message):
        data.load_windows(**arguments)


def test_a_failed_fetch_names_its_command_and_output(tmp_path):
    command = [sys.executable, "-c", "import sys; print('no such package'); sys.exit(3)"]
    with pytest.raises(data.FetchError) as error:
        run_fetch_command(command, tmp_path)
    assert "exited 3" in str(error.value) and "no such package" in str(error.value)
    assert "sys.exit(3)" in str(error.value)


def test_hub_sources_are_joined_as_the_spec_says(tokenizer, monkeypatch, tmp_path):
    """The hub is unreachable here: a stand-in for datasets.load_dataset checks what we ask
    for and how the rows are joined (wikitext and c4 one stream, pg19 one document a book)."""
    import datasets

    asked = []
    line = "The quick brown fox jumps over the lazy dog and runs back home again. " * 10

    def fake_load_dataset(path, *args, **kwargs):
        asked.append((path, args, kwargs))
        return datasets.Dataset.from_dict({"text": [f"{i} {line}" for i in range(1200)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    rows = [f"{i} {line}" for i in range(1200)]
    L = 128
    for name, joined in (("wikitext-2", ["\n\n".join(rows)]), ("c4", ["\n\n".join(rows[:1000])]),
                         ("pg19", rows)):
        windows = data.load_windows(name, tokenizer, L, cache_dir=tmp_path)
        expected = []
        for text in joined:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            expected.extend(ids[start:start + L] for start in range(0, len(ids) - L + 1, L))
        assert windows.input_ids.tolist() == expected, name
    assert asked[0][:2] == ("Salesforce/wikitext", ("wikitext-2-raw-v1",))
    assert asked[0][2]["split"] == "test"
    assert asked[1][0] == "allenai/c4"
    assert asked[1][2]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert asked[2][0] == "deepmind/pg19" and asked[2][2]["split"] == "test"
