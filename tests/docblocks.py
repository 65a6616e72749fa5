"""The fenced code blocks of the README and the documentation pages, with
the markers that say how tests/test_examples.py runs them.

A marker is an HTML comment on the lines just before a block (invisible on
GitHub and in the built site)::

    <!-- illustration: why -->   not run (e.g. needs a cluster); also "not run:"
    <!-- file: PATH -->          written to PATH (in the page's sandbox), not run
    <!-- ranks: N -->            a Python block run under mpiexec -n N
    <!-- requires: NAME -->      skipped while ``layerpar`` has no attribute NAME

A Python block that imports mpi4py runs under ``mpiexec -n 2``; a bash
block runs as written (its commands name their own mpiexec).  Blocks
without a language, or of language ``text``, are listings.
"""
import os
import re
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")

MARKER = re.compile(r"^<!--\s*(illustration|not run|file|ranks|requires)\s*:?\s*(.*?)\s*-->\s*$")
RUNNABLE = ("bash", "python")
LISTINGS = ("", "text")


@dataclass
class Block:
    path: str            # relative to the source tree
    line: int            # of the opening fence
    lang: str
    code: str
    markers: dict = field(default_factory=dict)

    @property
    def where(self):
        return f"{self.path}:{self.line}"

    @property
    def first(self):
        return self.code.strip().splitlines()[0] if self.code.strip() else ""

    @property
    def skipped(self):
        """Why the block is not run (None: it is run or written)."""
        for key in ("illustration", "not run"):
            if key in self.markers:
                return f"{key}: {self.markers[key]}"
        return None

    def ranks(self):
        if "ranks" in self.markers:
            return int(self.markers["ranks"])
        return 2 if re.search(r"^\s*(from|import) mpi4py", self.code, re.M) else 1


def pages():
    """README.md and every Markdown page of docs/ (relative paths), sorted."""
    out = ["README.md"]
    for top, dirs, files in os.walk(DOCS):
        dirs[:] = sorted(d for d in dirs if not d.startswith("_"))
        out += sorted(os.path.relpath(os.path.join(top, f), ROOT)
                      for f in files if f.endswith(".md"))
    return out


def blocks(path):
    """[Block] of the page at ``path`` (relative to the source tree)."""
    out, inside, markers = [], None, {}
    with open(os.path.join(ROOT, path)) as fh:
        for number, line in enumerate(fh, 1):
            if inside is None:
                m = MARKER.match(line.strip())
                if m:
                    markers[m.group(1)] = m.group(2)
                elif line.startswith("```"):
                    lang = line[3:].strip()
                    inside = Block(path, number, lang, "", markers)
                    markers = {}
                elif line.strip():
                    markers = {}
            elif line.startswith("```"):
                out.append(inside)
                inside = None
            else:
                inside.code += line
    assert inside is None, f"{path}:{inside.line}: a code block that does not end"
    return out


def problems(block):
    """What is wrong with a block's markers (a list of sentences)."""
    out = []
    if block.lang.startswith("{"):
        return out  # a MyST directive (toctree, eval-rst, ...)
    if block.lang not in RUNNABLE + LISTINGS + ("toml",):
        out.append(f"{block.where}: a {block.lang!r} block (bash, python, toml or text)")
    if block.lang == "toml" and not (block.skipped or "file" in block.markers):
        out.append(f"{block.where}: a toml block is a file (<!-- file: PATH -->) or an "
                   "illustration")
    if "ranks" in block.markers and not block.markers["ranks"].isdigit():
        out.append(f"{block.where}: ranks: {block.markers['ranks']!r} is not a number")
    if block.lang in RUNNABLE and not block.skipped and not block.code.strip() \
            and "file" not in block.markers:
        out.append(f"{block.where}: an empty block")
    return out
