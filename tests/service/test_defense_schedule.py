"""The served defense follows Algorithm 1's schedule: interventions at every t with t mod Tf = 0
up to and including t = N, each costing R input-gradient steps and two extra f-evaluations (f at z[t-1]
under x[t], then the redone step z[t])."""

from __future__ import annotations

import httpx
import pytest

from deqguard.data import load_test
from service.imaging import encode_png

pytestmark = pytest.mark.timeout(900)  # shared, busy CPUs: behaviour, not speed


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [encode_png(img.numpy()) for img in load_test(n=2).images]


def _predict(client: httpx.Client, pngs: list[bytes], **params: object) -> dict:
    r = client.post(
        "/v1/predict",
        files=[("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)],
        params=params,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _acted(pred: dict) -> list[int]:
    return [s["step"] for s in pred["entropy_trace"] if s["defense_acted"]]


def test_paper_preset_acts_at_2_4_6_8_with_40_gradient_steps(
    service_client: httpx.Client, pngs: list[bytes]
) -> None:
    client = service_client
    off = _predict(client, pngs, preset="off")
    paper = _predict(client, pngs, preset="paper")
    assert paper["defense"]["steps"] == 8
    assert (paper["defense"]["Tf"], paper["defense"]["R"]) == (2, 10)
    for p, o in zip(paper["predictions"], off["predictions"], strict=True):
        assert _acted(p) == [2, 4, 6, 8]  # the last step included: z[8] is solved on x[8]
        assert p["grad_steps"] == 40  # 4 interventions x R = 10
        assert o["nfe"] == 1 + 8  # this untrained model converges nowhere: every step is paid
        assert p["nfe"] == o["nfe"] + 2 * 4
        for s in p["entropy_trace"]:
            assert (s["post_entropy"] is not None) == s["defense_acted"]
        # Before the first intervention the dynamics are the undefended ones; z[2] is redone.
        assert p["entropy_trace"][0]["entropy"] == pytest.approx(
            o["entropy_trace"][0]["entropy"], abs=1e-4
        )
        assert p["entropy_trace"][1]["entropy"] != pytest.approx(
            o["entropy_trace"][1]["entropy"], abs=1e-6
        )
        assert p["entropy"] == pytest.approx(p["entropy_trace"][7]["entropy"], abs=1e-5)


def test_other_schedules(service_client: httpx.Client, pngs: list[bytes]) -> None:
    client = service_client
    fast = _predict(client, pngs[:1], preset="fast")["predictions"][0]  # Tf 4, R 5
    assert _acted(fast) == [4, 8] and fast["grad_steps"] == 10
    last = _predict(client, pngs[:1], preset="off", R=3, Tf=8)["predictions"][0]
    assert _acted(last) == [8] and last["grad_steps"] == 3  # Tf = N: one intervention, at N
    every = _predict(client, pngs[:1], preset="off", R=1, Tf=1)["predictions"][0]
    assert _acted(every) == list(range(1, 9)) and every["grad_steps"] == 8


def test_openapi_describes_the_schedule(service_client: httpx.Client) -> None:
    schema = service_client.get("/openapi.json").json()["components"]["schemas"]
    step = schema["StepEntropy"]["properties"]
    assert "up to and including t = N" in step["defense_acted"]["description"]
    assert "z[t]" in step["entropy"]["description"]
