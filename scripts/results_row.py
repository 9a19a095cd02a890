"""Print the docs/RESULTS.md row for a model from its `medmoe eval` outputs (`--intervals`: its row
of the intervals table, each number with its 95% bootstrap interval).

    python scripts/results_row.py "nano Med-MoE" 0.2B evals/nano-vqarad/metrics.json evals/nano-slake/metrics.json
    python scripts/results_row.py --intervals "nano Med-MoE" evals/*/metrics.json
"""

import json
import sys

from medmoe.evaluation.report import interval_row, results_row

if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--intervals":
        label, *paths = sys.argv[2:]
        print(interval_row(label, [json.load(open(p)) for p in paths]))
    elif len(sys.argv) >= 4:
        label, activated, *paths = sys.argv[1:]
        print(results_row(label, activated, [json.load(open(p)) for p in paths]))
    else:
        sys.exit(__doc__)
