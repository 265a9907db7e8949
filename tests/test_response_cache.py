"""The response cache (service/http/cache.py): logits per (model version, image sha256), answers still made
from them by ``service.answer.answer``. LogitsCache alone (LRU order, byte accounting), then in process
through the whole edge (httpx over ASGI) on real ONNX Runtime sessions: repeats answered identically and
marked cached, a reload answers from the new version, the bounds hold, 0 turns it off, and V2's ``image``
input shares the cache with /classify."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.http.cache import LogitsCache
from service.http.stats import model_stats
from service.repository import ModelRepository
from tests.support import images
from tests.support.edge import calls, edge_for
from tests.support.servers import NAME, add_copy, copy_repo

pytestmark = pytest.mark.slow  # real ONNX Runtime sessions loaded and warmed up


# --- LogitsCache alone ---------------------------------------------------------------------------------


def _row(value: float, classes: int = 10) -> np.ndarray:
    return np.full(classes, value, dtype=np.float32)  # 40 bytes


def test_least_recently_used_goes_first_and_is_counted() -> None:
    seen: list[str] = []
    cache = LogitsCache(2, 1 << 20, on_outcome=seen.append)
    a, b, c = (cache.key("m:1", d) for d in (b"a", b"b", b"c"))
    cache.put(a, _row(1))
    cache.put(b, _row(2))
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, _row(3))
    assert len(cache) == 2 and cache.get(b) is None and cache.get(a)[0] == 1 and cache.get(c)[0] == 3
    assert cache.counts == {"hit": 3, "miss": 1, "eviction": 1} and sorted(seen) == sorted(cache.counts.elements())


def test_bytes_are_accounted_and_bounded() -> None:
    cache = LogitsCache(100, 100)  # two 40-byte rows fit, not three
    keys = [cache.key("m:1", bytes([i])) for i in range(3)]
    for i, key in enumerate(keys):
        cache.put(key, _row(i))
    assert (len(cache), cache.bytes, cache.counts["eviction"]) == (2, 80, 1)
    cache.put(keys[2], _row(9))  # the same key again replaces its row: no double count
    assert (len(cache), cache.bytes) == (2, 80)
    cache.put(cache.key("m:1", b"big"), _row(0, classes=26))  # 104 bytes: over the bound, not kept
    assert (len(cache), cache.bytes) == (2, 80)


def test_rows_are_copies_read_only_and_a_retired_version_is_forgotten() -> None:
    class Retired:
        key = "m:1"

    cache = LogitsCache(10, 1 << 20)
    batch = np.stack([_row(1), _row(2)])
    cache.put(cache.key("m:1", b"x"), batch[0])
    cache.put(cache.key("m:2", b"x"), batch[1])
    batch[0] = 7  # a batch's row is a view: the cache kept its own copy
    kept = cache.get(cache.key("m:1", b"x"))
    assert kept[0] == 1 and not kept.flags.writeable and kept.base is None
    cache.forget([Retired()])  # type: ignore[list-item]
    assert (len(cache), cache.bytes) == (1, 40) and cache.get(cache.key("m:2", b"x")) is not None


def test_off_hashes_nothing_and_counts_nothing() -> None:
    cache = LogitsCache.off()
    assert not cache.enabled and cache.key("m:1", b"x") is None and cache.lookup("m:1", b"x") == (None, None)
    cache.put(None, _row(1))
    assert len(cache) == 0 and not cache.counts


# --- through the edge ------------------------------------------------------------------------------------


def jpeg(size: tuple[int, int] = (320, 240), which: str = "chelsea") -> bytes:
    return images.encode(images.photo(size, which).convert("RGB"), "JPEG")


def classify(data: bytes, **fields: str) -> tuple[str, dict]:
    return "/classify", {"files": {"image": ("a.jpg", data)}, "data": fields}


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _without_timing(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timing_ms"}


def test_a_repeated_image_is_answered_from_the_cache_identically(imagenet_repo: Path) -> None:
    edge = edge_for(imagenet_repo)
    cache, photo, other = edge.worker.cache, jpeg(), jpeg(which="coffee")
    counted: list[dict[str, int]] = []
    first, second, strict, fresh, batch = (_ok(r) for r in calls(
        edge, classify(photo), classify(photo), classify(photo, top_k="3", min_score="0.999"),
        lambda: counted.append(dict(cache.counts)),
        lambda: cache.forget(edge.worker.live.current.models.values()),  # the same parameters, answered uncached
        classify(photo, top_k="3", min_score="0.999"),
        ("/classify_batch", {"files": [("images", ("a.jpg", photo)), ("images", ("b.jpg", other))]})))
    assert "cached" not in first["timing_ms"] and first["timing_ms"]["preprocess"] > 0
    assert second["timing_ms"]["cached"] == 1.0 and second["timing_ms"]["preprocess"] == 0.0
    assert _without_timing(second) == _without_timing(first)
    assert strict["timing_ms"]["cached"] == 1.0 and len(strict["predictions"]) == 3
    assert counted == [{"miss": 1, "hit": 2}]
    assert "cached" not in fresh["timing_ms"] and _without_timing(fresh) == _without_timing(strict)
    assert batch["results"][0]["label"] == first["label"]
    assert cache.counts == {"miss": 3, "hit": 3} and len(cache) == 2  # the photo hit, the other missed


def test_a_reload_answers_from_the_new_version_not_the_cache(imagenet_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(imagenet_repo, tmp_path / "models")
    second = add_copy(repo)  # registered, not promoted
    edge = edge_for(repo.root, admin_token="secret")
    photo = jpeg()
    load = (f"/v2/repository/models/{NAME}/load",
            {"json": {"parameters": {"version": str(second)}}, "headers": {"Authorization": "Bearer secret"}})
    before, loaded, after, again = calls(edge, classify(photo), load, classify(photo), classify(photo))
    assert loaded.status_code == 200, loaded.text
    assert _ok(before)["version"] == 1 and "cached" not in _ok(before)["timing_ms"]
    assert _ok(after)["version"] == second and "cached" not in _ok(after)["timing_ms"]
    assert _ok(again)["version"] == second and _ok(again)["timing_ms"]["cached"] == 1.0
    cache = edge.worker.cache
    assert len(cache) == 1 and all(key[0] == f"{NAME}:{second}" for key in cache._rows)  # version 1's forgotten


def test_the_bounds_hold(imagenet_repo: Path) -> None:
    three = [jpeg(), jpeg((300, 200)), jpeg(which="coffee")]
    by_entries = edge_for(imagenet_repo, cache_entries=2)
    assert all(_ok(r) for r in calls(by_entries, *(classify(d) for d in three)))
    assert len(by_entries.worker.cache) == 2 and by_entries.worker.cache.counts == {"miss": 3, "eviction": 1}

    row = 4 * len(ModelRepository(imagenet_repo).get(NAME, 1).manifest.labels)  # float32 logits
    by_bytes = edge_for(imagenet_repo, cache_max_bytes=int(2.5 * row))
    cache, kept = by_bytes.worker.cache, []
    responses = calls(by_bytes, *(classify(d) for d in three), lambda: kept.append((len(cache), cache.bytes)),
                      classify(three[0]))
    assert all(_ok(r) for r in responses) and kept == [(2, 2 * row)] and cache.counts["eviction"] >= 1
    assert "cached" not in _ok(responses[-1])["timing_ms"]  # the first image was the one evicted


def test_zero_entries_turns_it_off(imagenet_repo: Path) -> None:
    edge = edge_for(imagenet_repo, cache_entries=0)
    photo = jpeg()
    first, second = (_ok(r) for r in calls(edge, classify(photo), classify(photo)))
    assert "cached" not in second["timing_ms"] and _without_timing(first) == _without_timing(second)
    assert len(edge.worker.cache) == 0 and not edge.worker.cache.counts


def _v2_image(data: bytes) -> tuple[str, dict]:
    return f"/v2/models/{NAME}/infer", {"json": {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "base64"},
                    "data": [base64.b64encode(data).decode()]}],
        "outputs": [{"name": "probabilities"}]}}


def test_v2_image_input_shares_the_cache_with_classify(imagenet_repo: Path) -> None:
    edge = edge_for(imagenet_repo)
    served = edge.worker.live.current.pick(NAME)
    photo = jpeg()
    (before,) = model_stats([("s", served)])
    classified, inferred = calls(edge, classify(photo, top_k="5"), _v2_image(photo))
    assert edge.worker.cache.counts == {"miss": 1, "hit": 1}
    (output,) = _ok(inferred)["outputs"]
    probabilities = np.asarray(output["data"]).reshape(output["shape"])[0]
    for p in _ok(classified)["predictions"]:
        assert probabilities[p["index"]] == pytest.approx(p["score"], rel=1e-6)

    (after,) = model_stats([("s", served)])  # the cached request counted, its queue and compute counts too
    counts = {k: after["inference_stats"][k]["count"] - before["inference_stats"][k]["count"]
              for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}
    assert counts == {"success": 1, "fail": 0, "queue": 1, "compute_input": 1, "compute_infer": 1,
                      "compute_output": 1}
