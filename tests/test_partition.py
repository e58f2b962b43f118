"""Tests for monai_fedkd.data.partition (small synthetic datalists in tmp_path)."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from monai_fedkd.data.partition import add_partition_arguments, partition_datalist, run_partition

SPLITS = ("training", "validation", "test")


def make_cls_datalist(
    root: Path, n_train: int = 120, n_val: int = 20, n_test: int = 40, num_classes: int = 4, seed: int = 0,
    with_test: bool = True, touch: bool = False,
) -> Path:
    """Pooled classification datalist with 'subject', 'age', 'sex' columns; returns its path."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_train + n_val + n_test):
        path = f"img/case_{i:04d}.nii.gz"
        if touch:
            (data / path).write_bytes(b"")
        items.append({
            "image": path,
            "label": int(rng.integers(0, num_classes)),
            "subject": f"S{i:04d}",
            "age": int(rng.integers(18, 90)),
            "sex": "F" if rng.random() < 0.5 else "M",
        })
    dl = {"training": items[:n_train], "validation": items[n_train:n_train + n_val]}
    if with_test:
        dl["test"] = items[n_train + n_val:]
    path = data / "datalist.json"
    path.write_text(json.dumps(dl, indent=1))
    return path


def load_sites(manifest_path: Path) -> tuple[dict, list[dict]]:
    manifest = json.loads(manifest_path.read_text())
    sites = [json.loads((manifest_path.parent / s["datalist"]).read_text()) for s in manifest["sites"]]
    return manifest, sites


def subjects(items: list[dict]) -> list[str]:
    return [it["subject"] for it in items]


def class_dist(items: list[dict], num_classes: int) -> np.ndarray:
    counts = np.bincount([it["label"] for it in items], minlength=num_classes).astype(float)
    return counts / max(counts.sum(), 1)


def read_dir(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


METHOD_KW = {
    "dirichlet": dict(num_sites=4, alpha=0.5),
    "quantity": dict(num_sites=4, quantity_beta=1.0),
    "metadata": dict(num_sites=None, column="sex"),
    "acquisition": dict(num_sites=4),
}


@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_counts_add_up_and_min_samples(tmp_path, method):
    dl = make_cls_datalist(tmp_path)
    pooled = json.loads(dl.read_text())
    mp = partition_datalist(dl, tmp_path / "out", method=method, seed=3, min_samples=5, **METHOD_KW[method])
    assert mp == tmp_path / "out" / "manifest.json"
    manifest, sites = load_sites(mp)
    pool_subjects = subjects(pooled["training"] + pooled["validation"])
    got_pool = [s for site in sites for split in ("training", "validation") for s in subjects(site[split])]
    got_test = [s for site in sites for s in subjects(site["test"])]
    assert sorted(got_pool) == sorted(pool_subjects)  # nothing lost, nothing duplicated
    assert sorted(got_test) == sorted(subjects(pooled["test"]))
    assert not set(got_pool) & set(got_test)
    for entry, site in zip(manifest["sites"], sites):
        assert entry["counts"] == {split: len(site[split]) for split in SPLITS}
        assert len(site["training"]) + len(site["validation"]) >= 5
        assert len(site["validation"]) >= 1 and len(site["training"]) >= 1
        for split in SPLITS:
            assert entry["class_counts"][split] == np.bincount(
                [it["label"] for it in site[split]], minlength=4
            ).tolist()
        # extra keys are kept
        assert all({"subject", "age", "sex"} <= set(it) for split in SPLITS for it in site[split])
    pooled_test = json.loads((mp.parent / "pooled_test.json").read_text())["test"]
    assert sorted(subjects(pooled_test)) == sorted(got_test)
    assert manifest["method"] == method and manifest["seed"] == 3
    assert manifest["source"]["datalist"] == "../data/datalist.json"
    assert len(manifest["source"]["sha256"]) == 64


def test_carves_test_pool_when_missing(tmp_path):
    dl = make_cls_datalist(tmp_path, n_train=80, n_val=20, n_test=0, with_test=False)
    mp = partition_datalist(dl, tmp_path / "out", num_sites=3, method="quantity", test_fraction=0.25)
    manifest, sites = load_sites(mp)
    n_test = sum(len(s["test"]) for s in sites)
    n_pool = sum(len(s["training"]) + len(s["validation"]) for s in sites)
    assert n_pool + n_test == 100 and 20 <= n_test <= 30
    assert manifest["source"]["test_carved_from_training_pool"] is True
    assert manifest["parameters"]["test_fraction"] == 0.25
    with pytest.raises(ValueError, match="already has a 'test' list"):
        partition_datalist(make_cls_datalist(tmp_path / "b"), tmp_path / "o2", num_sites=2, method="quantity",
                           test_fraction=0.2)


@pytest.mark.parametrize("method", ["dirichlet", "quantity", "acquisition", "metadata"])
def test_deterministic_and_seed_dependent(tmp_path, method):
    dl = make_cls_datalist(tmp_path)
    kw = METHOD_KW[method]
    a = partition_datalist(dl, tmp_path / "runs" / "a", method=method, seed=7, **kw).parent
    b = partition_datalist(dl, tmp_path / "runs" / "b", method=method, seed=7, **kw).parent
    c = partition_datalist(dl, tmp_path / "runs" / "c", method=method, seed=8, **kw).parent
    files_a, files_b, files_c = read_dir(a), read_dir(b), read_dir(c)
    assert files_a == files_b
    assert {"manifest.json", "pooled_test.json"} <= set(files_a)
    assert files_a != files_c
    site_a = {k: v for k, v in files_a.items() if k.startswith("site")}
    site_c = {k: v for k, v in files_c.items() if k.startswith("site")}
    assert site_a != site_c  # the assignment (or for metadata the site-local val split) changed
    text = files_a["manifest.json"].decode()
    assert str(tmp_path) not in text and not any(str(tmp_path) in v.decode() for v in files_a.values())
    # nothing left behind next to the output folders
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "b", "c"]


