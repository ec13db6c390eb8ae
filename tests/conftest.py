import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # 2 torch threads under any other load slow 10-40x on these machines

# The benchmark copies laid beside the repository (never copied into it).
SHARED_BENCHMARKS = Path(os.environ.get("SCOPE_SHARED_BENCHMARKS", ROOT.parent / "shared" / "benchmarks"))
