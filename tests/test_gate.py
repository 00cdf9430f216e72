"""The regression gate on hand-built tables (no Ray, no models): pairing, intervals, thresholds, refusals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from jobs.config import load_score_config
from stylid_core.config import ConfigError, JobConfig, ScoreJobConfig
from stylid_core.gate import (
    GateConfig,
    GateInputError,
    check_comparable,
    compare_runs,
    fold_small_buckets,
    format_gate,
    paired_binary_interval,
    paired_interval,
)


def _tables(n_images: int = 12, faces_per_image: int = 2, size: float = 40.0, seed: int = 0):
    """Metrics and faces of a run: ``n_images`` ok images with ``faces_per_image`` faces of ``size`` px each."""
    rng = np.random.default_rng(seed)
    metrics, faces = [], []
    for i in range(n_images):
        image_id = f"img{i:03d}"
        style, content = 3.0 + rng.normal(0, 0.2), 0.7 + rng.normal(0, 0.02)
        metrics.append({"image_id": image_id, "status": "ok", "error": None, "colour_distance": style,
                        "style_distance": style / 2, "content_ssim": content})  # fmt: skip
        for k in range(faces_per_image):
            x0 = 10.0 + 100 * k
            faces.append({"image_id": image_id, "face_index": k, "x0": x0, "y0": 10.0, "x1": x0 + size,
                          "y1": 10.0 + size, "size_px": size, "size_bucket": "32-48" if size < 48 else "64-128",
                          "id_sim": 0.95 + rng.normal(0, 0.01), "id_match": True, "redetected": True,
                          "backend": "dlib"})  # fmt: skip
    return pd.DataFrame(metrics), pd.DataFrame(faces)


def _checks(result: dict) -> dict[tuple[str, str], dict]:
    return {(c["bucket"], c["figure"]): c for c in result["checks"]}


def test_an_identical_candidate_passes_with_zero_differences():
    m, f = _tables()
    result = compare_runs(m, f, m.copy(), f.copy(), GateConfig(min_faces=5))
    assert result["passed"] and result["failures"] == []
    checks = _checks(result)
    assert checks[("32-48", "id_sim")]["diff"] == 0 and checks[("32-48", "id_sim")]["status"] == "pass"
    assert checks[("all", "content_ssim")]["pairs"] == 12 and checks[("all", "id_sim")]["pairs"] == 24
    assert result["faces_paired"] == 24 and result["shared_ids"] == 12


def test_a_consistent_identity_drop_fails_naming_bucket_and_figure():
    m, f = _tables()
    worse = f.copy()
    worse["id_sim"] -= 0.05 + np.random.default_rng(1).normal(0, 0.005, len(worse))
    result = compare_runs(m, worse, m, f, GateConfig(min_faces=5))
    assert not result["passed"]
    check = _checks(result)[("32-48", "id_sim")]
    assert check["status"] == "fail" and check["significant"] and check["breached"]
    assert check["ci_high"] < 0 and check["drop"] == pytest.approx(0.05, abs=0.01)
    assert any(s.startswith("bucket 32-48: id_sim") for s in result["failures"])
    assert _checks(result)[("32-48", "colour_distance")]["status"] == "pass"  # per-image figures untouched
    table = format_gate(result)
    assert "FAIL" in table and "32-48" in table and "id_sim" in table


def test_a_drop_inside_the_noise_does_not_fail():
    """Beyond the threshold on average, but the paired interval reaches zero: reported as noise, not a failure."""
    m, f = _tables(n_images=3, faces_per_image=1)
    noisy = f.copy()
    noisy["id_sim"] = noisy["id_sim"].to_numpy() + np.array([-0.20, 0.15, -0.04])
    result = compare_runs(m, noisy, m, f, GateConfig(min_faces=2))
    check = _checks(result)[("32-48", "id_sim")]
    assert check["breached"] and not check["significant"] and check["status"] == "noise"
    assert check["ci_low"] < 0 < check["ci_high"] and result["passed"]


def test_a_bucket_with_too_few_faces_is_not_gated_alone_but_folded_into_all():
    m, f = _tables()
    worse = f.copy()
    worse["id_sim"] -= 0.2
    result = compare_runs(m, worse, m, f, GateConfig(min_faces=25))  # 24 paired faces, all in 32-48
    checks = _checks(result)
    assert checks[("32-48", "id_sim")]["status"] == "too_few_faces" and checks[("32-48", "id_sim")]["passed"]
    assert checks[("32-48", "id_sim")]["gated_in"] == "all" and result["not_gated_alone"] == {"32-48": "all"}
    assert checks[("all", "id_sim")]["status"] == "fail" and not result["passed"] and result["gated"]
    assert "not gated alone (fewer than min_faces paired faces): 32-48 (in all)" in format_gate(result)
    gated = compare_runs(m, worse, m, f, GateConfig(min_faces=24))
    assert _checks(gated)[("32-48", "id_sim")]["status"] == "fail" and gated["not_gated_alone"] == {}


def test_colour_distance_fails_on_a_rise_and_relative_thresholds_apply():
    m, f = _tables()
    shifted = m.copy()
    shifted["colour_distance"] *= 1.2  # +20%, +0.6 Lab units
    config = GateConfig(min_faces=5, colour_distance={"abs_drop": None, "rel_drop": 0.10})
    check = _checks(compare_runs(shifted, f, m, f, config))[("32-48", "colour_distance")]
    assert check["status"] == "fail" and check["rel_drop"] == pytest.approx(0.2, abs=0.01)
    lenient = GateConfig(min_faces=5, colour_distance={"abs_drop": None, "rel_drop": 0.25})
    assert compare_runs(shifted, f, m, f, lenient)["passed"]
    better = m.copy()
    better["colour_distance"] *= 0.5  # closer to the style is no regression
    assert compare_runs(better, f, m, f, config)["passed"]


def test_ids_on_one_side_only_and_worse_statuses_are_reported():
    m, f = _tables()
    cand_m = m[m["image_id"] != "img000"].copy()  # lost
    cand_m = pd.concat([cand_m, pd.DataFrame([{"image_id": "new1", "status": "ok"}])], ignore_index=True)
    cand_m.loc[cand_m["image_id"] == "img001", ["status", "error"]] = ["score_error", "boom"]
    cand_f = f[~f["image_id"].isin(["img000", "img001"])]
    result = compare_runs(cand_m, cand_f, m, f, GateConfig(min_faces=5))
    assert result["only_in_baseline"] == ["img000"] and result["only_in_candidate"] == ["new1"]
    assert result["status_worse"] == [{"image_id": "img001", "baseline": "ok", "candidate": "score_error",
                                       "error": "boom"}]  # fmt: skip
    counts = {c["check"]: c for c in result["counts"]}
    assert not counts["status_worse"]["passed"] and not counts["only_in_baseline"]["passed"]
    assert counts["only_in_candidate"]["passed"]  # null maximum: reported only
    assert not result["passed"] and result["faces_paired"] == 20
    table = format_gate(result)
    assert "img000" in table and "new1" in table and "img001" in table
    lenient = GateConfig(min_faces=5, max_status_worse=1, max_only_in_baseline=1)
    assert compare_runs(cand_m, cand_f, m, f, lenient)["passed"]


def test_faces_whose_boxes_moved_are_not_paired():
    m, f = _tables()
    moved = f.copy()
    moved.loc[0, ["x0", "x1"]] += 30  # IoU of the two boxes: 10/70
    result = compare_runs(m, moved, m, f, GateConfig(min_faces=5))
    assert result["faces_paired"] == 23
    assert result["faces_unpaired_baseline"] == [["img000", 0]] == result["faces_unpaired_candidate"]


def test_no_shared_ids_is_bad_input():
    m, f = _tables()
    other = m.assign(image_id=m["image_id"] + "-x")
    with pytest.raises(GateInputError, match="share no image_id"):
        compare_runs(other, f, m, f, GateConfig())


def test_paired_interval_is_the_student_t_interval():
    low, high = paired_interval(np.array([1.0, 2.0, 3.0]), 0.95)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert paired_interval(np.array([0.5]), 0.95) is None


def _info(config) -> dict:
    return {"job": "score", "config": config.to_dict()}


def test_a_baseline_of_another_backend_or_config_is_refused():
    here = _info(ScoreJobConfig())
    check_comparable(here, {"config": JobConfig().to_dict()}, "b")  # a stylid run output of the same faces/score
    other_backend = JobConfig.from_dict({"faces": {"backend": "insightface"}}).to_dict()
    with pytest.raises(GateInputError, match="face backend 'insightface'"):
        check_comparable(here, {"config": other_backend}, "s3://b/base")
    with pytest.raises(GateInputError, match="faces.upsample: 1 in the baseline, 2 here"):
        check_comparable(here, _info(ScoreJobConfig.from_dict({"faces": {"upsample": 1}})), "b")
    with pytest.raises(GateInputError, match="score.redetect"):
        check_comparable(here, _info(ScoreJobConfig.from_dict({"score": {"redetect": False}})), "b")
    with pytest.raises(GateInputError, match="stylid customize"):
        check_comparable(here, {"job": "customize", "config": {}}, "b")
    # what does not change the figures is no reason to refuse
    check_comparable(here, _info(ScoreJobConfig.from_dict({"faces": {"providers": ["CUDAExecutionProvider"]}})), "b")


def test_gate_thresholds_come_from_the_nightly_config_and_set_overrides():
    config, gate = load_score_config("nightly_score", ["gate.min_faces=3", "gate.id_sim.abs_drop=0.01"])
    assert gate.min_faces == 3 and gate.id_sim.abs_drop == 0.01 and gate.id_sim.rel_drop == 0.03
    assert config.faces == JobConfig().faces  # scored as stylid run scores
    assert config.config_hash() == load_score_config("nightly_score", ["gate.min_faces=9"])[0].config_hash()
    with pytest.raises(ConfigError, match="gate.nope"):
        load_score_config("nightly_score", ["gate.nope=1"])
    with pytest.raises(ConfigError, match="gate.id_sim.abs"):
        load_score_config("nightly_score", ["gate.id_sim.abs=1"])
    with pytest.raises(ConfigError, match="confidence"):
        load_score_config("nightly_score", ["gate.confidence=1.5"])
    with pytest.raises(ConfigError, match="abs_drop"):
        load_score_config("nightly_score", ["gate.content_ssim.abs_drop=-1"])


def test_a_baseline_of_another_metrics_version_is_refused():
    from stylid_core.metrics import METRICS_VERSION

    here = {**_info(ScoreJobConfig()), "metrics_version": METRICS_VERSION}
    check_comparable(here, {**_info(ScoreJobConfig()), "metrics_version": METRICS_VERSION}, "b")
    # an output written before the learned style distance: its style_distance column is the Lab figure
    with pytest.raises(GateInputError, match=r"metrics version 1 and this run 2: .*style_distance is learned"):
        check_comparable(here, _info(ScoreJobConfig()), "s3://b/old")


def test_a_missing_figure_column_is_no_data_not_an_error():
    m, f = _tables()
    old = m.drop(columns=["style_distance"])  # an output written before the column existed
    checks = _checks(compare_runs(m, f, old, f, GateConfig(min_faces=5)))
    assert checks[("all", "style_distance")]["status"] == "no_data" and checks[("all", "style_distance")]["passed"]


def _canary(n_images: int = 12, seed: int = 0):
    """A 54-face canary like the issue's: 12 images, 3-6 faces each, face_index by size (largest first)."""
    rng = np.random.default_rng(seed)
    metrics, faces = [], []
    for i in range(n_images):
        image_id = f"img{i:03d}"
        metrics.append({"image_id": image_id, "status": "ok", "error": None, "colour_distance": 3.0,
                        "style_distance": 1.5, "content_ssim": 0.7})  # fmt: skip
        n = [6, 3][i % 2]  # 6 x 6 + 6 x 3 = 54 faces
        sizes = sorted(rng.uniform(20, 120, n), reverse=True)
        for k, size in enumerate(sizes):
            x0 = 10.0 + 150 * k
            bucket = "<32" if size < 32 else "32-48" if size < 48 else "48-64" if size < 64 else "64-128"
            faces.append({"image_id": image_id, "face_index": k, "x0": x0, "y0": 10.0, "x1": x0 + size,
                          "y1": 10.0 + size, "size_px": size, "size_bucket": bucket,
                          "id_sim": 0.9 + rng.normal(0, 0.02), "id_match": True, "redetected": True})  # fmt: skip
    return pd.DataFrame(metrics), pd.DataFrame(faces)


