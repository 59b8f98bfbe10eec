"""End to end over real HTTP on a catalogue of Fashion-MNIST images: search and classify."""

from __future__ import annotations

import numpy as np
import pytest
from service_helpers import CATALOGUE_SIZE, Catalogue, fashion_mnist_pngs


def search_file(catalogue: Catalogue, data: bytes, **form) -> dict:
    reply = catalogue.client.post("/search", files={"file": ("q.png", data, "image/png")}, data=form)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_catalogue_is_fully_indexed(catalogue: Catalogue) -> None:
    ready = catalogue.client.get("/health/ready").json()
    assert ready["index_size"] == CATALOGUE_SIZE
    assert len(set(catalogue.ids)) == CATALOGUE_SIZE
    record = catalogue.client.get(f"/images/{catalogue.ids[0]}").json()
    assert record["status"] == "indexed" and record["model_version"] == ready["model_version"]


@pytest.mark.parametrize("position", [0, 77, 299])
def test_search_by_upload_returns_the_image_first(catalogue: Catalogue, position: int) -> None:
    body = search_file(catalogue, catalogue.images[position], k="5")
    first = body["results"][0]
    assert first["id"] == catalogue.ids[position]
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(body["results"]) == 5 and body["expand"] == 5  # the service's SEARCH_EXPAND
    plain = search_file(catalogue, catalogue.images[position], k="5", expand="0")
    scores = [r["score"] for r in plain["results"]]
    assert plain["expand"] == 0 and scores == sorted(scores, reverse=True)
    assert plain["results"][0]["id"] == first["id"]
    assert first["content_url"] == f"/images/{first['id']}/content"
    assert set(body["timing_ms"]) == {"decode", "embed", "search", "metadata", "thumbnails"}
    assert all(r["thumbnail_data_url"] is None for r in body["results"])  # not asked for
    assert body["model_version"] and body["index_version"]


def test_search_by_id_and_by_vector_agree(catalogue: Catalogue) -> None:
    target = catalogue.ids[10]
    by_id = catalogue.client.post("/search", json={"id": target, "k": 8}).json()["results"]
    assert by_id[0]["id"] == target
    # The vector of the same image, taken from a search by upload of it, cannot be read back from the
    # API; use a random direction instead and check the scores are cosine similarities in [-1, 1].
    dim = catalogue.client.get("/version").json()["embed_dim"]
    vector = np.random.default_rng(0).normal(size=dim).tolist()
    by_vector = catalogue.client.post("/search", json={"vector": vector, "k": 8}).json()["results"]
    assert len(by_vector) == 8 and all(-1.0 <= r["score"] <= 1.0 for r in by_vector)


def test_search_with_the_image_as_the_body_matches_multipart(catalogue: Catalogue) -> None:
    """`Content-Type: image/png` with the options in the query string: the same search as multipart."""
    image = catalogue.images[40]
    options = {"k": "7", "tags": "fmnist", "thumbnails": "3"}
    png = {"Content-Type": "image/png"}
    raw = catalogue.client.post("/search", content=image, headers=png, params=options)
    assert raw.status_code == 200, raw.text
    form = search_file(catalogue, image, **options)
    assert [(r["id"], r["score"]) for r in raw.json()["results"]] == [
        (r["id"], pytest.approx(r["score"], abs=1e-5)) for r in form["results"]
    ]
    assert raw.json()["results"][0]["id"] == catalogue.ids[40]
    inline = [r["thumbnail_data_url"] for r in raw.json()["results"]]
    assert all(url.startswith("data:image/png;base64,") for url in inline[:3]) and inline[3:] == [None] * 4
    # a label filter and repeated tags travel in the query string too
    bag = catalogue.labels.index("Bag")
    trousers = catalogue.client.post(
        "/search",
        content=catalogue.images[bag],
        headers={"Content-Type": "image/png"},
        params=[("k", "5"), ("label", "Trouser"), ("tags", "fmnist"), ("tags", "fmnist")],
    )
    assert trousers.status_code == 200, trousers.text
    assert [r["label"] for r in trousers.json()["results"]] == ["Trouser"] * 5


@pytest.mark.parametrize("path", ["/search", "/classify"])
@pytest.mark.parametrize(
    ("content", "content_type", "params", "status", "message"),
    [
        (b"not an image at all", "image/png", {}, 422, "query image is not a readable image"),
        (b"", "image/png", {}, 422, "query image is empty"),
        (None, "image/png", {"k": "0"}, 422, "k"),
        (None, "image/png", {"color": "red"}, 422, "color"),
        (None, "text/plain", {}, 415, "image/*"),
    ],
)
def test_an_image_body_refuses_bad_input(
    catalogue: Catalogue,
    path: str,
    content: bytes | None,
    content_type: str,
    params: dict,
    status: int,
    message: str,
) -> None:
    body = catalogue.images[0] if content is None else content
    headers = {"Content-Type": content_type}
    reply = catalogue.client.post(path, content=body, headers=headers, params=params)
    assert reply.status_code == status, reply.text
    assert message in reply.text


def test_label_and_tag_filters_grow_the_fetch(catalogue: Catalogue) -> None:
    # Query with a bag and ask only for trousers: the nearest trousers are far down the raw ranking.
    bag = catalogue.labels.index("Bag")
    trousers = sum(label == "Trouser" for label in catalogue.labels)
    body = search_file(catalogue, catalogue.images[bag], k="50", label="Trouser")
    assert len(body["results"]) == min(50, trousers)
    assert all(r["label"] == "Trouser" for r in body["results"])
    tagged = search_file(catalogue, catalogue.images[bag], k="5", tags="fmnist")
    assert len(tagged["results"]) == 5
    none = search_file(catalogue, catalogue.images[bag], k="5", tags="no-such-tag")
    assert none["results"] == []


