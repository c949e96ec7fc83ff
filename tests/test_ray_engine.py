"""`serve --engine ray`: the same app on Ray Serve replicas, and its settings refused when they cannot work.

The integration test starts a local Ray (2 CPUs, one replica of 0.5 CPU) serving a tiny classifier trained
here, and calls it over HTTP through Ray's proxy: the routes answer with the key, a wrong or missing key is a
401, the body limits hold. Starting Ray and its replica takes most of its time (~30-80 s on 2 busy cores)."""

from __future__ import annotations

import sys
import threading
import time

import httpx
import pytest

from workbench.config import Config
from workbench.deploy.app import ServeSettings
from workbench.deploy.monitor import parse_metrics
from workbench.deploy.ray_engine import Autoscaling, import_ray, serve_on_ray
from workbench.errors import WorkbenchError
from workbench.store import RunStore

KEY = "wb-ray-test-key-0123456789abcdef"


@pytest.mark.parametrize("kwargs, message", [
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas=3 is more than max_replicas=2: give --min-replicas"),
    ({"max_replicas": 0}, "max_replicas must be a whole number >= 1"),
    ({"min_replicas": -1}, "min_replicas must be a whole number >= 0"),
    ({"target_ongoing_requests": 0}, "target_ongoing_requests must be > 0"),
    ({"downscale_delay_s": -1.0}, "downscale_delay_s must be a number of seconds >= 0"),
    ({"replica_cpus": 0}, "replica_cpus must be > 0"),
])
def test_bad_autoscaling_is_refused_naming_the_fix(kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        Autoscaling(**kwargs)


def test_autoscaling_config_is_rays():
    config = Autoscaling(1, 3, 2.5, upscale_delay_s=1.0, downscale_delay_s=4.0).ray_config()
    assert config == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1, "target_ongoing_requests": 2.5,
                      "upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "look_back_period_s": 30.0}
    from ray.serve.config import AutoscalingConfig  # Ray accepts every key and value

    assert AutoscalingConfig(**config).max_replicas == 3


def test_missing_ray_names_the_install(monkeypatch, store):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(WorkbenchError, match=r'pip install "ray\[serve\]"'):
        import_ray()
    with pytest.raises(WorkbenchError, match=r'pip install "ray\[serve\]"'):
        serve_on_ray("latest", store.home)


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, tiny_model_dir, tiny_csv):
    import workbench

    home = tmp_path_factory.mktemp("ray-home")
    key_file = home / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    raw = {"model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                     "early_stopping_patience": 0, "threads": 1},
           "track": {"wandb": "disabled", "tensorboard": False}}
    record = workbench.train(Config.from_dict(raw), store=RunStore(home))
    assert record["status"] == "completed", record.get("error")
    lines: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=serve_on_ray, daemon=True, kwargs=dict(
        run=record["id"], home=home, settings=ServeSettings(max_texts=4), api_key_file=str(key_file),
        scaling=Autoscaling(1, 1, 2.0), num_cpus=2, echo=lines.append, stop=stop, terminal=False))
    thread.start()
    deadline = time.monotonic() + 240
    while not any(line.startswith("serving run") for line in lines):
        assert thread.is_alive() and time.monotonic() < deadline, lines
        time.sleep(0.2)
    url = next(line for line in lines if line.startswith("serving run")).rsplit(" at ", 1)[1]
    yield url, record["id"]
    stop.set()
    thread.join(120)
    assert not thread.is_alive(), "serve_on_ray did not return after stop"
    ray, _ = import_ray()
    assert not ray.is_initialized(), "the local Ray it started was left running"


@pytest.mark.integration
def test_routes_answer_through_ray_with_the_key(ray_server):
    url, run_id = ray_server
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/healthz").json() == {"status": "ok"}  # open, like the uvicorn engine's
        ready = client.get("/readyz", headers=auth)
        assert ready.status_code == 200 and ready.json()["run"] == run_id and ready.json()["route"] == "/v1/classify"
        answer = client.post("/v1/classify", headers=auth, json={"texts": ["a great film", "a dull film"]})
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert len(results) == 2 and all(abs(sum(r["scores"].values()) - 1) < 1e-4 for r in results)
        assert client.get("/v1/models", headers=auth).json()["data"][0]["id"] == run_id
        metrics = parse_metrics(client.get("/metrics", headers=auth).text)  # this replica's counters
        assert metrics["requests"]["classify"]["200"] >= 1
        # the app's limits hold behind Ray's proxy
        too_many = client.post("/v1/classify", headers=auth, json={"texts": ["x"] * 5})
        assert too_many.status_code == 413 and too_many.json()["error"]["limit"] == "max_texts"
        assert client.post("/v1/translate", headers=auth, json={"texts": ["x"]}).status_code == 404


@pytest.mark.integration
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wb-wrong-key-0123456789abcdef"},
                                     {"Authorization": f"Basic {KEY}"}])
def test_a_bad_key_is_refused_through_ray(ray_server, headers):
    url, _ = ray_server
    answer = httpx.post(url + "/v1/classify", headers=headers, json={"texts": ["a great film"]}, timeout=60)
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "authentication_error"
    assert answer.headers["www-authenticate"] == "Bearer"
