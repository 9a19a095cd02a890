"""Print the docs/RESULTS.md row for a model from its `medmoe eval` outputs.

    python scripts/results_row.py "nano Med-MoE" 0.2B evals/nano-vqarad/metrics.json evals/nano-slake/metrics.json
"""

import json
import sys

from medmoe.evaluation.report import results_row

if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    label, activated, *paths = sys.argv[1:]
    print(results_row(label, activated, [json.load(open(p)) for p in paths]))
