"""benchmarks/RESULTS.md opens with a current record whose every row names its machine, date and commit; below
it the history, newest first, each entry naming its machine, date and commit."""
import os
import re
import subprocess

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "RESULTS.md")


def _record_rows() -> list[list[str]]:
    text = open(RESULTS, encoding="utf-8").read()
    assert text.index("## Current record") < text.index("## History")  # the record first, above the history
    block = text[text.index("## Current record"):text.index("## History")]
    rows = [ln for ln in block.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["case", "machine", "date", "commit", "value", "goal", "met?"]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[1:]]


def _known_commits() -> list[str]:
    return subprocess.run(["git", "rev-list", "--all", "--abbrev-commit", "--abbrev=7"], capture_output=True,
                          text=True, cwd=os.path.dirname(RESULTS)).stdout.split()


def _exists(commit: str, known: list[str]) -> bool:
    return not known or any(k.startswith(commit) or commit.startswith(k) for k in known)  # outside git: not checked


def test_every_record_row_names_machine_date_commit_and_verdict():
    rows = _record_rows()
    assert len(rows) >= 5
    known = _known_commits()
    for case, machine, date, commit, value, goal, met in rows:
        assert machine and ("GPU" in machine or "H200" in machine or "H100" in machine), case  # CPU rows say "no GPU"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), case
        assert re.fullmatch(r"[0-9a-f]{7,40}", commit), case
        assert _exists(commit, known), (case, commit)
        assert value and met in ("met", "missed", "missed (eager)", "-"), case
        assert met == "-" or goal != "none set", case


def test_the_history_is_newest_first_and_every_entry_names_machine_date_commit():
    text = open(RESULTS, encoding="utf-8").read()
    history = text[text.index("## History"):]
    assert not re.search(r"^## ", history[3:], re.M)  # one flat list of entries
    heads = re.findall(r"^### (.*)$", history, re.M)
    assert len(heads) >= 10
    known, dates = _known_commits(), []
    for h in heads:
        m = re.fullmatch(r".+ — (.+), (\d{4}-\d{2}-\d{2}), commit ([0-9a-f]{7,40})", h)
        assert m, h
        machine, date, commit = m.groups()
        assert "GPU" in machine or "H200" in machine or "none" in machine, h
        assert _exists(commit, known), h
        dates.append(date)
    assert dates == sorted(dates, reverse=True)