def test_one_lost_face_leaves_the_other_faces_of_its_image_paired():
    m, f = _canary()
    assert len(f) == 54
    lost = f[~((f["image_id"] == "img000") & (f["face_index"] == 0))].copy()  # the largest face of img000 is gone
    lost.loc[lost["image_id"] == "img000", "face_index"] -= 1  # so every other face of it moves up one index
    result = compare_runs(m, lost, m, f, GateConfig(min_faces=5))
    assert result["faces_paired"] == 53
    assert result["faces_unpaired_baseline"] == [["img000", 0]] and result["faces_unpaired_candidate"] == []
    checks = _checks(result)
    assert checks[("all", "id_sim")]["diff"] == 0  # each face met its own self, not a neighbour
    u = result["unpaired_faces"]
    assert (u["lost"], u["new"], u["faces"]) == (1, 0, 54) and u["share"] == pytest.approx(1 / 54)
    lost_bucket = f.loc[(f["image_id"] == "img000") & (f["face_index"] == 0), "size_bucket"].item()
    by_bucket = {r["bucket"]: r for r in result["face_pairing"]}
    assert by_bucket[lost_bucket]["lost"] == 1 and by_bucket["all"] == {"bucket": "all", "paired": 53, "lost": 1,
                                                                        "new": 0}  # fmt: skip
    # 1.9% of all faces is under the default 2%, but not of its bucket's faces: the lost face fails the gate
    in_bucket = int((f["size_bucket"] == lost_bucket).sum())
    assert u["share_passed"] and not u["passed"] and not result["passed"] and in_bucket < 50
    assert result["failures"] == [f"unpaired faces in bucket {lost_bucket}: 1 of {in_bucket} (1 lost, 0 new;"
                                  f" {1 / in_bucket:.1%}, at most 2.0% in each bucket)"]  # fmt: skip
    assert f"{lost_bucket} 1 of {in_bucket} (1 lost, 0 new; {1 / in_bucket:.1%}) FAIL" in format_gate(result)
    strict = compare_runs(m, lost, m, f, GateConfig(min_faces=5, max_unpaired_share=0.01))
    assert not strict["passed"] and any(s.startswith("unpaired faces: 1 of 54") for s in strict["failures"])
    assert compare_runs(m, lost, m, f, GateConfig(min_faces=5, max_unpaired_share=0.5))["passed"]
    # a count instead of a share: max_unpaired_faces
    counted = compare_runs(m, lost, m, f, GateConfig(min_faces=5, max_unpaired_share=None, max_unpaired_faces=0))
    assert not counted["passed"] and counted["failures"] == ["unpaired faces: 1 (at most 0)"]
    assert compare_runs(m, lost, m, f, GateConfig(min_faces=5, max_unpaired_share=None, max_unpaired_faces=1))[
        "passed"
    ]


