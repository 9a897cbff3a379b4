"""The README and LESSONS.md, kept honest without running anything: every `python X.py ...` (or
`torchrun ... X.py ...`, or `python -m tools.X ...`) either shows, in a ``` shell block or an inline
`code span`, must get through the script's own parse_args(argv); every tests/ path and
tests/x.py::name it names must exist; every repo file it names (*.py, *.md, assets/*.png, markdown
links) must exist (paths that leave the repository, ../shared/..., are not the repository's to
check).

Both documents are read when the tests are collected, so the checks follow them as they change.
Shell is handled only as far as a command line needs: `\\` continuations, `# comments`, quotes,
`&&`, `||`, `|`, `;`, redirections, leading `VAR=value`, `time`, `do`/`then`. A command that uses a
shell variable ($flags) cannot be checked without running the shell: it fails, naming its line, so
the documents write their commands out."""

import ast
import contextlib
import importlib
import io
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "LESSONS.md")  # every check runs on each
SHELLS = {
    "",
    "bash",
    "sh",
    "shell",
    "console",
    "zsh",
}  # fence languages whose lines are shell commands
SEPARATORS = {"&&", "||", "|", ";", "&", "|&", ";;"}
PREFIXES = {"time", "do", "then", "else", "exec", "nohup", "!", "$"}


def read_readme(doc="README.md"):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def code_blocks(text):
    """(line number, line) of each line inside a ``` (or ~~~) block in a shell language,
    continuations joined; and the text with those blocks blanked out (line numbers kept), for the
    inline spans."""
    lines, found, blanked = text.split("\n"), [], []
    fence, start, pending = None, 0, ""
    for i, line in enumerate(lines, start=1):
        m = re.match(r"\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence is None:
            blanked.append("" if m else line)
            if m:
                fence, shell = m.group(1), m.group(2).lower() in SHELLS
            continue
        blanked.append("")
        if (
            m
            and m.group(1)[0] == fence[0]
            and len(m.group(1)) >= len(fence)
            and not line.strip(fence[0] + " ")
        ):
            fence = None
            continue
        if not shell:
            continue
        start, pending = (start if pending else i), pending + line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        found.append((start, pending.strip()))
        pending = ""
    return found, "\n".join(blanked)


def inline_spans(text):
    """(line number, content) of each inline `code span` (single backticks; it may wrap over
    lines)."""
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        yield text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())


def segments(line):
    """The simple commands of a shell line: token lists split at && || | ; &, comments and
    redirections dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = (
        True  # words split at blanks and shell operators only: --models a=b/c.pt stays one
    )
    out, cur, tokens = [], [], list(lex)
    skip = False
    for tok in tokens:
        if skip:
            skip = False
        elif tok in SEPARATORS:
            out.append(cur)
            cur = []
        elif tok[0] in "<>" and set(tok) <= set("<>&|"):
            skip = True  # a redirection: drop it and its target
        else:
            cur.append(tok)
    return [seg for seg in out + [cur] if seg]


def invocation(seg):
    """(script name, argv) if the command runs `python X.py ...` / `torchrun ... X.py ...`, (module,
    argv) for `python -m tools.X ...`, ("pytest", argv) for `python -m pytest ...`, else None.
    Leading VAR=value, time, do, then are skipped."""
    while seg and (seg[0] in PREFIXES or re.match(r"[A-Za-z_]\w*=", seg[0])):
        seg = seg[1:]
    if not seg:
        return None
    prog, rest = os.path.basename(seg[0]), seg[1:]
    if re.fullmatch(r"python[\d.]*", prog):
        if rest[:1] == ["-m"] and len(rest) > 1:
            return ("pytest", rest[2:]) if rest[1] == "pytest" else (rest[1], rest[2:])
        rest = rest[
            next((i for i, t in enumerate(rest) if not t.startswith("-")), len(rest)) :
        ]  # python -u, -O
    elif prog == "torchrun":
        rest = rest[
            next((i for i, t in enumerate(rest) if t.endswith(".py")), len(rest)) :
        ]  # torchrun's own flags
    else:
        return None
    if not rest or not rest[0].endswith(".py"):
        return None
    return rest[0], rest[1:]


def readme_commands(text):
    """(line number, the document's text, script, argv or an error string) of every python /
    torchrun command."""
    blocks, rest = code_blocks(text)
    for lineno, line in blocks + sorted(inline_spans(rest)):
        try:
            segs = segments(line)
        except ValueError as e:  # shlex: an unclosed quote
            yield lineno, line, None, f"the shell line cannot be split ({e})"
            continue
        for seg in segs:
            found = invocation(seg)
            if found and found[0] != "pytest":
                yield lineno, line, found[0], found[1]


def docstring_commands(path):
    """(line number, command) of each command line in a module's docstring, the way the scripts show
    their usage: an indented line that starts with python, torchrun or VAR=value, with its backslash
    continuations."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    doc = ast.get_docstring(tree, clean=False) or ""
    found, pending, start = [], "", 0
    for i, line in enumerate(
        doc.split("\n"), start=1 + (tree.body[0].lineno - 1 if tree.body else 0)
    ):
        text = line.strip()
        if not pending and not re.match(r"(python[\d.]*|torchrun|[A-Z_]+=\S*)\s", text):
            continue
        start, pending = (start if pending else i), pending + text
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        found.append((start, pending))
        pending = ""
    return found


SCRIPTS = sorted(f for f in os.listdir(ROOT) if f.endswith(".py")) + sorted(
    f"tools/{f}" for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py")
)
COMMANDS = [(doc, *command) for doc in DOCS for command in readme_commands(read_readme(doc))] + [
    (script, lineno, line, *found)
    for script in SCRIPTS
    for lineno, line in docstring_commands(os.path.join(ROOT, script))
    for seg in segments(line)
    for found in [invocation(seg)]
    if found and found[0] != "pytest"
]


@pytest.mark.parametrize("doc", DOCS)
def test_the_readme_shows_commands(doc):
    """Guards the extraction: a document without a single python command found means the parsing
    above broke."""
    assert any(script for d, _, _, script, _ in COMMANDS if d == doc), (
        f"no `python X.py` command found in {doc}"
    )


@pytest.mark.parametrize(
    "doc, lineno, line, script, argv",
    COMMANDS,
    ids=[f"{d[:-3]}-line{n}-{s or 'shell'}" for d, n, _, s, _ in COMMANDS],
)
def test_readme_command_parses(doc, lineno, line, script, argv):
    where = f"{doc} line {lineno}: `{line}`"
    if isinstance(argv, str):
        pytest.fail(f"{where}: {argv}", pytrace=False)
    if script.endswith(".py"):
        path, module_name = os.path.join(ROOT, script), os.path.basename(script)[:-3]
        if os.path.dirname(script) not in ("", ".") or not os.path.isfile(path):
            pytest.fail(
                f"{where}: runs {script}, which is not a file at the top of the repository",
                pytrace=False,
            )
    else:  # python -m package.module
        path, module_name = os.path.join(ROOT, *script.split(".")) + ".py", script
        if not os.path.isfile(path):
            pytest.fail(
                f"{where}: runs the module {script}, which is not a file of the repository",
                pytrace=False,
            )
    if any("$" in a for a in argv):
        pytest.fail(
            f"{where}: uses shell variables ({', '.join(a for a in argv if '$' in a)}), "
            "which this test cannot check: write the commands out",
            pytrace=False,
        )
    module = importlib.import_module(module_name)
    if not hasattr(module, "parse_args"):
        pytest.fail(
            f"{where}: {script} has no parse_args(argv) to check it with: give it one",
            pytrace=False,
        )
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):  # 0: --help
            said = err.getvalue().strip().splitlines()
            pytest.fail(
                f"{where}: {script}'s parser rejects it: {said[-1] if said else e}", pytrace=False
            )


