#!/usr/bin/env python3
"""Prints one regex (for `cargo mutants -F`) matching exactly the mutants named in the given
files (one name per line, as in cargo-mutants' missed.txt).

usage: regex.py target/mutants/sim-0/mutants.out/missed.txt [...]
"""
import sys

META = set(r"\.+*?()|[]{}^$")


def escape(name: str) -> str:
    # Only regex metacharacters: the regex crate refuses some escapes Python's re.escape makes.
    return "".join("\\" + c if c in META else c for c in name)


names = [line.rstrip("\n") for path in sys.argv[1:] for line in open(path) if line.strip()]
if not names:
    sys.exit("no mutant names given")
print("^(" + "|".join(escape(n) for n in names) + ")$")
