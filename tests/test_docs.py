"""The front page and docs/: every relative link resolves, to a file and, with #anchor, to a heading."""

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slug(heading):
    """GitHub's anchor of a heading: lowercase, only letters, digits, spaces, - and _, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path):
    """The anchors of a markdown file's headings (outside code blocks); repeats get -1, -2, ..."""
    seen, found, in_code = {}, set(), False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                in_code = not in_code
            elif not in_code and (m := re.match(r"#{1,6} (.*)", line)):
                s = slug(m.group(1))
                found.add(s if s not in seen else f"{s}-{seen[s]}")
                seen[s] = seen.get(s, 0) + 1
    return found


def broken_links(root, files):
    """'file: target: why' for each relative link in files (paths relative to root) that does not resolve."""
    bad = []
    for name in files:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            full = (
                os.path.normpath(os.path.join(root, os.path.dirname(name), path))
                if path
                else os.path.join(root, name)
            )
            if not os.path.exists(full):
                bad.append(f"{name}: {target}: no such file")
            elif anchor and full.endswith(".md") and anchor not in anchors(full):
                bad.append(f"{name}: {target}: no such heading")
    return bad


def doc_files(root):
    found = ["README.md", "tools/README.md"] + glob.glob("docs/*.md", root_dir=root)
    return sorted(name for name in found if os.path.exists(os.path.join(root, name)))


def test_every_relative_link_in_the_docs_resolves():
    assert len(doc_files(REPO)) >= 5
    assert broken_links(REPO, doc_files(REPO)) == []


def test_the_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A `b` c\n\n## Same\n\n## Same\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#a-b-c) [ok](docs/a.md#same-1) [web](https://x.y/z.md)\n"
        "[gone](docs/gone.md) [no heading](docs/a.md#nope)\n```\n[in code](docs/none.md)\n```\n"
    )
    assert broken_links(str(tmp_path), doc_files(str(tmp_path))) == [
        "README.md: docs/gone.md: no such file",
        "README.md: docs/a.md#nope: no such heading",
    ]
