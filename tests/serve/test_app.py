"""The API of `reslab serve` through FastAPI's test client: answers equal `reslab predict`'s,
bad input gets a 4xx JSON error and the server keeps answering."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.inference import predict_files
from reslab.serve import app as serve_app
from reslab.serve.app import create_app
from reslab.serve.models import load_service

from .conftest import CLASSES, png


@pytest.fixture
def client(tiny_run):
    service = load_service(load_checkpoint(tiny_run), "fp32")
    with TestClient(create_app(service, tiny_run, max_batch=4, max_wait=0.001)) as client:
        yield client


def test_predict_equals_the_predict_command(client, tiny_run, tmp_path):
    files = []
    for seed, mode, size in ((1, "L", 28), (2, "RGB", 50)):
        path = tmp_path / f"{seed}.png"
        path.write_bytes(png(seed, size, mode))
        files.append(str(path))
    expected = predict_files(load_checkpoint(tiny_run), files, top_k=5, precision="fp32")
    for path, top in zip(files, expected, strict=True):
        with open(path, "rb") as f:
            answer = client.post("/predict", files={"file": ("x.png", f, "image/png")}).json()
        assert answer["prediction"] == top[0][0]
        assert [r["class"] for r in answer["top"]] == [name for name, _ in top]
        assert [r["probability"] for r in answer["top"]] == pytest.approx(
            [p for _, p in top], abs=1e-5
        )
    # the raw body is read the same way, and ?top= sets how many classes come back
    raw = client.post("/predict?top=2", content=open(files[0], "rb").read()).json()
    assert [r["class"] for r in raw["top"]] == [name for name, _ in expected[0][:2]]


def test_explain_draws_the_grad_cam_map_of_the_served_model(client, tiny_run):
    import io

    import torch
    from PIL import Image

    from reslab.data.transforms import InputSpec, to_input
    from reslab.engine.checkpoint import model_from_checkpoint
    from reslab.explain import grad_cam, overlay

    image = png(6)
    answer = client.post("/explain", files={"file": ("x.png", image, "image/png")})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    drawn = Image.open(io.BytesIO(answer.content))
    assert drawn.size == (224, 224) and drawn.mode == "RGB"
    # the map of the predicted class in the last stage, as reslab.explain draws it
    payload = load_checkpoint(tiny_run)
    gray = Image.open(io.BytesIO(image))
    pixels = torch.tensor(list(gray.getdata()), dtype=torch.uint8).view(1, 1, 28, 28)
    x = to_input(pixels, InputSpec.from_dict(payload["input"]))
    cam = grad_cam(model_from_checkpoint(payload).eval(), x)[0]
    expected = overlay(gray.resize((224, 224), Image.Resampling.NEAREST), cam)
    assert list(drawn.getdata()) == list(expected.getdata())
    other = client.post("/explain?target=class%203&layer=layer2", content=image)
    assert other.status_code == 200 and other.content != answer.content
    bad_class = client.post("/explain?target=cat", content=image)
    assert bad_class.status_code == 422 and "'cat' is not one of" in bad_class.json()["error"]
    assert client.post("/explain?layer=nope", content=image).status_code == 422
    assert client.post("/explain", content=b"text").status_code == 415


def test_health_run_and_page(client):
    assert client.get("/health").json() == {
        "status": "ok",
        "task": "classification",
        "model": "resnet20",
    }
    run = client.get("/run").json()
    assert run["classes"] == CLASSES and run["pictures"] == ["curves"]
    assert run["config"]["model"] == "resnet20" and run["epoch"] == 1 and run["explain"]
    assert client.get("/run/curves.png").headers["content-type"] == "image/png"
    assert client.get("/run/confusion.png").status_code == 404
    page = client.get("/").text
    assert "/static/app.js" in page and "http" not in page.replace("http-equiv", "")
    script = client.get("/static/app.js").text
    assert 'fetch("/predict"' in script and "https://" not in script


def test_bad_input_gets_a_json_error_and_the_server_goes_on(client, monkeypatch):
    not_image = client.post("/predict", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert not_image.status_code == 415
    assert "notes.txt: not a readable image" in not_image.json()["error"]
    assert client.post("/predict", files={"other": ("x.png", png(1))}).status_code == 400
    assert client.post("/predict", content=b"").status_code == 400
    assert client.post("/predict?top=0", content=png(1)).status_code == 422
    missing = client.get("/no/such/route")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405
    monkeypatch.setattr(serve_app, "MAX_UPLOAD", 2000)
    big = client.post("/predict", files={"file": ("big.png", png(3, 200), "image/png")})
    assert big.status_code == 413 and "over the limit of 2,000 bytes" in big.json()["error"]
    assert client.post("/predict", content=png(3, 200)).status_code == 413
    assert client.post("/predict", content=png(1)).status_code == 200


def test_concurrent_uploads_share_a_batch(client, tiny_run):
    import concurrent.futures

    images = [png(seed) for seed in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: client.post("/predict", content=b), images))
    assert all(a.status_code == 200 for a in answers)
    stats = client.get("/stats").json()
    assert stats["requests"] == 8 and stats["largest_batch"] <= 4
    assert min(stats["seconds"][k] for k in ("upload", "decode", "model")) > 0


def test_the_wheel_ships_the_page(tmp_path):
    """The page's files are package data: a wheel built from the tree holds every one."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(root)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("reslab-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if "/static/" in n}
    static = root / "src" / "reslab" / "serve" / "static"
    assert shipped == {f"reslab/serve/static/{p.name}" for p in static.iterdir()}
    assert {"reslab/serve/static/index.html", "reslab/serve/static/app.js"} <= shipped


def test_a_detector_checkpoint_is_served_with_its_boxes(tmp_path):
    from loop_traces import tiny_detector

    from reslab.data.coco import decode_rgb
    from reslab.engine.checkpoint import make_payload, save_checkpoint
    from reslab.engine.detect_infer import detect_images, prepare_detector_for_inference
    from reslab.engine.detection import detector_from_checkpoint

    names = ["wide", "tall"]
    payload = make_payload(
        tiny_detector(), task="detection", class_names=names, train_config={"epochs": 1}
    )
    save_checkpoint(tmp_path / "last.pt", payload)
    image = png(4, 64, "RGB")
    model = prepare_detector_for_inference(detector_from_checkpoint(payload))
    expected = detect_images(model, [decode_rgb(image)], names)[0]
    service = load_service(load_checkpoint(tmp_path / "last.pt"), "fp32")
    with TestClient(create_app(service, tmp_path)) as client:
        answer = client.post("/predict", files={"file": ("x.png", image, "image/png")}).json()
        assert client.get("/run").json()["config"] == {"epochs": 1}
        bad = client.post("/predict", content=b"not an image")
        assert client.post("/explain", content=image).status_code == 404
    assert answer["task"] == "detection" and (answer["width"], answer["height"]) == (64, 64)
    assert answer["detections"] == expected and len(expected) > 0
    assert bad.status_code == 415 and "not a readable image" in bad.json()["error"]
