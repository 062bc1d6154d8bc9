"""tools/score_difficulty.py: difficulty = 1 - rollout accuracy, trivial/missing/bad rows all reported."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "score_difficulty.py")


def _load_tool():
    spec = importlib.util.spec_from_file_location("score_difficulty", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["score_difficulty"] = mod  # dataclasses and the worker pool look the module up by name
    spec.loader.exec_module(mod)
    return mod


sd = _load_tool()


def R(a: str) -> str:
    return f"<think>looking at the image</think><answer>{a}</answer>"


def _row(i, answer, task="general", atype="choice"):
    return {"id": i, "messages": [{"role": "user", "content": "q"}], "answer": answer, "task": task,
            "answer_type": atype}  # fmt: skip


@pytest.fixture
def files(tmp_path):
    data = [
        _row("mixed", "B"),  # 3/4 right -> 0.25
        _row("easy", "A"),  # 4/4 -> dropped
        _row("hard", "C"),  # 0/4 -> dropped
        _row("none", "D"),  # no rollouts -> kept unscored
        _row("badgt", "the left one"),  # not an option letter -> dropped, reported
        _row("spatial", "4.0", task="spatial", atype="number"),  # EDNM task: within 10% is right
        _row("shard", "12", atype="number"),  # rollouts on two lines: pooled
    ]
    rolls = [
        {"id": "mixed", "responses": [R("B"), R("(B)"), R("answer: b"), R("C")]},
        {"id": "easy", "responses": [R("A")] * 4},
        {"id": "hard", "responses": [R("A"), "garbage", "", R("A or C")]},
        {"id": "badgt", "responses": [R("A")]},
        {"id": "ghost", "responses": [R("A"), R("B")]},  # not in the input
        {"id": "spatial", "responses": [R("4.2"), R("3.9"), R("6"), R("x")]},
        {"id": "shard", "responses": [R("12"), R("13")]},
        {"id": "shard", "responses": [R("12.0"), R("1,2")]},
    ]
    src, rol = tmp_path / "data.jsonl", tmp_path / "rollouts.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in data) + "\n\n")  # a blank line is skipped
    rol.write_text("\n".join(json.dumps(r) for r in rolls) + "\n")
    cfg = tmp_path / "rewards.json"
    cfg.write_text(json.dumps({"spatial": {"numeric": "ednm"}}))
    return tmp_path, src, rol, cfg


def _run(argv):
    return sd.main(argv + ["--no-progress"])


def _read(p):
    return [json.loads(line) for line in p.read_text().splitlines()]


def test_difficulty_default_drops_trivial(files, capsys):
    d, src, rol, cfg = files
    out, rep = d / "out.jsonl", d / "report.json"
    assert _run(["--input", str(src), "--rollouts", str(rol), "--output", str(out), "--reward-config", str(cfg),
                 "--report", str(rep)]) == 0  # fmt: skip
    rows = {r["id"]: r for r in _read(out)}
    assert list(rows) == ["mixed", "none", "spatial", "shard"]  # input order kept
    assert rows["mixed"]["difficulty"] == 0.25 and rows["mixed"]["difficulty_rollouts"] == 4
    assert "difficulty" not in rows["none"]
    assert rows["spatial"]["difficulty"] == 0.5  # 4.2 and 3.9 within 10% of 4.0; 6 and "x" not
    assert rows["shard"]["difficulty"] == 0.5 and rows["shard"]["difficulty_rollouts"] == 4
    assert rows["mixed"]["messages"] == [{"role": "user", "content": "q"}]  # the rest of the row untouched
    report = json.loads(rep.read_text())
    c = report["counts"]
    assert (c["rows"], c["written"], c["scored"]) == (7, 4, 5)
    assert (c["dropped_all_correct"], c["dropped_all_wrong"], c["bad_ground_truth"]) == (1, 1, 1)
    assert (c["missing_rollouts"], c["dropped_missing"], c["orphan_rollouts"]) == (1, 0, 2)
    assert (c["rollout_lines"], c["rollouts"]) == (8, 23)
    assert report["examples"]["dropped_all_correct"] == ["easy"] and report["examples"]["orphan_rollouts"] == ["ghost"]
    assert "badgt" in report["examples"]["bad_ground_truth"][0] and "not an option letter" in report["examples"]["bad_ground_truth"][0]
    assert json.loads(capsys.readouterr().err) == report  # the same report on stderr


def test_keep_trivial_and_drop_missing(files):
    d, src, rol, cfg = files
    out = d / "out.jsonl"
    assert _run(["--input", str(src), "--rollouts", str(rol), "--output", str(out), "--keep-trivial",
                 "--drop-missing"]) == 0  # fmt: skip
    rows = {r["id"]: r for r in _read(out)}
    assert rows["easy"]["difficulty"] == 0.0 and rows["hard"]["difficulty"] == 1.0
    assert "none" not in rows
    # Without the reward config, the spatial task uses binary numeric matching: none of 4.2/3.9/6/x equal 4.0.
    assert rows["spatial"]["difficulty"] == 1.0


def test_min_rollouts(files):
    d, src, rol, _ = files
    out = d / "out.jsonl"
    assert _run(["--input", str(src), "--rollouts", str(rol), "--output", str(out), "--min-rollouts", "3"]) == 0
    rows = {r["id"]: r for r in _read(out)}
    assert "difficulty" not in rows["none"] and rows["mixed"]["difficulty"] == 0.25


def test_workers_match_serial(files):
    d, src, rol, cfg = files
    a, b = d / "a.jsonl", d / "b.jsonl"
    base = ["--input", str(src), "--rollouts", str(rol), "--reward-config", str(cfg)]
    assert _run(base + ["--output", str(a)]) == 0
    assert _run(base + ["--output", str(b), "--workers", "2"]) == 0
    assert a.read_text() == b.read_text()


@pytest.mark.parametrize(
    "which, bad_line, message",
    [
        ("rollouts", '{"id": "mixed", "responses": [1, 2]}', "rollouts.jsonl:9 (id 'mixed'): 'responses' must be a list of strings"),
        ("rollouts", "{not json", "rollouts.jsonl:9: malformed JSON"),
        ("data", json.dumps(_row("mixed", "B")), "data.jsonl:9: duplicate id 'mixed' (first on line 1)"),
        ("data", json.dumps({"answer": "A", "task": "t", "answer_type": "choice"}), "data.jsonl:9: row has no usable 'id'"),
        ("data", json.dumps({"id": "x", "task": "t", "answer_type": "choice"}), "data.jsonl:9 (id 'x'): 'answer' must be a string"),
    ],
)
def test_bad_input_names_file_and_line(files, capsys, which, bad_line, message):
    d, src, rol, _ = files
    target = src if which == "data" else rol
    with open(target, "a") as f:
        f.write(bad_line + "\n")
    code = _run(["--input", str(src), "--rollouts", str(rol), "--output", str(d / "o.jsonl")])
    assert code == 2 and message in capsys.readouterr().err


def test_bad_reward_config(files, capsys):
    d, src, rol, cfg = files
    cfg.write_text(json.dumps({"spatial": {"numeric": "smooth"}}))
    assert _run(["--input", str(src), "--rollouts", str(rol), "--output", str(d / "o.jsonl"),
                 "--reward-config", str(cfg)]) == 2  # fmt: skip
    assert "rewards.json: reward config for task 'spatial'" in capsys.readouterr().err


def test_media_paths_follow_the_output_directory(tmp_path):
    """Relative image / video paths resolve against the JSONL's directory: an --output elsewhere gets them
    rewritten to name the same files (absolute ones and text untouched), so the scored file preprocesses."""
    (tmp_path / "data").mkdir()
    content = [{"type": "image", "image": "images/a.png"}, {"type": "video", "video": "videos/c.mp4", "fps": 2},
               {"type": "video", "video": ["frames/0.jpg", "/abs/1.jpg"]}, {"type": "text", "text": "images/a.png"}]
    row = {**_row("v", "B"), "messages": [{"role": "user", "content": content}]}
    src, rol = tmp_path / "data/rl.jsonl", tmp_path / "data/rollouts.jsonl"
    src.write_text(json.dumps(row) + "\n")
    rol.write_text(json.dumps({"id": "v", "responses": [R("B"), R("A")]}) + "\n")
    for out, prefix in ((tmp_path / "out/deep/s.jsonl", "../../data/"), (tmp_path / "data/s.jsonl", "")):
        out.parent.mkdir(parents=True, exist_ok=True)
        assert _run(["--input", str(src), "--rollouts", str(rol), "--output", str(out)]) == 0
        (got,) = _read(out)
        assert got["difficulty"] == 0.5 and got["messages"][0]["content"] == [
            {"type": "image", "image": prefix + "images/a.png"},
            {"type": "video", "video": prefix + "videos/c.mp4", "fps": 2},
            {"type": "video", "video": [prefix + "frames/0.jpg", "/abs/1.jpg"]},
            {"type": "text", "text": "images/a.png"}]


def test_checkpoint_mode_names_a_missing_checkpoint(files, capsys):
    """(The working --checkpoint path is exercised on the demo's checkpoint in tests/test_demo.py, on image and
    video rows in tests/test_video_pipeline.py.)"""
    d, src, _, _ = files
    code = _run(["--input", str(src), "--checkpoint", "/nonexistent/ckpt", "--output", str(d / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "/nonexistent/ckpt: no complete checkpoint" in err


def test_runs_as_script(files):
    d, src, rol, _ = files
    out = d / "s.jsonl"
    p = subprocess.run([sys.executable, TOOL, "--input", str(src), "--rollouts", str(rol), "--output", str(out),
                        "--no-progress"], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stderr)["counts"]["written"] == 3  # no reward config: spatial is binary, all wrong
