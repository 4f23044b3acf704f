"""The package's own code as text, for tests that check what it uses and names."""

from __future__ import annotations

import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpc_multires"


def statements(path: Path) -> list[tuple[int, str]]:
    """A module's code as (line, tokens joined by spaces), without comments and
    docstrings: `torch . utils . data`, `getattr ( x , "_y" )`."""
    lines: dict[int, list[str]] = {}
    previous = tokenize.NEWLINE
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.COMMENT, tokenize.NL):
                continue
            docstring = tok.type == tokenize.STRING and previous in (
                tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
            if not docstring:
                lines.setdefault(tok.start[0], []).append(tok.string)
            previous = tok.type
    return [(n, " ".join(parts)) for n, parts in sorted(lines.items())]


def package_statements() -> list[tuple[str, int, str]]:
    """(module path relative to the package, line, code) of every module of the package."""
    return [(str(path.relative_to(PACKAGE)), n, text)
            for path in sorted(PACKAGE.rglob("*.py")) for n, text in statements(path)]
