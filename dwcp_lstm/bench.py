"""``python -m dwcp_lstm bench``: latency, throughput, training overhead and memory figures, as one JSON object.

Every pair is measured side by side in one process on the same inputs (ONNX Runtime vs PyTorch eager, Lightning vs a
plain loop), alternating rounds so that background load hits both alike. Without ``--run`` an untrained model with
the defaults is exported: latency and parity do not depend on training.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dwcp_lstm.errors import ConfigError, DataError, ModelFileError, check_named, parse_flags
from dwcp_lstm.intervals import scale_kinds
from dwcp_lstm.tables import atomic_write, check_output_file, finite_or_null

if TYPE_CHECKING:  # torch and lightning load only when a benchmark runs
    from dwcp_lstm.data import DwcpDataModule
    from dwcp_lstm.module import DwcpForecaster

# Sizes: full run vs --quick (a few seconds, for the test suite).
FULL = {"rows": 1_000_000, "b1_iters": 2000, "b1_rounds": 50, "b256_iters": 20, "rounds": 5, "train_batches": 60,
        "train_warmup": 5,
        "train_reps": 2, "train_rows": 15_000, "parity_windows": 2048, "plan_links": 1000}  # fmt: skip
QUICK = {"rows": 20_000, "b1_iters": 40, "b1_rounds": 2, "b256_iters": 2, "rounds": 2, "train_batches": 3,
         "train_warmup": 1,
         "train_reps": 1, "train_rows": 3_000, "parity_windows": 256, "plan_links": 50}  # fmt: skip
BATCH_SIZE, LR = 64, 1e-3
PAIRED_SESSIONS = 4  # sessions of each graph in the interval-overhead comparison (see paired_calls)

# Run in a fresh interpreter so that the parent's imports and data generation do not count towards the peak. On Linux
# ru_maxrss survives fork + exec: a child's starts at the parent's RSS at spawn time (the parent holds torch and the
# generated frame). VmHWM of /proc/self/status belongs to the child's own address space, so it is the figure used;
# ru_maxrss is reported beside it.
_DATAMODULE_CHILD = """
import json, re, resource, sys, time
from pathlib import Path


def hwm_kb():
    try:
        return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


from dwcp_lstm.data import DwcpDataModule

base = hwm_kb()
dm = DwcpDataModule(data_path=sys.argv[1])
t0 = time.perf_counter()
dm.setup("fit")
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "hwm_kb": hwm_kb(), "base_kb": base, "rows": len(dm.raw_features),
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "train_windows": len(dm.datasets["train"])}))
"""


def percentile_ms(ns: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(ns, dtype=np.float64), q) / 1e6)


def time_calls(fn: Callable[[], Any], iters: int) -> list[int]:
    """Wall time of each of ``iters`` calls, in ns."""
    out = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


def paired_calls(
    path_a: Path, path_b: Path, inputs: list[np.ndarray], iters: int, sessions: int = PAIRED_SESSIONS
) -> tuple[list[int], list[int], list[float]]:
    """Batch-1 latency of two graphs, every output asked for, one call of each in turn on the same input, spread
    over ``sessions`` one-thread sessions of each, each graph first in every other pair (the second call of a pair
    can find the caches warmer): the wall times (ns) of both and the ratio of each pair.

    Why this way: rounds of 40 calls of one graph, then 40 of the other, put the two graphs in different seconds
    of the machine's load, and a single session of a graph can be steadily faster or slower than another session of
    the same graph; on a shared 2-core machine the interval outputs' overhead then read anywhere from -23 % to +39 %
    (docs/benchmarks.md). Call by call, several sessions each, the median ratio repeats within about a point."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1

    def session(path: Path):
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    pairs = [(session(path_a), session(path_b)) for _ in range(sessions)]
    name = pairs[0][0].get_inputs()[0].name
    for a, b in pairs:  # warm-up, excluded
        for x in inputs[:20]:
            a.run(None, {name: x})
            b.run(None, {name: x})
    ta, tb = [], []
    for i in range(max(iters, sessions)):
        feed = {name: inputs[i % len(inputs)]}
        first, second = pairs[i % sessions][:: 1 if i % 2 == 0 else -1]  # each graph goes first half the time
        t0 = time.perf_counter_ns()
        first.run(None, feed)
        t1 = time.perf_counter_ns()
        second.run(None, feed)
        t2 = time.perf_counter_ns()
        ta.append(t1 - t0 if i % 2 == 0 else t2 - t1)
        tb.append(t2 - t1 if i % 2 == 0 else t1 - t0)
    return ta, tb, [x / y for x, y in zip(ta, tb, strict=True)]


