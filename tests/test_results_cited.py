"""benchmarks/results/ holds what the README and docs/ cite, and they cite only what it holds.

A results file or plot folder is *cited* when its name appears in README.md or docs/*.md as a
whole token: `fastswitch_compare.json` or benchmarks/results/fastswitch_compare.json cite that
file (not fastswitch_compare_markov_p05.json); plots/fastswitch_compare cites that folder.

A *reference* is every benchmarks/results/... path in those files, every bare plots/<name>, and
every bare `*.json` name that starts like a results file: with the first word of a benchmark
script's name or of a recorded file's name (`fastswitch_...`, `gc_...`), so that the checkpoint's
config.json or an example's --output-json r.json are not taken for one. A reference with a `*` is
a glob and must match at least one file. Every reference must exist.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README_MAX_LINES = 220

_NAME = r"[\w*-]+(?:\.[\w*-]+)*"  # file or folder name, globs allowed
_RESULTS_PATH = re.compile(r"benchmarks/results/(" + _NAME + r"(?:/" + _NAME + r")*)")
_BARE_JSON = re.compile(r"(?<![\w./-])([\w*-]+\.json)(?![\w.-])")
_BARE_PLOTS = re.compile(r"(?<![\w./-])(plots/[\w*-]+)(?![\w.-])")
_FIRST_WORD = re.compile(r"[A-Za-z0-9-]*")


def doc_paths() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def recorded(results: Path = RESULTS) -> list[str]:
    """What must be cited, as paths relative to ``results``: each file, except that a folder
    under plots/ counts as one item (plots/<name>)."""
    items = set()
    for path in results.rglob("*"):
        rel = path.relative_to(results).as_posix()
        parts = rel.split("/")
        if parts[0] == "plots" and len(parts) >= 2 and (len(parts) > 2 or path.is_dir()):
            items.add("/".join(parts[:2]))
        elif path.is_file():
            items.add(rel)
    return sorted(items)


def is_cited(item: str, text: str) -> bool:
    """``item`` (a results-relative path: run.json, plots/run) appears in ``text`` as a whole
    token, bare or at the end of a longer path; a glob does not cite."""
    return re.search(r"(?<![\w.-])" + re.escape(item) + r"(?![\w-]|\.\w)", text) is not None


def results_prefixes(results: Path = RESULTS) -> set[str]:
    """First words of the benchmark scripts' names and of the recorded files' names."""
    names = [p.name for p in (ROOT / "benchmarks").glob("*.py")] + [
        p.name for p in results.glob("*.json")]
    return {_FIRST_WORD.match(name).group() for name in names} - {""}


def references(text: str, prefixes: set[str]) -> set[str]:
    """Results-relative paths that ``text`` refers to (see the module docstring)."""
    refs = {m.group(1).rstrip(".") for m in _RESULTS_PATH.finditer(text)}
    refs |= set(_BARE_PLOTS.findall(text))
    refs |= {name for name in _BARE_JSON.findall(text)
             if _FIRST_WORD.match(name).group() in prefixes}
    return refs


def missing(refs: set[str], results: Path = RESULTS) -> list[str]:
    """The references that name nothing in ``results``."""
    existing = {p.relative_to(results).as_posix() for p in results.rglob("*")}
    return sorted(ref for ref in refs
                  if not (fnmatch.filter(existing, ref) if "*" in ref else ref in existing))


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in doc_paths())


def test_every_results_file_is_cited():
    """One current file per cited configuration: a file nobody cites is a superseded run (git
    keeps it) or a result nobody explains."""
    items = recorded()
    assert items, "benchmarks/results/ is empty"
    text = _docs_text()
    uncited = [item for item in items if not is_cited(item, text)]
    assert not uncited, f"in benchmarks/results/ but cited in neither README.md nor docs/: {uncited}"


def test_every_cited_results_file_exists():
    prefixes = results_prefixes()
    refs = {ref: p.relative_to(ROOT).as_posix() for p in doc_paths()
            for ref in references(p.read_text(), prefixes)}
    assert "fastswitch_compare.json" in refs  # the matching finds what the README cites
    absent = missing(set(refs))
    assert not absent, "cited but not in benchmarks/results/: " + ", ".join(
        f"{ref} ({refs[ref]})" for ref in absent)


def test_readme_stays_short():
    num_lines = len((ROOT / "README.md").read_text().splitlines())
    assert num_lines <= README_MAX_LINES, f"README.md has {num_lines} lines"


def test_the_matching_can_fail(tmp_path):
    """Neither check passes vacuously: a name inside a longer name cites nothing, an uncited file
    or plot folder is found, and so is a results name that does not exist."""
    (tmp_path / "plots" / "run").mkdir(parents=True)
    (tmp_path / "plots" / "run" / "ttft.png").write_bytes(b"")
    (tmp_path / "plots" / "run_b").mkdir()
    for name in ("run.json", "pre_run.json", "run_b.json"):
        (tmp_path / name).write_text("{}")
    assert recorded(tmp_path) == ["plots/run", "plots/run_b", "pre_run.json", "run.json",
                                  "run_b.json"]
    text = ("`pre_run.json` and benchmarks/results/run_b.json, plots `plots/run_b/`;\n"
            "```bash\npython3 x.py --output-json r.json\n```\n`run_gone.json`, `run*.json`, "
            "`pre_*_x.json`, the checkpoint's `config.json`, benchmarks/results/gone.json, "
            "plots/run_c")
    assert [i for i in recorded(tmp_path) if not is_cited(i, text)] == ["plots/run", "run.json"]
    refs = references(text, {"run", "pre"})
    assert not {"r.json", "config.json"} & refs
    assert {"pre_run.json", "run_b.json", "run*.json"} <= refs
    assert missing(refs, tmp_path) == ["gone.json", "plots/run_c", "pre_*_x.json",
                                       "run_gone.json"]