def _mean_tv(sites: list[dict], global_dist: np.ndarray, num_classes: int) -> float:
    tv = [0.5 * np.abs(class_dist(s["training"] + s["validation"], num_classes) - global_dist).sum() for s in sites]
    return float(np.mean(tv))


def test_dirichlet_small_alpha_is_more_skewed(tmp_path):
    dl = make_cls_datalist(tmp_path, n_train=500, n_val=100, n_test=100)
    pooled = json.loads(dl.read_text())
    global_dist = class_dist(pooled["training"] + pooled["validation"], 4)
    tv = {}
    for alpha in (0.1, 100.0):
        vals = []
        for seed in (0, 1):
            mp = partition_datalist(dl, tmp_path / f"a{alpha}_{seed}", num_sites=4, method="dirichlet", alpha=alpha,
                                    seed=seed, min_samples=2)
            vals.append(_mean_tv(load_sites(mp)[1], global_dist, 4))
        tv[alpha] = float(np.mean(vals))
    assert tv[100.0] < 0.1
    assert tv[0.1] > 0.3
    assert tv[0.1] > 3 * tv[100.0]


def test_dirichlet_test_split_follows_site_proportions(tmp_path):
    dl = make_cls_datalist(tmp_path, n_train=1500, n_val=300, n_test=900, num_classes=3)
    pooled = json.loads(dl.read_text())
    mp = partition_datalist(dl, tmp_path / "out", num_sites=3, method="dirichlet", alpha=1.0, seed=2)
    manifest, sites = load_sites(mp)
    test_per_class = np.bincount([it["label"] for it in pooled["test"]], minlength=3)
    pool_per_class = np.bincount([it["label"] for it in pooled["training"] + pooled["validation"]], minlength=3)
    for entry, site in zip(manifest["sites"], sites):
        p = np.asarray(entry["label_proportions"])
        test_counts = np.asarray(entry["class_counts"]["test"])
        pool_counts = np.asarray(entry["class_counts"]["training"]) + np.asarray(entry["class_counts"]["validation"])
        # the same per-class proportions split the training pool and the test pool
        assert np.all(np.abs(test_counts - p * test_per_class) <= 1)
        assert np.all(np.abs(pool_counts - p * pool_per_class) <= 1)
        if len(site["test"]) >= 50:
            tv = 0.5 * np.abs(class_dist(site["test"], 3) - class_dist(site["training"] + site["validation"], 3)).sum()
            assert tv < 0.12


def test_metadata_age_bins(tmp_path):
    dl = make_cls_datalist(tmp_path)
    mp = partition_datalist(dl, tmp_path / "out", num_sites=None, method="metadata", column="age", bins=[0, 40, 60, 200])
    manifest, sites = load_sites(mp)
    assert manifest["num_sites"] == 3
    bands = [(0, 40), (40, 60), (60, 200)]
    for entry, site, (lo, hi) in zip(manifest["sites"], sites, bands):
        assert entry["group"] == [lo, hi]
        ages = [it["age"] for split in SPLITS for it in site[split]]
        assert ages and all(lo <= a < hi for a in ages)
    with pytest.raises(ValueError, match="3 non-empty group"):
        partition_datalist(dl, tmp_path / "bad", num_sites=2, method="metadata", column="age", bins=[0, 40, 60, 200])
    with pytest.raises(ValueError, match="outside the bins"):
        partition_datalist(dl, tmp_path / "bad", num_sites=None, method="metadata", column="age", bins=[30, 60, 200])


