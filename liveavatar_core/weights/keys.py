"""The key-mismatch report every weight format uses: which tensors are missing, extra or misshaped."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

EXAMPLES = 5


def examples(items: Iterable[str], limit: int = EXAMPLES) -> str:
    """The first `limit` items, then how many more: "a, b, ... (3 more)"."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def key_mismatch(expected: Mapping[str, tuple] | Iterable[str], found: Mapping[str, tuple] | Iterable[str],
                 display: Callable[[str], str] = str) -> list[str]:
    """Phrases naming the tensors of `found` that differ from `expected`; empty when they match.

    Both sides map names to shapes, or are plain names (then only the names are compared).
    `display` turns a name into what the user should read (e.g. the key as the file spells it).
    """
    shapes = isinstance(expected, Mapping) and isinstance(found, Mapping)
    expected_names = list(expected)
    found_set = set(found)
    expected_set = set(expected_names)
    missing = [k for k in expected_names if k not in found_set]
    unexpected = [k for k in found if k not in expected_set]
    wrong = [f"{display(k)} {tuple(found[k])} instead of {tuple(expected[k])}"
             for k in expected_names if shapes and k in found_set and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected_names)} expected tensors missing "
                        f"(e.g. {examples(map(display, missing))})")
    if wrong:
        problems.append(f"{len(wrong)} tensors with the wrong shape (e.g. {examples(wrong)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {examples(map(display, unexpected))})")
    return problems