_PAIRED_CHILD = """
import json, sys
import numpy as np
from dwcp_lstm.bench import paired_calls

x = np.load(sys.argv[3])
ta, tb, ratios = paired_calls(sys.argv[1], sys.argv[2], [x[i : i + 1] for i in range(len(x))], int(sys.argv[4]))
print(json.dumps({"a": ta, "b": tb, "ratios": ratios}))
"""


def _child_env() -> dict[str, str]:
    """This process's environment with the package's folder on PYTHONPATH, for ``python -P -c`` children (``-P``:
    without it the working directory comes first on the path, and a ``dwcp_lstm`` folder there, another checkout's,
    was imported instead of this one)."""
    here = str(Path(__file__).parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}


def paired_calls_apart(
    path_a: Path, path_b: Path, inputs: np.ndarray, iters: int, work: Path
) -> tuple[list[int], list[int], list[float]]:
    """:func:`paired_calls` in a fresh interpreter that loads only numpy and onnxruntime; ``inputs`` [N, W, F].

    Why apart: inside ``bench``, after the sections before it (torch, the training data module, the other
    sessions), the same comparison read +3.6 % and +19.2 % in two runs of one model, where a process of its own
    repeats within about a point (docs/benchmarks.md)."""
    feed = work / "paired_inputs.npy"
    np.save(feed, np.ascontiguousarray(inputs, dtype=np.float32))
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _PAIRED_CHILD, str(path_a), str(path_b), str(feed), str(iters)],
        capture_output=True, text=True, env=_child_env(), check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"bench: paired-calls child process failed ({tail[0]})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["a"], out["b"], out["ratios"]


