"""Trajectory quality rules: each axis reacts to the property it claims to measure; the CLI filters."""

import json
import subprocess
import sys

import pytest

from m2mega.data.quality import QualityConfig, main, score_row, score_trajectory, split_steps

GOOD = (
    "<think>Step 1: The floor is a rectangle with sides 3 m and 4 m, so its area is 3 × 4 = 12 square metres.\n"
    "Step 2: The question asks for the floor area, which is exactly this rectangle.\n"
    "Step 3: Let me verify by counting tiles: 12 tiles of 1 m² each, which confirms 12.\n"
    "Step 4: So the area is 12.</think><answer>12</answer>"
)


def test_good_trajectory_scores_high():
    q = score_trajectory(GOOD, "12", "number")
    assert q.structural == 1.0 and q.cognitive == 1.0 and q.verification == 1.0 and q.total == 1.0
    assert q.n_steps == 4 and q.correct is True
    assert q.combined == q.total


def test_structural_rules():
    bad_tags = GOOD.replace("</think><answer>", "</think> text <answer>")
    q = score_trajectory(bad_tags, "12", "number")
    assert q.rules["tags"] == 0.5 and q.total == 0.0  # format gate
    q = score_trajectory(bad_tags, "12", "number", config=QualityConfig(gate_on_format=False))
    assert 0 < q.total < 1 and q.structural == pytest.approx(0.8)
    skipped = GOOD.replace("Step 3", "Step 5")
    q = score_trajectory(skipped, "12", "number")
    assert q.rules["step_order"] == pytest.approx(2 / 4)  # starts at 1, 1->2 ok; 2->5 and 5->4 not
    # The conclusion region is the last step or the last 300 characters, whichever is longer.
    no_conclusion = GOOD.replace("Step 4: So the area is 12.", "Step 4: That is the floor. " + "It is flat. " * 30)
    assert score_trajectory(no_conclusion, "12", "number").rules["conclusion"] == 0.0
    q = score_trajectory("<think>a. b.</think><answer>many</answer>", "3", "number")
    assert q.rules["answer_extractable"] == 0.0 and q.correct is False


def test_cognitive_rules():
    loop = "<think>" + "The area is 3 times 4. " * 60 + "</think><answer>12</answer>"
    q = score_trajectory(loop, "12", "number")
    assert q.rules["no_repetition"] == 0.0 and q.rules["loop_fraction"] > 0.9
    assert q.cognitive < score_trajectory(GOOD, "12", "number").cognitive
    one_step = "<think>12.</think><answer>12</answer>"
    q = score_trajectory(one_step, "12", "number")
    assert q.n_steps == 1 and q.rules["step_count"] == pytest.approx(0.5)  # 1 / min_steps(2)
    many = "<think>" + "\n\n".join(f"Observation {i}: the tile at row {i} is grey." for i in range(64)) + "\n\n12</think><answer>12</answer>"
    q = score_trajectory(many, "12", "number")
    # complexity of a number answer is 1: max steps = 12 + 4 = 16, 65 paragraphs -> 16/65
    assert q.n_steps == 65 and q.rules["step_count"] == pytest.approx(16 / 65)
    # A longer (math) answer allows more steps.
    q_math = score_trajectory(many.replace("12</think><answer>12", "x^2+2x+1</think><answer>x^2+2x+1"), "x^2+2x+1", "math")
    assert q_math.rules["step_count"] > q.rules["step_count"]
    wall = "<think>" + " ".join(["word"] * 2000) + "</think><answer>12</answer>"
    assert score_trajectory(wall, "12", "number").rules["length"] < 0.1


