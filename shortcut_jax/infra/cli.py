"""Command-line helpers shared by the package's entry points (``python -m shortcut_jax.<command>``).

No project imports: the entry points of every layer (the FID statistics command included) use it.
"""
from __future__ import annotations

import sys


def last_override_wins(argv: list[str], names: tuple[str, ...] = ("config",)) -> list[str]:
    """``argv`` with each ``--<name>.<key>`` override given more than once kept at its last place.

    absl keeps the last value of a repeated flag, but ml_collections appends a repeated tuple
    override to the earlier one (``--config.eval.budgets=(1,4)`` then ``--config.eval.budgets=(8,)``
    gives ``(1, 4, 8)``). Dropping the earlier occurrences gives every type absl's rule, so a
    script can put defaults first and let its caller's flags replace them. Both ``--k=v`` and
    ``--k v`` are understood, and ``--no<name>.<key>`` is the same key as ``--<name>.<key>``;
    everything after ``--`` is left alone. Each dropped override is reported on stderr.
    """
    groups: list[tuple[str | None, list[str]]] = []  # (override key or None, its tokens)
    rest = list(argv[1:])
    i = 0
    while i < len(rest):
        token = rest[i]
        if token == "--":
            groups.append((None, rest[i:]))
            break
        flag, has_value, _ = token.partition("=")
        key = None
        for name in names:
            if flag.startswith(f"--{name}.") or flag.startswith(f"--no{name}."):
                key = flag[flag.index(f"{name}."):]
                break
        take = 1
        if (key is not None and not has_value and not flag.startswith("--no")
                and i + 1 < len(rest) and not rest[i + 1].startswith("--")):
            take = 2  # '--config.key value'
        groups.append((key, rest[i:i + take]))
        i += take
    last = {key: n for n, (key, _) in enumerate(groups) if key is not None}
    out = list(argv[:1])
    for n, (key, tokens) in enumerate(groups):
        if key is not None and last[key] != n:
            print(f"{' '.join(tokens)} is replaced by a later {' '.join(groups[last[key]][1])}",
                  file=sys.stderr)
            continue
        out += tokens
    return out


def run(main, names: tuple[str, ...] = ("config",)) -> None:
    """``absl.app.run(main)`` on this process's arguments, each repeated ``--<name>.<key>``
    override kept at its last place (:func:`last_override_wins`)."""
    from absl import app

    app.run(main, argv=last_override_wins(sys.argv, names))
