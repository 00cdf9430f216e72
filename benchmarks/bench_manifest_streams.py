"""Driver memory and time of reading a large manifest for ``stylid score`` and for the customizer's training pairs:
the whole table in pandas (what ``run_score`` and the training pairs did before they streamed: this file's
``_score_whole`` and ``_train_whole``, the baseline) against the streamed reader's passes (``iter_score_manifest``,
``TrainingPairRows``), and the training references by person, vectorised against row by row.

Each variant runs in a fresh subprocess; its peak RSS (``VmHWM``) is printed beside the RSS after imports, so
the difference is what the read itself held. No Ray: the plan's blocks go to the object store, not the driver.

    python benchmarks/bench_manifest_streams.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    """This process's own peak RSS (``VmHWM``; ``ru_maxrss`` would carry the parent's over ``exec``)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM"))


def _write_manifests(folder: str, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    k = np.arange(rows)
    sources = pa.array([f"s3://bucket/photos/{i:08d}.jpg" for i in k])
    outputs = pa.array([f"s3://bucket/stylized/{i:08d}.png" for i in k])
    pq.write_table(pa.table({"source_uri": sources, "output_uri": outputs}), os.path.join(folder, "pairs.parquet"))
    persons = pa.array([f"person-{p}" for p in rng.integers(0, rows // 4, rows)])  # about 4 photos a person
    captions = pa.array([f"a portrait photo, number {i}, in natural light" for i in k])
    pq.write_table(pa.table({"image_uri": sources, "person_id": persons, "caption": captions}),
                   os.path.join(folder, "train.parquet"))  # fmt: skip


def _score_whole(pairs: str):
    """The baseline of ``score-*``: every prepared score row in one pandas frame, its ids checked unique in it."""
    import pyarrow as pa

    from pipelines.manifest import check_unique_ids
    from pipelines.score import iter_score_manifest

    reader = iter_score_manifest(pairs, None)
    table = pa.concat_tables(list(reader), promote_options="permissive")
    check_unique_ids(table.column("image_id"), pairs, reader.id_hint)
    style = table.column("style_uri")
    if pa.types.is_dictionary(style.type):  # the reader's one-style-a-batch encoding; a frame wants plain strings
        table = table.set_column(table.column_names.index("style_uri"), "style_uri", style.cast(pa.string()))
    return table.to_pandas()


def _train_whole(train):
    """The baseline of ``train-*``: every training row, with its reference, in one pandas frame."""
    import pyarrow as pa

    from pipelines.train_customizer import TrainingPairRows

    return pa.concat_tables(list(TrainingPairRows(train)), promote_options="permissive").to_pandas()


def _variant(name: str, folder: str) -> None:
    """One measurement, in this (fresh) process: prints ``name seconds rss_after_imports peak_rss``."""
    import pyarrow as pa  # noqa: F401

    from pipelines.score import iter_score_manifest
    from pipelines.train_customizer import TrainingPairRows
    from stylid_core.customize.facesnap.training import FaceSnapTrainConfig

    train = FaceSnapTrainConfig(manifest=os.path.join(folder, "train.parquet"), storage_path=folder, tiny={})
    pairs = os.path.join(folder, "pairs.parquet")
    base = _rss_mb()
    t0 = time.perf_counter()
    if name == "score-whole":
        n = len(_score_whole(pairs))
    elif name == "score-streamed":
        n = sum(t.num_rows for t in iter_score_manifest(pairs, None))
    elif name == "train-whole":
        n = len(_train_whole(train))
    elif name == "train-streamed":
        n = sum(t.num_rows for t in TrainingPairRows(train))
    else:
        raise SystemExit(f"unknown variant {name}")
    print(f"{name} {time.perf_counter() - t0:.2f} {base:.0f} {_rss_mb():.0f} {n}")


def _references(folder: str) -> None:
    """The references by person at the manifest's size: vectorised, and the row-by-row draw it replaced."""
    import numpy as np
    import pyarrow.parquet as pq

    from stylid_core.customize.facesnap.training import cross_photo_reference_array, person_keys

    table = pq.read_table(os.path.join(folder, "train.parquet"), columns=["image_uri", "person_id"])
    uris, persons = table.column("image_uri").combine_chunks(), table.column("person_id").combine_chunks()
    t0 = time.perf_counter()
    fast = cross_photo_reference_array(uris, person_keys(persons), 0)
    vectorised = time.perf_counter() - t0
    t0 = time.perf_counter()
    u, p = uris.to_pylist(), persons.to_pylist()
    photos: dict[str, set[str]] = {}
    for uri, person in zip(u, p):
        photos.setdefault(person, set()).add(uri)
    ordered = {person: sorted(s) for person, s in photos.items() if len(s) > 1}
    slow = []
    for uri, person in zip(u, p):
        others = [x for x in ordered.get(person, ()) if x != uri]
        rng = np.random.default_rng(zlib.crc32(f"0:reference:{uri}".encode()))
        slow.append(others[int(rng.integers(len(others)))] if others else uri)
    by_row = time.perf_counter() - t0
    assert fast.to_pylist() == slow
    print(f"references {len(u)} rows: vectorised {vectorised:.2f} s, row by row {by_row:.2f} s (equal)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _references(args.folder) if args.variant == "references" else _variant(args.variant, args.folder)
        return
    env = {**os.environ, "PYTHONPATH": ROOT}
    with tempfile.TemporaryDirectory() as folder:
        _write_manifests(folder, args.rows)
        print(f"{args.rows} rows; peak RSS of a fresh process per variant (MB)")
        print(f"{'variant':16} {'s':>7} {'imports':>8} {'peak':>7} {'read':>7}")
        for name in ("score-whole", "score-streamed", "train-whole", "train-streamed"):
            out = subprocess.run([sys.executable, __file__, "--variant", name, "--folder", folder], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
            seconds, base, peak = (float(v) for v in out[-4:-1])
            print(f"{name:16} {seconds:7.2f} {base:8.0f} {peak:7.0f} {peak - base:7.0f}")
        subprocess.run([sys.executable, __file__, "--variant", "references", "--folder", folder], env=env, check=True)


if __name__ == "__main__":
    main()
