"""Docstrings in the house style, rendered as written.

layerpar's docstrings are plain text (see /work/shared/STYLE.md): prose,
with tables of options whose continuation lines are indented under their
name, e.g.::

    Options (keyword-only):
      max_levels   1 = exact propagation
      cfactor      coarsening factor

reStructuredText would read such a table as a broken definition list.  This
hook (``autodoc-process-docstring``) keeps every block that is indented
under the line before it, with no blank line between, as a literal block:
the table is shown as it is written in the source.  Literal blocks the
docstring opens itself (a line ending in ``::``) are left as they are.
"""


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def literal_tables(lines):
    """``lines`` (a docstring, dedented) with each block indented under the
    line before it made a literal block.  Returns a new list."""
    out, i, n = [], 0, len(lines)
    while i < n:
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < n else ""
        if line.strip() and line.rstrip().endswith("::"):
            # a literal block of the docstring's own: copy it through
            out.append(line)
            i += 1
            base = _indent(line)
            while i < n and (not lines[i].strip() or _indent(lines[i]) > base):
                out.append(lines[i])
                i += 1
            continue
        if line.strip() and nxt.strip() and _indent(nxt) > _indent(line):
            base = _indent(line)
            text = line.rstrip()
            if text.endswith(":"):
                out.append(text + ":")      # "Options:" -> "Options::" (shown as one ':')
            else:
                out += [text, "", " " * base + "::"]
            out.append("")
            i += 1
            while i < n and (_indent(lines[i]) > base or
                             (not lines[i].strip() and i + 1 < n and lines[i + 1].strip()
                              and _indent(lines[i + 1]) > base)):
                out.append(lines[i])
                i += 1
            out.append("")
            continue
        out.append(line)
        i += 1
    return out


def process(app, what, name, obj, options, lines):
    lines[:] = literal_tables(lines)


def setup(app):
    # before napoleon (priority 500), which would read the tables as sections
    app.connect("autodoc-process-docstring", process, priority=400)
    return {"parallel_read_safe": True, "version": "1"}
