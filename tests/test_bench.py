"""The benchmark suite (torch_rlds.bench): a quick run without TensorFlow produces every
torch_rlds figure and file. Values are not checked, except the contracts: a resumed run
reproduces the uninterrupted one, and no torch_rlds measurement imports TensorFlow."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from torch_rlds.bench import BenchSettings, main
from torch_rlds.bench._batches import batch_shapes


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value) and value >= 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_results")
    cache = tmp_path_factory.mktemp("bench_cache")
    code = main(["--quick", "--skip-tf", "--out", str(out), "--cache-dir", str(cache)])
    results = json.loads((out / "results.json").read_text())
    return code, out, results


def _assert_child(record, *, torch: bool = True) -> dict:
    assert record["ok"], record.get("error")
    memory = record["memory"]
    assert _number(memory["peak_rss_mb"]) and _number(memory["maxrss_mb"]), memory
    assert record["modules"] == {"torch": torch, "tensorflow": False}
    assert _number(record["foreign_cpu_pct"])
    assert _number(record["wall_s"])
    return record["result"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_run_produces_every_torch_rlds_figure_and_file(quick_run):
    code, out, results = quick_run
    assert code == 0, results["failed"]
    assert results["failed"] == []
    settings = BenchSettings.quick()

    throughput = results["throughput"]
    assert set(throughput["torch_rlds"]) == {str(w) for w in settings.workers}
    assert set(throughput["torch_rlds_window"]) == {str(settings.order_workers)}
    rows = [(record, "global") for record in throughput["torch_rlds"].values()]
    rows += [(record, "window") for record in throughput["torch_rlds_window"].values()]
    for record, order in rows:
        r = _assert_child(record)
        assert r["order"] == order  # the default order of a local tfrecord dataset is global
        assert _number(r["samples_per_s"]) and _number(r["first_batch_s"])
        assert r["shapes"]["observation/image"] == [settings.batch_size, 1, 64, 64, 3]
        assert r["shapes"]["action"] == [settings.batch_size, settings.action_horizon, 7]
        assert _number(r["metrics"]["samples_per_s"]) and _number(r["metrics"]["wait_fraction"])
    limit = _assert_child(throughput["limit"], torch=False)
    assert _number(limit["samples_per_s"]) and _number(limit["us_per_image"])
    assert "tf_data" not in throughput

    resume = results["resume"]["torch_rlds"]
    elsewhere = ["global order, restored on 2 hosts x 1 worker",
                 "global order, restored on 4 hosts x 0 workers"]
    assert list(resume) == ["global order", *elsewhere, "window 16"]
    positions = set(map(str, settings.resume_positions))
    for name, runs in resume.items():
        assert set(runs) == (positions if name in elsewhere else {"fresh", *positions})
        for position, record in runs.items():
            r = _assert_child(record)
            assert _number(r["restore_s"]) and _number(r["first_batch_s"])
            if position != "fresh":
                assert r["exact"] is True, f"{name} at {position} is not the uninterrupted stream"
                assert _number(r["state_bytes"]) and _number(r["save_s"])

    rows = _assert_child(results["checkpoint"]["torch_rlds"])
    assert [(r["order"], r["buffer_steps"]) for r in rows] == [
        ("global", settings.epoch_steps()),
        *(("window", b) for b in settings.checkpoint_buffers)]
    for r in rows:
        for key in ("bytes", "bytes_per_worker", "file_bytes", "state_dict_s", "save_s"):
            assert _number(r[key]), key

    shuffle = _assert_child(results["shuffle"], torch=False)
    assert list(shuffle["profiles"]) == ["bridge-like", "fractal-like", "droid-like"]
    for profile in shuffle["profiles"].values():
        scores = list(profile["orders"].values())
        assert len(scores) == 5 and all(s["batches"] > 0 for s in scores)
        global_, one_worker = scores[0], scores[1]
        assert one_worker["distinct_episodes"] < global_["distinct_episodes"] <= 64

    memory = results["memory"]
    points = {"episodes": settings.memory_episodes, "size": settings.memory_size_steps}
    assert set(memory) == set(points)
    for axis, orders in memory.items():
        assert set(orders) == {"global", "window"}
        for order, by_point in orders.items():
            assert list(by_point) == [str(p) for p in points[axis]]
            for record in by_point.values():
                r = _assert_child(record)
                assert r["order"] == order and r["workers"] == settings.order_workers
                assert len(r["uss_mb"]) == len(r["pss_mb"]) == settings.order_workers
                assert all(0 < u <= p for u, p in zip(r["uss_mb"], r["pss_mb"]))

    build = _assert_child(results["index"]["build"])
    assert build["episodes"] == settings.episodes and build["failed_shards"] == 0
    for key in ("read_mb_per_s", "build_mb_per_s", "record_index_s", "index_bytes"):
        assert _number(build[key]) and build[key] > 0, key
    first = results["index"]["first_batch"]
    assert list(first) == ["never seen", "indexed"]
    never, indexed = (_assert_child(first[k]) for k in first)
    assert never["cache_had_index"] is False and never["index_build_started"] is True
    assert indexed["cache_had_index"] is True
    assert never["batch_size"] == indexed["batch_size"] == settings.batch_size

    from torch_rlds.bench import _report, _report_order

    for name in ("torch_rlds / decode limit", "torch_rlds resume 95% / 5%",
                 "torch_rlds state bytes per worker", "torch_rlds save_state ms",
                 _report.GLOBAL_LIMIT, _report.WINDOW_LIMIT, _report.GLOBAL_WINDOW,
                 _report_order.SHUFFLE_DISTINCT, _report_order.SHUFFLE_LARGEST,
                 _report_order.INDEX_SPEED, _report_order.FIRST_BATCH):
        assert _number(results["ratios"][name]), name
    for axis in ("episode counts", "episode sizes"):
        for order in ("global", "window"):
            spread = results["ratios"][_report_order.MEMORY_SPREAD.format(axis=axis,
                                                                           order=order)]
            assert _number(spread) and spread >= 1
    assert results["ratios"]["torch_rlds / tf.data (samples/s, equal cores)"] is None
    assert results["ratios"][_report.GLOBAL_TF] is None

    table = (out / "results.md").read_text()
    for w in settings.workers:
        assert f"| torch_rlds num_workers={w} | global |" in table
    assert f"| torch_rlds num_workers={settings.order_workers} | window 16 |" in table
    assert "| decode limit (2 processes) |" in table
    for decode in ("full", "reduced"):
        assert f"resized to half after a {decode} decode | global |" in table
    half = settings.image_size // 2
    shapes = _assert_child(results["throughput"]["torch_rlds_resize"]["reduced"])["shapes"]
    assert shapes["observation/image"][-3:] == [half, half, 3]
    assert _number(results["ratios"][_report.REDUCED_FULL])
    for heading in ("## Shuffle quality", "## Worker memory", "## Step index"):
        assert heading in table
    assert "| torch_rlds global order (any hosts x workers) |" in table
    assert "| 200 episodes |" in table and "| 40 steps per episode |" in table
    assert "error:" not in table
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert not any("matplotlib" in note for note in results["notes"])


@pytest.mark.slow
def test_quick_run_reports_start_up_and_throughput_from_a_bucket(quick_run):
    _, out, results = quick_run
    startup = _assert_child(results["remote"]["startup"])
    assert startup["latency_s"] == 0.03 and set(startup["sizes"]) == {"10 shards", "100 shards"}
    for row in startup["sizes"].values():
        cold, warm, published = row["cold"], row["warm"], row["published"]
        # one listing; dataset_info.json and features.json; cold: one header read per record
        assert (cold["list"], cold["read"]) == (1, 2 + cold["episodes"])
        assert (warm["list"], warm["read"], warm["requests"]) == (1, 2, 3)
        assert (published["list"], published["read"], published["requests"]) == (1, 3, 4)
        assert all(_number(m["seconds"]) for m in (cold, warm, published))
    through = _assert_child(results["remote"]["throughput"])
    local = results["throughput"]["torch_rlds"][str(through["workers"])]["result"]
    assert _number(through["samples_per_s"]) and through["shapes"] == local["shapes"]
    reads = through["window_reads"]
    assert _number(reads["serial_s"]) and _number(reads["read_many_s"]) and reads["bytes"] > 0
    table = (out / "results.md").read_text()
    assert "## From a bucket: start-up at 30 ms per request" in table
    assert "| simulated gs:// at 30 ms | 2 |" in table


@pytest.mark.slow
def test_chart_marks_what_did_not_run_and_keeps_close_sizes_alike(quick_run):
    import matplotlib

    matplotlib.use("Agg")
    from torch_rlds.bench._report import NOT_RUN, chart_figure

    _, _, results = quick_run
    fig = chart_figure(results)
    ax_rate, _, ax_size = fig.axes
    names = [t.get_text() for t in ax_rate.get_xticklabels()]
    heights = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in ax_rate.patches}
    tf = names.index("tf.data")
    assert tf not in heights  # tf.data did not run (--skip-tf): no bar, not a bar of 0
    assert [t.get_text() for t in ax_rate.texts if t.get_position()[0] == tf] == [NOT_RUN]
    assert all(h > 0 for h in heights.values()) and len(heights) == len(names) - 1
    # The two torch_rlds states differ by a few bytes: on a scale of decades they look alike.
    low, high = ax_size.get_ylim()
    assert ax_size.get_yscale() == "log" and low == 1 and high >= 1e4
    assert not any(t.get_text() == NOT_RUN for t in ax_size.texts)


def test_without_matplotlib_the_chart_is_left_out(quick_run, tmp_path, monkeypatch):
    from torch_rlds.bench._report import write_chart

    _, _, results = quick_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    assert write_chart(results, str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []


def test_settings_name_the_bad_field():
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1 \(got 0\)"):
        BenchSettings(batch_size=0)
    with pytest.raises(ValueError, match="resume_positions must lie in"):
        BenchSettings(resume_positions=(0.5, 1.0))
    quick = BenchSettings.quick()
    assert BenchSettings.from_dict(json.loads(json.dumps(quick.to_dict()))) == quick


def test_rounds_report_the_median_of_those_that_worked():
    from torch_rlds.bench._main import build_parser, settings_from_args
    from torch_rlds.bench._sections import median_record

    def run(rate):
        return {"ok": True, "result": {"samples_per_s": rate, "first_batch_s": rate / 100}}

    failed = {"ok": False, "error": "killed"}
    odd = median_record([run(300.0), failed, run(100.0), run(200.0)])
    assert odd["result"]["samples_per_s"] == 200.0 and odd["result"]["first_batch_s"] == 2.0
    assert odd["result"]["rounds_samples_per_s"] == [300.0, None, 100.0, 200.0]
    even = median_record([run(400.0), run(100.0)])
    assert even["result"]["samples_per_s"] == 100.0  # the lower middle: never flattering
    assert median_record([failed, {"ok": False, "error": "again"}]) is failed
    args = build_parser().parse_args(["--quick", "--rounds", "2"])
    assert settings_from_args(args).throughput_rounds == settings_from_args(args).resume_rounds == 2
    default = settings_from_args(build_parser().parse_args([]))
    assert default.throughput_rounds == default.resume_rounds == 3
    with pytest.raises(ValueError, match="throughput_rounds must be an int >= 1"):
        BenchSettings(throughput_rounds=0)


def test_ratios_pair_the_rounds():
    from torch_rlds.bench._report import paired_ratio, ratios

    # Round 2 ran on a slower machine for both: paired, it skews nothing.
    assert paired_ratio([200.0, 100.0, 210.0], [100.0, 50.0, 100.0]) == 2.0
    assert paired_ratio([200.0, None, 300.0], [100.0, 50.0, 100.0]) == 2.5
    assert paired_ratio([300.0, 100.0], [100.0]) == 2.0  # unpaired: medians
    assert paired_ratio([None], [100.0]) is None

    def record(*rates):
        return {"ok": True, "result": {"samples_per_s": sorted(rates)[len(rates) // 2],
                                       "rounds_samples_per_s": list(rates)}}

    results = {
        "throughput": {"torch_rlds": {"0": record(150.0, 60.0, 160.0),
                                      "2": record(140.0, 80.0, 150.0)},
                       "tf_data": record(100.0, 50.0, 100.0),
                       "limit": record(200.0, 100.0, 200.0)},
        "resume": {"torch_rlds": {}}, "checkpoint": {},
    }
    out = ratios(results)
    assert out["torch_rlds / tf.data (samples/s, equal cores)"] == 1.5  # 1.4, 1.6, 1.5
    assert out["torch_rlds best / tf.data"] == 1.6  # best per round: 150, 80, 160
    assert out["torch_rlds / decode limit"] == 0.8
    assert out["tf.data / decode limit"] == 0.5


def test_pipelines_take_turns_in_alternating_order(tmp_path, monkeypatch):
    from torch_rlds.bench import _limit
    from torch_rlds.bench._sections import Bench, in_turn

    assert in_turn(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert in_turn(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert in_turn(["a", "b", "c"], 2) == ["a", "b", "c"]

    class Recording:
        def __init__(self):
            self.labels, self.jobs = [], []

        def run(self, label, task, kwargs, show):
            self.labels.append(label)
            job = f"{task}:{kwargs['workers']}" if "workers" in kwargs else task
            self.jobs.append(job + (f":{kwargs['order']}" if "order" in kwargs else "")
                             + (f":{kwargs['resize']}" if "resize" in kwargs else ""))
            return {"ok": True, "result": {"samples_per_s": float(len(self.jobs))}}

        def run_all(self, jobs):
            return [self.run(*job) for job in jobs]

    monkeypatch.setattr(_limit, "export_frames", lambda *args: 0)
    settings = BenchSettings.quick(workers=(2, 0, 1), throughput_rounds=2)
    steps = Recording()
    out = {"torch_rlds": {}}
    Bench(steps, settings, "unused", str(tmp_path), [16]).throughput(out, with_tf=True)
    # fewer workers first, then tf.data, the most workers, the window order and the resized
    # rows next to the limit; reversed after
    first = ["torch_throughput:0", "torch_throughput:1", "tf_throughput", "torch_throughput:2",
             "torch_throughput:2:window", "torch_throughput:2:full",
             "torch_throughput:2:reduced", "limit"]
    assert steps.jobs == first + first[::-1]
    assert all("(round 1 of 2)" in label for label in steps.labels[:8])
    assert out["torch_rlds"]["2"]["result"]["rounds_samples_per_s"] == [4.0, 13.0]
    assert out["torch_rlds_window"]["2"]["result"]["rounds_samples_per_s"] == [5.0, 12.0]
    assert out["torch_rlds_resize"]["full"]["result"]["rounds_samples_per_s"] == [6.0, 11.0]
    assert out["torch_rlds_resize"]["reduced"]["result"]["rounds_samples_per_s"] == [7.0, 10.0]
    assert out["limit"]["result"]["rounds_samples_per_s"] == [8.0, 9.0]
    assert list(out["torch_rlds"]) == ["2", "0", "1"]  # the order the settings give
    with pytest.raises(ValueError, match="workers must be distinct"):
        BenchSettings(workers=(2, 2))


def test_grouped_steps_run_in_one_process_and_fail_alone():
    from torch_rlds.bench._steps import Steps

    settings = BenchSettings.quick().to_dict()
    steps = Steps(3, timeout_s=120, wait_idle_s=0, retries=0, group=True)
    shown = []
    records = steps.run_all([
        ("a", "shuffle_quality", {"settings": settings}, lambda r: shown.append("a") or ""),
        ("b", "shuffle_quality", {"settings": {}}, lambda r: ""),  # raises in the child
        ("c", "shuffle_quality", {"settings": settings}, lambda r: shown.append("c") or ""),
    ])
    assert [r["ok"] for r in records] == [True, False, True]
    assert "shuffle_quality: KeyError" in records[1]["error"]
    assert records[0]["result"] == records[2]["result"]  # one pure function, twice
    assert len({r["wall_s"] for r in records}) == 1  # one process ran all three
    assert shown == ["a", "c"] and steps.done == 3
    assert steps.failed == ["b: " + records[1]["error"]]


def test_new_settings_name_the_bad_field():
    with pytest.raises(ValueError, match=r"order_workers must be one of workers \(0, 1\)"):
        BenchSettings(workers=(0, 1))
    with pytest.raises(ValueError, match=r"elastic_topologies .* dividing batch_size 32"):
        BenchSettings(elastic_topologies=((3, 1),))
    with pytest.raises(ValueError, match="memory_episodes must hold at least two ints"):
        BenchSettings(memory_episodes=(1000,))


def test_resume_points_lie_inside_the_first_epoch():
    s = BenchSettings.quick()
    first, last = s.resume_batches()
    assert 1 <= first < last < s.epoch_batches()


def test_batch_shapes_name_every_leaf_by_its_path():
    assert batch_shapes({"o": {"a": np.zeros((2, 3))}, "t": ["x", "y"]}) == {
        "o/a": [2, 3], "t": [2]}


def test_cli_hands_every_option_to_the_suite(monkeypatch):
    from torch_rlds import cli
    from torch_rlds.bench import _main

    seen = []
    monkeypatch.setattr(_main, "main", lambda argv=None: seen.append(list(argv)) or 0)
    assert cli.main(["bench", "--quick", "--out", "x", "--skip-tf"]) == 0
    assert seen == [["--quick", "--out", "x", "--skip-tf"]]


def test_shuffle_simulation_covers_every_step_and_scores_batches():
    from torch_rlds.bench import _shuffle

    lengths = np.asarray([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.int64)
    expected = np.repeat(np.arange(len(lengths)), lengths)
    # Every order emits each step of the epoch once: episode e appears lengths[e] times.
    assert sorted(_shuffle.global_order(lengths, seed=3).tolist()) == expected.tolist()
    window = _shuffle.window_order(lengths, shuffle_window=2, hosts=1, workers=1, batch_size=1)
    assert sorted(window.tolist()) == expected.tolist()
    # The buffer's first fill is left out: what follows is the rest of the stream.
    assert len(_shuffle.tfdata_order(lengths, buffer=10)) == lengths.sum() - 10
    scored = _shuffle.score(np.asarray([0, 0, 1, 2, 5, 5, 5, 5, 9]), batch_size=4)
    assert scored == {"distinct_episodes": 2.0, "largest_share": 3.0, "batches": 2}
