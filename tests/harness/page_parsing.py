"""The results page read back with the standard library's HTML parser: its tables (heading,
rows of cells with their text, link, mark and sort value), images, notes and section ids."""
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class ParsedCell:
    text: str = ""
    attrs: dict = field(default_factory=dict)
    href: str = ""
    bold: bool = False
    note: str = ""


@dataclass
class ParsedTable:
    caption: str = ""
    head: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # the note paragraphs right after it
    section: str = ""  # the id of the innermost section around it

    def column(self, name: str) -> list:
        i = self.head.index(name)
        return [row[i] for row in self.rows]


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images, self.paragraphs, self.sections = [], [], [], []
        self._stack = []  # open section ids
        self._table = self._cell = self._paragraph = self._last_table = None
        self._in = []  # open tags that collect text: caption, cell-note

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag != "p":  # a table's notes are the paragraphs right after it
            self._last_table = None
        if tag == "section":
            self._stack.append(attrs.get("id", ""))
            self.sections.append(attrs.get("id", ""))
        elif tag == "table":
            self._table = ParsedTable(section=self._stack[-1] if self._stack else "")
            self.tables.append(self._table)
        elif tag == "caption":
            self._in.append("caption")
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ParsedCell(attrs=attrs)
        elif tag == "a" and self._cell is not None:
            self._cell.href = attrs.get("href", "")
        elif tag == "b" and self._cell is not None:
            self._cell.bold = True
        elif tag == "div" and "cell-note" in attrs.get("class", ""):
            self._in.append("cell-note")
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "p":
            self._paragraph = {"class": attrs.get("class", ""), "text": ""}

    def handle_endtag(self, tag):
        if tag == "section":
            self._stack.pop()
        elif tag == "caption":
            self._in.remove("caption")
        elif tag == "div" and "cell-note" in self._in:
            self._in.remove("cell-note")
        elif tag in ("td", "th") and self._cell is not None:
            self._cell.text = self._cell.text.strip()
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._table is not None:
            if all(c.attrs.get("title") == "sort by this column" for c in self._row):
                self._table.head = [c.text for c in self._row]
            else:
                self._table.rows.append(self._row)
        elif tag == "table":
            self._last_table, self._table = self._table, None
        elif tag == "p" and self._paragraph is not None:
            self.paragraphs.append(self._paragraph)
            if self._paragraph["class"] == "note" and self._last_table is not None:
                self._last_table.notes.append(self._paragraph["text"])
            self._paragraph = None

    def handle_data(self, data):
        if "caption" in self._in and self._table is not None:
            self._table.caption += data
        elif "cell-note" in self._in and self._cell is not None:
            self._cell.note += data
        elif self._cell is not None:
            self._cell.text += data
        if self._paragraph is not None:
            self._paragraph["text"] += data


def parse_page(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return parser


def tables_in(page: PageParser, section_pattern: str) -> list:
    """The tables inside the sections whose id matches the pattern."""
    return [t for t in page.tables if re.fullmatch(section_pattern, t.section)]