def test_verification_rules():
    plain = (
        "<think>Step 1: The sides are 3 and 4.\nStep 2: Multiply them.\nStep 3: The area is 12.</think>"
        "<answer>12</answer>"
    )
    q = score_trajectory(plain, "12", "number")
    assert q.rules["check_markers"] == 0.0 and q.rules["late_check"] == 0.0 and q.rules["rederived"] == 0.5
    checked = plain.replace("The area is 12.", "The area is 12.\nStep 4: Double-check: 12 / 4 = 3, consistent with the side, so 12.")
    q2 = score_trajectory(checked, "12", "number")
    assert q2.rules["late_check"] == 1.0 and q2.rules["rederived"] == 1.0 and q2.verification > q.verification
    early = "<think>Let me check the image first.\nStep 1: sides 3 and 4.\nStep 2: area 12.</think><answer>12</answer>"
    assert score_trajectory(early, "12", "number").rules["late_check"] == 0.0
    zh = "<think>面积是 3 × 4 = 12。验证：12 ÷ 4 = 3，没错。所以答案是 12。</think><answer>12</answer>"
    assert score_trajectory(zh, "12", "number").rules["check_markers"] == 0.5


def test_choice_and_math_answers():
    mc = "<think>The cube is left of the sphere, so (B).\nChecking again: the cube is on the left, B.</think><answer>B</answer>"
    q = score_trajectory(mc, "B", "choice")
    assert q.rules["conclusion"] == 1.0 and q.rules["rederived"] == 1.0 and q.correct
    m = "<think>Expand: (x+1)^2 = x^2 + 2x + 1.\n\nVerify at x = 1: 4 = 1 + 2 + 1.\n\nSo x^2+2x+1.</think><answer>x^2+2x+1</answer>"
    q = score_trajectory(m, "(x+1)^2", "math")
    assert q.rules["conclusion"] == 1.0 and q.correct


@pytest.mark.parametrize("text", ["", "garbage", "<think>", "<think></think><answer></answer>", "x" * 10000, None])
def test_malformed_trajectories_never_raise(text):
    q = score_trajectory(text, "1", "number")  # type: ignore[arg-type]
    assert q.total == 0.0 and 0.0 <= q.structural <= 1.0 and 0.0 <= q.cognitive <= 1.0


def test_split_steps():
    steps, nums = split_steps("Intro.\nStep 1: a\nStep 2: b\n3) c")
    assert nums == [1, 2, 3] and steps[0] == "Intro." and len(steps) == 4
    steps, nums = split_steps("para one.\n\npara two.")
    assert steps == ["para one.", "para two."] and nums == []
    steps, _ = split_steps("One. Two! Three?")
    assert len(steps) == 3


def test_score_row_and_cli(tmp_path):
    rows = [
        {"id": "good", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": GOOD}],
         "answer": "12", "task": "math", "answer_type": "number"},
        {"id": "wrong", "messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": [{"type": "text", "text": GOOD}]}],
         "answer": "13", "task": "math", "answer_type": "number"},
        {"id": "notags", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "12"}],
         "answer": "12", "task": "math", "answer_type": "number"},
        {"id": "rl", "messages": [{"role": "user", "content": "q"}], "answer": "1", "task": "t", "answer_type": "number"},
    ]  # fmt: skip
    assert score_row(rows[0]).total == 1.0 and score_row(rows[1]).correct is False
    with pytest.raises(ValueError, match="no trajectory"):
        score_row(rows[3])
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["--input", str(src), "--output", str(dst), "--min-quality", "0.5", "--require-correct",
                 "--detail", "--no-progress"]) == 0  # fmt: skip
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in out] == ["good"] and out[0]["quality"] == 1.0 and "rules" in out[0]["quality_detail"]
    # As a module entry point, with the report on stderr.
    p = subprocess.run([sys.executable, "-m", "m2mega.data.quality", "--input", str(src), "--output", str(dst),
                        "--no-progress"], capture_output=True, text=True, check=True)  # fmt: skip
    rep = json.loads(p.stderr)
    assert rep["counts"] == {"read": 4, "written": 3, "low_quality": 0, "wrong_answer": 0, "no_trajectory": 1, "bad_row": 0}