def test_a_bucket_of_50_faces_or_more_tolerates_one_lost_face_under_the_default_share():
    m, f = _tables(n_images=60, faces_per_image=1)
    result = compare_runs(m, f.iloc[1:], m, f, GateConfig())
    assert result["unpaired_faces"]["count"] == 1 and result["passed"]  # 1 of 60: 1.7%
    small = compare_runs(m.iloc[:40], f.iloc[1:40], m.iloc[:40], f.iloc[:40], GateConfig())
    assert not small["passed"]  # 1 of 40: 2.5%


def test_a_reordered_face_list_pairs_every_face():
    m, f = _canary()
    shuffled = f.copy()
    rng = np.random.default_rng(3)
    for idx in shuffled.groupby("image_id").groups.values():
        shuffled.loc[idx, "face_index"] = rng.permutation(len(idx))
    shuffled = shuffled.sample(frac=1, random_state=4)
    assert (shuffled.sort_index()["face_index"] != f["face_index"]).sum() > 30
    result = compare_runs(m, shuffled, m, f, GateConfig(min_faces=5))
    assert result["faces_paired"] == 54 and result["unpaired_faces"]["count"] == 0
    assert all(c["diff"] == 0 for c in result["checks"] if c["diff"] is not None) and result["passed"]


def test_46_of_54_faces_unpaired_fails_the_gate():
    m, f = _canary()
    moved = f.copy()
    moved.loc[moved.index[8:], ["x0", "x1"]] += 5000  # 46 faces found elsewhere: no overlap with any baseline face
    result = compare_runs(m, moved, m, f, GateConfig(min_faces=5))
    u = result["unpaired_faces"]
    assert result["faces_paired"] == 8 and (u["lost"], u["new"]) == (46, 46) and not u["passed"]
    assert not result["passed"]
    assert any(s.startswith("unpaired faces: 92 of 100 (46 lost, 46 new") for s in result["failures"])
    assert "unpaired faces: 92 of 100" in format_gate(result)
    assert compare_runs(m, moved, m, f, GateConfig(min_faces=5, max_unpaired_share=None))["passed"]


