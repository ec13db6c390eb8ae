"""reproduce.py: train every method and evaluate the benchmarks, writing RESULTS.md and plots.

Not implemented yet: it needs the training loop (scope.py) and the evaluation harness (eval/).
"""
import sys

if __name__ == "__main__":
    sys.exit("reproduce.py is not implemented yet: it lands with the training loop and the eval/ harness. "
             "See README.md for what works today.")
