"""Regenerate the figures of README.md and docs/ from their commands and compare.

A figure block in a Markdown file names the command that prints it and where in that
command's output the same numbers appear:

    <!-- figure: bandit-theory ; command: vrpo reproduce bandit --out runs/bandit ;
         source: runs/bandit/results.md#theory-table-paper-layout-base--vrpo-ratio -->
    | setting | ... |            (the figures, as written in the page)
    <!-- /figure -->

- ``figure``: a name, unique over all pages.
- ``command``: a shell command run from the repository root (the running Python's folder
  first on PATH, ``src`` on PYTHONPATH, so ``vrpo`` and ``python`` are this checkout's).
- ``source``: a file the command writes, relative to the repository root, optionally with
  ``#slug`` of a Markdown heading (GitHub's slug: lower case, punctuation dropped, spaces
  to hyphens): the section under that heading, up to the next heading of the same or a
  higher level.
- ``match`` (optional): ``same`` (default): the block and the source section hold the same
  numbers in the same order. ``subset``: the block shows a selection, possibly from several
  tables of the source: each table row of the block is matched with the source rows that
  have the same first cell (or, when none has, whose first cell starts with the same word),
  and every number of the row must be among theirs; numbers outside tables must be among
  the section's numbers.
- ``minutes`` (optional): the command's CPU time in minutes (measured, or estimated from its
  parts; the page says which), on the machine where the page was written. Wall time on a
  shared machine can be many times more. ``--quick`` runs only the commands of at most QUICK_MINUTES; the
  other figures are compared with their existing outputs when those exist, else listed as
  not checked.

Numbers inside inline code (`...`) are commands, not figures, and are skipped. A number
of the page matches a regenerated one when they agree to the page's printed precision
(half a unit of its last digit).

    python benchmarks/check_figures.py --list
    python benchmarks/check_figures.py --check bandit-theory     # run its command, compare
    python benchmarks/check_figures.py --all [--from-existing]   # every figure; reuse outputs
    python benchmarks/check_figures.py --all --quick             # rerun the cheap commands only
    python benchmarks/check_figures.py --all --quick --fresh     # ... from scratch, not resumed

Most commands resume from what their output folder already holds, so a rerun over an old
folder recomputes nothing. ``--fresh`` first moves each rerun command's output folders (the
folders of its figures' sources) aside to ``FOLDER.before-check-N`` (nothing is deleted), so
the command computes every figure again with today's code.

``--from-existing`` compares with the output files already on disk (no command is run).
``--update`` rewrites each checked ``same`` block with its regenerated section (to refresh a
page after a deliberate change; review the diff). Exit status 0 when every figure checked
matches (or was updated), 1 when any differs, 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")
OPEN = re.compile(r"<!--\s*figure:(?P<body>.*?)-->", re.S)
CLOSE = re.compile(r"<!--\s*/figure\s*-->")
NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
CODE = re.compile(r"`[^`\n]*`")
MATCH_MODES = ("same", "subset")
FIELDS = ("command", "source", "match", "minutes")
QUICK_MINUTES = 5.0  # --quick reruns commands up to this many CPU minutes (the bandit testbed: ~3.5)


class FigureError(ValueError):
    """A malformed figure block or source: one line naming the file and what was expected."""


@dataclass
class Figure:
    name: str
    command: str
    source: str
    match: str
    page: str
    line: int
    text: str = field(repr=False)
    span: tuple = field(default=(0, 0), repr=False)  # character offsets of ``text`` in the page
    minutes: float | None = None  # the command's measured CPU minutes, when the page states them

    @property
    def quick(self) -> bool:
        return self.minutes is not None and self.minutes <= QUICK_MINUTES

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Mismatch:
    figure: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where} figure {self.figure}: {self.detail}"


# ------------------------------------------------------------------------------ parsing
def _fields(body: str, where: str) -> dict:
    """'NAME ; command: ... ; source: ...' -> {'figure': NAME, 'command': ..., ...}."""
    parts = [p.strip() for p in " ".join(body.split()).split(" ; ")]
    out = {"figure": parts[0]}
    for p in parts[1:]:
        key, sep, value = p.partition(":")
        if not sep or key.strip() not in FIELDS:
            raise FigureError(f"{where}: figure field {p!r}; expected one of " + ", ".join(f"'{k}: ...'" for k in FIELDS))
        out[key.strip()] = value.strip()
    for key in ("command", "source"):
        if not out.get(key):
            raise FigureError(f"{where}: figure {out['figure']!r} has no '{key}:' field")
    out.setdefault("match", "same")
    if out["match"] not in MATCH_MODES:
        raise FigureError(f"{where}: figure {out['figure']!r} match {out['match']!r}; expected one of {MATCH_MODES}")
    if "minutes" in out:
        try:
            out["minutes"] = float(out["minutes"])
        except ValueError:
            raise FigureError(f"{where}: figure {out['figure']!r} minutes {out['minutes']!r}; expected a number "
                              "(the command's CPU minutes)") from None
    return out


def parse_page(path: Path, root: Path = ROOT) -> list[Figure]:
    """The figure blocks of one Markdown page."""
    text = path.read_text(encoding="utf-8")
    page = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    figures, pos = [], 0
    while (m := OPEN.search(text, pos)) is not None:
        line = text.count("\n", 0, m.start()) + 1
        f = _fields(m.group("body"), f"{page}:{line}")
        end = CLOSE.search(text, m.end())
        nxt = OPEN.search(text, m.end())
        if end is None or (nxt is not None and nxt.start() < end.start()):
            raise FigureError(f"{page}:{line}: figure {f['figure']!r} has no closing <!-- /figure -->")
        figures.append(Figure(f["figure"], f["command"], f["source"], f["match"], page, line, text[m.end():end.start()],
                              (m.end(), end.start()), f.get("minutes")))
        pos = end.end()
    return figures


def all_figures(root: Path = ROOT, pages=PAGES) -> list[Figure]:
    figures = [f for pattern in pages for path in sorted(root.glob(pattern)) for f in parse_page(path, root)]
    seen: dict[str, str] = {}
    for f in figures:
        if f.name in seen:
            raise FigureError(f"{f.where}: figure name {f.name!r} is also used at {seen[f.name]}; expected unique names")
        seen[f.name] = f.where
    return figures


# ------------------------------------------------------------------------------ sources
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def section(text: str, anchor: str, where: str) -> str:
    """The lines under the heading whose slug is ``anchor``, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(#+)\s+(.*)", line)
        if m and slug(m.group(2)) == anchor:
            level = len(m.group(1))
            body = []
            for nxt in lines[i + 1:]:
                h = re.match(r"(#+)\s", nxt)
                if h and len(h.group(1)) <= level:
                    break
                body.append(nxt)
            return "\n".join(body)
    found = [slug(m.group(1)) for m in (re.match(r"#+\s+(.*)", x) for x in lines) if m]
    raise FigureError(f"{where}: no heading with anchor #{anchor}; the file has {found}")


def read_source(fig: Figure, root: Path = ROOT) -> str:
    path, _, anchor = fig.source.partition("#")
    file = root / path
    if not file.is_file():
        raise FigureError(f"{fig.where}: figure {fig.name!r}: source {path} does not exist (run its command, "
                          "or drop --from-existing)")
    text = file.read_text(encoding="utf-8")
    return section(text, anchor, f"{fig.where} ({path})") if anchor else text


# ------------------------------------------------------------------------------ comparing
@dataclass(frozen=True)
class Num:
    text: str
    value: float
    line: str

    @property
    def tolerance(self) -> float:
        """Half a unit of the last printed digit."""
        mantissa = re.split(r"[eE]", self.text)[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        exponent = int(re.split(r"[eE]", self.text)[1]) if re.search(r"[eE]", self.text) else 0
        return 0.5 * 10.0 ** (exponent - decimals) + 1e-12


def numbers(text: str) -> list[Num]:
    out = []
    for line in text.splitlines():
        plain = CODE.sub(" ", line)
        for m in NUMBER.finditer(plain):
            t = m.group(0)
            out.append(Num(t, float(t.replace(",", "").replace("−", "-")), line.strip()))
    return out


def _agree(page: Num, regenerated: Num) -> bool:
    return abs(page.value - regenerated.value) <= page.tolerance


def compare_same(fig: Figure, source: str) -> list[Mismatch]:
    page, regen = numbers(fig.text), numbers(source)
    out = [Mismatch(fig.name, fig.where, f"number {i + 1} ({p.line!r}): page {p.text}, regenerated {r.text}")
           for i, (p, r) in enumerate(zip(page, regen)) if not _agree(p, r)]
    if len(page) != len(regen):
        out.append(Mismatch(fig.name, fig.where, f"the page shows {len(page)} numbers, the regenerated source "
                                                 f"{len(regen)}"))
    return out


def _first_cell(line: str) -> str | None:
    """A table row's first cell, lower case, code marks dropped; None for other lines and rules."""
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if not line.strip().startswith("|") or not cells or set(cells[0]) <= set("-: "):
        return None
    return " ".join(CODE.sub(lambda m: m.group(0).strip("`"), cells[0]).lower().split()) or None


def _row_key(line: str) -> str | None:
    """First word of a table row's first cell ('| bt_flip (20% flips) | ...' -> 'bt_flip')."""
    cell = _first_cell(line)
    return cell.split()[0] if cell else None


def compare_subset(fig: Figure, source: str) -> list[Mismatch]:
    """Rows whose first cell is a source row's first cell are matched with those rows; other
    rows with the source rows that start with the same word; other lines with the section."""
    rows: dict[str, list[Num]] = {}
    for line in source.splitlines():
        for key in {_first_cell(line), _row_key(line)} - {None}:
            rows.setdefault(key, []).extend(numbers(line))
    anywhere = numbers(source)
    out = []
    for line in fig.text.splitlines():
        key = _first_cell(line) if _first_cell(line) in rows else _row_key(line)
        pool = list(rows[key]) if key in rows else list(anywhere)
        for p in numbers(line):
            hit = next((i for i, r in enumerate(pool) if _agree(p, r)), None)
            if hit is None:
                where = f"row {key!r}" if key in rows else "the source"
                out.append(Mismatch(fig.name, fig.where, f"{p.text} in {line.strip()!r} is not in {where} "
                                                         f"(regenerated: {_some(pool)})"))
            else:
                pool.pop(hit)
    return out


def _some(pool: list[Num], most: int = 24) -> str:
    """The regenerated numbers a page number was looked for in, at most ``most`` of them."""
    shown = " ".join(r.text for r in pool[:most]) or "nothing"
    return shown + (f" ... ({len(pool) - most} more)" if len(pool) > most else "")


COMPARE = {"same": compare_same, "subset": compare_subset}


def check(fig: Figure, root: Path = ROOT) -> list[Mismatch]:
    return COMPARE[fig.match](fig, read_source(fig, root))


def update(figures: list[Figure], root: Path = ROOT) -> None:
    """Replace each ``same`` block's text with its regenerated section (pages rewritten from the end)."""
    for page in dict.fromkeys(f.page for f in figures):
        path = root / page
        text = path.read_text(encoding="utf-8")
        for f in sorted((f for f in figures if f.page == page and f.match == "same"), key=lambda f: -f.span[0]):
            text = text[:f.span[0]] + "\n" + read_source(f, root).strip("\n") + "\n" + text[f.span[1]:]
        path.write_text(text, encoding="utf-8")


def move_aside(figures: list[Figure], root: Path = ROOT) -> None:
    """Rename the output folders of these figures' sources to FOLDER.before-check-N (never delete)."""
    for folder in dict.fromkeys((root / f.source.partition("#")[0]).parent for f in figures):
        if folder.is_dir() and folder != root:
            n = 1
            while folder.with_name(f"{folder.name}.before-check-{n}").exists():
                n += 1
            folder.rename(folder.with_name(f"{folder.name}.before-check-{n}"))
            print(f"moved {folder.relative_to(root)} aside to {folder.name}.before-check-{n}", flush=True)


def run_command(command: str, root: Path = ROOT) -> None:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(root / "src") + os.pathsep + env.get("PYTHONPATH", "")
    print(f"$ {command}", flush=True)
    done = subprocess.run(command, shell=True, cwd=root, env=env)
    if done.returncode != 0:
        raise FigureError(f"command {command!r} exited with status {done.returncode}")


# ------------------------------------------------------------------------------ command line
def main(argv=None, root: Path = ROOT, pages=PAGES) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="list the figure blocks")
    what.add_argument("--check", metavar="NAME", action="append", help="check this figure (repeatable)")
    what.add_argument("--all", action="store_true", help="check every figure")
    ap.add_argument("--from-existing", action="store_true", help="compare with the output files on disk; run nothing")
    ap.add_argument("--update", action="store_true", help="rewrite the checked 'same' blocks with the regenerated sections")
    ap.add_argument("--fresh", action="store_true", help="move each rerun command's output folders aside first "
                    "(kept as FOLDER.before-check-N), so it computes everything again instead of resuming")
    ap.add_argument("--quick", action="store_true", help=f"rerun only commands of at most {QUICK_MINUTES:g} CPU minutes "
                    "(their 'minutes:' field); compare the others with existing outputs, or list them as not checked")
    args = ap.parse_args(argv)
    try:
        figures = all_figures(root, pages)
        if args.list:
            for f in figures:
                print(f"{f.name}\t{f.where}\t{f.match}\t{_minutes(f)}\n    command: {f.command}\n    source:  {f.source}")
            return 0
        chosen = figures if args.all else _select(figures, args.check)
        if args.fresh and args.from_existing:
            raise FigureError("--fresh reruns commands from scratch; --from-existing runs none: choose one")
        if not args.from_existing:
            rerun = [f for f in chosen if f.quick or not args.quick]
            for command in dict.fromkeys(f.command for f in rerun):  # each command once, in page order
                if args.fresh:
                    move_aside([f for f in rerun if f.command == command], root)
                run_command(command, root)
        if args.quick:
            chosen = _quick_choice(chosen, args.from_existing, root)
        if args.update:
            update(chosen, root)
            chosen = [f for f in all_figures(root, pages) if f.name in {c.name for c in chosen}]
        mismatches = []
        for f in chosen:
            found = check(f, root)
            print(f"{'ok      ' if not found else 'DIFFERS '} {f.name} ({f.where})")
            mismatches += found
    except FigureError as e:
        print(f"check_figures: error: {e}", file=sys.stderr)
        return 2
    for m in mismatches:
        print(m)
    print(f"{len(chosen)} figure(s) checked, {len(mismatches)} mismatch(es)")
    return 1 if mismatches else 0


def _quick_choice(chosen: list[Figure], from_existing: bool, root: Path) -> list[Figure]:
    """--quick: the figures whose command was rerun, plus the others whose output exists."""
    kept = []
    for f in chosen:
        if f.quick and not from_existing:
            kept.append(f)
        elif (root / f.source.partition("#")[0]).is_file():
            print(f"existing {f.name} ({f.where}): not rerun (its command takes {_minutes(f)}), compared with "
                  f"{f.source.partition('#')[0]} as found")
            kept.append(f)
        else:
            print(f"skipped  {f.name} ({f.where}): not checked (its command takes {_minutes(f)}; no output yet)")
    return kept


def _minutes(f: Figure) -> str:
    return f"{f.minutes:g} CPU min" if f.minutes is not None else "an unstated time"


def _select(figures: list[Figure], names: list[str]) -> list[Figure]:
    by_name = {f.name: f for f in figures}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise FigureError(f"--check {missing[0]}: no such figure; expected one of {sorted(by_name)}")
    return [by_name[n] for n in names]


if __name__ == "__main__":
    raise SystemExit(main())