def test_min_score_cuts_the_results(catalogue: Catalogue) -> None:
    everything = search_file(catalogue, catalogue.images[5], k="100", expand="0")["results"]
    threshold = everything[20]["score"]
    cut = search_file(catalogue, catalogue.images[5], k="100", min_score=str(threshold), expand="0")
    assert cut["results"] and all(r["score"] >= threshold for r in cut["results"])
    assert len(cut["results"]) == sum(r["score"] >= threshold for r in everything)


def test_query_expansion_reranks_and_keeps_the_query_similarity(catalogue: Catalogue) -> None:
    """Expanded results are a reranking: each score is still the result's cosine similarity to the
    query image (as the plain search over the whole catalogue gives it), and min_score keeps
    exactly the images that similar."""
    query = fashion_mnist_pngs(1003, 1)[0][0]  # not in the catalogue
    plain = search_file(catalogue, query, k=str(CATALOGUE_SIZE), expand="0")["results"]
    similarity = {r["id"]: r["score"] for r in plain}
    expanded = search_file(catalogue, query, k="20", expand="5")
    assert expanded["expand"] == 5
    ids = [r["id"] for r in expanded["results"]]
    assert len(set(ids)) == 20
    for hit in expanded["results"]:
        assert hit["score"] == pytest.approx(similarity[hit["id"]], abs=1e-4)
    assert ids != [r["id"] for r in plain[:20]]  # the ranking moved
    threshold = plain[12]["score"]
    cut = search_file(catalogue, query, k="50", expand="5", min_score=str(threshold))["results"]
    assert {r["id"] for r in cut} == {r["id"] for r in plain if r["score"] >= threshold}
    # A label filter over-fetches in rounds (4k, then the whole catalogue): an expanded ranking
    # may reorder within a larger fetch, yet no image comes twice and none is lost.
    label = plain[0]["label"]
    same_label = [r["id"] for r in plain if r["label"] == label]
    filtered = search_file(catalogue, query, k=str(len(same_label)), expand="5", label=label)["results"]
    filtered_ids = [r["id"] for r in filtered]
    assert len(filtered_ids) == len(set(filtered_ids)) == len(same_label)
    assert set(filtered_ids) == set(same_label) and {r["label"] for r in filtered} == {label}
    bad = catalogue.client.post(
        "/search", files={"file": ("q.png", query, "image/png")}, data={"expand": "101"}
    )
    assert bad.status_code == 422 and "expand" in bad.text


def test_classify_uses_the_paper_defaults(catalogue: Catalogue) -> None:
    data = fashion_mnist_pngs(1000, 1)[0][0]
    reply = catalogue.client.post("/classify", files={"file": ("q.png", data, "image/png")})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["k"] == 200 and body["tau"] == 0.07
    assert len(body["neighbours"]) == 10  # 200 vote; the 10 nearest are listed unless asked for more
    scores = [n["score"] for n in body["neighbours"]]
    assert scores == sorted(scores, reverse=True)
    every = catalogue.client.post(
        "/classify", files={"file": ("q.png", data, "image/png")}, data={"neighbours": "200"}
    ).json()
    assert len(every["neighbours"]) == 200 and every["neighbours"][:10] == body["neighbours"]
    assert every["probabilities"] == body["probabilities"]
    probabilities = [p["probability"] for p in body["probabilities"]]
    assert 1 <= len(probabilities) <= 5 and probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1.0 + 1e-6
    assert body["label"] == body["probabilities"][0]["label"]
    # the image as the body, options in the query string: the same vote
    raw = catalogue.client.post(
        "/classify", content=data, headers={"Content-Type": "image/png"}, params={"neighbours": "200"}
    )
    assert raw.status_code == 200, raw.text
    assert raw.json()["probabilities"] == every["probabilities"]
    assert [n["id"] for n in raw.json()["neighbours"]] == [n["id"] for n in every["neighbours"]]


def test_classify_beats_chance_by_far(catalogue: Catalogue) -> None:
    # k = 200 would let two thirds of this 300-image catalogue vote; k = 10 suits its size.
    held_out = fashion_mnist_pngs(1000, 100)  # not in the catalogue (which is 0..299)
    correct = 0
    for data, label in held_out:
        files = {"file": ("q.png", data, "image/png")}
        reply = catalogue.client.post("/classify", files=files, data={"k": "10"})
        assert reply.status_code == 200, reply.text
        correct += reply.json()["label"] == label
    accuracy = correct / len(held_out)
    print(f"weighted kNN (k=10) accuracy of a random tiny encoder on 100 held-out images: {accuracy:.2f}")
    assert accuracy > 0.40  # chance is 0.10


def test_classify_probabilities_follow_the_formula(catalogue: Catalogue) -> None:
    """p_c = sum_{i: c_i = c} exp(s_i / tau) / sum_i exp(s_i / tau) over the returned neighbours."""
    data = fashion_mnist_pngs(1500, 1)[0][0]
    body = catalogue.client.post(
        "/classify", files={"file": ("q.png", data, "image/png")}, data={"k": "50", "neighbours": "50"}
    ).json()
    assert len(body["neighbours"]) == 50
    scores = np.array([n["score"] for n in body["neighbours"]], dtype=np.float64)
    labels = [n["label"] for n in body["neighbours"]]
    weights = np.exp(scores / 0.07)
    expected = {c: weights[[lab == c for lab in labels]].sum() / weights.sum() for c in set(labels)}
    for entry in body["probabilities"]:
        assert entry["probability"] == pytest.approx(expected[entry["label"]], abs=1e-4)
    assert body["label"] == max(expected, key=expected.get)
