#!/usr/bin/env bash
# Runs README.md's shell blocks as a new user pastes them: every ```sh block, in order, in
# one bash session started at the checkout's root, its lines fed through a plain pipe, stopping at the first command that
# fails (the last "readme-check: README.md:<line>" printed names its block). A block right
# after a `<!-- readme-check: skip <reason> -->` line is not run (the reason is printed);
# ```text blocks are output and templates; a block without a language is an error.
# Processes a block leaves in the background are stopped at the end.
# Usage: scripts/readme-check.sh
# (scripts/test.sh runs it after the tests: its blocks rebuild target/debug/haul without
# the test-only hooks, and run a cluster on the default ports 50051/50052.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p target
script=target/readme-check.sh
python3 - README.md > "$script" <<'PY'
import re, shlex, sys

lines = open(sys.argv[1]).read().split("\n")
out = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
ran = skipped = 0
i = 0
while i < len(lines):
    fence = re.match(r"^```(\S*)\s*$", lines[i])
    if not fence:
        i += 1
        continue
    lang, start = fence.group(1), i + 1
    end = start
    while not lines[end].startswith("```"):
        end += 1
    skip = re.match(r"^<!-- readme-check: skip (.+) -->$", lines[i - 1]) if i else None
    where = f"README.md:{i + 1}"
    if lang == "":
        sys.exit(f"readme-check: {where}: a block without a language (sh runs, text does not)")
    if lang in ("sh", "bash"):
        if skip:
            out.append("echo " + shlex.quote(f"readme-check: {where} not run: {skip.group(1)}") + " >&2")
            skipped += 1
        else:
            out.append(f"echo 'readme-check: {where}' >&2")
            out.extend(lines[start:end])
            ran += 1
    i = end + 1
out.append(f"echo 'readme-check: {ran} blocks ran as pasted, {skipped} not run (reasons above)' >&2")
out.append("touch target/readme-check.done")
print("\n".join(out))
PY
# fed to bash through a plain pipe, as a block pasted without bracketed paste (typed,
# tmux, some ssh clients) reaches a shell: a command that reads its standard input would
# swallow the lines after it, and the check fails
rm -f target/readme-check.done
bash < "$script"
[ -f target/readme-check.done ] || {
  echo "readme-check: the last lines never ran: a command read the pasted lines as its input" >&2
  exit 1
}
