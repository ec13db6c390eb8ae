"""The tiny testbed: a synthetic math task, a character tokenizer, and tiny Qwen2 teacher and student models built
on this machine. It belongs to the harness, not to the method: `python scope.py` imports it (lazily) only when no
--student/--teacher/--data are given, so a laptop CPU with no internet can run the whole pipeline in minutes. It
imports no project module (scope.py imports it; evaluation on its test split is scope.evaluate).

    python -c "import tiny_testbed; tiny_testbed.build_tiny_models('.cache/scope', seed=1)"   # a build (~6 minutes)

The build is safe to kill: it writes into `<cache>/tiny-<key>.building/` and renames that to `tiny-<key>/` only once
both models are saved, so a finished-looking directory is a finished build. One process builds at a time under an
flock on `tiny-<key>.lock` (the kernel drops it when its owner dies, even on SIGKILL, OOM or a reboot); a process
that finds a live builder says so and prints the builder's progress while it waits, and a process that finds the
debris of a dead builder says so and builds again.
"""

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import sympy
import torch

# ----------------------------------------------------------------------------------------------------
# the task: +/- chains of digits (3, 4, 5 terms) and same-denominator fractions, with chain-of-thought solutions
# ----------------------------------------------------------------------------------------------------
TINY_LEVELS = ("add3", "add4", "add5", "frac")


def tiny_problem(rng, level):
    """One problem: {"problem", "answer", "solution", "level"}; the solution is a chain of thought ending in
    \\boxed{}."""
    if level == "frac":
        den = rng.randint(2, 9)
        a, b = rng.randint(1, den), rng.randint(1, den)
        gold = sympy.Rational(a + b, den)                      # reduced gold; the model writes \frac{a+b}{den}
        answer = str(gold.p) if gold.q == 1 else f"\\frac{{{gold.p}}}{{{gold.q}}}"
        return {"problem": f"{a}/{den}+{b}/{den}=?", "answer": answer, "level": level,
                "solution": f"{a}+{b}={a + b} \\boxed{{\\frac{{{a + b}}}{{{den}}}}}"}
    n_terms = int(level[-1])
    total = rng.randint(0, 9)
    text, steps = str(total), []
    for _ in range(n_terms - 1):
        x, op = rng.randint(0, 9), rng.choice("+-")
        if op == "-" and total - x < 0:                        # keep the running total >= 0
            op = "+"
        new = total + x if op == "+" else total - x
        text += f"{op}{x}"
        steps.append(f"{total}{op}{x}={new}")
        total = new
    return {"problem": f"{text}=?", "answer": str(total), "level": level,
            "solution": "; ".join(steps) + f" \\boxed{{{total}}}"}


