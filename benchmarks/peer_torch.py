"""dsv3c on the CPU beside Hugging Face transformers' `DeepseekV3ForCausalLM` in PyTorch eager: same weights, one run.

A 34M-parameter DeepSeek-V3-shaped model (hidden 512, 4 layers with the first dense, 16 routed experts top-4 plus one
shared, MLA with q_lora 256 / kv_lora 128 / nope 64 / rope 32 / v 64, vocab 8192, no MTP) is built by transformers
from a seed and saved with `save_pretrained`; dsv3c reads that directory with `dsv3c.import_hf`, so both sides run
exactly the same weights. The f32 logits of both are compared first (parity), then each row is timed on each dtype:

- forward, batch 4 x 512: tokens/s of one full forward pass (all logits);
- train, batch 4 x 256: tokens/s of one optimizer step (forward, backward, clip 1.0, AdamW with dsv3c's default
  hyperparameters on both sides);
- decode, batch 1 and batch 8: greedy, 128-token prompts, 128 new tokens with the KV cache; tokens/s of generated
  tokens (the prefill is part of the time on both sides);
- rss: peak resident memory (`ru_maxrss`) of a fresh process that loads the f32 model and takes 3 train steps.

Why torch runs elsewhere: torch and transformers are not dsv3c dependencies, so the benchmark makes its own virtual
environment once (`--venv`, default /tmp/dsv3c-peer-venv) and runs `peer_torch_worker.py` there, one subprocess per
measurement, which prints JSON. The two frameworks never run at the same time, but their timed calls alternate:
torch's worker, warmed up, times one call when the driver asks, then dsv3c times one in this process, and so on. On
a shared host the machine's speed drifts (both sides' train steps ran 30% faster twenty minutes apart on this one),
so timing one side after the other would measure the host as much as the frameworks.

Timing: one warm-up call each (dsv3c's includes the jit compile; `compile` + first call is reported as compile
time), then up to `--reps` timed calls each, fewer once either side's add up to `--budget` seconds (at least one:
that keeps the slow torch bf16 rows within the run's time); tokens/s is from the median wall time. Process CPU time
(all threads) is recorded too and printed as tokens per CPU-second: on a shared machine wall time also counts the
waiting for a core. The rss row runs first, while the driver is still small: ru_maxrss is inherited through fork
and exec, so a child of a big process would report its parent's peak (each child's VmHWM is printed as the
cross-check).

Why the torch worker gets OMP_WAIT_POLICY=PASSIVE by default: torch's OpenMP threads spin at every barrier, and on a
machine whose load is above its core count a spinning thread holds a core that its sibling needs; on this 2-core
shared host that made a batch-1 decode 8x slower with 2 threads than with 1. Passive waiting removes that artefact
without taking threads away (`--torch-omp-wait default` measures torch as it comes).

    python benchmarks/peer_torch.py                                       # everything, about 15 min on 2 cores
    python benchmarks/peer_torch.py --rows forward,decode --dtypes f32 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import time_calls  # noqa: E402 - benchmarks/timing.py, beside this script

import dsv3c  # noqa: E402

WORKER = Path(__file__).resolve().with_name("peer_torch_worker.py")
TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ROWS = ("forward", "train", "decode", "rss")
DTYPES = ("f32", "bf16")
FORWARD_SHAPE = (4, 512)
TRAIN_SHAPE = (4, 256)
PROMPT, NEW = 128, 128
PARITY_SHAPE = (2, 64)
PARITY_TOLERANCE = 1e-4

# DeepseekV3Config keyword arguments: 34.0M parameters (embedding and head 4.2M each, 3 MoE layers 6.7M each, the
# dense layer 2.4M, attention 0.8M per layer). No bos/eos, so generation never stops early.
CONFIG: dict[str, Any] = {
    "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536, "moe_intermediate_size": 256,
    "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 8, "num_key_value_heads": 8,
    "q_lora_rank": 256, "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
    "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0,
}

START = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr with the elapsed time, so a long run shows where it is without mixing into the table."""
    print(f"[{time.perf_counter() - START:6.0f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The torch side: its virtual environment and its worker
# ---------------------------------------------------------------------------------------------------------------


def _pip(python: Path, args: list[str], report: Path) -> subprocess.CompletedProcess:
    """`pip install` in the venv with a JSON report, which names the file each package actually came from."""
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--report", str(report), *args]
    log("$ " + " ".join(cmd[1:]))
    return subprocess.run(cmd, capture_output=True, text=True)


def _sources(report: Path) -> dict[str, str]:
    """package name -> the URL pip installed it from (empty when the report is missing)."""
    if not report.exists():
        return {}
    data = json.loads(report.read_text())
    return {i["metadata"]["name"].lower(): i["download_info"]["url"] for i in data.get("install", [])}


def ensure_venv(venv: Path) -> dict[str, Any]:
    """Creates the torch venv on first use and returns what is in it (versions, where torch came from). The marker
    file makes later runs start at once; delete the venv to rebuild it."""
    python, marker = venv / "bin" / "python", venv / "dsv3c-peer.json"
    if python.exists() and marker.exists():
        return json.loads(marker.read_text())
    log(f"creating {venv} (once)")
    base = shutil.which("python3.11") or sys.executable
    # --clear: a half-made venv would make pip report "already satisfied" and hide where torch came from
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    report = venv / "pip-report.json"
    attempts = [
        (f"torch=={TORCH_VERSION} from the PyTorch CPU index",
         ["--index-url", CPU_INDEX, "--retries", "1", "--timeout", "20", f"torch=={TORCH_VERSION}"]),
        (f"torch=={TORCH_VERSION} from PyPI", [f"torch=={TORCH_VERSION}"]),
        (f"the newest torch on PyPI (torch=={TORCH_VERSION} could not be installed)", ["torch"]),
    ]
    tried = []
    for how, args in attempts:
        result = _pip(python, args, report)
        tried.append({"attempt": how, "ok": result.returncode == 0,
                      "error": result.stderr.strip().splitlines()[-1:] if result.returncode else []})
        if result.returncode == 0:
            torch_from = _sources(report).get("torch", "")
            break
    else:
        raise SystemExit(f"could not install torch: {json.dumps(tried, indent=1)}")
    # transformers >= 4.57 has DeepseekV3ForCausalLM with the loading behaviour the worker relies on (dtype=)
    result = _pip(python, ["transformers>=4.57", "safetensors", "numpy"], report)
    if result.returncode != 0:
        raise SystemExit(f"could not install transformers: {result.stderr[-2000:]}")
    probe = ("import json, numpy, safetensors, torch, transformers; from transformers import DeepseekV3ForCausalLM; "
             "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
             "'safetensors': safetensors.__version__, 'numpy': numpy.__version__}))")
    versions = json.loads(subprocess.run([str(python), "-c", probe], check=True, capture_output=True,
                                         text=True).stdout)
    # pip's configured find-links or mirrors can satisfy an attempt whatever its index says: name the real source
    source = "the PyTorch CPU index" if CPU_INDEX.split("/")[2] in torch_from else torch_from or "unknown"
    info = {**versions, "torch_installed_by": f"{tried[-1]['attempt']} (wheel from {source})",
            "torch_from": torch_from, "attempts": tried}
    marker.write_text(json.dumps(info, indent=1))
    return info


class ServedWorker:
    """A torch worker started with `bench --serve`: warmed up, it times one call per `call()`, so that the two
    sides' timed calls alternate. Its stderr (transformers' progress bars) goes to a file, not a pipe that could
    fill up and stall it."""

    def __init__(self, venv: Path, args: list[str], env: dict[str, str]):
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([str(venv / "bin" / "python"), str(WORKER), *args, "--serve"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, env={**os.environ, **env})
        self.spent = 0.0  # wall seconds of the timed calls so far
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self._proc.wait()
        self._stderr.seek(0)
        raise RuntimeError(f"torch worker failed:\n{self._stderr.read()[-3000:]}")

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def call(self) -> None:
        self._send("call")
        self.spent += self._read()["wall_s"]

    def finish(self) -> dict[str, Any]:
        """The worker's result (as `bench` without `--serve` prints it), once it has stopped."""
        self._send("done")
        result = self._read()
        self._proc.wait()
        self._stderr.close()
        return result


def worker(venv: Path, args: list[str], env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """Runs the worker in the venv and returns the JSON of its last stdout line."""
    cmd = [str(venv / "bin" / "python"), str(WORKER), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"torch worker failed ({' '.join(args[:3])}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------------------------
# The dsv3c side (this process)
# ---------------------------------------------------------------------------------------------------------------


def block(tree: Any) -> Any:
    """Waits for every array in `tree`, so that a timing covers the computation and not only its dispatch."""
    return jax.block_until_ready(tree)


def measure(prepare: Callable[[], Callable[[], Any]], reps: int, budget: float, torch_side: ServedWorker
            ) -> dict[str, Any]:
    """Compiles (`prepare` returns the call to time), warms up once, then times up to `reps` calls, each right
    after one of the torch worker's, fewer once either side's add up to `budget` seconds (at least one): wall and
    process CPU seconds of each. `compile_s` is `dsv3c.compile` plus the first call (the jit's own compile on
    first use)."""
    clock = time.perf_counter()
    run = prepare()
    compiled = time.perf_counter() - clock
    clock = time.perf_counter()
    run()
    first = time.perf_counter() - clock
    times: list[float] = []
    cpu: list[float] = []
    while len(times) < reps and not (times and max(sum(times), torch_side.spent) >= budget):
        torch_side.call()
        wall, used = time_calls(run, 1, 0.0)
        times += wall
        cpu += used
    return {"compile_s": compiled + first, "compile_call_s": compiled, "first_s": first, "times_s": times,
            "cpu_s": cpu, "median_s": statistics.median(times), "median_cpu_s": statistics.median(cpu)}


def dsv3c_forward(spec: dsv3c.ModelSpec, params: dict[str, jax.Array], tokens: np.ndarray, reps: int,
                  budget: float, torch_side: ServedWorker) -> dict:
    """`Program.forward` on int32 [B, S]: logits of every position."""

    def prepare() -> Callable[[], Any]:
        prog = dsv3c.compile(spec, mode="forward", batch=tokens.shape[0], seq=tokens.shape[1])
        ids = jnp.asarray(tokens)
        return lambda: block(prog.forward(params, ids))

    return {**measure(prepare, reps, budget, torch_side), "tokens_counted": tokens.size}


def train_state(prog: dsv3c.Program, params: dict[str, jax.Array]) -> dict[str, Any]:
    """A fresh training state (AdamW moments zero, step 0) holding the imported weights instead of a random init,
    so both sides train the same model. The weights are copied: the step donates its state, which would otherwise
    delete the caller's arrays (the decode rows use them after the train rows)."""
    state = prog.init_state(0)
    for group in ("params", "router_bias"):
        fresh = state[group]
        missing = set(fresh) - set(params)
        if missing:
            raise RuntimeError(f"imported weights lack {sorted(missing)}")
        state[group] = {k: jnp.array(params[k], v.dtype, copy=True).reshape(v.shape) for k, v in fresh.items()}
    return state


def dsv3c_train(spec: dsv3c.ModelSpec, params: dict[str, jax.Array], tokens: np.ndarray, reps: int,
                budget: float, torch_side: ServedWorker) -> dict:
    """`Program.train_step` on int32 [B, S+1] (the state is donated, so each step feeds the next)."""
    holder: dict[str, Any] = {}

    def prepare() -> Callable[[], Any]:
        prog = dsv3c.compile(spec, mode="train", batch=tokens.shape[0], seq=tokens.shape[1] - 1)
        holder["state"], holder["losses"] = train_state(prog, params), []
        batch = {"tokens": jnp.asarray(tokens)}

        def step() -> None:
            holder["state"], metrics = prog.train_step(holder["state"], batch)
            block((holder["state"], metrics))
            holder["losses"].append(float(metrics["loss"]))

        return step

    result = measure(prepare, reps, budget, torch_side)
    return {**result, "tokens_counted": tokens.shape[0] * (tokens.shape[1] - 1), "losses": holder["losses"]}


def dsv3c_decode(spec: dsv3c.ModelSpec, params: dict[str, jax.Array], prompts: np.ndarray, reps: int,
                 budget: float, torch_side: ServedWorker) -> dict:
    """`Program.generate`, greedy, `NEW` tokens after each prompt (one jitted prefill + decode loop); the tokens of
    the last call are returned too, to compare with transformers'."""
    holder: dict[str, np.ndarray] = {}

    def prepare() -> Callable[[], Any]:
        prog = dsv3c.compile(spec, mode="decode", batch=prompts.shape[0], seq=prompts.shape[1] + NEW)

        def generate() -> None:  # returns NumPy: already synchronous
            holder["tokens"] = np.asarray(prog.generate(params, prompts, max_new_tokens=NEW))

        return generate

    result = measure(prepare, reps, budget, torch_side)
    return {**result, "tokens_counted": prompts.shape[0] * NEW, "generated": holder["tokens"]}


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, Any]:
    """How far two greedy generations agree: identical rows, and the first step where any row differs (after a
    difference the two continue from different prefixes, so later tokens say nothing)."""
    same = ours == theirs
    differs = np.flatnonzero(~same.all(axis=0))
    return {"rows_identical": int(same.all(axis=1).sum()), "rows": int(same.shape[0]),
            "first_difference": int(differs[0]) if differs.size else None}


def peak_rss_mib() -> tuple[float, float]:
    """(ru_maxrss, VmHWM) in MiB. ru_maxrss survives fork and exec (a child of a big process reports at least its
    parent's peak); VmHWM is this process image's own high-water mark, the cross-check."""
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hwm / 1024


def rss_child(directory: Path) -> None:
    """The dsv3c half of the rss row, in a fresh interpreter: import, compile, 3 f32 train steps, peak RSS."""
    spec, params = dsv3c.import_hf(directory, dtype="f32")
    tokens = np.load(directory / "train.npy")
    prog = dsv3c.compile(spec, mode="train", batch=tokens.shape[0], seq=tokens.shape[1] - 1)
    state, losses = train_state(prog, params), []
    del params
    batch = {"tokens": jnp.asarray(tokens)}
    for _ in range(3):
        state, metrics = prog.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    block(state)
    peak, hwm = peak_rss_mib()
    print(json.dumps({"peak_rss_mib": peak, "vm_hwm_mib": hwm, "losses": losses}))


def parity(directory: Path) -> dict[str, Any]:
    """f32 logits of dsv3c and transformers on the same tokens; matmuls at full precision as in the repo's tests."""
    spec, params = dsv3c.import_hf(directory, dtype="f32")
    tokens = np.load(directory / "parity_tokens.npy")
    reference = np.load(directory / "parity_logits_torch.npy")
    with jax.default_matmul_precision("highest"):
        prog = dsv3c.compile(spec, mode="forward", batch=tokens.shape[0], seq=tokens.shape[1])
        logits = np.asarray(prog.forward(params, tokens))
    diff = float(np.abs(logits - reference).max())
    return {"max_abs_diff": diff, "max_abs_logit": float(np.abs(reference).max()),
            "argmax_agree": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
            "ok": diff <= PARITY_TOLERANCE, "shape": list(tokens.shape)}


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def environment(threads: int) -> dict[str, Any]:
    """This process's side of the environment: what decides XLA's speed and how busy the machine is."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": metadata.version("jaxlib"),
        "cpu": cpu, "cores_visible": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(), "threads": threads, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def tokens_file(directory: Path, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random token ids (never 0, the pad id) written where the torch worker reads them: both sides see the same."""
    tokens = np.random.default_rng(seed).integers(1, CONFIG["vocab_size"], shape).astype(np.int32)
    np.save(directory / name, tokens)
    return tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the model, measures peak RSS (first: see there), checks parity, then measures every requested
    (row, dtype), the two sides' timed calls alternating."""
    rows = [r for r in args.rows.split(",") if r]
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [r for r in rows if r not in ROWS] + [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"unknown rows/dtypes {bad}; rows are {','.join(ROWS)}, dtypes {','.join(DTYPES)}")
    decode_batches = [int(b) for b in args.decode_batches.split(",")]
    load_start = os.getloadavg()
    venv_info = ensure_venv(Path(args.venv))
    torch_env = {"OMP_NUM_THREADS": str(args.threads)}
    if args.torch_omp_wait != "default":
        torch_env["OMP_WAIT_POLICY"] = args.torch_omp_wait.upper()
    common = ["--threads", str(args.threads)]
    if args.torch_attn:
        common += ["--attn", args.torch_attn]
    if args.torch_experts:
        common += ["--experts", args.torch_experts]

    directory = Path(args.workdir or tempfile.mkdtemp(prefix="dsv3c-peer-"))
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "venv": venv_info,
                           "env": environment(args.threads), "torch_worker_env": torch_env,
                           "load_start": load_start, "results": []}
    try:
        tokens_file(directory, "parity_tokens.npy", PARITY_SHAPE, args.seed + 1)
        inputs = {"forward.npy": tokens_file(directory, "forward.npy", FORWARD_SHAPE, args.seed + 2),
                  "train.npy": tokens_file(directory, "train.npy", (TRAIN_SHAPE[0], TRAIN_SHAPE[1] + 1),
                                           args.seed + 3)}
        for b in decode_batches:
            inputs[f"decode{b}.npy"] = tokens_file(directory, f"decode{b}.npy", (b, PROMPT), args.seed + 10 + b)
        log("building the model with transformers")
        built = worker(Path(args.venv), ["build", "--dir", str(directory), "--config", json.dumps(CONFIG),
                                         "--seed", str(args.seed)], torch_env)
        out["params"], out["torch_env"] = built["params"], built["env"]
        log(f"{built['params'] / 1e6:.1f}M parameters")
        if "rss" in rows:
            # first, while this process is still small: ru_maxrss is inherited through fork and exec, so a child
            # reports at least this process's own peak (checked against the child's VmHWM in the table)
            out["parent_rss_mib"] = peak_rss_mib()[0]
            load = os.getloadavg()[0]
            log(f"rss: torch (fresh process; this one peaked at {out['parent_rss_mib']:.0f} MiB so far)")
            theirs = worker(Path(args.venv), ["rss", "--dir", str(directory), "--tokens", "train.npy", *common],
                            torch_env)
            log("rss: dsv3c (fresh process)")
            child = subprocess.run([sys.executable, __file__, "--rss-child", str(directory)], capture_output=True,
                                   text=True, timeout=1800)
            if child.returncode != 0:
                raise RuntimeError(f"dsv3c rss child failed:\n{child.stderr[-3000:]}")
            mine = json.loads(child.stdout.strip().splitlines()[-1])
            out["results"].append({"row": "rss", "dtype": "f32", "shape": list(inputs["train.npy"].shape),
                                   "load_1m": load, "dsv3c": mine, "torch": theirs})
            log(f"rss: dsv3c {mine['peak_rss_mib']:.0f} MiB, torch {theirs['peak_rss_mib']:.0f} MiB")

        log("parity check")
        out["parity"] = parity(directory)
        log(f"parity: max |dsv3c - torch| = {out['parity']['max_abs_diff']:.2e}")

        imported: dict[str, tuple[dsv3c.ModelSpec, dict[str, jax.Array]]] = {}

        def weights(dtype: str) -> tuple[dsv3c.ModelSpec, dict[str, jax.Array]]:
            if dtype not in imported:
                spec, params = dsv3c.import_hf(directory, dtype=dtype)
                imported[dtype] = (spec, {k: jnp.asarray(v) for k, v in params.items()})
            return imported[dtype]

        plan: list[tuple[str, str, str, Any]] = []
        for row in rows:
            if row == "forward":
                plan += [(row, d, "forward.npy", dsv3c_forward) for d in dtypes]
            elif row == "train":
                plan += [(row, d, "train.npy", dsv3c_train) for d in dtypes]
            elif row == "decode":
                plan += [(row, d, f"decode{b}.npy", dsv3c_decode) for b in decode_batches for d in dtypes]
        for row, dtype, name, ours in plan:
            tokens = inputs[name]
            label = f"{row} {dtype} {'x'.join(map(str, tokens.shape))}"
            load = os.getloadavg()[0]
            log(f"{label}: torch warm-up")
            torch_side = ServedWorker(Path(args.venv), ["bench", "--dir", str(directory), "--row", row, "--dtype",
                                                        dtype, "--tokens", name, "--new-tokens", str(NEW), *common],
                                      torch_env)
            log(f"{label}: dsv3c compile, then alternate timed calls")
            spec, params = weights(dtype)
            mine = ours(spec, params, tokens, args.reps, args.budget, torch_side)
            mine["tokens_per_s"] = mine["tokens_counted"] / mine["median_s"]
            theirs = torch_side.finish()
            log(f"{label}: torch {theirs['tokens_per_s']:.1f} tok/s, dsv3c {mine['tokens_per_s']:.1f} tok/s")
            result = {"row": row, "dtype": dtype, "shape": list(tokens.shape), "load_1m": load, "dsv3c": mine,
                      "torch": theirs}
            if "generated" in mine:
                generated = mine.pop("generated")
                result["greedy_agreement"] = agreement(
                    generated, np.load(directory / f"generated_{dtype}_{tokens.shape[0]}.npy"))
            out["results"].append(result)
            imported.pop("bf16" if dtype == "f32" else "f32", None)  # keep one copy of the weights resident
    finally:
        out["load_end"] = os.getloadavg()
        if not args.workdir:
            shutil.rmtree(directory, ignore_errors=True)
    return out


def describe(r: dict[str, Any]) -> str:
    """A row's name as the table shows it."""
    if r["row"] == "rss":
        return f"peak RSS, 3 f32 train steps {r['shape'][0]}x{r['shape'][1] - 1}"
    if r["row"] == "train":
        return f"train step {r['shape'][0]}x{r['shape'][1] - 1}"
    if r["row"] == "decode":
        return f"greedy decode b{r['shape'][0]}, {PROMPT}+{NEW}"
    return f"forward {r['shape'][0]}x{r['shape'][1]}"


def _losses(side: dict[str, Any]) -> str:
    return "/".join(f"{x:.4f}" for x in side.get("losses", []))


def table(out: dict[str, Any]) -> str:
    """The markdown report: environment, parity, then one line per (row, dtype) with the dsv3c/torch ratio."""
    env, tenv, venv = out["env"], out.get("torch_env", {}), out["venv"]
    lines = [
        f"Model: DeepSeek-V3-shaped, {out.get('params', 0) / 1e6:.1f}M parameters (hidden 512, 4 layers, 1 dense, "
        "16 experts top-4 + 1 shared, MLA, vocab 8192), same weights on both sides.",
        f"dsv3c: jax {env['jax']}, XLA:CPU on {env['cores_visible']} visible cores ({env['cpu']}). "
        f"torch {tenv.get('torch', venv.get('torch'))} ({venv.get('torch_from') or venv.get('torch_installed_by')}), "
        f"transformers {tenv.get('transformers', venv.get('transformers'))}, eager mode, attention "
        f"'{tenv.get('attn_implementation')}', experts '{tenv.get('experts_implementation')}', "
        f"{tenv.get('torch_threads')} intra-op / {tenv.get('torch_interop_threads')} inter-op threads, "
        f"worker env {out['torch_worker_env']}.",
        "Load average (1/5/15 min) at start {:.2f}/{:.2f}/{:.2f}, at end {:.2f}/{:.2f}/{:.2f}.".format(
            *out["load_start"], *out["load_end"]),
    ]
    if "parity" in out:
        p = out["parity"]
        lines.append(f"Parity (f32 logits, {p['shape'][0]}x{p['shape'][1]} tokens): max |dsv3c - torch| = "
                     f"{p['max_abs_diff']:.2e} (logits up to {p['max_abs_logit']:.2f}; argmax agrees on "
                     f"{100 * p['argmax_agree']:.1f}% of positions) - {'OK' if p['ok'] else 'ABOVE'} 1e-4.")
    lines += ["", "| row | dtype | dsv3c tok/s | torch tok/s | dsv3c/torch | dsv3c tok/CPU-s | torch tok/CPU-s "
              "| dsv3c compile + 1st call s | timed calls dsv3c/torch | load 1m |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for r in sorted(out["results"], key=lambda r: r["row"] == "rss"):
        mine, theirs = r["dsv3c"], r["torch"]
        if r["row"] == "rss":
            a, b = mine["peak_rss_mib"], theirs["peak_rss_mib"]
            lines.append(f"| {describe(r)} | f32 | {a:.0f} MiB | {b:.0f} MiB | {a / b:.2f} (memory) | | | | | "
                         f"{r['load_1m']:.1f} |")
            notes.append(f"RSS cross-check, each process's own VmHWM: dsv3c {mine['vm_hwm_mib']:.0f} MiB, torch "
                         f"{theirs['vm_hwm_mib']:.0f} MiB (the driver had peaked at {out['parent_rss_mib']:.0f} MiB "
                         "when it started them; ru_maxrss cannot be below that). Train losses, 3 steps: dsv3c "
                         f"{_losses(mine)}, torch {_losses(theirs)}.")
            continue
        a, b = mine["tokens_per_s"], theirs["tokens_per_s"]
        cpu_a = mine["tokens_counted"] / mine["median_cpu_s"]
        cpu_b = theirs["tokens_counted"] / theirs["median_cpu_s"]
        lines.append(f"| {describe(r)} | {r['dtype']} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {cpu_a:.1f} | "
                     f"{cpu_b:.1f} | {mine['compile_s']:.1f} | {len(mine['times_s'])}/{len(theirs['times_s'])} | "
                     f"{r['load_1m']:.1f} |")
        if "greedy_agreement" in r:
            g = r["greedy_agreement"]
            first = g["first_difference"]
            where = "all steps" if first is None else f"first difference at step {first}"
            notes.append(f"{describe(r)} {r['dtype']}: greedy tokens identical in {g['rows_identical']}/{g['rows']} "
                         f"rows ({where}).")
        if r["row"] == "train":
            notes.append(f"{describe(r)} {r['dtype']} losses (warm-up, then timed steps): dsv3c {_losses(mine)}, "
                         f"torch {_losses(theirs)}.")
    lines += ["", "tok/s from the median wall time of the timed calls after one warm-up (torch's decode warm-up "
              "generates 8 tokens); tok/CPU-s from the median process CPU time (all threads). dsv3c's compile is "
              "`dsv3c.compile` plus its first call. Ratios above 1 favour dsv3c, except memory (below 1 favours it).",
              *[f"- {n}" for n in notes]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of f32,bf16")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per measurement (after one warm-up)")
    parser.add_argument("--budget", type=float, default=45.0,
                        help="stop a measurement's timed calls once they add up to this many seconds (at least one)")
    parser.add_argument("--decode-batches", default="1,8")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: the cores this process may use)")
    parser.add_argument("--torch-omp-wait", choices=["passive", "active", "default"], default="passive",
                        help="OMP_WAIT_POLICY for the torch worker (see the module docstring)")
    parser.add_argument("--torch-attn", default=None, help="attn_implementation (default: transformers' choice)")
    parser.add_argument("--torch-experts", default=None, help="experts_implementation (default: transformers')")
    parser.add_argument("--venv", default="/tmp/dsv3c-peer-venv")
    parser.add_argument("--workdir", default=None, help="keep the checkpoint and inputs here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    parser.add_argument("--rss-child", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(Path(args.rss_child))
        return
    out = run(args)
    out["wall_s"] = time.perf_counter() - START
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(table(out))
    print(f"\n({out['wall_s'] / 60:.1f} min in all)")


if __name__ == "__main__":
    main()
