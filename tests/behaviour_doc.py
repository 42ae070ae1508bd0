"""Write docs/behaviour.md, the behaviours fntrain promises, from the tests' docstrings.

Usage: ``python -m tests.behaviour_doc docs/behaviour.md`` writes it; with ``--check`` it
exits 1, saying what to run, when the file differs. The tests are read with ``ast``, not run.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
COMMAND = "python -m tests.behaviour_doc docs/behaviour.md"
ORDER = ("loop", "stepping", "restore", "metrics", "checkpoint", "sharded", "distributed")
ORDER += ("data", "records", "optim", "pytorch_behaviour")
INTRO = (
    "The behaviours fntrain promises, each one a test: a test's docstring is the promise and"
    " its name says where to check it. Grouped by test file; generated from `tests/test_*.py`"
    f" by `{COMMAND}`, so do not edit it by hand."
)


def _escape(text: str) -> str:
    """Escape ``*`` and word-edge ``_`` outside `code spans`, so ``__all__`` reads as written."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"\*|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\\g<0>", parts[i])
    return "`".join(parts)


def _summary(node: ast.Module | ast.FunctionDef | ast.AsyncFunctionDef, what: str) -> str:
    """Return ``node``'s docstring summary, its first paragraph on one line; or name ``what``."""
    doc = ast.get_docstring(node)
    if not doc:
        raise ValueError(f"{what} has no docstring: the behaviour doc needs one")
    return _escape(" ".join(doc.split("\n\n")[0].split()))


def _sort_key(path: Path) -> tuple[int, str]:
    """Put the files of ``ORDER`` first, in that order, then the others alphabetically."""
    name = path.stem.removeprefix("test_")
    return (ORDER.index(name), "") if name in ORDER else (len(ORDER), name)


def render(tests: Path = TESTS) -> str:
    """Return the Markdown of the behaviour doc for the ``test_*.py`` files in ``tests``."""
    lines = ["# How fntrain behaves", "", INTRO]
    for path in sorted(tests.glob("test_*.py"), key=_sort_key):
        module = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        lines += ["", f"## [{path.name}](../tests/{path.name})", ""]
        lines += [_summary(module, path.name), ""]
        functions = (ast.FunctionDef, ast.AsyncFunctionDef)
        for node in module.body:
            if isinstance(node, functions) and node.name.startswith("test_"):
                promise = _summary(node, f"{path.name}::{node.name}")
                lines.append(f"- {promise} (`{node.name}`)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the doc to the given path, or with ``--check`` return 1 if it is out of date."""
    parser = argparse.ArgumentParser(prog="python -m tests.behaviour_doc")
    parser.add_argument("path", type=Path, help="where the doc goes: docs/behaviour.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    if not args.check:
        args.path.write_text(render(), encoding="utf-8", newline="\n")
    elif not args.path.exists() or args.path.read_text(encoding="utf-8") != render():
        print(f"{args.path} is out of date with the tests; regenerate it with: {COMMAND}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