def flags_of(script):
    """Every --flag the script's parser takes, read from its --help."""
    out = io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(io.StringIO()),
        pytest.raises(SystemExit),
    ):
        importlib.import_module(script).parse_args(["--help"])
    return set(re.findall(r"(?<![\w-])(--\w+)", out.getvalue()))


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_a_document_shows_alone_is_one_a_script_takes(doc):
    """An inline span of flags alone (`--resume`, `--set KEY=VALUE`), which a reader adds to a
    command, names only flags that train.py, sample.py or a tool takes."""
    known = set().union(
        *(
            flags_of(m)
            for m in (
                "train",
                "sample",
                *(
                    f"tools.{f[6:-3]}"
                    for f in SCRIPTS
                    if f.startswith("tools/") and f != "tools/__init__.py" and f != "tools/shape.py"
                ),
            )
        )
    )
    _, rest = code_blocks(read_readme(doc))
    unknown = [
        (n, flag)
        for n, span in inline_spans(rest)
        if span.startswith("--")
        for flag in re.findall(r"(?<![\w-])--\w+", span)
        if flag not in known
    ]
    assert not unknown, f"{doc} shows flags no script takes: " + ", ".join(
        f"line {n}: {f}" for n, f in unknown
    )


@pytest.mark.parametrize("doc", DOCS)
def test_readme_test_paths_exist(doc):
    """Every tests/... path and tests/x.py::name (::Class::method) the document names exists."""
    text, missing = read_readme(doc), []
    for m in re.finditer(r"(?<![\w/.-])(tests/[\w/.-]*)((?:::\w+)*)", text):
        path, names = m.group(1).rstrip("."), [n for n in m.group(2).split("::") if n]
        lineno = text.count("\n", 0, m.start()) + 1
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            missing.append(f"line {lineno}: {path} does not exist")
        elif names:
            with open(full, encoding="utf-8") as f:
                source = f.read()
            for name in names:
                if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", source, re.M):
                    missing.append(f"line {lineno}: {path} has no test or class named {name}")
    assert not missing, f"{doc} names tests that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS)
def test_readme_file_references_exist(doc):
    """Every repo file the document names exists: *.py and *.md mentions, assets/*.png, and relative
    link targets."""
    text, missing = read_readme(doc), []
    mentions = (
        r"(?<![\w/.:~$-])((?:[\w.-]+/)*[\w-][\w.-]*\.(?:py|md)|assets/[\w./-]+\.png)(?![\w/])"
    )
    links = r"\]\(\s*<?([^)\s>#]+)"  # [text](target) and ![alt](target)
    for pattern in (mentions, links):
        for m in re.finditer(pattern, text):
            ref = m.group(1)
            if re.match(r"[a-z][\w+.-]*:", ref) or ref.startswith(("/", "../")):
                continue  # a URL (https:, mailto:), an absolute path, or one outside the repository
            if not os.path.exists(os.path.join(ROOT, ref)):
                missing.append((text.count("\n", 0, m.start()) + 1, ref))
    assert not missing, f"{doc} names files that are not in the repository:\n" + "\n".join(
        f"line {n}: {ref}" for n, ref in sorted(set(missing))
    )
