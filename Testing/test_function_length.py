"""The engine's functions stay short (project rule: under ~50 lines), or say why they are not.

Counts each function of InferenceSpecificSeg/isseg from its `def` line to its last line, docstring
included. A longer one needs a comment `# long: <reason>` on the line just above its `def` (or above
its decorators). Run this file as a script to list every function over the limit with its length.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "InferenceSpecificSeg" / "isseg"
MAX_LINES = 50


def long_functions(limit: int = MAX_LINES) -> list[tuple[str, int, str, int, bool]]:
    """(file relative to the engine, line, name, length, has a `# long:` reason) of each function over `limit`."""
    found = []
    for path in sorted(ENGINE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    reason = first >= 2 and lines[first - 2].strip().startswith("# long:")
                    found.append((str(path.relative_to(ENGINE)), node.lineno, node.name, length, reason))
    return found


def test_every_long_engine_function_gives_its_reason():
    unexplained = [f"{file}:{line} {name} ({length} lines)" for file, line, name, length, reason in long_functions()
                   if not reason]
    assert not unexplained, f"over {MAX_LINES} lines without a '# long:' comment: {unexplained}"


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else MAX_LINES
    for file, line, name, length, reason in long_functions(limit):
        print(f"{file}:{line} {name} {length} lines{'' if reason else '  (no # long: reason)'}")
