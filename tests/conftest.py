import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Every hypothesis test runs the same examples on every machine and every run: derandomized (examples derived
# from each test's source), no example database carried between runs, no wall-clock deadline (CI is slow).
# A green suite stays green; a new failing example appears only when a test or hypothesis itself changes.
settings.register_profile("scope", deadline=None, max_examples=60, derandomize=True, database=None,
                          print_blob=True)
settings.load_profile("scope")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # 2 torch threads under any other load slow 10-40x on these machines

# The benchmark copies laid beside the repository (never copied into it).
SHARED_BENCHMARKS = Path(os.environ.get("SCOPE_SHARED_BENCHMARKS", ROOT.parent / "shared" / "benchmarks"))

import tiny_testbed  # noqa: E402

# Small enough for CI; built by tiny_testbed.build_tiny_models exactly like the default models, just smaller. Head size
# 32 (64 / 2 heads), one that vLLM's CPU attention supports, so the vLLM tests run these models on the real engine.
MICRO_TEACHER = tiny_testbed.TinyModel(hidden=64, layers=2, heads=2, sft_steps=600, sft_lr=3e-3, cosine=True)
MICRO_STUDENT = tiny_testbed.TinyModel(hidden=64, layers=2, heads=2, sft_steps=330, sft_lr=3e-3)

# Their build (1.2 MB, made here by this recipe with 1 thread) ships in tests/micro/ so that CI does not spend a minute
# of every run rebuilding them; it is copied into the test cache, never used in place (no test can write into the
# repository). Changing MICRO_* changes the cache key and the fixture builds the new models as before; the build
# itself stays tested (tests/test_testbed.py). A build on another CPU would give other weights: these are fixed.
MICRO_SHIPPED = ROOT / "tests" / "micro"


@pytest.fixture(scope="session")
def micro_models(tmp_path_factory):
    cache = Path(os.environ.get("SCOPE_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    for shipped in MICRO_SHIPPED.glob("tiny-*"):
        if not (cache / shipped.name / "DONE").exists():            # copied whole, then renamed: never half there
            part = cache / (shipped.name + ".copying")
            shutil.rmtree(part, ignore_errors=True)
            shutil.copytree(shipped, part)
            shutil.rmtree(cache / shipped.name, ignore_errors=True)
            part.rename(cache / shipped.name)
    student, teacher = tiny_testbed.build_tiny_models(cache, MICRO_TEACHER, MICRO_STUDENT, seed=0, log=lambda *a: None)
    return str(student), str(teacher)


@pytest.fixture
def no_vllm(monkeypatch):
    """vllm cannot be imported (as on a machine without it), whatever this machine has installed."""
    import builtins
    real_import = builtins.__import__

    def blocked(name, *args, **kw):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", blocked)