def test_a_duplicated_faces_shard_gives_no_extra_pairs():
    m, f = _canary()
    doubled = pd.concat([f, f.iloc[:7]], ignore_index=True)  # a shard of 7 face rows written twice
    result = compare_runs(m, doubled, m, pd.concat([f.iloc[10:17], f], ignore_index=True), GateConfig(min_faces=5))
    assert result["faces_paired"] == 54 and result["unpaired_faces"]["count"] == 0
    assert _checks(result)[("all", "id_sim")]["pairs"] == 54


def test_max_unpaired_share_is_validated():
    with pytest.raises(ConfigError, match="max_unpaired_share"):
        GateConfig(max_unpaired_share=1.5)
    with pytest.raises(ConfigError, match="max_unpaired_faces"):
        GateConfig(max_unpaired_faces=-1)
    assert GateConfig().max_unpaired_share == 0.02


def _sized(sizes_per_image: list[list[float]], seed: int = 0):
    """Metrics and faces of images whose faces have the given sizes (px)."""
    rng = np.random.default_rng(seed)
    metrics, faces = [], []
    for i, sizes in enumerate(sizes_per_image):
        image_id = f"img{i:03d}"
        metrics.append({"image_id": image_id, "status": "ok", "error": None, "colour_distance": 3.0,
                        "style_distance": 1.5, "content_ssim": 0.7 + rng.normal(0, 0.01)})  # fmt: skip
        for k, size in enumerate(sizes):
            x0 = 10.0 + 200 * k
            bucket = "<32" if size < 32 else "32-48" if size < 48 else "48-64"
            faces.append({"image_id": image_id, "face_index": k, "x0": x0, "y0": 10.0, "x1": x0 + size,
                          "y1": 10.0 + size, "size_px": size, "size_bucket": bucket,
                          "id_sim": 0.9 + rng.normal(0, 0.01), "id_match": True, "redetected": True})  # fmt: skip
    return pd.DataFrame(metrics), pd.DataFrame(faces)