def test_metadata_sex_and_site_names(tmp_path):
    dl = make_cls_datalist(tmp_path)
    mp = partition_datalist(dl, tmp_path / "out", num_sites=2, method="metadata", column="sex",
                            site_names=["hosp_f", "hosp_m"])
    manifest, sites = load_sites(mp)
    assert [e["datalist"] for e in manifest["sites"]] == ["hosp_f.json", "hosp_m.json"]
    assert [e["group"] for e in manifest["sites"]] == ["F", "M"]
    for value, site in zip("FM", sites):
        assert all(it["sex"] == value for split in SPLITS for it in site[split])
    pooled_test = json.loads((mp.parent / "pooled_test.json").read_text())["test"]
    assert all(it["site"] == ("hosp_f" if it["sex"] == "F" else "hosp_m") for it in pooled_test)


def test_metadata_missing_column(tmp_path):
    dl = make_cls_datalist(tmp_path)
    data = json.loads(dl.read_text())
    for it in data["training"][:3]:
        del it["sex"]
    data["test"][0]["sex"] = None
    dl.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"4 item\(s\) have no value for column 'sex'"):
        partition_datalist(dl, tmp_path / "out", num_sites=None, method="metadata", column="sex")
    assert not (tmp_path / "out").exists()
    mp = partition_datalist(dl, tmp_path / "out", num_sites=None, method="metadata", column="sex", drop_missing=True)
    manifest, sites = load_sites(mp)
    assert manifest["source"]["dropped_missing"] == {"test_pool": 1, "training_pool": 3}
    assert sum(len(s[split]) for s in sites for split in SPLITS) == 180 - 4
    with pytest.raises(ValueError, match="column 'nope'"):
        partition_datalist(dl, tmp_path / "out2", num_sites=None, method="metadata", column="nope")


def test_acquisition_items_carry_params(tmp_path):
    dl = make_cls_datalist(tmp_path)
    mp = partition_datalist(dl, tmp_path / "out", num_sites=3, method="acquisition", seed=5)
    manifest, sites = load_sites(mp)
    shifts = [e["acquisition"] for e in manifest["sites"]]
    assert shifts[0]["gamma"] == 1.0 and shifts[0]["noise_std"] == 0.0  # site 0: identity
    assert shifts[1] != shifts[2]
    for shift, site in zip(shifts, sites):
        assert 0.6 <= shift["gamma"] <= 1.6
        seeds = []
        for split in SPLITS:
            for it in site[split]:
                params = dict(it["acquisition"])
                seeds.append(params.pop("seed"))
                assert params == shift
        assert len(set(seeds)) == len(seeds) and all(isinstance(s, int) and s >= 0 for s in seeds)
    pooled_test = json.loads((mp.parent / "pooled_test.json").read_text())["test"]
    names = [e["name"] for e in manifest["sites"]]
    assert len(pooled_test) == sum(len(s["test"]) for s in sites)
    by_site = Counter(it["site"] for it in pooled_test)
    assert by_site == Counter({n: len(s["test"]) for n, s in zip(names, sites)})
    site_items = {it["subject"]: it for s in sites for it in s["test"]}
    for it in pooled_test:
        assert it["acquisition"] == site_items[it["subject"]]["acquisition"]
        assert it["acquisition"] == dict(shifts[names.index(it["site"])], seed=it["acquisition"]["seed"])
    # balanced sizes
    sizes = [len(s["training"]) + len(s["validation"]) for s in sites]
    assert max(sizes) - min(sizes) <= 1


def test_acquisition_explicit_shifts(tmp_path):
    dl = make_cls_datalist(tmp_path)
    shifts = [{}, {"gamma": 0.7}, {"noise_std": 0.02, "blur_sigma": 1.0}]
    mp = partition_datalist(dl, tmp_path / "out", num_sites=3, method="acquisition", shifts=shifts)
    manifest, sites = load_sites(mp)
    assert manifest["sites"][1]["acquisition"]["gamma"] == 0.7
    assert manifest["sites"][2]["acquisition"]["noise_std"] == 0.02
    assert sites[1]["training"][0]["acquisition"]["gamma"] == 0.7
    with pytest.raises(ValueError, match="gamma"):
        partition_datalist(dl, tmp_path / "bad", num_sites=3, method="acquisition", shifts=[{}, {"gamma": -1}, {}])
    with pytest.raises(ValueError, match="3 dicts"):
        partition_datalist(dl, tmp_path / "bad", num_sites=3, method="acquisition", shifts=[{}])