def tiny_task(split, n, seed=0):
    """Deterministic train/test problems, levels cycling; test and train streams use disjoint seeds."""
    rng = random.Random(f"{split}-{seed}")
    return [dict(tiny_problem(rng, TINY_LEVELS[i % len(TINY_LEVELS)]), id=f"tiny-{split}-{i}") for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# the study's recipe (docs/reproducing.md): SFT and RL problems from disjoint halves of the problem space, a
# validation split apart from the test split, and a teacher trained until it reaches a stated accuracy on it
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Calibrated:
    """How the study's builds are made. Every build fine-tunes on problems of the "sft" half of the problem space (a
    hash of the problem text decides the half) and its RL runs draw from the "rl" half, so no RL prompt is an SFT
    problem of any build; each training seed of each build has its own RL stream. The teacher trains its recipe's
    steps, then `stage_steps` more at a tenth of its peak learning rate until its macro Avg@val_k on the validation
    split reaches `target`, at most `max_stages` times; a build that does not reach it is recorded as such."""
    target: float = 0.90
    stage_steps: int = 190
    max_stages: int = 3
    val_per_level: int = 128
    val_k: int = 4


CALIBRATED = Calibrated()


def half(problem):
    """"sft" or "rl": the half of the problem space a problem text belongs to (first byte of its sha256)."""
    return "sft" if hashlib.sha256(problem.encode()).digest()[0] % 2 == 0 else "rl"


def tiny_rows(stream, n, part=None, exclude=frozenset()):
    """n problems of the random stream named `stream`, levels cycling, each drawn until it is in `part` (a half) and
    its text is not in `exclude`."""
    rng, out = random.Random(stream), []
    for i in range(n):
        level = TINY_LEVELS[i % len(TINY_LEVELS)]
        while True:
            row = tiny_problem(rng, level)
            if (part is None or half(row["problem"]) == part) and row["problem"] not in exclude:
                break
        out.append(dict(row, id=f"{stream}-{i}"))
    return out


def sft_rows(build):
    return tiny_rows(f"sft-build{build}", 20000, "sft")


def rl_rows(build, seed):
    return tiny_rows(f"rl-build{build}-seed{seed}", 20000, "rl")


def validation_rows(per_level):
    """The validation split of the teacher's stopping rule: no problem text of the test split (tiny_task("test"))."""
    test = frozenset(r["problem"] for r in tiny_task("test", 1024, 0))
    return tiny_rows("validation", per_level * len(TINY_LEVELS), exclude=test)


CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %} A: {% endif %}")


