"""The minimal edition's measures of the core, as a table: python -m tools.shape [--check]

Lines of the six core files, the longest function, command-line flags, the refiner's parameters,
top-level Python files, import cycles among the top-level modules and tools, and comments that are
lab notes rather than statements of what a line computes. --check exits 1 when a measure is over its
target (tests/test_shape.py runs it)."""

import argparse
import ast
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("vae.py", "unet.py", "ddpm.py", "diffusevae.py", "train.py", "sample.py")
# a comment or docstring phrase that reports a measurement or the code's history instead of what it
# computes
LAB_NOTE = re.compile(
    r"\d(\.\d+)?x (faster|slower)|bench\.py measures|measured (it |them )?(faster|slower)"
    r"|checkpoints? from before|the code before|used to be|which run chose",
    re.IGNORECASE,
)


def source(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def functions(name):
    """(lines, name) of every function and method of a file."""
    tree = ast.parse(source(name))
    return [
        (n.end_lineno - n.lineno + 1, n.name)
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def flags(name):
    """The --flags a file defines: p.add_argument("--...") calls, or calls of a short alias `add` of
    it."""
    return len(re.findall(r'\b(?:add_argument|add)\(\s*"--', source(name)))


def parameters(name, function):
    """How many parameters a top-level function, or a method named "Class.method", takes (a **kwargs
    counts as one; a method's self does not: its caller does not pass it)."""
    *owner, function = function.split(".")
    body = ast.parse(source(name)).body
    if owner:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == owner[0]).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == function)
    a = node.args
    n = len(a.posonlyargs + a.args + a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return n - bool(owner)


def imports(path, modules):
    """The modules of `modules` that the file at `path` imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & modules


def import_cycles():
    """Cycles in the import graph of the top-level modules and tools (module names like 'sample',
    'tools.sweep')."""
    paths = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
    paths.update(
        {
            f"tools.{os.path.basename(p)[:-3]}": p
            for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))
            if not p.endswith("__init__.py")
        }
    )
    graph = {m: imports(p, set(paths)) - {m} for m, p in paths.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def lab_notes():
    """(file, line number, text) of each core or support line that reads as a lab note."""
    names = list(CORE) + ["data.py", "runtime.py"]
    return [
        (n, i, line.strip())
        for n in names
        for i, line in enumerate(source(n).splitlines(), 1)
        if LAB_NOTE.search(line)
    ]


def measures():
    """[(measure, value, target)]: the table of the minimal edition (the files as ruff formats
    them)."""
    longest = max((lines, f"{name}.{fn}") for name in CORE for lines, fn in functions(name))
    top_level = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    all_lines = [line for n in CORE for line in source(n).splitlines()]
    core_lines = len(all_lines)
    return [
        ("the six core files, lines (ruff format, 100 columns)", core_lines, 1700),
        ("lines of the core over 100 columns", sum(len(x) > 100 for x in all_lines), 0),
        ("train.py lines", len(source("train.py").splitlines()), 420),
        (
            "train.py imports sample.py",
            int("sample" in imports(os.path.join(ROOT, "train.py"), {"sample"})),
            0,
        ),
        (f"longest function in the core ({longest[1]})", longest[0], 60),
        ("train.py command-line flags", flags("train.py"), 20),
        ("sample.py command-line flags", flags("sample.py"), 15),
        ("parameters of DiffuseVAE.refine", parameters("diffusevae.py", "DiffuseVAE.refine"), 10),
        (f"top-level .py files ({', '.join(top_level)})", len(top_level), 8),
        ("import cycles", len(import_cycles()), 0),
        ("comments that are lab notes", len(lab_notes()), 0),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="exit 1 if a measure is over its target")
    args = p.parse_args(argv)
    rows = measures()
    print("| measure | now | target |\n|---|---|---|")
    for name, value, target in rows:
        print(f"| {name} | {value:,} | <= {target:,} |")
    for cycle in import_cycles():
        print("import cycle: " + " -> ".join(cycle))
    for name, i, text in lab_notes():
        print(f"lab note: {name}:{i}: {text}")
    over = [name for name, value, target in rows if value > target]
    if args.check and over:
        sys.exit(f"over target: {', '.join(over)}")


if __name__ == "__main__":
    main()