@pytest.mark.parametrize("method", ["quantity", "acquisition"])
def test_relative_paths_resolve(tmp_path, method):
    dl = make_cls_datalist(tmp_path, n_train=30, n_val=6, n_test=8, touch=True)
    out = tmp_path / "parts" / "nested" / "run1"
    mp = partition_datalist(dl, out, num_sites=2, method=method)
    manifest, sites = load_sites(mp)
    for entry in manifest["sites"]:
        for split in SPLITS:
            items = load_decathlon_datalist(out / entry["datalist"], is_segmentation=False, data_list_key=split)
            assert items
            for it in items:
                assert os.path.isfile(it["image"])
                assert os.path.normpath(it["image"]) == os.path.normpath(
                    tmp_path / "data" / "img" / Path(it["image"]).name
                )
    pooled = load_decathlon_datalist(out / "pooled_test.json", is_segmentation=False, data_list_key="test")
    assert all(os.path.isfile(it["image"]) for it in pooled)


@pytest.mark.parametrize("method", ["dirichlet", "quantity", "acquisition"])
def test_impossible_request_names_site(tmp_path, method):
    dl = make_cls_datalist(tmp_path, n_train=16, n_val=4, n_test=4)
    with pytest.raises(ValueError, match=r"site 'site\d+'"):
        partition_datalist(dl, tmp_path / "out", num_sites=50, method=method, min_samples=2)
    assert not (tmp_path / "out").exists()


def test_dirichlet_retry_failure_suggests_alpha(tmp_path):
    # 2 classes, tiny alpha: a site almost never gets samples from both classes -> some site too small
    dl = make_cls_datalist(tmp_path, n_train=40, n_val=0, n_test=10, num_classes=2)
    with pytest.raises(ValueError, match=r"site 'site\d+'.*larger alpha"):
        partition_datalist(dl, tmp_path / "out", num_sites=8, method="dirichlet", alpha=0.001, min_samples=4)


def test_metadata_small_group_names_site(tmp_path):
    dl = make_cls_datalist(tmp_path)
    data = json.loads(dl.read_text())
    data["training"][0]["sex"] = "X"
    dl.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"site 'site2'.*sex=X"):
        partition_datalist(dl, tmp_path / "out", num_sites=None, method="metadata", column="sex", min_samples=2)


def test_rerun_replaces_and_removes_stale_sites(tmp_path):
    dl = make_cls_datalist(tmp_path)
    out = tmp_path / "out"
    partition_datalist(dl, out, num_sites=4, method="quantity")
    assert (out / "site3.json").exists()
    (out / "notes.txt").write_text("keep me")
    partition_datalist(dl, out, num_sites=2, method="quantity")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "pooled_test.json", "site0.json",
                                                     "site1.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


def test_multi_hot_labels(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i in range(60):
        vec = [0, 0, 0]
        vec[int(rng.integers(0, 3))] = 1
        if i % 5 == 0:
            vec[2] = 1
        items.append({"image": f"{i}.png", "label": vec, "subject": str(i)})
    (data / "dl.json").write_text(json.dumps({"training": items[:50], "test": items[50:]}))
    mp = partition_datalist(data / "dl.json", tmp_path / "out", num_sites=2, method="dirichlet", alpha=5.0)
    manifest, sites = load_sites(mp)
    assert manifest["num_classes"] == 3
    for entry, site in zip(manifest["sites"], sites):
        for split in SPLITS:
            expected = np.sum([it["label"] for it in site[split]], axis=0).tolist() if site[split] else [0, 0, 0]
            assert entry["class_counts"][split] == expected


def test_dataset_info_and_label_range(tmp_path):
    dl = make_cls_datalist(tmp_path, num_classes=3)
    (dl.parent / "dataset_info.json").write_text(json.dumps({"task": "classification", "num_classes": 5}))
    mp = partition_datalist(dl, tmp_path / "out", num_sites=2, method="quantity")
    manifest = json.loads(mp.read_text())
    assert manifest["num_classes"] == 5 and manifest["task"] == "classification"
    assert all(len(e["class_counts"]["training"]) == 5 for e in manifest["sites"])
    assert manifest["source"]["dataset_info"] == "../data/dataset_info.json"
    with pytest.raises(ValueError, match="out of range"):
        partition_datalist(dl, tmp_path / "out2", num_sites=2, method="quantity", num_classes=2)


# ----------------------------------------------------------------------------------------------- segmentation
def make_seg_datalist(root: Path, maps: list[np.ndarray], num_classes: int | None, n_test: int = 2) -> Path:
    data = root / "data"
    (data / "labels").mkdir(parents=True)
    items = []
    for i, arr in enumerate(maps):
        nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.eye(4)), str(data / "labels" / f"lab{i}.nii.gz"))
        items.append({"image": f"images/img{i}.nii.gz", "label": f"labels/lab{i}.nii.gz", "subject": str(i)})
    (data / "datalist.json").write_text(json.dumps({"training": items[:-n_test], "test": items[-n_test:]}))
    if num_classes is not None:
        (data / "dataset_info.json").write_text(json.dumps({"task": "segmentation", "num_classes": num_classes}))
    return data / "datalist.json"


