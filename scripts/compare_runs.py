"""Say whether two `skiptune finetune --json` records trained the same adapters (used by
`make demo`: the simulated board against the golden model). Exit status 1 if not."""

import json
import sys


def main(argv):
    if len(argv) != 3:
        print("usage: compare_runs.py RUN.json REFERENCE.json", file=sys.stderr)
        return 2
    try:
        runs = [json.load(open(path)) for path in argv[1:]]
    except (OSError, ValueError) as e:
        print(f"compare_runs: cannot read a record: {e}", file=sys.stderr)
        return 2
    a, b = runs
    same = a["adapters_sha256"] == b["adapters_sha256"]
    verdict = "match" if same else "DO NOT match"
    print(f"adapters of device {a['device']} {verdict} device {b['device']}'s "
          f"(sha256 {a['adapters_sha256'][:16]}... vs {b['adapters_sha256'][:16]}...); "
          f"target accuracy {a['accuracy_after']:.4f} vs {b['accuracy_after']:.4f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
