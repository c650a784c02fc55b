"""The manual stays true to the code: every `python jobs/X.py ...` command shown in README.md and docs/*.md parses
with that job's own parser, and every relative link (and its #anchor) points at a file and heading that exist.

Commands are read from fenced code blocks (continuation lines joined) and from inline code spans. A command
written as a sketch (`...`, `[--optional flags]`, `--flag VALUE|OTHER`) is checked flag by flag: each flag must be
an option of the job, spelled out (argparse would accept an abbreviation; a reader copies what is written). A
complete command goes through the parser as it is, so types, choices and required options count too, and then
through the job's config checks (TrainConfig/LabelConfig.validate).
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shlex

import pytest

from pipeline.errors import JobError
from pipeline.label.config import LabelConfig
from pipeline.train.config import TrainConfig
from tests.jobs_util import ROOT, load_job

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
JOB_COMMAND = re.compile(r"python3? (?:\S*/)?jobs/(\w+)\.py\b(.*)")
FENCE = re.compile(r"^\s*```")
CONFIGS = {"train": TrainConfig, "label": LabelConfig}


def _read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def _commands(doc: str) -> list[tuple[int, str, str]]:
    """(line number, job, the rest of its command line) for every jobs/ command in a Markdown file."""
    texts, prose, in_fence, pending = [], [], False, None
    for number, line in enumerate(_read(doc).splitlines(), 1):
        if FENCE.match(line):
            in_fence, pending = not in_fence, None
            prose.append("")
            continue
        prose.append("" if in_fence else line)
        if in_fence:  # a shell line, its continuation lines joined
            pending = pending or (number, "")
            if line.rstrip().endswith("\\"):
                pending = (pending[0], pending[1] + line.rstrip()[:-1] + " ")
                continue
            texts.append((pending[0], pending[1] + line))
            pending = None
    # Inline code spans, which may wrap across lines of a paragraph.
    joined = "\n".join(prose)
    for span in re.finditer(r"`([^`]+)`", joined):
        texts.append((joined.count("\n", 0, span.start()) + 1, span.group(1).replace("\n", " ")))
    found = []
    for number, text in texts:
        for match in JOB_COMMAND.finditer(text):
            # The command ends where the shell line does (a comment, &&, ;, a pipe).
            found.append((number, match.group(1), re.split(r"\s(?:#|&&|;|\|)\s?", match.group(2))[0]))
    return sorted(found)


@functools.cache
def _parser(job: str):
    return load_job(job).build_parser()


def _check(job: str, rest: str) -> str | None:
    """None if the command line is one the job accepts, else why not."""
    if job.isupper():  # `python jobs/X.py --help`: a placeholder for any job
        return None
    if not os.path.isfile(os.path.join(ROOT, "jobs", f"{job}.py")):
        return f"no file jobs/{job}.py"
    parser = _parser(job)
    args = shlex.split(rest)
    known = parser._option_string_actions  # argparse keeps no public map of the option strings it takes
    for arg in args:
        flag = arg.strip("[]").split("=")[0]
        if flag.startswith("--") and flag not in known:
            return f"no option {flag}"
    sketch = "--help" in args or any(a == "..." or a.startswith("[") or a.endswith("]") or "|" in a
                                     or re.fullmatch(r"[A-Z_]+", a) for a in args)  # URI, N, FILE: placeholders
    if sketch:
        return None
    try:
        parsed = vars(parser.parse_args(args))
        if job == "label" and parsed["max_side"] == 0:
            parsed["max_side"] = None  # as jobs/label.py's main does: "never shrink"
        if job in CONFIGS:  # the option values' own checks, as the job makes them (no I/O)
            CONFIGS[job](**parsed).validate()
    except (JobError, ValueError, SystemExit) as e:
        return str(e)
    return None


def _all_commands() -> list[tuple[str, int, str, str]]:
    return [(doc, line, job, rest) for doc in DOCS for line, job, rest in _commands(doc)]


def test_the_docs_show_commands_of_every_job():
    """The extraction finds what the manual shows (so the test below cannot pass by finding nothing)."""
    jobs = {job for _, _, job, _ in _all_commands()}
    assert {"train", "label", "evaluate", "import_weights", "synthesize"} <= jobs, jobs


def test_every_job_command_in_the_docs_parses():
    wrong = [f"{doc}:{line}: python jobs/{job}.py{rest}: {why}" for doc, line, job, rest in _all_commands()
             if (why := _check(job, rest))]
    assert not wrong, "commands the jobs refuse:\n" + "\n".join(wrong)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(doc: str) -> set[str]:
    found, in_fence = set(), False
    for line in _read(doc).splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6} (.+)", line)):
            found.add(_anchor(m.group(1)))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_point_at_files_and_headings_that_exist(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(doc)):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto: — not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(ROOT, resolved)):
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved}")
    assert not broken, f"{doc}: " + "; ".join(broken)


def test_the_readme_leads_to_every_page_of_the_manual():
    readme = _read("README.md")
    pages = [doc for doc in DOCS if doc.startswith("docs" + os.sep)]
    assert len(pages) >= 7, pages
    missing = [page for page in pages if f"]({page.replace(os.sep, '/')}" not in readme]
    assert not missing, f"README.md links no {missing}"
    assert "](queries.md" in _read(os.path.join("docs", "labeling.md")), "docs/labeling.md does not link queries.md"
