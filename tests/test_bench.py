"""`bench --quick`: the JSON has every figure, numeric, and matches the file it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dwcp_lstm.bench import cmd_bench
from dwcp_lstm.cli import cli_main
from dwcp_lstm.tables import DataError

KEYS = [
    "onnx_b1_p50_ms", "onnx_b1_p99_ms", "torch_b1_p50_ms", "onnx_speedup_b1", "onnx_b256_samples_per_s",
    "torch_b256_samples_per_s", "lightning_samples_per_s", "plain_samples_per_s", "lightning_vs_plain",
    "datamodule_rows", "datamodule_setup_s", "datamodule_peak_rss_mb", "onnx_file_mb", "onnx_parity_max_rel",
    "load_project_default_slowdown", "load_one_per_core_slowdown", "load_project_default_loaded_samples_per_s",
    "onnx_b1_with_intervals_p50_ms", "onnx_b1_forecast_only_graph_p50_ms", "plan_s",
]  # fmt: skip


def test_bench_quick_emits_every_figure(tmp_path: Path, capsys):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    cli_main(["bench", "--quick", "--output", str(out)])
    printed = json.loads(capsys.readouterr().out)  # stdout is the JSON and nothing else
    assert printed == json.loads(out.read_text())
    for key in KEYS:
        value = printed[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), key
        assert math.isfinite(value) and value > 0, (key, value)
    assert printed["onnx_parity_max_rel"] < 1e-4
    assert math.isfinite(printed["interval_latency_overhead"]) and printed["interval_latency_overhead"] > -1
    assert printed["datamodule_rows"] == 20_000
    assert printed["plan_links"] == 50  # every link of the telemetry got a plan
    assert printed["onnx_speedup_b1"] == pytest.approx(printed["torch_b1_p50_ms"] / printed["onnx_b1_p50_ms"])
    assert "1 intra-op thread" in printed["threads"]["b1_latency"]
    assert printed["settings"]["quick"] is True and printed["settings"]["train_batch_size"] == 64
    assert set(printed["settings"]["interval_scales"]) == {"throughput_mbps", "rtt_ms", "packet_loss", "jitter_ms"}
    assert printed["settings"]["mix_with_ridge"] is True  # the graph as `fit` ships it
    assert printed["device"]["logical_cpus"] >= 1
    assert torch.get_num_threads() == threads  # the 1-thread latency section restores the caller's setting
    from dwcp_lstm.runtime import default_threads, usable_cores

    assert printed["load_project_default_threads"] == default_threads()
    assert printed["load_one_per_core_threads"] == usable_cores()


def test_bench_rejects_a_missing_run(tmp_path: Path):
    with pytest.raises(DataError, match=r"run directory not found"):
        cmd_bench(["--quick", "--run", str(tmp_path / "nope")])


def test_bench_leaves_the_run_it_measures_untouched(tmp_path: Path, smoke_run: Path, capsys):
    """It exported its interval-free comparison model beside the run's own, as forecast_only.onnx: a run trained
    with --onnx.filename forecast_only.onnx had its model replaced, and forecast then refused it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cli_main(["bench", "--quick", "--skip-load", "--run", str(run)])
    assert json.loads(capsys.readouterr().out)["onnx_b1_forecast_only_graph_p50_ms"] > 0
    assert before == {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_bench_never_writes_over_a_runs_own_files(tmp_path: Path, smoke_run: Path, capsys):
    """--output was compared with the files of --run only: without it (or with another run) it replaced a run's
    model_metadata.json or report.json, and forecast then refused the model."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (tmp_path / "meta.json").symlink_to(run / "model_metadata.json")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for target, flags in ((run / "model_metadata.json", []), (run / "report.json", ["--run", str(smoke_run)]),
                          (tmp_path / "meta.json", [])):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            cli_main(["bench", "--quick", "--skip-load", "--output", str(target), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {target}: --output is the "), err
    assert before == {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_bench_refuses_an_empty_output_name(capsys):
    """Found by fuzzing: ``--output ''`` (an unset variable in a script) benchmarked for minutes, printed the JSON
    and wrote no file, exit 0. Refused before any work, like forecast's."""
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--quick", "--skip-load", "--output", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == ["error: --output must name a .json file (leave it out to print the JSON "
                                           "only), got ''"], err  # fmt: skip


def _relu_graph(path: Path, ops: int) -> Path:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(ops)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info(f"t{ops}", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_paired_calls_run_apart_in_a_fresh_interpreter(tmp_path: Path):
    """bench times the interval overhead in a child process (in-process it read +3.6 % and +19.2 % for one model);
    the child's figures come back whole, and a child that fails says so in one line."""
    from dwcp_lstm.bench import paired_calls_apart

    a, b = _relu_graph(tmp_path / "a.onnx", 3), _relu_graph(tmp_path / "b.onnx", 1)
    inputs = np.arange(12, dtype=np.float32).reshape(3, 4)  # rows fed as [1, 4] inputs, cycled by the child
    ta, tb, ratios = paired_calls_apart(a, b, inputs, 10, tmp_path)
    assert len(ta) == len(tb) == len(ratios) == 10 and min(ta + tb) > 0
    assert ratios == pytest.approx([x / y for x, y in zip(ta, tb, strict=True)])
    with pytest.raises(DataError, match=r"^bench: paired-calls child process failed \(.+\)$"):
        paired_calls_apart(a, tmp_path / "missing.onnx", inputs, 10, tmp_path)


def test_paired_calls_alternate_the_two_graphs_call_by_call(tmp_path: Path):
    """Each pair is one call of each graph on the same input, the sessions taken in turn; the ratio is per pair."""
    from dwcp_lstm.bench import paired_calls

    inputs = [np.full((1, 4), i, dtype=np.float32) for i in range(3)]
    a, b = _relu_graph(tmp_path / "a.onnx", 3), _relu_graph(tmp_path / "b.onnx", 1)
    ta, tb, ratios = paired_calls(a, b, inputs, 10, sessions=3)
    assert len(ta) == len(tb) == len(ratios) == 10
    assert ratios == [a / b for a, b in zip(ta, tb, strict=True)] and min(ta + tb) > 0


@pytest.mark.parametrize("damage", ["truncated", "other_checkpoint"])
def test_bench_measures_only_the_runs_own_model(tmp_path: Path, smoke_run: Path, capsys, damage):
    """Found by a hunt: a run holding another model's consistent model.onnx + metadata was benchmarked anyway (ONNX
    figures of the other graph beside PyTorch figures of the checkpoint: a 35.8x "speed-up", exit 0), and a
    truncated model.onnx ended in an onnxruntime traceback. Both are refused in one line, as ``report`` leaves
    out such a pair's figures."""
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    if damage == "truncated":
        (run / "model.onnx").write_bytes((smoke_run / "model.onnx").read_bytes()[:10_000])
        expected = "does not match model_metadata.json"
    else:  # the checkpoint is no longer the model the pair was exported from
        ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
        for k, v in ckpt["state_dict"].items():
            if "head" in k and v.is_floating_point():
                v.mul_(1.5)
        torch.save(ckpt, run / "checkpoints" / "best.ckpt")
        expected = "its forecasts differ from the run's checkpoint's by up to"
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--quick", "--skip-load", "--run", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and expected in err[0] and "export --run" in err[0], err
    assert "Traceback" not in "\n".join(err)
