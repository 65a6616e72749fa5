"""The configuration reference, generated from the code.

``layerpar.config.DEFAULTS`` is the table of the keys of a configuration:
its sections, keys, default values, and (as comments in the source) what
each key means.  The directive ``config-reference`` renders it, with the
keys that apply only in some settings (``layerpar.config.APPLIES``) and the
choices of the string keys, so that the reference cannot drift from the
code: a key added to DEFAULTS appears here with the comment written beside
it.
"""
import inspect
import io
import tokenize

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

import layerpar.config as config


def key_comments():
    """{(section, key): comment} from the source of DEFAULTS: the comment on
    a key's line and the comment lines that follow it indented past the key
    (a continuation), then, in parentheses, a block of comment lines just
    before the key."""
    source = inspect.getsource(config)
    start = source.index("DEFAULTS = {")
    tokens = tokenize.generate_tokens(io.StringIO(source[start:]).readline)
    depth, section, current, pending, out = 0, None, None, [], {}
    last_line_with_code, key_column = 0, 0
    for tok in tokens:
        kind, text, (row, column), _, _ = tok
        if kind == tokenize.OP and text == "{":
            depth += 1
        elif kind == tokenize.OP and text == "}":
            depth -= 1
            if depth == 0:
                break
        elif kind == tokenize.STRING and depth in (1, 2):
            name = text.strip("\"'")
            # a key is a string followed by ':'; values are strings too
            nxt = next(tokens)
            if nxt.type == tokenize.OP and nxt.string == ":":
                if depth == 1:
                    section, current = name, None
                else:
                    current, key_column = (section, name), column
                    out[current] = ([], list(pending))  # (its own, the block before)
                    pending = []
                last_line_with_code = row
            else:
                last_line_with_code = row
        elif kind == tokenize.COMMENT:
            text = text.lstrip("#").strip()
            if row == last_line_with_code and current is not None:
                out[current][0].append(text)
            elif current is not None and not pending and out[current][0] and column > key_column:
                # a comment-only line indented past the key: the key's
                # comment goes on
                out[current][0].append(text)
            else:
                pending.append(text)
        elif kind not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            last_line_with_code = row
    return {k: " ".join(own + (["(" + " ".join(before) + ")"] if before else []))
            for k, (own, before) in out.items()}


def choices():
    """{(section, key): choices} of the string keys checked against a list."""
    from layerpar.data import KNOWN_DATASETS
    from layerpar.engine.pipeline import SCHEDULES as PIPELINE_SCHEDULES
    from layerpar.optim import LINE_SEARCHES
    from layerpar.steps import ACTIVATIONS, BIASES
    return {
        ("data", "name"): tuple(KNOWN_DATASETS) + ("files",),
        ("data", "dtype"): ("float32", "float64"),
        ("model", "kind"): ("dense", "conv"),
        ("model", "activation"): tuple(ACTIVATIONS),
        ("model", "bias"): tuple(BIASES),
        ("mgrit", "mode"): config.MODES,
        ("mgrit", "schedule"): tuple(PIPELINE_SCHEDULES),
        ("optim", "name"): config.OPTIMIZERS,
        ("optim", "schedule"): config.SCHEDULES,
        ("optim", "line_search"): tuple(LINE_SEARCHES),
        ("multilevel", "method"): config.MULTILEVEL_METHODS,
        ("multilevel", "prolong"): ("constant", "linear"),
        ("multilevel", "restrict"): ("injection", "full-weighting"),
    }


def rows():
    """[(section, [(key, default as TOML, description)])], in DEFAULTS'
    order."""
    comments, options = key_comments(), choices()
    out = []
    for section, values in config.DEFAULTS.items():
        keys = []
        for key, default in values.items():
            text = comments.get((section, key), "")
            if (section, key) in options:
                text += (" " if text else "") + "Choices: " + ", ".join(
                    f"``{c}``" for c in options[section, key]) + "."
            if (section, key) in config.APPLIES:
                decider, where = config.APPLIES[section, key]
                text += (" " if text else "") + f"Only with ``{decider}`` = " + " or ".join(
                    f'``"{w}"``' for w in where) + "."
            keys.append((key, config._toml_value(default), text))
        out.append((section, keys))
    return out


def _escape(text):
    # comments are plain text: keep '*' and '|' from becoming markup
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|")


class ConfigReference(Directive):
    """``.. config-reference::`` (MyST: ```` ```{config-reference} ````): a
    table per section of ``layerpar.config.DEFAULTS``."""
    has_content = False

    def run(self):
        lines = []
        for section, keys in rows():
            lines += [f".. rubric:: [{section}]", "",
                      ".. list-table::", "   :header-rows: 1", "   :widths: 22 18 60", "",
                      "   * - key", "     - default", "     - meaning"]
            for key, default, text in keys:
                text = " ".join(_escape(part) if i % 2 == 0 else f"``{part}``"
                                for i, part in enumerate(text.split("``")))
                lines += [f"   * - ``{key}``", f"     - ``{default}``",
                          f"     - {text or '–'}"]
            lines.append("")
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="layerpar/config.py"),
                                self.content_offset, container)
        return container.children


def setup(app):
    app.add_directive("config-reference", ConfigReference)
    return {"parallel_read_safe": True, "version": "1"}
