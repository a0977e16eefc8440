"""Mutation score per module, from `mutmut results --all true` (run `make mutation` first; see pyproject.toml).

A mutant counts as caught when a test failed on it ("killed") or it made the tests hang ("timeout": the
guarantee broke loudly). Survivors are listed so each can be killed by a test or argued equivalent in
benchmarks/README.md.
"""

import collections
import subprocess
import sys
from pathlib import Path

CAUGHT = {"killed", "timeout"}


def module_of(mutant: str) -> str:
    # histokt.store.sampler.xǁGlobalBatchSamplerǁ__iter____mutmut_6 -> histokt.store.sampler
    return ".".join(part for part in mutant.split(".") if not part.startswith("x"))


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    counts: dict = collections.defaultdict(collections.Counter)
    survivors = collections.defaultdict(list)
    for line in out.splitlines():
        if ":" not in line:
            continue
        mutant, status = (s.strip() for s in line.rsplit(":", 1))
        module = module_of(mutant)
        counts[module][status] += 1
        if status not in CAUGHT:
            survivors[module].append(f"{mutant} ({status})")
    print("| module | mutants | caught | survived | score |\n|---|---:|---:|---:|---:|")
    for module in sorted(counts):
        c = counts[module]
        total, caught = sum(c.values()), sum(c[s] for s in CAUGHT)
        print(f"| `{module}` | {total} | {caught} | {total - caught} | {100 * caught / total:.0f} % |")
    for module, names in sorted(survivors.items()):
        print(f"\n{module}: {len(names)} not caught")
        for name in names:
            print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
