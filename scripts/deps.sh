#!/bin/sh
# Prints the dependency edges between the modules of src/ ("from -> to", one a line) and
# exits 1 if they form a cycle. A module is a top-level folder or file of src/, except
# that each job kind (src/jobs/<kind>/) is a module of its own and src/jobs/mod.rs is
# `jobs`, the vocabulary the kinds share. An edge is any `crate::<module>` path outside a
# comment (and `connector::<module>` in src/bin/), so inline paths count as much as `use`.
#
# src/queue/ is not checked: it is becoming a crate of its own, where the compiler keeps
# it at the bottom (it may import nothing of the product). Its edges are left out here
# until then, not counted as allowed.
#
# Usage: scripts/deps.sh [SRC_DIR]   (default: the src/ next to this script)
# Run by `cargo test --lib` (src/lib.rs), so CI keeps the graph acyclic.
set -eu

src=${1:-"$(dirname "$0")/../src"}
kinds=$(find "$src/jobs" -mindepth 1 -maxdepth 1 -type d -exec basename {} \; 2>/dev/null | sort | tr '\n' ' ')

edges=$(find "$src" -name '*.rs' | sort | while read -r f; do
    rel=${f#"$src"/}
    case $rel in
        lib.rs | queue/*) continue ;;
        bin/*) from=bin ;;
        jobs/mod.rs) from=jobs ;;
        jobs/*/*) k=${rel#jobs/}; from=jobs/${k%%/*} ;;
        */*) from=${rel%%/*} ;;
        *) from=${rel%.rs} ;;
    esac
    awk -v from="$from" -v kinds=" $kinds" -v file="$rel" '
        BEGIN { root = (from == "bin") ? "connector::" : "crate::" }
        {
            line = $0
            sub(/^[ \t]+/, "", line)
            if (line ~ /^\/\//) next
            # In a job kind, `super::x` from its mod.rs (or `super::super::x` from a file
            # inside it) is the jobs module or a sibling kind.
            up = (file ~ /^jobs\/[^\/]+\/mod\.rs$/) ? "super::" : "super::super::"
            if (from ~ /^jobs\//) {
                rest = line
                while (match(rest, "(^|[^:a-z_])" up "[a-z_]+")) {
                    m = substr(rest, RSTART, RLENGTH)
                    sub(/^[^s]*super::(super::)?/, "", m)
                    to = (index(kinds, " " m " ") > 0) ? "jobs/" m : "jobs"
                    print from " -> " to
                    rest = substr(rest, RSTART + RLENGTH)
                }
            }
            rest = line
            while (match(rest, root "[a-z_]+(::[a-z_]+)?")) {
                m = substr(rest, RSTART + length(root), RLENGTH - length(root))
                rest = substr(rest, RSTART + RLENGTH)
                # `crate::say!`: a macro, exported at the root from wherever it is.
                if (substr(rest, 1, 1) == "!") continue
                n = split(m, p, "::")
                to = p[1]
                if (to == "jobs" && n > 1 && index(kinds, " " p[2] " ") > 0) to = "jobs/" p[2]
                print from " -> " to
            }
        }' "$f"
done | awk '{ split($0, e, " -> ") } e[1] != e[2]' | sort -u)

printf '%s\n' "$edges"

# tsort names a loop on stderr and fails when the edges are not a DAG.
if ! printf '%s\n' "$edges" | awk '{ print $1, $3 }' | tsort >/dev/null 2>/tmp/deps.$$; then
    echo "cycle:" >&2
    grep -v '^tsort: -:' /tmp/deps.$$ | sed 's/^tsort: /  /' >&2 || true
    rm -f /tmp/deps.$$
    exit 1
fi
rm -f /tmp/deps.$$