def tiny_tokenizer():
    """Character-level tokenizer (printable ASCII) wrapped as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------------------------------
# the models: tiny Qwen2s (the paper's students are Qwen2), supervised on gold solutions
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TinyModel:
    """Size and supervised pre-training of one tiny model."""
    hidden: int
    layers: int
    heads: int
    sft_steps: int
    sft_lr: float
    sft_batch: int = 64
    warmup: int = 30
    cosine: bool = False      # decay the lr to 10% over the run (after warm-up)
    weak_level: str = ""      # a level this model sees little of in SFT (the second regime's teacher; issue #12)
    weak_keep: float = 1.0    # the fraction of that level's SFT problems it keeps


TINY_TEACHER = TinyModel(hidden=192, layers=4, heads=6, sft_steps=380, sft_lr=2e-3, cosine=True)
# Head size 32 for both (teacher 192 / 6, student 96 / 3): vLLM's CPU attention takes 32, 64, 80, ... but not 24
# (the student had 4 heads of 24 until 2026-11-30; same parameter count, the attention split differs).
TINY_STUDENT = TinyModel(hidden=96, layers=3, heads=3, sft_steps=280, sft_lr=3e-3)
# The second regime (docs/reproducing.md, --regime): the same teacher trained on 2% of the add5 problems, so it is
# unsure (high perplexity) and unreliable exactly there and reliable elsewhere.
WEAK_TEACHER = dataclasses.replace(TINY_TEACHER, weak_level="add5", weak_keep=0.02)
REGIMES = {"default": TINY_TEACHER, "weak-add5": WEAK_TEACHER}


def tiny_model_config(spec, tokenizer):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                       max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def sft(model, tokenizer, rows, spec, seed, desc, progress=lambda step: None):
    """Supervised training on gold solutions; loss on the answer tokens and eos only."""
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_factor(s):
        decay = 0.55 + 0.45 * math.cos(math.pi * s / spec.sft_steps) if spec.cosine else 1.0
        return min(1.0, (s + 1) / spec.warmup) * decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    for step in tqdm(range(spec.sft_steps), desc=desc, leave=False):
        idx = torch.randint(0, len(rows), (spec.sft_batch,), generator=g, device="cpu").tolist()
        prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": rows[i]["problem"]}],
                                                           tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for i in idx]   # = scope.prompt_text
        answers = [tokenizer(rows[i]["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for i in idx]
        length = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((len(idx), length), tokenizer.pad_token_id, device="cpu")   # the build runs on the CPU
        labels = torch.full((len(idx), length), -100, device="cpu")
        for r, (p, a) in enumerate(zip(prompts, answers)):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a, device="cpu")
            labels[r, len(p):len(p) + len(a)] = torch.tensor(a, device="cpu")
        attention = (labels != -100) | (ids != tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        progress(step + 1)
    model.eval()
    return model


def embedded_default(args, rows, log):
    """What `python scope.py` uses for whatever the user did not name: the tiny models, and (when rows, the problems
    of --data, is None) the tiny task with its test split for periodic evaluation.
    -> (student, teacher, train rows, test rows or None)."""
    student, teacher = args.student, args.teacher
    if not student or not teacher:
        dirs = build_tiny_models(args.cache_dir, log=log, threads=args.threads)
        student, teacher = student or str(dirs[0]), teacher or str(dirs[1])
    if rows is not None:
        return student, teacher, rows, None
    return student, teacher, tiny_task("train", 20000, args.seed), tiny_task("test", args.eval_problems, args.seed)


# ----------------------------------------------------------------------------------------------------
# building once, safely: atomic rename of a finished build, an flock that dies with its owner
# ----------------------------------------------------------------------------------------------------
# The default build's two models (the embedded default: TINY_TEACHER, TINY_STUDENT, build seed 0, 1 thread), shipped
# in the repository so that every machine trains and evaluates the same models as RESULTS.md, at once. A build of
# the same recipe on another CPU gives other weights (docs/testbed.md); the shipped ones serve when the key matches.
SHIPPED = Path(__file__).resolve().parent / "testbed"


def _key(teacher, student, seed, threads, design=None):
    """The cache key: everything the built weights depend on. The thread count is part of it: a build with 2 torch
    threads sums in another order than one with 1 and trains different models (measured: the student's Avg@4 was
    39.5% built with 2 threads and 27.3% with 1)."""
    def spec(m):                                               # default-valued new fields leave old keys unchanged
        return {k: v for k, v in dataclasses.asdict(m).items() if k not in ("weak_level", "weak_keep") or
                v != {"weak_level": "", "weak_keep": 1.0}[k]}
    blob = json.dumps([spec(teacher), spec(student), seed, TINY_LEVELS, threads, "tiny-v3"]
                      + ([dataclasses.asdict(design)] if design else []))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_tiny_models(cache_dir, teacher=TINY_TEACHER, student=TINY_STUDENT, seed=0, log=print, threads=1,
                      wait_report_s=10.0, design=None, strength=None):
    """Build (or reuse from cache_dir, keyed by their config) the tiny tokenizer, teacher and student.
    Returns (student_dir, teacher_dir). Any number of processes (torchrun ranks, parallel runs) may call it: one
    builds, the others wait and report the builder's progress. threads: torch threads for the build (1 by default:
    on a shared or loaded machine 2 threads run several times slower than 1; docs/testbed.md, "Thread count").
    design: None (the default testbed: SFT on tiny_task("train", 20000, seed)) or a Calibrated recipe, which needs
    strength(model, tokenizer) -> {"macro": accuracy, ...} on validation_rows (reproduce.py gives it; this module
    imports no project code); the scores go to strength.json beside the models."""
    root = Path(cache_dir) / f"tiny-{_key(teacher, student, seed, threads, design)}"
    dirs = root / "student", root / "teacher"
    if (root / "DONE").exists():
        return dirs
    if (SHIPPED / root.name / "DONE").exists():               # the default build, in the repository: no build
        return SHIPPED / root.name / "student", SHIPPED / root.name / "teacher"
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path, status_path = root.with_name(root.name + ".lock"), root.with_name(root.name + ".status")
    with open(lock_path, "a+") as lock:
        _acquire(lock, status_path, log, wait_report_s)       # held until the with-block closes the file
        if (root / "DONE").exists():                          # built by the process we waited for
            return dirs
        previous = _read_json(status_path)
        if previous.get("pid") is not None:
            log(f"tiny models: the build by process {previous['pid']} (started {previous.get('started', '?')}) "
                f"did not finish and that process is gone; taking over and building again")
        _build(root, teacher, student, seed, log, threads, status_path, design, strength)
        status_path.unlink(missing_ok=True)
    return dirs


def _calibrate(model, tokenizer, rows, spec, seed, design, strength, teacher, status, log):
    """Validation scores of a model just fine-tuned; a teacher trains on in stages of design.stage_steps at a tenth of
    its peak learning rate while it is below design.target (at most design.max_stages). -> [{steps, macro, ...}]."""
    scores = [{"steps": spec.sft_steps, **strength(model, tokenizer)}]
    stage = dataclasses.replace(spec, sft_steps=design.stage_steps, sft_lr=spec.sft_lr / 10, warmup=1, cosine=False)
    while teacher and scores[-1]["macro"] < design.target and len(scores) <= design.max_stages:
        status(f"teacher: validation {100 * scores[-1]['macro']:.1f} < {100 * design.target:.0f}, stage {len(scores)}")
        sft(model, tokenizer, rows, stage, seed + len(scores), f"tiny teacher, stage {len(scores)}")
        scores.append({"steps": scores[-1]["steps"] + stage.sft_steps, **strength(model, tokenizer)})
    log(f"tiny {'teacher' if teacher else 'student'}: validation macro Avg " +
        " -> ".join(f"{100 * s['macro']:.1f} ({s['steps']} steps)" for s in scores))
    return scores


def _acquire(lock, status_path, log, wait_report_s):
    """flock the open lock file; while another live process holds it, say who and how far it got."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    last, last_time = None, 0.0
    while True:
        s = _read_json(status_path)
        line = (f"tiny models: waiting for process {s.get('pid', '?')}, which is building them "
                f"({s.get('progress', 'starting')})")
        if last is None or (line != last and time.time() - last_time >= wait_report_s):
            log(line)
            last, last_time = line, time.time()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.5)


