"""LESSONS.md quotes the code beside the math, and the quotes stay true.

The convention: a ```python block in LESSONS.md is a verbatim quote of the project's code, and the
line right before it names the file in backticks and ends with a colon, e.g. "From `ddpm.py`:". A
quote matches when some window of contiguous lines of that file, with its common indentation
removed, equals the quote with its own removed. When the code changes under a quote, the test names
the lesson's line, the file, and the file's closest lines."""

import difflib
import os
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSONS = os.path.join(ROOT, "LESSONS.md")
MIN_QUOTES = 14  # issue 32: at least 14 equations shown beside the lines that compute them


def python_blocks(text):
    """(line number of the opening fence, the line right before it, the block's lines) of every
    ```python block."""
    lines, blocks, i = text.split("\n"), [], 0
    while i < len(lines):
        if re.fullmatch(r"\s*```\s*python\s*", lines[i]):
            start, body = i, []
            i += 1
            while i < len(lines) and not re.fullmatch(r"\s*```\s*", lines[i]):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(
                    f"LESSONS.md line {start + 1}: the ```python block is never closed"
                )
            blocks.append((start + 1, lines[start - 1] if start else "", body))
        i += 1
    return blocks


def quoted_file(label):
    """The file a quote names: the first `name.py` in backticks on a line that ends with a colon,
    else None."""
    m = re.search(r"`([\w./-]+\.py)`", label)
    return m.group(1) if m and label.rstrip().endswith(":") else None


def dedented(lines):
    return textwrap.dedent("\n".join(lines)).strip("\n")


def find_quote(quote, source_lines):
    """True if the dedented quote equals some dedented window of contiguous source lines; else the
    closest window."""
    n, best, best_ratio = len(quote.split("\n")), None, -1.0
    for i in range(len(source_lines) - n + 1):
        window = dedented(source_lines[i : i + n])
        if window == quote:
            return True, None
        ratio = difflib.SequenceMatcher(None, window, quote).quick_ratio()
        if ratio > best_ratio:
            best, best_ratio = (i + 1, window), ratio
    return False, best


def read_lessons():
    with open(LESSONS, encoding="utf-8") as f:
        return f.read()


BLOCKS = python_blocks(read_lessons())
QUOTES = [
    (lineno, quoted_file(label), body) for lineno, label, body in BLOCKS if quoted_file(label)
]


def test_every_python_block_names_the_file_it_quotes():
    """A ```python block is a quote: the line before it says which file, e.g. "From `ddpm.py`:".
    Math, shell commands and pseudo-code go in ```text / ```bash blocks instead."""
    unnamed = [
        f"line {lineno}: the line before it is {label!r}"
        for lineno, label, _ in BLOCKS
        if not quoted_file(label)
    ]
    assert not unnamed, (
        "LESSONS.md has ```python blocks without a line naming their file and ending with a colon "
        'right before them ("From `ddpm.py`:"):\n' + "\n".join(unnamed)
    )


def test_lessons_quote_the_code_at_least_14_times():
    assert len(QUOTES) >= MIN_QUOTES, (
        f"LESSONS.md quotes the code {len(QUOTES)} times; each lesson that states "
        f"an equation quotes the lines that compute it (at least {MIN_QUOTES})"
    )


@pytest.mark.parametrize("lineno, path, body", QUOTES, ids=[f"line{n}-{p}" for n, p, _ in QUOTES])
def test_quoted_code_is_in_the_file_verbatim(lineno, path, body):
    quote = dedented(body)
    where = f"LESSONS.md line {lineno}: the block quoted from `{path}`"
    assert quote.strip(), f"{where} is empty"
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        pytest.fail(f"{where}: {path} is not a file of the repository", pytrace=False)
    with open(full, encoding="utf-8") as f:
        source = f.read().split("\n")
    found, closest = find_quote(quote, source)
    if not found:
        start, window = closest
        pytest.fail(
            f"{where} no longer appears in {path} verbatim (as contiguous lines, common "
            f"indentation removed). The quote:\n{quote}\n\n{path}'s closest lines "
            f"(from line {start}):\n{window}\n\n"
            "Update the quote in LESSONS.md, and the sentence after it if the code's meaning "
            "changed.",
            pytrace=False,
        )


def test_the_matcher_finds_an_indented_window_and_rejects_an_edited_one():
    """Guards the check itself: a quote at another indentation matches; a one-character edit does
    not."""
    source = ["class A:", "    def f(self, x):", "        y = x + 1", "        return y * 2", ""]
    assert find_quote(dedented(["y = x + 1", "return y * 2"]), source)[0]
    assert find_quote(dedented(["    y = x + 1", "    return y * 2"]), source)[0]
    assert not find_quote(dedented(["y = x + 1", "return y * 3"]), source)[0]
    assert not find_quote(dedented(["return y * 2", "y = x + 1"]), source)[
        0
    ]  # contiguous and in order
    assert quoted_file("From `ddpm.py`, `GaussianDiffusion.__init__`:") == "ddpm.py"
    assert quoted_file("From `ddpm.py`") is None  # the line must end with a colon


# ----------------------------------------------------------------------------- Part I: a first hour

PART_I_WORDS, PART_I_LINES = 3000, 600  # issue 39: at most about 3,000 words and 600 lines of code


def part_i(text):
    """Part I of LESSONS.md: from its heading to Part II's."""
    start, end = text.index("\n## Part I."), text.index("\n## Part II.")
    return text[start:end]


def reading_list(text):
    """(file, name) of every function or class Part I's reading table names: a `name` belongs to
    the last `file.py` named before it on its row."""
    rows = [line for line in part_i(text).split("\n") if re.match(r"\|\s*I\.\d", line)]
    listed = []
    for row in rows:
        path = None
        for token in re.findall(r"`([^`]+)`", row):
            if token.endswith(".py"):
                path = token
            else:
                listed.append((path, token))
    return listed


def definition_lines(path, name):
    """Lines of the definition `name` (function, class, or Class.method) in a repository file."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    scope = tree.body
    for part in name.split("."):
        found = [n for n in scope if getattr(n, "name", None) == part]
        if not found:
            return None
        node, scope = found[0], getattr(found[0], "body", [])
    return node.end_lineno - node.lineno + 1


def test_part_i_names_functions_that_exist_and_asks_at_most_600_lines_of_them():
    listed = reading_list(read_lessons())
    assert len(listed) >= 20, listed
    missing = [f"{p}: {n}" for p, n in listed if p is None or definition_lines(p, n) is None]
    assert not missing, f"Part I's reading list names what the code does not define: {missing}"
    lines = sum(definition_lines(p, n) for p, n in set(listed))
    assert lines <= PART_I_LINES, f"Part I asks {lines} lines of code to be read"


def test_part_i_is_at_most_3000_words_of_prose():
    prose = re.sub(r"```.*?```", "", part_i(read_lessons()), flags=re.S)  # code blocks apart
    words = len(prose.split())
    assert words <= PART_I_WORDS, f"Part I has {words} words"


def test_the_reading_list_resolves_methods_and_rejects_what_is_not_there():
    row = "| I.1 | `ddpm.py` | `GaussianDiffusion.loss`; `vae.py`: `VAE` |"
    text = f"\n## Part I.\n{row}\n## Part II.\n"
    assert reading_list(text) == [("ddpm.py", "GaussianDiffusion.loss"), ("vae.py", "VAE")]
    assert definition_lines("ddpm.py", "GaussianDiffusion.loss") >= 3
    assert definition_lines("ddpm.py", "GaussianDiffusion.no_such_method") is None
