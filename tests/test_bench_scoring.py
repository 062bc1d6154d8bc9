"""Each benchmark's loader and official scoring on fixtures laid out like its released files
(tests/data/bench/<benchmark>/: the release's file names and fields, plus responses.jsonl with one model
response per item). Every expected number is worked out by hand in the comments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2mega.eval import benchmarks as B
from m2mega.eval.benchmarks.base import BenchDataError, levenshtein, read_records
from m2mega.eval.metrics import MRA_THRESHOLDS

DATA = Path(__file__).parent / "data" / "bench"

# where each release keeps its images: (data file relative to the fixture folder, image field, image folder)
_IMAGES = {
    "mathvista": ("annot_testmini.json", "image", "."),
    "mathvision": ("data/test.jsonl", "image", "data"),
    "mathverse": ("testmini.json", "image", "."),
    "dynamath": ("sample_variant1.jsonl", "image", "."),
    "wemath": ("testmini.json", "image_path", "."),
    "logicvista": ("data/dataset.json", "imagename", "data/images"),
    "cvbench": ("test_2d.jsonl", "filename", "."),
}


def _png(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (28, 28), color).save(path)


def materialize(name: str, tmp: Path) -> Path:
    """A copy of the fixture folder with a small PNG at every image path its records name (the released
    images are not checked in)."""
    root = tmp / name
    shutil.copytree(DATA / name, root)
    if name in _IMAGES:
        data, field, img_dir = _IMAGES[name]
        for f in [root / data] + ([root / "test_3d.jsonl"] if name == "cvbench" else []):
            for r in read_records(str(f)):
                if r.get(field):
                    _png(root / img_dir / r[field])
    return root


def responses(name: str) -> dict[str, str]:
    return {r["id"]: r["response"] for r in read_records(str(DATA / name / "responses.jsonl"))}


def run(name: str, path: Path, **opts):
    spec = B.get(name)
    items = spec.load(str(path), **opts)
    resp = responses(name)
    assert sorted(it.id for it in items) == sorted(resp)
    return items, *B.score_all(spec, items, [resp[it.id] for it in items])


def test_mathvista(tmp_path):
    root = materialize("mathvista", tmp_path)
    items, scored, agg = run("mathvista", root / "annot_testmini.json")
    by = {r["id"]: r for r in scored}
    # 1: "A" -> choices[0] "145°" right; 2: "(C) 4" -> letter C -> "4" right; 3: "blue cubes" is not a letter,
    # nearest option by edit distance is "blue cube" (1 edit) right; 4: integer "3.9" -> int(3.9) = 3 right
    # (truncation); 5: float precision 1: round(1.24, 1) = 1.2 right; 6: round(0.5, 2) = 0.5 != 0.57 wrong;
    # 7: no number in the response -> None wrong. 5 / 7.
    assert [by[str(i)]["score"] for i in range(1, 8)] == [1, 1, 1, 1, 1, 0, 0]
    assert by["1"]["pred"] == "145°" and by["3"]["pred"] == "blue cube" and by["4"]["pred"] == "3"
    assert agg["accuracy"] == pytest.approx(5 / 7)
    # task: FQA = {1, 2, 4} all right; MWP = {3, 5, 6, 7}: 2 / 4. Skills: geometry and algebraic only on 1
    # (right); arithmetic on 2..7: 4 / 6.
    assert agg["task/figure question answering"] == 1.0 and agg["task/math word problem"] == 0.5
    assert agg["skills/geometry reasoning"] == 1.0 and agg["skills/arithmetic reasoning"] == pytest.approx(4 / 6)
    assert items[0].text.startswith("Hint:") and items[0].images == [str(root / "images/1.jpg")]


def test_mathvista_normalisation_edges():
    from m2mega.eval.benchmarks.mathvista import normalize

    assert normalize("B", ["x", "y"], "multi_choice", "text", None) == "y"
    assert normalize("z", ["abc", "xyz"], "multi_choice", "text", None) == "xyz"  # 2 edits vs 3
    assert normalize("Z", ["abc", "xyz"], "multi_choice", "text", None) == "abc"  # case counts: a tie, first wins
    assert normalize("-2.7", [], "free_form", "integer", None) == "-2"  # int() truncates toward zero
    assert normalize("3.14159", [], "free_form", "float", 2) == "3.14"
    assert normalize("3.14159", [], "free_form", "float", 2.0) == "3.14"  # precision stored as a float
    assert normalize("\\frac{1}{2}", [], "free_form", "float", 1) == "0.5"  # number read from LaTeX
    assert normalize("[1, 2]", [], "free_form", "list", None) == "[1, 2]"


def test_levenshtein_matches_definition():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("same", "same") == 0
    rng = np.random.default_rng(0)
    for _ in range(50):  # symmetric and bounded by the longer length
        a, b = ("".join(rng.choice(list("abc"), rng.integers(0, 7))) for _ in range(2))
        assert levenshtein(a, b) == levenshtein(b, a) <= max(len(a), len(b))


def test_mathvision(tmp_path):
    root = materialize("mathvision", tmp_path)
    _, scored, agg = run("mathvision", root / "data/test.jsonl")
    by = {r["id"]: r["score"] for r in scored}
    # 1: letter C = answer; 2: "0.5" is not a letter but equals option B's value 1/2; 3: 12 = 12;
    # 4: 1.5 != sqrt(2). 3 / 4; counting {1, 2} 2/2, length {3, 4} 1/2; level 2: 2/2, level 5: 1/2.
    assert by == {"1": 1.0, "2": 1.0, "3": 1.0, "4": 0.0}
    assert agg["accuracy"] == 0.75 and agg["subject/counting"] == 1.0 and agg["level/5"] == 0.5


def test_mathverse_rule_and_judge(tmp_path):
    root = materialize("mathverse", tmp_path)
    items, scored, agg = run("mathverse", root / "testmini.json")
    # 1: B = B; 2: C != A; 3: 5 = 5; 4: pi != 2 pi. 2 / 4; Vision Only {1, 4} 1/2; Text Dominant {2, 3} 1/2.
    assert [r["score"] for r in scored] == [1.0, 0.0, 1.0, 0.0]
    assert agg["accuracy"] == 0.5 and agg["version/Vision Only"] == 0.5 and agg["subfield/angle"] == 0.5
    assert items[0].text == "Please answer question 1."  # query_wo by default
    calls = []

    def judge(question, answer, response):
        calls.append((question, answer))
        return answer in response

    spec = B.get("mathverse")
    scored_j, agg_j = B.score_all(spec, items, [responses("mathverse")[it.id] for it in items],
                                  score=B.mathverse.make_score(judge))
    # the judge sees question_for_eval and decides every sample: "B" in 1, "5" in 3 -> 2 / 4 again, but
    # every record says who scored it and keeps the rule verdict
    assert calls[0] == ("Question 1 for eval", "B") and len(calls) == 4
    assert all(r["scored_by"] == "judge" for r in scored_j) and agg_j["accuracy"] == 0.5
    always = B.score_all(spec, items, ["nothing"] * 4, score=B.mathverse.make_score(lambda q, a, r: True))[1]
    assert always["accuracy"] == 1.0


def test_dynamath(tmp_path):
    root = materialize("dynamath", tmp_path)
    items, scored, agg = run("dynamath", root)
    by = {r["id"]: r["score"] for r in scored}
    # seed 1 (float): v1 |1.5004 - 1.5| = 0.0004 <= 0.001 right; v2 2.1 vs 2.0 wrong.
    # seed 2 (choice): v1 "B" right; v2 "C. 12" is longer than one character, "C" is in its first 3 right.
    # seed 3 (free form): v1 "yes" in "yes" right; v2 "no" not in "yes" wrong.
    # seed 4 (float): v1 2π = 6.28319, |6.28319 - 6.283| = 0.00019 right; v2 "3.1416 units" -> first token
    # 3.1416, |3.1416 - 3.142| = 0.0004 right.
    assert by == {"1/v1": 1, "1/v2": 0, "2/v1": 1, "2/v2": 1, "3/v1": 1, "3/v2": 0, "4/v1": 1, "4/v2": 1}
    # average 6/8 = 0.75; worst case: seeds 2 and 4 right in every variant -> 2/4 = 0.5; RR = 0.5/0.75
    assert agg["average"] == 0.75 and agg["worst_case"] == 0.5 and agg["RR"] == pytest.approx(2 / 3)
    assert agg["seeds"] == 4 and agg["variants_per_seed_min"] == agg["variants_per_seed_max"] == 2
    # algebra = seeds 1, 4: average 3/4, worst 1/2; graph theory = seeds 2, 3: average 3/4, worst 1/2
    assert agg["average/subject/algebra"] == 0.75 and agg["worst_case/subject/algebra"] == 0.5
    assert items[0].text.endswith("Please answer in a floating-point number.")


def test_dynamath_checks_and_single_file(tmp_path):
    from m2mega.eval.benchmarks.dynamath import check

    assert check("12", "12.0005", "float") and not check("abc", "1", "float") and not check("", "1", "float")
    assert check("B", "B", "multiple choice") and not check("A", "B", "multiple choice")
    assert check("(B) 5", "B", "multiple choice") and not check("The answer is B", "B", "multiple choice")
    rows = [json.loads(l) for l in (DATA / "dynamath/sample_variant1.jsonl").read_text().splitlines()]
    one = tmp_path / "all.jsonl"
    one.write_text("".join(json.dumps({**r, "image": None, "variant": 7}) + "\n" for r in rows))
    items = B.get("dynamath").load(str(one))
    assert [it.id for it in items] == ["1/v7", "2/v7", "3/v7", "4/v7"] and items[0].images == []
    one.write_text(json.dumps({**rows[0], "image": None}) + "\n")
    with pytest.raises(BenchDataError, match="record 0: no 'variant' field"):
        B.get("dynamath").load(str(one))


def test_wemath_four_dimensional(tmp_path):
    root = materialize("wemath", tmp_path)
    _, scored, agg = run("wemath", root / "testmini.json")
    # Problems (one-step results -> multi-step result):
    #   1 (2 steps): T T -> T   CM strict + CM loose
    #   2 (2 steps): T F -> T   RM strict, CM loose
    #   3 (2 steps): F F -> T   RM strict + RM loose
    #   4 (2 steps): T T -> F   IG
    #   5 (3 steps): F T T -> F IK
    #   6 (3 steps): T T T -> T CM strict + CM loose
    #   7: only 2steps_1 present -> incomplete, left out.
    # N = 6, IG = 1, IK = 1, RM strict = 2, RM loose = 1, CM strict = 2, CM loose = 3.
    assert agg["problems"] == 6 and agg["incomplete_problems"] == 1
    assert agg["score_strict"] == pytest.approx((6 - 0.5 * 1 - 2 - 1) / 6)  # 0.41667
    assert agg["score_loose"] == pytest.approx((6 - 0.5 * 1 - 1 - 1) / 6)  # 0.58333
    assert agg["IK"] == pytest.approx(1 / 6) and agg["IG"] == pytest.approx(1 / 6)
    assert agg["CM_strict"] == pytest.approx(2 / 6) and agg["CM_loose"] == pytest.approx(3 / 6)
    assert agg["RM_strict"] == pytest.approx(2 / 4) and agg["RM_loose"] == pytest.approx(1 / 4)  # RM / (CM + RM)
    # S1 over the 14 one-step rows of complete problems (4 x 2 + 2 x 3): 2 + 1 + 0 + 2 + 2 + 3 = 10 right; S2 = multi-step
    # of problems 1-4: 3/4; S3 = problems 5, 6: 1/2. All 21 rows: 15 right.
    assert agg["S1"] == pytest.approx(10 / 14) and agg["S2"] == 0.75 and agg["S3"] == 0.5
    assert agg["accuracy_all"] == pytest.approx(15 / 21)
    # the untagged responses ("Reasoning first. Answer: D.") are read the official way
    assert {r["id"]: r["pred"] for r in scored}["1/2steps_multi"] == "D"


def test_wemath_rejects_duplicates_and_bad_keys(tmp_path):
    rows = json.loads((DATA / "wemath/testmini.json").read_text())
    for r in rows:
        r["image_path"] = None
    p = tmp_path / "testmini.json"
    p.write_text(json.dumps(rows + [rows[0]]))
    with pytest.raises(BenchDataError, match="has two '2steps_1' rows"):
        B.get("wemath").load(str(p))
    p.write_text(json.dumps([{**rows[0], "key": "4steps_1"}]))
    with pytest.raises(BenchDataError, match="record 0: key '4steps_1'"):
        B.get("wemath").load(str(p))


def test_logicvista(tmp_path):
    root = materialize("logicvista", tmp_path)
    _, scored, agg = run("logicvista", root / "data/dataset.json")
    by = {r["id"]: r["score"] for r in scored}
    # v1_0 {C} = {C}; v1_1 "A and C" -> {A, C} = {A, C}; v1_2 {B} != {B, D}; v1_20 numeric {3} = {3};
    # v1_4 "The answer is G" -> {G} ("The" is not a standalone letter); v1_5 {A} != {D}. 4 / 6.
    assert by == {"v1_0": 1, "v1_1": 1, "v1_2": 0, "v1_20": 1, "v1_4": 1, "v1_5": 0}
    # inductive {v1_0, v1_1, v1_2} 2/3; deductive {v1_20, v1_4} 1; spatial {v1_5} 0;
    # diagram {v1_0, v1_1, v1_2, v1_4, v1_5} 3/5; ocr {v1_20, v1_5} 1/2
    assert agg["accuracy"] == pytest.approx(4 / 6) and agg["skill/inductive"] == pytest.approx(2 / 3)
    assert agg["skill/spatial"] == 0.0 and agg["capability/diagram"] == 0.6 and agg["capability/ocr"] == 0.5


def test_cvbench(tmp_path):
    root = materialize("cvbench", tmp_path)
    items, scored, agg = run("cvbench", root)  # the folder: test_2d.jsonl + test_3d.jsonl
    by = {r["id"]: r["score"] for r in scored}
    # ADE20K {0: (A) right, 1: "C. 2" vs B wrong} 1/2; COCO {2: C, 3: (A), 4: "B. 1"} 3/3;
    # Omni3D {5: A right, 6: A vs B wrong, 7: B vs A wrong, 8: B right} 2/4.
    assert by == {"0": 1, "1": 0, "2": 1, "3": 1, "4": 1, "5": 1, "6": 0, "7": 0, "8": 1}
    # CV-Bench = 1/2 * ((0.5 + 1.0)/2 + 0.5) = 0.625, not the plain mean 6/9
    assert agg["overall"] == 0.625 and agg["2d"] == 0.75 and agg["3d"] == 0.5
    assert agg["accuracy_all"] == pytest.approx(6 / 9) and agg["task/Count"] == pytest.approx(2 / 3)
    assert items[0].images == [str(root / "img/2D/count/ade20k_0.png")]


def _frames(root: Path, n: int = 5) -> Path:
    frames = root / "frames"
    for ds, scene in (("scannet", "scene0001_00"), ("arkitscenes", "41069025")):
        for k in range(n):
            _png(frames / ds / scene / f"{k:05d}.jpg", (10 * k, 0, 0))
    return frames


def _mra(pred: float, gt: float) -> float:
    return float(np.mean([abs(pred - gt) / gt <= 1 - t for t in MRA_THRESHOLDS]))


def test_vsibench(tmp_path):
    frames = _frames(tmp_path)
    items, scored, agg = run("vsibench", DATA / "vsibench/test.jsonl", frames_dir=str(frames), num_frames=3)
    by = {r["id"]: r["score"] for r in scored}
    # counting: 4 vs 4 -> 1; 7.9 vs 10 (rel 0.21: thresholds 0.50..0.75 pass, 6 of 10) -> 0.6; mean 0.8
    assert by["0"] == 1.0 and by["1"] == pytest.approx(0.6) == pytest.approx(_mra(7.9, 10))
    # abs distance: "2.45 meters" -> first word 2.45, rel 0.225 -> 0.50..0.75 pass -> 0.6
    # size: "hundred" is not a number -> 0; room size: 20 vs 20.0 -> 1
    assert by["2"] == pytest.approx(0.6) and by["3"] == 0.0 and by["4"] == 1.0
    # multiple choice: "A. chair" -> "A" right; direction easy B right, medium "b" vs A wrong, hard "c" vs C
    # right (case-insensitive) and A vs D wrong; route A right; appearance "(B)" != "B" wrong (exact match)
    assert [by[str(i)] for i in range(5, 12)] == [1, 1, 0, 1, 0, 1, 0]
    # categories: counting 0.8, abs distance 0.6, size 0, room 1, rel distance 1,
    # rel direction mean(easy 1, medium 0, hard 0.5) = 0.5, route 1, appearance 0 -> overall 4.9 / 8
    assert agg["category/object_rel_direction"] == pytest.approx(0.5)
    assert agg["category/object_counting"] == pytest.approx(0.8)
    assert agg["overall"] == pytest.approx(4.9 / 8) and "missing_categories" not in agg
    # 3 of 5 frames, uniformly: indices 0, 2, 4
    assert [Path(p).name for p in items[0].images] == ["00000.jpg", "00002.jpg", "00004.jpg"]
    assert items[5].text.splitlines()[-1] == "Answer with the option's letter from the given choices directly."


def test_vsibench_needs_frames():
    with pytest.raises(BenchDataError, match="--frames-dir"):
        B.get("vsibench").load(str(DATA / "vsibench/test.jsonl"))


def test_vsibench_missing_category_reported(tmp_path):
    spec = B.get("vsibench")
    scored = [{"question_type": "object_counting", "score": 0.5}, {"question_type": "route_planning", "score": 1.0}]
    agg = spec.aggregate(scored)
    assert agg["overall"] == 0.75 and len(agg["missing_categories"]) == 6


def test_loaders_name_the_bad_file_and_record(tmp_path):
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"idx": 0}\nnot json\n')
    with pytest.raises(BenchDataError, match=r"test.jsonl:2: not JSON"):
        B.get("cvbench").load(str(bad))
    bad.write_text(json.dumps({"idx": 0, "answer": "(A)", "source": "Omni3D", "prompt": "q",
                               "filename": "img/missing.png"}) + "\n")
    with pytest.raises(BenchDataError, match=r"record 0: image .*img/missing.png not found"):
        B.get("cvbench").load(str(bad))
    with pytest.raises(BenchDataError, match="no such file"):
        B.get("mathvista").load(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'"):
        B.get("mmmu")


def test_registry_and_cli_names_agree():
    from m2mega.eval.bench import _NAMES

    assert set(_NAMES) == set(B.BENCHMARKS) and len(B.BENCHMARKS) == 8
    assert B.get("CV-Bench") is B.get("cvbench") and B.get("VSI_Bench") is B.get("vsibench")
    for spec in B.BENCHMARKS.values():
        assert spec.headline in ("overall", "accuracy", "worst_case", "score_strict")


def test_unreadable_responses_score_zero_everywhere(tmp_path):
    """Garbage, empty and huge responses never raise and never score (MathVista maps any text of a
    multiple-choice answer to its nearest option, so only its free-form items are checked)."""
    for name in ("mathvista", "mathvision", "mathverse", "dynamath", "wemath", "logicvista", "cvbench"):
        root = materialize(name, tmp_path / "g")
        path = root if name in ("dynamath", "cvbench") else root / _IMAGES[name][0]
        spec = B.get(name)
        items = spec.load(str(path))
        for junk in ("", "<answer></answer>", "}{" * 5000, "\\boxed{"):
            scored, agg = B.score_all(spec, items, [junk] * len(items))
            assert all(r["score"] == 0.0 for r in scored if r.get("question_type") != "multi_choice"), (name, junk)
            if name != "mathvista":
                assert agg[spec.headline] == 0.0, (name, junk)  # WeMath: every problem is IK -> (N - N) / N


def test_wemath_categories_partition_random_results():
    """On random right/wrong patterns: IK + IG + CM + RM = N under each condition, strict and loose agree on
    IK and IG, loose never scores below strict, and the score equals its formula from the counts."""
    from m2mega.eval.benchmarks.wemath import four_dimensional

    rng = np.random.default_rng(3)
    for _ in range(40):
        scored = []
        n2, n3 = rng.integers(1, 6), rng.integers(0, 5)
        for pid in range(n2 + n3):
            steps = 2 if pid < n2 else 3
            for part in [str(i) for i in range(1, steps + 1)] + ["multi"]:
                scored.append({"ID": str(pid), "key": f"{steps}steps_{part}", "score": float(rng.random() < 0.5)})
        a = four_dimensional(scored)
        c = {k[6:]: v for k, v in a.items() if k.startswith("count/")}
        n = n2 + n3
        for cond in ("strict", "loose"):
            assert c["IK"] + c["IG"] + c[f"CM_{cond}"] + c[f"RM_{cond}"] == n
            assert a[f"score_{cond}"] == pytest.approx((n - 0.5 * c["IG"] - c[f"RM_{cond}"] - c["IK"]) / n)
        assert a["score_loose"] >= a["score_strict"] and a["problems"] == n


def test_parquet_release_with_image_bytes(tmp_path):
    """HF parquet releases (DynaMath_Sample's only format) carry images as {"bytes", "path"} structs."""
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    rows = [{"id": "9", "question": "q?", "image": "images/9.png", "decoded_image": {"bytes": buf.getvalue(), "path": None},
             "ground_truth": "B", "answer_type": "multiple choice", "subject": "s", "knowledge_level": "k"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sample4-00000-of-00001.parquet")
    items = B.get("dynamath").load(str(tmp_path))
    assert items[0].id == "9/v4" and items[0].images == [buf.getvalue()]