def _build(root, teacher, student, seed, log, threads, status_path, design=None, strength=None):
    from transformers import AutoModelForCausalLM
    work = root.with_name(root.name + ".building")
    shutil.rmtree(work, ignore_errors=True)                   # debris of an interrupted build
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def status(progress):                                     # atomic, so a waiter never reads half a file
        tmp = status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "started": started, "progress": progress}))
        tmp.replace(status_path)

    status("starting")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokenizer = tiny_tokenizer()
        rows = sft_rows(seed) if design else tiny_task("train", 20000, seed)
        record = {"target": design.target} if design else None
        for name, spec in (("teacher", teacher), ("student", student)):
            t0 = time.time()
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_model_config(spec, tokenizer))
            every = max(1, spec.sft_steps // 20)
            keep = [r for i, r in enumerate(rows) if r["level"] != spec.weak_level or i % 1000 < 1000 * spec.weak_keep]
            sft(model, tokenizer, keep, spec, seed, f"building tiny {name}",
                lambda s: s % every == 0 and status(f"{name}: SFT step {s}/{spec.sft_steps}"))
            if design:
                record[name] = _calibrate(model, tokenizer, keep, spec, seed, design, strength, name == "teacher",
                                          status, log)
            model.save_pretrained(work / name)
            tokenizer.save_pretrained(work / name)
            log(f"built tiny {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                f"{spec.sft_steps} SFT steps, {threads} thread(s)) in {time.time() - t0:.0f}s")
        if record:
            record["reached"] = record["teacher"][-1]["macro"] >= design.target
            (work / "strength.json").write_text(json.dumps(record, indent=1))
        (work / "DONE").touch()
        if root.exists():                                     # an old-layout build that never finished
            shutil.rmtree(root)
        work.rename(root)                                     # the one step that makes the build visible
        log(f"tiny models ready in {root}")
    finally:
        torch.set_num_threads(old_threads)