def test_fold_small_buckets_into_the_next_larger_and_leave_the_rest_to_all():
    folds, gated_in = fold_small_buckets([("<32", 5), ("32-48", 6), ("48-64", 30), ("64-128", 3)], 20)
    assert folds == [("<32+32-48+48-64", ["<32", "32-48", "48-64"])]
    assert gated_in == {"<32": "<32+32-48+48-64", "32-48": "<32+32-48+48-64", "64-128": "all"}
    assert fold_small_buckets([("<32", 25), ("32-48", 30)], 20) == ([], {})
    assert fold_small_buckets([("<32", 12), ("32-48", 8)], 20) == (
        [("<32+32-48", ["<32", "32-48"])],
        {"<32": "<32+32-48", "32-48": "<32+32-48"},
    )


def test_a_drop_in_a_small_bucket_fails_the_bucket_it_is_folded_into():
    """The issue's <32 px bucket: 8 faces lose 0.2 id_sim; alone it is `few faces`, folded into 32-48 it fails."""
    m, f = _sized([[24.0, 40.0, 40.0, 40.0]] * 8)  # 8 faces under 32 px, 24 at 32-48
    worse = f.copy()
    worse.loc[worse["size_bucket"] == "<32", "id_sim"] -= 0.2
    result = compare_runs(m, worse, m, f, GateConfig())  # default min_faces 20
    checks = _checks(result)
    assert (
        checks[("<32", "id_sim")]["status"] == "too_few_faces" and checks[("<32", "id_sim")]["gated_in"] == "<32+32-48"
    )
    fold = checks[("<32+32-48", "id_sim")]
    assert fold["faces"] == 32 and fold["status"] == "fail" and fold["drop"] == pytest.approx(0.05, abs=1e-9)
    assert checks[("32-48", "id_sim")]["status"] == "pass"
    assert any(s.startswith("bucket <32+32-48: id_sim") for s in result["failures"]) and not result["passed"]


