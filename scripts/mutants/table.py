#!/usr/bin/env python3
"""Builds the mutation table (docs/mutation-testing.md) from cargo-mutants output directories.

usage: table.py --sim DIR... [--rerun DIR... --rerun-files FILE...] [--full DIR...] [--equivalent FILE]
                [--current FILE]

--sim: runs with the simulator alone as the oracle (later directories override earlier ones
       for the same mutant, so re-runs of survivors go last);
--rerun: simulator runs over whole files that changed since, named by --rerun-files (their
       results replace every earlier result for those files, whose mutant names moved; other
       results of the rerun, which `-F` lets through for struct-field deletions, count as usual);
--full: runs of the full suite on the simulator's survivors (same rule);
--equivalent: proven equivalents, one per line: `<mutant name> # <reason>`;
--current: `cargo mutants --list` of the code as it is now: only these mutants count (results
       of code removed since are dropped), and every one of them must have a result.
A timeout counts as caught (the timeouts are at least 3x the unmutated run).
"""
import collections
import json
import sys

CAUGHT = ("CaughtMutant", "Timeout")


def load(directory):
    found = {}
    with open(f"{directory}/mutants.out/outcomes.json") as f:
        for outcome in json.load(f)["outcomes"]:
            scenario = outcome["scenario"]
            if isinstance(scenario, dict) and "Mutant" in scenario:
                mutant = scenario["Mutant"]
                found[mutant["name"]] = (mutant["file"], outcome["summary"])
    return found


groups = {"--sim": [], "--rerun": [], "--rerun-files": [], "--full": [], "--equivalent": [], "--current": []}
current = None
for arg in sys.argv[1:]:
    if arg in groups:
        current = arg
    elif current is None:
        sys.exit(__doc__)
    else:
        groups[current].append(arg)
sim, full, equivalent = {}, {}, {}
for d in groups["--sim"]:
    sim.update(load(d))
rerun = {}
for d in groups["--rerun"]:
    rerun.update(load(d))
rerun_files = set(groups["--rerun-files"])
sim = {name: v for name, v in sim.items() if v[0] not in rerun_files}
sim.update(rerun)
for path in groups["--current"]:
    current = {line.strip() for line in open(path) if line.strip()}
    sim = {name: v for name, v in sim.items() if name in current}
    for name in sorted(current - set(sim)):
        print(f"NO RESULT {name}", file=sys.stderr)
for d in groups["--full"]:
    full.update(load(d))
for path in groups["--equivalent"]:
    for line in open(path):
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.rstrip("\n").partition(" # ")
            equivalent[name.strip()] = reason.strip()

rows = collections.defaultdict(collections.Counter)
survivors = []
for name, (file, summary) in sorted(sim.items()):
    row = rows[file]
    row["mutants"] += 1
    if summary == "Unviable":
        row["unviable"] += 1
    elif name in equivalent:
        row["equivalent"] += 1
    else:
        row["viable"] += 1
        if summary in CAUGHT:
            row["sim"] += 1
            row["full"] += 1
        elif full.get(name, (None, None))[1] in CAUGHT:
            row["full"] += 1
        else:
            survivors.append(name)

unused = sorted(set(equivalent) - set(sim))
total = collections.Counter()
print("| file | mutants | unviable | proven equivalent | viable | caught by the simulator alone | caught by the full suite |")
print("|---|---|---|---|---|---|---|")
for file in sorted(rows):
    r = rows[file]
    total.update(r)
    print(f"| `{file}` | {r['mutants']} | {r['unviable']} | {r['equivalent']} | {r['viable']} | {r['sim']} | {r['full']} |")


def pct(a, b):
    return f"{100 * a / b:.0f} %" if b else "-"


t = total
print(
    f"| **all** | {t['mutants']} | {t['unviable']} | {t['equivalent']} | {t['viable']} "
    f"| {t['sim']} ({pct(t['sim'], t['viable'])}) | {t['full']} ({pct(t['full'], t['viable'])}) |"
)
for name in survivors:
    print(f"SURVIVOR {name}", file=sys.stderr)
for name in unused:
    print(f"EQUIVALENT NOT FOUND (renamed?) {name}", file=sys.stderr)