def interval_scales(meta: dict) -> dict[str, str] | None:
    """Per target, the scale its calibrated bounds use (as recorded in the metadata: ``intervals.scales``, or in
    metadata written before it, the tail's); None without intervals."""
    intervals = meta.get("intervals") or {}
    recorded = intervals.get("scales")
    if recorded is None and intervals.get("beyond_horizon") is not None:
        recorded = scale_kinds(intervals["beyond_horizon"])
    if recorded is None:
        return None
    names = [t["name"] for t in meta["targets"]]  # the contract's targets: {"name", "unit", ...}
    kinds = {"adaptive": "volatility", "fitted": "fitted spread", "plain": "plain", "quantile": "forecast quantiles"}
    return {t: kinds[k] for t, k in zip(names, recorded, strict=True)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synthetic_datamodule(rows: int, work: Path) -> DwcpDataModule:
    """A DwcpDataModule (batch size 64, set up) over ``rows`` rows of synthetic data written to ``work``."""
    from dwcp_lstm import synthetic
    from dwcp_lstm.data import DwcpDataModule

    data = work / f"train_{rows}.parquet"
    synthetic.write_frame(synthetic.generate(samples=rows, links=max(1, rows // 3000)), data)
    dm = DwcpDataModule(data_path=str(data), batch_size=BATCH_SIZE)
    dm.setup("fit")
    return dm


def build_model(
    run: str | None, work: Path, train_dm: DwcpDataModule, parity_windows: int
) -> tuple[DwcpForecaster, DwcpDataModule, Path, dict[str, Any]]:
    """(module, datamodule of its windows, model.onnx, metadata) for ``run``, or an untrained default model that
    takes the scalers of ``train_dm`` (so that its inputs are in a realistic range), exported into ``work``.
    """
    import torch

    from dwcp_lstm.blend import ridge_in_raw_units
    from dwcp_lstm.callbacks import export_run
    from dwcp_lstm.contract import METADATA_NAME, load_metadata, model_path_of
    from dwcp_lstm.model import RidgeBlend
    from dwcp_lstm.module import DwcpForecaster

    if run is not None:
        from dwcp_lstm.runs import load_run

        module, dm, _ = load_run(run, "fit")
        path = model_path_of(run)
        if not path.exists():
            raise ModelFileError(f"{path}: file not found (the run has no ONNX export)")
        from dwcp_lstm.errors import DwcpError
        from dwcp_lstm.evaluate import check_run_pair

        # the run's own pair, or its figures are another model's beside this checkpoint's (a hunt found a 35.8x
        # "speed-up" of a 1,916-parameter graph over the 540,516-parameter checkpoint, exit 0)
        try:
            check_run_pair(path, Path(run) / METADATA_NAME, dm, module)
        except DwcpError as exc:
            raise ModelFileError(f"{exc}; python -m dwcp_lstm export --run {run} writes the run's own") from None
        meta = load_metadata(Path(run) / METADATA_NAME)
        return module.cpu().eval(), dm, path, meta
    dm = train_dm
    torch.manual_seed(0)
    module = DwcpForecaster(window_size=dm.window_size)
    module.set_scalers(dm.scalers)
    module.eval()
    # the graph as `fit` ships it, with the mix with ridge (model.blend_ridge, the default); for an untrained network
    # the validation split would choose ridge alone (w = 0), hiding the network from the parity check: half and half
    _, coef, intercept = ridge_in_raw_units(dm)
    module.blend = RidgeBlend(np.full((dm.horizon, dm.n_targets), 0.5), coef, intercept)
    module.blend_summary = {"weights": {t: [0.5] * dm.horizon for t in dm.targets}, "note": "bench: set, not fitted"}
    meta = export_run(module, dm, work, parity_windows=parity_windows)
    return module, dm, model_path_of(work), meta


def bench_inference(
    module: DwcpForecaster, dm: DwcpDataModule, model_path: Path, s: dict, threads: int | None, work: Path
) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch eager on the same raw test windows: batch-1 latency (1 thread) and batch-256 rate
    (``threads`` intra-op threads for both; None = each library's default)."""
    import onnxruntime as ort
    import torch

    from dwcp_lstm.callbacks import export_onnx, onnx_parity, raw_windows
    from dwcp_lstm.serve import Predictor

    x = np.ascontiguousarray(raw_windows(dm, "test", max(256, s["parity_windows"])), dtype=np.float32)  # [N, W, F]
    while len(x) < 256:  # tiny quick datasets: repeat windows to fill a batch
        x = np.concatenate([x, x])
    raw = module.raw_forecaster().cpu().eval()
    singles = [np.ascontiguousarray(x[i : i + 1]) for i in range(64)]  # [1, W, F] each, cycled
    singles_t = [torch.from_numpy(a) for a in singles]
    batch = np.ascontiguousarray(x[:256])  # [256, W, F]
    batch_t = torch.from_numpy(batch)

    one = ort.SessionOptions()
    one.intra_op_num_threads, one.inter_op_num_threads = 1, 1
    sess1 = ort.InferenceSession(str(model_path), one, providers=["CPUExecutionProvider"])
    many = ort.SessionOptions()
    if threads is not None:
        many.intra_op_num_threads = threads
    sess_all = ort.InferenceSession(str(model_path), many, providers=["CPUExecutionProvider"])
    predictor = Predictor(model_path, threads=1)
    name_in, name_out = sess1.get_inputs()[0].name, sess1.get_outputs()[0].name

    parity = onnx_parity(model_path, module, x)  # on every test window used here, as in the export check
    parity_rel, parity_abs = parity["max_rel_diff"], parity["max_abs_diff"]

    default_threads = torch.get_num_threads()  # as run_bench set it: restored after the batch-1 section
    k = {"i": 0}

    def nxt() -> int:
        k["i"] = (k["i"] + 1) % len(singles)
        return k["i"]

    def onnx_b1() -> None:
        sess1.run([name_out], {name_in: singles[nxt()]})

    # The same model without the interval outputs, exported beside it: their cost, measured side by side.
    plain_path = work / "forecast_only.onnx"  # the scratch folder: never beside a run's own model
    export_onnx(module, plain_path, dm.window_size)

    def predictor_b1() -> None:
        predictor.predict_windows(singles[nxt()])

    def torch_b1() -> None:
        with torch.inference_mode():
            raw(singles_t[nxt()])

    def onnx_b256() -> None:
        sess_all.run([name_out], {name_in: batch})

    def torch_b256() -> None:
        with torch.inference_mode():
            raw(batch_t)

    ns: dict[str, list[int]] = {"onnx": [], "predictor": [], "torch": []}  # + the paired pair, below
    b256: dict[str, list[int]] = {"onnx": [], "torch": []}
    # batch-1 calls take about a millisecond: 50 short rounds, so that load that comes and goes within seconds hits
    # every variant alike (5 rounds of 2.4 s gave overheads of -7 % to +39 % on a busy afternoon)
    per_round = max(1, s["b1_iters"] // s["b1_rounds"])
    try:
        torch.set_num_threads(1)  # batch-1 latency: one intra-op thread for both runtimes
        for fn in (onnx_b1, predictor_b1, torch_b1):  # warm-up, excluded
            time_calls(fn, 20)
        for _ in range(s["b1_rounds"]):  # alternate so that background load hits both alike
            ns["onnx"] += time_calls(onnx_b1, per_round)
            ns["predictor"] += time_calls(predictor_b1, per_round)
            ns["torch"] += time_calls(torch_b1, per_round)
    finally:
        torch.set_num_threads(default_threads)
    ns["onnx_all"], ns["onnx_plain"], ratios = paired_calls_apart(model_path, plain_path, x[:64], s["b1_iters"], work)
    time_calls(onnx_b256, 2)
    time_calls(torch_b256, 2)
    for _ in range(s["rounds"]):
        b256["onnx"] += time_calls(onnx_b256, max(1, s["b256_iters"] // s["rounds"]))
        b256["torch"] += time_calls(torch_b256, max(1, s["b256_iters"] // s["rounds"]))

    onnx_p50, torch_p50 = percentile_ms(ns["onnx"], 50), percentile_ms(ns["torch"], 50)
    return {
        "onnx_b1_p50_ms": onnx_p50,
        "onnx_b1_with_intervals_p50_ms": percentile_ms(ns["onnx_all"], 50),
        "onnx_b1_forecast_only_graph_p50_ms": percentile_ms(ns["onnx_plain"], 50),
        "interval_latency_overhead": float(np.median(ratios)) - 1,  # median of paired per-call ratios
        "onnx_b1_p99_ms": percentile_ms(ns["onnx"], 99),
        "torch_b1_p50_ms": torch_p50,
        "torch_b1_p99_ms": percentile_ms(ns["torch"], 99),
        "onnx_speedup_b1": torch_p50 / onnx_p50,
        "predictor_b1_p50_ms": percentile_ms(ns["predictor"], 50),
        "onnx_b256_samples_per_s": 256 / (np.median(b256["onnx"]) / 1e9),
        "torch_b256_samples_per_s": 256 / (np.median(b256["torch"]) / 1e9),
        "onnx_parity_max_rel": parity_rel,
        "onnx_parity_max_abs": parity_abs,
        "onnx_parity_windows": len(x),
        "onnx_file_mb": model_path.stat().st_size / 1e6,
        "onnx_file_bytes": model_path.stat().st_size,
        "b1_iterations": len(ns["onnx"]),
        "b256_iterations": len(b256["onnx"]),
        "torch_threads_b256": default_threads,
    }


def bench_plan(model_path: Path, work: Path, links: int, threads: int | None, reps: int = 5) -> dict[str, Any]:
    """``plan`` for ``links`` links (a 64 GiB migration at 100 Mbit/s dirty rate): the telemetry CSV read, every
    link's latest window forecast in batched ONNX calls, the pre-copy replay of both plans; median of ``reps``."""
    from dwcp_lstm import synthetic
    from dwcp_lstm.planner import Migration, plan_table
    from dwcp_lstm.serve import Predictor
    from dwcp_lstm.tables import read_table

    predictor = Predictor(model_path, threads=threads)
    if not predictor.levels:
        return {"plan_links": links, "plan_s": None, "plan_note": "the model has no intervals"}
    rows = links * (predictor.window + 4)
    frame = synthetic.generate(samples=rows, links=links)
    series, time_col = predictor.metadata["series"]["columns"], predictor.metadata["series"]["time_column"]
    columns = list(dict.fromkeys([*series, time_col, *predictor.file_features]))
    # The telemetry is the built-in data's: a model of other columns or another cadence (a real trace's) has no
    # input to plan from here (it failed, naming this scratch file; found by fuzzing)
    missing = [c for c in columns if c not in frame.columns]
    cadence = predictor.cadence_s
    if missing or "throughput_mbps" not in predictor.targets or (cadence and cadence != synthetic.DYNAMIC_CADENCE_S):
        why = (f"column {missing[0]!r}" if missing else "throughput_mbps" if "throughput_mbps" not in
               predictor.targets else f"a row every {cadence:g} s")  # fmt: skip
        return {"plan_links": links, "plan_s": None,
                "plan_note": f"the model reads {why}; the plan section times models of the built-in data (columns, "
                             f"throughput target, a row every {synthetic.DYNAMIC_CADENCE_S} s)"}  # fmt: skip
    path = work / "plan_telemetry.csv"
    synthetic.write_frame(frame, path)

    def once() -> int:
        df = read_table(path, columns, text_columns=series)
        out, _ = plan_table(predictor, df, series, time_col, path, Migration(64, 100.0), 0.9)
        return len(out)

    planned = once()  # warm-up, and the count of links it planned
    ns = time_calls(once, reps)
    return {"plan_links": planned, "plan_s": float(np.median(ns) / 1e9), "plan_rows_read": rows}


def _fresh_model(dm: DwcpDataModule) -> DwcpForecaster:
    """The default model for ``dm`` with the same initial weights every time."""
    import torch

    from dwcp_lstm.module import DwcpForecaster

    torch.manual_seed(0)
    return DwcpForecaster(
        feature_names=dm.features,
        target_names=dm.targets,
        window_size=dm.window_size,
        optimizer=lambda p: torch.optim.Adam(p, lr=LR),
    )


def _plain_rate(dm: DwcpDataModule, warm: int, k: int) -> float:
    """Training samples/s of a plain loop over batches ``warm`` .. ``k - 1`` (the first ``warm`` are warm-up)."""
    import torch

    model = _fresh_model(dm).train()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    t0 = 0.0
    for i, (x, y) in enumerate(dm.train_dataloader()):  # x [B, W, F], y [B, T]
        if i == warm:
            t0 = time.perf_counter()
        if i == k:
            break
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (k - warm) * BATCH_SIZE / (time.perf_counter() - t0)


def bench_under_load(dm: DwcpDataModule, s: dict) -> dict[str, Any]:
    """Training samples/s idle and beside one CPU-bound process (a busy loop), for the project's default thread
    count and for torch's own default of one thread per usable core. Idle and loaded rounds alternate so that drift
    hits both; the slowdown is the median idle rate over the median loaded rate."""
    import torch

    from dwcp_lstm.runtime import default_threads, usable_cores

    warm, k = s["train_warmup"], s["train_warmup"] + s["train_batches"]
    before = torch.get_num_threads()
    out: dict[str, Any] = {}
    try:
        for name, n in (("project_default", default_threads()), ("one_per_core", usable_cores())):
            torch.set_num_threads(n)
            idle, loaded = [], []
            for _ in range(s["train_reps"]):
                idle.append(_plain_rate(dm, warm, k))
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    time.sleep(0.2)  # let it reach its core
                    loaded.append(_plain_rate(dm, warm, k))
                finally:
                    busy.kill()
                    busy.wait()
            out[f"load_{name}_threads"] = n
            out[f"load_{name}_idle_samples_per_s"] = float(np.median(idle))
            out[f"load_{name}_loaded_samples_per_s"] = float(np.median(loaded))
            out[f"load_{name}_slowdown"] = float(np.median(idle) / np.median(loaded))
    finally:
        torch.set_num_threads(before)
    return out


def bench_training(dm: DwcpDataModule, s: dict) -> dict[str, Any]:
    """Samples/s of one DwcpForecaster on the same DwcpDataModule batches: a plain loop vs ``lightning.Trainer``.

    Warm-up batches are excluded from both; the timed span runs from the start of the first timed step to the end of
    the last, so it includes fetching the batches in between for both. Best of ``train_reps`` rounds each.
    """
    import lightning as L

    warm, k = s["train_warmup"], s["train_warmup"] + s["train_batches"]
    dm.batch_size = BATCH_SIZE
    if len(dm.datasets["train"]) < k * BATCH_SIZE:
        raise ConfigError(f"bench: {len(dm.datasets['train'])} training windows, need {k * BATCH_SIZE} for {k} batches")

    def fresh() -> DwcpForecaster:
        return _fresh_model(dm)

    def plain() -> float:
        return _plain_rate(dm, warm, k)

    class Clock(L.Callback):
        """Times batches ``warm`` .. ``k - 1`` from the inside of the fit loop."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            if batch_idx == warm:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if batch_idx == k - 1:
                self.t1 = time.perf_counter()

    def lightning() -> float:
        clock = Clock()
        trainer = L.Trainer(
            max_epochs=1,
            limit_train_batches=k,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            accelerator="cpu",
            devices=1,
            callbacks=[clock],
        )
        trainer.fit(fresh(), datamodule=dm)
        return (k - warm) * BATCH_SIZE / (clock.t1 - clock.t0)

    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in quiet]
    plain_rates, lightning_rates = [], []
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)  # "GPU available: ..." banners would pollute the JSON on stdout
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(s["train_reps"]):  # alternate so that background load hits both alike
                plain_rates.append(plain())
                lightning_rates.append(lightning())
    finally:
        for lg, lvl in zip(quiet, levels, strict=True):
            lg.setLevel(lvl)
    best_plain, best_lightning = max(plain_rates), max(lightning_rates)
    return {
        "lightning_samples_per_s": best_lightning,
        "plain_samples_per_s": best_plain,
        "lightning_vs_plain": best_lightning / best_plain,
        "lightning_samples_per_s_all": lightning_rates,
        "plain_samples_per_s_all": plain_rates,
    }


def bench_datamodule(rows: int, work: Path) -> dict[str, Any]:
    """Generate ``rows`` synthetic rows to Parquet, then time ``DwcpDataModule.setup("fit")`` in a fresh process."""
    from dwcp_lstm import synthetic

    path = work / f"dm_{rows}.parquet"
    df = synthetic.generate(samples=rows)
    synthetic.write_frame(df, path)
    del df
    cmd = [sys.executable, "-P", "-c", _DATAMODULE_CHILD, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"bench: DataModule child process failed ({tail[0]})")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    hwm = child["hwm_kb"] is not None
    return {
        "datamodule_rows": child["rows"],
        "datamodule_setup_s": child["seconds"],
        # KiB -> MiB; without /proc (not Linux) only ru_maxrss is there, and it is exact only there
        "datamodule_peak_rss_mb": (child["hwm_kb"] if hwm else child["maxrss_kb"]) / 1024,
        "datamodule_peak_rss_source": "VmHWM of the child" if hwm else "ru_maxrss of the child",
        "datamodule_rss_before_setup_mb": child["base_kb"] / 1024 if hwm else None,
        "datamodule_child_ru_maxrss_mb": child["maxrss_kb"] / 1024,
        "datamodule_train_windows": child["train_windows"],
        "datamodule_parquet_mb": path.stat().st_size / 1e6,
    }


def run_bench(
    run: str | None = None,
    quick: bool = False,
    rows: int | None = None,
    threads: int | None = None,
    skip_load: bool = False,
) -> dict[str, Any]:
    """All figures as one flat dict (see the module docstring).

    Args:
        run: a finished run directory; None = an untrained default model.
        quick: tiny sizes, for tests.
        rows: synthetic rows for the DataModule figure (default 1,000,000; quick 20,000).
        threads: intra-op threads of torch and ONNX Runtime for the batch-256 and training figures; None = each
            library's default (one per core); quick mode defaults to 1. Batch-1 latency always uses 1.
        skip_load: leave out the training-under-load figures (they start a busy process beside the benchmark).
    """
    import onnxruntime as ort
    import torch

    from dwcp_lstm import synthetic
    from dwcp_lstm.runtime import MAX_THREADS

    s = dict(QUICK if quick else FULL)
    if rows is not None:
        if not 1000 <= rows <= synthetic.MAX_SAMPLES:
            raise ConfigError(f"bench: --rows must be from 1000 to {synthetic.MAX_SAMPLES:,}, got {rows:,}")
        s["rows"] = rows
    if threads is None and quick:
        threads = 1  # a smoke test must not depend on how busy the machine's cores are
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"bench: --threads must be from 1 to {MAX_THREADS}, got {threads}")
    load = os.getloadavg()
    t0 = time.perf_counter()
    default_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory(prefix="dwcp_bench_") as tmp:
            work = Path(tmp)
            sections: dict[str, float] = {}
            tick = time.perf_counter()

            def lap(name: str) -> None:
                nonlocal tick
                sections[name] = round(time.perf_counter() - tick, 3)
                tick = time.perf_counter()

            train_dm = synthetic_datamodule(s["train_rows"], work)
            module, dm, model_path, meta = build_model(run, work, train_dm, s["parity_windows"])
            lap("setup_and_export")
            result: dict[str, Any] = bench_inference(module, dm, model_path, s, threads, work)
            lap("inference")
            result.update(bench_plan(model_path, work, s["plan_links"], threads))
            lap("plan")
            result.update(bench_training(train_dm, s))
            lap("training")
            if not skip_load:
                result.update(bench_under_load(train_dm, s))
                lap("training_under_load")
            result.update(bench_datamodule(s["rows"], work))
            lap("datamodule")
            used = torch.get_num_threads()
    finally:
        torch.set_num_threads(default_threads)
    result.update(
        {
            "threads": {
                "b1_latency": "1 intra-op thread for both ONNX Runtime and torch (torch.set_num_threads(1), restored)",
                "b256_and_training": (
                    f"{threads} intra-op thread(s) for torch and ONNX Runtime (--threads)"
                    if threads is not None
                    else f"library defaults: torch {used} threads, ONNX Runtime one per physical core"
                ),
            },
            "device": {
                "cpu": _cpu_name(),
                "logical_cpus": os.cpu_count(),
                "load_average_at_start": [round(v, 2) for v in load],
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "torch_device": "cpu",
            },
            "settings": {
                **s,
                "quick": quick,
                "model": str(run) if run else "untrained DwcpForecaster() defaults, scalers from synthetic data",
                "window_size": meta["window_size"],
                "n_features": len(meta["features"]),
                "n_targets": len(meta["targets"]),
                "total_parameters": meta.get("total_parameters"),
                "opset": meta.get("opset"),
                # the scale of each target's bounds: "volatility" adds its computation to the graph (and to the
                # interval overhead), "plain" does not
                "interval_scales": interval_scales(meta),
                "mix_with_ridge": meta.get("blend") is not None,  # its Gemm, Mul and Add are in every graph timed
                "train_batch_size": BATCH_SIZE,
                "train_lr": LR,
                "train_rate": "best of train_reps rounds, warm-up batches excluded",
                "b256_rate": "median batch time",
            },
            "wall_s": time.perf_counter() - t0,
            "section_wall_s": sections,
        }
    )
    return result


RUN_FILES = ("model.onnx", "model_metadata.json", "report.json", "report.md", "config.yaml", "hparams.yaml")
RUN_MARKERS = ("config.yaml", "model_metadata.json")  # a folder holding one of these is a run's


def check_not_a_run_file(out: Path) -> None:
    """Refuse an ``--output`` that names one of a run folder's own files (or a link to one), whichever run
    ``--run`` names, if any: ``bench --output run/model_metadata.json`` replaced the run's metadata, and forecast
    then refused the model."""
    for path in dict.fromkeys([out, out.resolve()]):
        folder = path.parent
        if (path.name in RUN_FILES or path.suffix == ".ckpt") and any((folder / m).is_file() for m in RUN_MARKERS):
            raise ConfigError(f"{out}: --output is the {path.name} of the run in {folder}; refusing to overwrite a "
                              "run's file")  # fmt: skip


def cmd_bench(argv: list[str]) -> None:
    """``python -m dwcp_lstm bench``: print the figures as JSON (and write them with ``--output``)."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="python -m dwcp_lstm bench", description="latency, throughput and memory figures as JSON")
    p.add_argument("--run", default=None, help="a finished run directory; default: an untrained model with defaults")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests")
    p.add_argument("--rows", type=int, default=None, help="synthetic rows for the DataModule figure (1e6; quick 2e4)")
    p.add_argument("--threads", type=int, default=None, help="threads for batch-256 and training (default: all)")
    p.add_argument("--output", default=None, help="also write the JSON here (atomically)")
    p.add_argument("--skip-load", action="store_true", help="leave out training beside a competing busy process")
    a = parse_flags(p, argv)
    check_named(a.run, "--run", "a run directory (leave it out for an untrained model)")
    if a.run is not None and not Path(a.run).is_dir():
        raise DataError(f"{a.run}: run directory not found")
    check_named(a.output, "--output", "a .json file (leave it out to print the JSON only)")  # '' wrote nothing
    out = check_output_file(a.output) if a.output else None  # now, not after minutes of benchmarking
    if out is not None and out.suffix.lower() != ".json":  # it writes JSON: a .onnx / .ckpt / .yaml name is a slip
        raise ConfigError(f"{out}: --output must end in .json (the figures are JSON)")
    if out is not None and a.run is not None:  # the run's own files: model_metadata.json is a .json name too
        from dwcp_lstm.serve import same_file

        for own in [*Path(a.run).glob("*.json"), *Path(a.run).glob("*.yaml")]:
            if same_file(out, own):
                raise ConfigError(f"{out}: --output is the run's own {own.name}; refusing to overwrite it")
    if out is not None:
        check_not_a_run_file(out)
    result = run_bench(a.run, a.quick, a.rows, a.threads, a.skip_load)
    text = json.dumps(finite_or_null(result), indent=2, allow_nan=False)  # JSON has no NaN: an unmeasured figure: null
    print(text)
    if out is not None:
        atomic_write(out, text + "\n")