def test_fourteen_heavily_blurred_faces_fail_the_all_bucket_with_the_default_config():
    """The issue's seven blurred scenes: 14 faces, match rate 1.00 -> 0.21, id_sim -0.11; every size bucket is too
    small for min_faces 20, and `stylid score` exited 0. Now `all` (min_faces_all 10) fails."""
    m, f = _sized([[24.0, 40.0]] * 7, seed=2)
    blurred = f.copy()
    rng = np.random.default_rng(5)
    blurred["id_sim"] -= 0.111 + rng.normal(0, 0.03, len(blurred))
    blurred["id_match"] = [True, False, False, True, False, False, False, True, False, False, False, False, False,
                           False]  # 3 of 14  # fmt: skip
    result = compare_runs(m, blurred, m, f, GateConfig())
    checks = _checks(result)
    assert all(checks[(b, "id_sim")]["status"] == "too_few_faces" for b in ("<32", "32-48"))
    assert checks[("all", "id_match")]["status"] == "fail" and checks[("all", "id_sim")]["status"] == "fail"
    assert checks[("all", "id_match")]["candidate"] == pytest.approx(3 / 14)
    assert not result["passed"] and result["gated"]


def test_intervals_stay_inside_the_range_of_the_difference_and_one_pair_has_none():
    low, high = paired_interval(np.array([1.0, -1.0]), 0.95, (-1.0, 1.0))
    assert (low, high) == (-1.0, 1.0)  # unclipped: [-12.7, 12.7]
    m, f = _sized([[40.0, 40.0], [40.0]])
    flipped = f.copy()
    flipped["redetected"] = [False, True, False]
    flipped["id_sim"] = [-0.6, 0.95, -0.5]  # differences about -1.5, 0.05, -1.4: the t interval reaches -3.1
    result = compare_runs(m, flipped, m, f, GateConfig(min_faces=2, min_faces_all=2))
    for c in result["checks"]:
        if c["ci_low"] is not None:
            lowest, highest = {"id_sim": (-2, 2), "id_match": (-1, 1), "redetected": (-1, 1),
                               "content_ssim": (-2, 2)}.get(c["figure"], (-math.inf, math.inf))  # fmt: skip
            assert lowest <= c["ci_low"] <= c["ci_high"] <= highest
    assert _checks(result)[("all", "id_sim")]["ci_low"] == -2.0
    one = compare_runs(m[m["image_id"] == "img000"], f, m, f, GateConfig(min_faces=2, min_faces_all=2))
    image_check = _checks(one)[("all", "content_ssim")]  # one image: one pair
    assert image_check["pairs"] == 1 and image_check["ci_low"] is None and image_check["status"] == "too_few_faces"


def test_a_night_too_small_to_gate_even_all_is_not_gated():
    m, f = _sized([[40.0]] * 4)
    result = compare_runs(m, f, m, f, GateConfig())  # 4 faces < min_faces_all 10
    assert result["passed"] and not result["gated"]
    assert "NOT GATED" in format_gate(result)
    assert compare_runs(m, f, m, f, GateConfig(min_faces_all=4))["gated"]
    with pytest.raises(ConfigError, match="min_faces_all"):
        GateConfig(min_faces_all=1)


def test_binary_figures_use_an_interval_for_matched_proportions():
    """Two faces that both stop matching: the t interval of the 0/1 differences is [-1, -1] (zero wide, a FAIL);
    the Agresti-Min interval (1/2 added to each cell of the 2x2 table) is wide and reaches zero."""
    low, high = paired_binary_interval(np.array([True, True]), np.array([False, False]), 0.95)
    p_lost, p_gained = 2.5 / 4, 0.5 / 4
    half = 1.959963984540054 * math.sqrt((p_lost + p_gained - (p_gained - p_lost) ** 2) / 4)
    assert low == pytest.approx(max(-0.5 - half, -1.0)) and high == pytest.approx(-0.5 + half) and high > 0
    assert paired_interval(np.array([-1.0, -1.0]), 0.95) == (-1.0, -1.0)  # what the t interval said
    m, f = _sized([[40.0], [40.0]])
    result = compare_runs(m, f.assign(id_match=False), m, f, GateConfig(min_faces=2, min_faces_all=2))
    check = _checks(result)[("all", "id_match")]
    assert check["breached"] and not check["significant"] and check["status"] == "noise"
    # 30 of 30 faces that stop matching is decisive
    m, f = _sized([[40.0]] * 30)
    many = _checks(compare_runs(m, f.assign(id_match=False), m, f, GateConfig()))[("all", "id_match")]
    assert many["status"] == "fail" and many["ci_high"] < -0.8
    assert paired_binary_interval(np.array([True]), np.array([False]), 0.95) is None


