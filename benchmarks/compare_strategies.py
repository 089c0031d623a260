"""The strategy benchmark (issue 6): every setting x strategy x seed on an identical budget.

Same as ``python -m align_kd bench``; see ``python benchmarks/compare_strategies.py --help``.
Outputs: benchmarks/results/<setting>/{results.json, table.md, accuracy.png, alignment.png}.
"""
import sys

from align_kd.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
