"""Print the Markdown table of a ``bnlab bench --json`` file: ``python bench/to_markdown.py out.json``."""

import json
import sys

from bnlab.benchmarks.timing import markdown_table

if __name__ == "__main__":
    doc = json.loads(open(sys.argv[1]).read())
    m = doc["machine"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread(s)), "
          f"load average {m.get('loadavg_1m', float('nan')):.1f}, {m['date']}\n")
    print(markdown_table(doc["results"]))
    for fam, why in doc.get("skipped", {}).items():
        print(f"\nSkipped {fam}: {why}")