def test_the_median_night_takes_each_faces_median_over_the_nights_it_was_paired_in():
    from stylid_core.gate import median_night

    m, f = _tables(n_images=3, faces_per_image=2)
    nights = []
    for k, (sim, match) in enumerate([(0.90, True), (0.80, False), (0.70, False), (0.60, False)]):
        night_faces = f.assign(id_sim=sim, id_match=match | ((k == 3) & (f["image_id"] == "img001")))
        night_metrics = m.assign(content_ssim=0.5 + k / 10)
        if k == 1:  # night 1: img000's face 0 lost, faces listed in another order, img002 failed
            night_faces = night_faces[~((night_faces["image_id"] == "img000") & (night_faces["face_index"] == 0))]
            night_faces = night_faces.iloc[::-1].assign(face_index=lambda d: d.groupby("image_id").cumcount())
            night_metrics = night_metrics.assign(status=np.where(night_metrics["image_id"] == "img002", "no_face",
                                                                 "ok"))  # fmt: skip
        nights.append((night_metrics, night_faces))
    metrics, faces = median_night(nights, pair_iou=0.5)
    assert len(faces) == 6 and faces[["image_id", "face_index"]].equals(f[["image_id", "face_index"]])
    sims = faces.set_index(["image_id", "face_index"])["id_sim"]
    assert sims[("img001", 0)] == pytest.approx(0.75)  # median of 0.9, 0.8, 0.7, 0.6
    assert sims[("img000", 0)] == pytest.approx(0.70)  # lost in night 1: median of 0.9, 0.7, 0.6
    assert sims[("img002", 1)] == pytest.approx(0.70)  # its image failed in night 1: not counted there
    matches = faces.set_index(["image_id", "face_index"])["id_match"]
    assert matches[("img001", 0)] is True  # 2 of 4: a tie keeps the newest night's (the anchor's) value
    assert matches[("img000", 0)] is False and matches[("img002", 0)] is False  # 1 of 3 matched
    ssim = metrics.set_index("image_id")["content_ssim"]
    assert ssim["img000"] == pytest.approx(0.65) and ssim["img002"] == pytest.approx(0.7)  # 0.5, 0.7, 0.8
    assert metrics["status"].tolist() == ["ok"] * 3  # the anchor's statuses
    # a candidate equal to the median passes with zero differences; one 0.1 under it fails
    result = compare_runs(metrics, faces, metrics, faces, GateConfig(min_faces=5, min_faces_all=5))
    assert result["passed"] and _checks(result)[("all", "id_sim")]["diff"] == 0
    worse = faces.assign(id_sim=faces["id_sim"].astype(float) - 0.1 + np.linspace(0, 0.01, 6))
    assert not compare_runs(metrics, worse, metrics, faces, GateConfig(min_faces=5, min_faces_all=5))["passed"]


def test_the_canary_warning_names_each_bucket_too_small_to_gate_alone_and_where_it_is_gated():
    from stylid_core.gate import canary_warning

    buckets = [{"size_bucket": "64-128", "faces": 30}, {"size_bucket": "<32", "faces": 4},
               {"size_bucket": "32-48", "faces": 18}, {"size_bucket": ">=128", "faces": 7}]  # fmt: skip
    warning = canary_warning(buckets, GateConfig(), "s3://b/scores/n01/")
    assert warning.startswith("warning: s3://b/scores/n01/ has fewer than gate.min_faces (20) faces in <32 (4 faces),"
                              " 32-48 (18 faces) gated in <32+32-48; >=128 (7 faces) gated in all: a drop there cannot"
                              " fail on its own")  # fmt: skip
    assert "nothing can be gated" not in warning
    assert canary_warning([{"size_bucket": "32-48", "faces": 20}], GateConfig(), "x") is None
    tiny = canary_warning([{"size_bucket": "32-48", "faces": 1}], GateConfig(min_faces_all=2), "x")
    assert "in 32-48 (1 face) gated in all:" in tiny
    tiny = canary_warning([{"size_bucket": "32-48", "faces": 6}], GateConfig(), "x")
    assert "and 6 faces in all, under gate.min_faces_all (10): nothing can be gated (exit 3)" in tiny
