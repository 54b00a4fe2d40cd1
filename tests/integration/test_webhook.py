"""`lazysnap webhook` as a process over TLS (a throwaway CA) against the real registry: AdmissionReviews
of pods made from real `kubectl create ... --dry-run=client` workloads are POSTed with httpx, the returned
JSONPatch applied, and the pods checked; then a registry that hangs or is gone, bad bodies, certificate
reloading and the metrics."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import images as im
from tests.harness.auth import TestPKI
from tests.harness.procs import free_port
from tests.harness.registry import Registry
from tests.unit.test_webhook_review import admission_review, apply_patch, kubectl_workload, patch_of, pod_from

BUDGET = 2.0  # the webhook's default
NODE = {"lazysnap.io/image-accelerate-enabled": "true"}


class Webhook:
    def __init__(self, workdir: Path, pki: TestPKI):
        self.port = free_port()
        self.dir = workdir / "webhook"
        self.dir.mkdir()
        pair = pki.server_cert("webhook")
        self.cert, self.key = self.dir / "tls.crt", self.dir / "tls.key"
        shutil.copy(pair.cert, self.cert)
        shutil.copy(pair.key, self.key)
        config = self.dir / "webhook.toml"
        config.write_text(
            f'listen = "127.0.0.1:{self.port}"\ncert_file = "tls.crt"\nkey_file = "tls.key"\n'
            'reload_interval = "200ms"\nnegative_ttl = "1s"\n'
        )
        self.log = self.dir / "webhook.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "snapshotter.cli", "webhook", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.client = httpx.Client(
            base_url=f"https://127.0.0.1:{self.port}",
            verify=ssl.create_default_context(cafile=str(pki.ca_cert)),
            timeout=10,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                if self.client.get("/healthz").text == "ok\n":
                    break
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, f"the webhook exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the webhook did not answer: {self.log.read_text()[-2000:]}"
            time.sleep(0.1)

    def review(self, pod: dict) -> tuple[dict, dict]:
        """(the pod after the returned patch, the response)."""
        doc = admission_review(pod)
        answer = self.client.post("/mutate", json=doc)
        assert answer.status_code == 200, answer.text
        response = answer.json()["response"]
        assert response["uid"] == doc["request"]["uid"] and response["allowed"] is True
        return apply_patch(pod, patch_of(response)), response

    def served_certificate(self) -> bytes:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.port)) as raw:
            with context.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def webhook(workdir: Path, pki: TestPKI) -> Iterator[Webhook]:
    w = Webhook(workdir, pki)
    yield w
    w.stop()


def containers(pod: dict, field: str = "containers") -> list[str]:
    return [c["image"] for c in pod["spec"].get(field, [])]


def test_pods_start_from_accelerated_images(registry: Registry, webhook: Webhook) -> None:
    host = registry.host
    img = im.Image([im.Layer([im.File("etc/name", b"app")])])
    digest = im.push_image(registry.url, "team/app", "v1", img)
    hex_part = digest.removeprefix("sha256:")
    for tag in ("v1_accelerated", f"sha256-{hex_part}_accelerated"):
        im.push_image(registry.url, "team/app", tag, img)
    im.push_image(registry.url, "team/init", "v1", img)
    im.push_image(registry.url, "team/init", "v1_accelerated", img)
    im.push_image(registry.url, "team/plain", "v1", img)  # never converted

    pod = pod_from(kubectl_workload("deployment", "web", f"{host}/team/app:v1", f"{host}/team/app@{digest}"))
    pod["spec"]["initContainers"] = [{"name": "init", "image": f"{host}/team/init:v1"}]
    mutated, response = webhook.review(pod)
    assert containers(mutated) == [
        f"{host}/team/app:v1_accelerated",
        f"{host}/team/app:sha256-{hex_part}_accelerated",
    ]
    assert containers(mutated, "initContainers") == [f"{host}/team/init:v1_accelerated"]
    assert mutated["spec"]["nodeSelector"] == NODE and "warnings" not in response

    again, response = webhook.review(mutated)  # a second mutation is a no-op
    assert again == mutated and "patch" not in response and len(response["warnings"]) == 3

    # missing accelerated copy: left alone, with a warning, no node selector
    job = pod_from(kubectl_workload("job", "batch", f"{host}/team/plain:v1"))
    mutated, response = webhook.review(job)
    assert mutated == job and "patch" not in response
    assert f"no accelerated copy {host}/team/plain:v1_accelerated" in response["warnings"][0]

    # already accelerated, with an existing selector: untouched
    cron = pod_from(
        kubectl_workload(
            "cronjob", "nightly", f"{host}/team/app:v1_accelerated", extra=("--schedule=0 3 * * *",)
        )
    )
    cron["spec"]["nodeSelector"] = {"kubernetes.io/arch": "amd64"}
    mutated, response = webhook.review(cron)
    assert mutated == cron and "already accelerated" in response["warnings"][0]

    # existing selectors are merged; a conflicting one is kept, with a warning
    pod = pod_from(kubectl_workload("deployment", "sel", f"{host}/team/app:v1"))
    pod["spec"]["nodeSelector"] = {"kubernetes.io/arch": "amd64"}
    mutated, _ = webhook.review(pod)
    assert mutated["spec"]["nodeSelector"] == {"kubernetes.io/arch": "amd64", **NODE}
    pod["spec"]["nodeSelector"] = {"lazysnap.io/image-accelerate-enabled": "false"}
    mutated, response = webhook.review(pod)
    assert containers(mutated) == [f"{host}/team/app:v1_accelerated"]
    assert mutated["spec"]["nodeSelector"] == pod["spec"]["nodeSelector"]
    assert any("nodeSelector" in w for w in response["warnings"])

    metrics = webhook.client.get("/metrics").text
    assert 'lazysnap_webhook_reviews_total{result="mutated"} 3.0' in metrics
    assert "lazysnap_webhook_images_swapped_total 5.0" in metrics
    assert 'lazysnap_webhook_images_left_total{reason="not-accelerated"} 1.0' in metrics
    assert 'lazysnap_webhook_registry_lookups_total{outcome="found"} 3.0' in metrics


def test_a_hanging_or_stopped_registry_leaves_the_pod_unchanged_within_the_budget(
    registry: Registry, webhook: Webhook
) -> None:
    with socket.socket() as hole:  # accepts connections (the backlog), never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        slow = f"127.0.0.1:{hole.getsockname()[1]}/team/app:v1"
        pod = pod_from(kubectl_workload("deployment", "slow", slow))
        started = time.monotonic()
        mutated, response = webhook.review(pod)
        elapsed = time.monotonic() - started
    assert mutated == pod and "patch" not in response
    assert "no answer from the registry" in response["warnings"][0]
    assert BUDGET - 0.2 < elapsed < BUDGET + 1.5, elapsed

    registry.stop()
    pod = pod_from(kubectl_workload("deployment", "down", f"{registry.host}/team/app:v1"))
    started = time.monotonic()
    mutated, response = webhook.review(pod)
    assert time.monotonic() - started < BUDGET + 1.5
    assert mutated == pod and "no answer from the registry" in response["warnings"][0]
    assert webhook.client.get("/healthz").status_code == 200


def test_malformed_and_oversized_reviews_are_refused_clearly(webhook: Webhook) -> None:
    bad = webhook.client.post("/mutate", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]
    wrong = webhook.client.post("/mutate", json={"apiVersion": "v1", "kind": "Pod"})
    assert wrong.status_code == 400 and "AdmissionReview" in wrong.json()["error"]
    no_uid = webhook.client.post(
        "/mutate", json={"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
    )
    assert no_uid.status_code == 400 and "uid" in no_uid.json()["error"]
    pod = {"spec": {"containers": [{"name": "x", "image": "nginx", "args": ["a" * (1 << 20)]}]}}
    big = webhook.client.post("/mutate", json=admission_review(pod))
    assert big.status_code == 413 and "over 1048576 bytes" in big.json()["error"]
    assert webhook.client.get("/healthz").status_code == 200 and webhook.proc.poll() is None
    assert 'lazysnap_webhook_reviews_total{result="bad-request"} 3.0' in webhook.client.get("/metrics").text


def test_a_renewed_certificate_is_served_without_a_restart(webhook: Webhook, pki: TestPKI) -> None:
    before = webhook.served_certificate()
    renewed = pki.server_cert("renewed")
    shutil.copy(renewed.key, webhook.key)  # key first: a mismatched pair is not loaded, the old one stays
    time.sleep(0.5)
    assert webhook.served_certificate() == before
    shutil.copy(renewed.cert, webhook.cert)
    deadline = time.monotonic() + 5
    while webhook.served_certificate() == before:
        assert time.monotonic() < deadline, "the renewed certificate was not loaded"
        time.sleep(0.1)
    assert webhook.served_certificate() == ssl.PEM_cert_to_DER_cert(renewed.cert.read_text())
    assert webhook.client.get("/healthz").status_code == 200  # the CA still verifies the new one