def test_segmentation_voxel_class_counts(tmp_path):
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 3, size=(4, 5, 3)) for _ in range(8)]
    dl = make_seg_datalist(tmp_path, maps, num_classes=3)
    mp = partition_datalist(dl, tmp_path / "out", num_sites=2, method="acquisition", min_samples=2)
    manifest, sites = load_sites(mp)
    assert manifest["task"] == "segmentation" and manifest["num_classes"] == 3
    total = np.zeros(3, dtype=int)
    for entry, site in zip(manifest["sites"], sites):
        for split in SPLITS:
            expected = np.zeros(3, dtype=int)
            for it in site[split]:
                expected += np.bincount(maps[int(it["subject"])].ravel(), minlength=3)
            assert entry["voxel_class_counts"][split] == expected.tolist()
            total += expected
        assert "class_counts" not in entry
        # label paths resolve too
        for it in load_decathlon_datalist(mp.parent / entry["datalist"], is_segmentation=True, data_list_key="training"):
            assert os.path.isfile(it["label"])
    assert total.tolist() == np.bincount(np.concatenate([m.ravel() for m in maps]), minlength=3).tolist()
    with pytest.raises(ValueError, match="classification"):
        partition_datalist(dl, tmp_path / "out2", num_sites=2, method="dirichlet")


def test_segmentation_out_of_range_label_names_file(tmp_path):
    maps = [np.zeros((3, 3, 2), dtype=np.uint8) for _ in range(6)]
    maps[3][1, 1, 1] = 4
    dl = make_seg_datalist(tmp_path, maps, num_classes=3)
    with pytest.raises(ValueError, match=r"lab3\.nii\.gz.*label value 4"):
        partition_datalist(dl, tmp_path / "out", num_sites=2, method="quantity")
    assert not (tmp_path / "out").exists()


def test_cli_arguments(tmp_path):
    dl = make_cls_datalist(tmp_path)
    parser = add_partition_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        "--datalist", str(dl), "--output-dir", str(tmp_path / "cli"), "--method", "acquisition", "--num-sites", "2",
        "--seed", "4", "--shifts", json.dumps([{}, {"gamma": 1.2, "noise_std": 0.01}]),
    ])
    mp = run_partition(args)
    direct = partition_datalist(dl, tmp_path / "direct", num_sites=2, method="acquisition", seed=4,
                                shifts=[{}, {"gamma": 1.2, "noise_std": 0.01}])
    assert read_dir(mp.parent) == read_dir(direct.parent)
    args = parser.parse_args(["--datalist", str(dl), "--output-dir", str(tmp_path / "m"), "--method", "metadata",
                              "--column", "age", "--bins", "0", "50", "120"])
    manifest = json.loads(run_partition(args).read_text())
    assert manifest["num_sites"] == 2 and manifest["parameters"]["bins"] == [0.0, 50.0, 120.0]


def test_invalid_arguments(tmp_path):
    dl = make_cls_datalist(tmp_path)
    with pytest.raises(ValueError, match="unknown partition method"):
        partition_datalist(dl, tmp_path / "o", num_sites=2, method="random")
    with pytest.raises(ValueError, match="num_sites is required"):
        partition_datalist(dl, tmp_path / "o", num_sites=None, method="quantity")
    with pytest.raises(ValueError, match="alpha"):
        partition_datalist(dl, tmp_path / "o", num_sites=2, method="dirichlet", alpha=0)
    with pytest.raises(ValueError, match="shifts only apply"):
        partition_datalist(dl, tmp_path / "o", num_sites=2, method="quantity", shifts=[{}, {}])
    with pytest.raises(ValueError, match="site_names"):
        partition_datalist(dl, tmp_path / "o", num_sites=2, method="quantity", site_names=["a"])
    assert not (tmp_path / "o").exists()
