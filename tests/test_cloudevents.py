"""CloudEvents (what Knative Eventing delivers): binary mode (ce-* headers) and structured mode,
answered as CloudEvents with the same predictions as a plain V1 request."""

import base64
import json

import pytest
import requests

from .conftest import encode, tone

RATE = 16000
WAV = encode(tone(880, 1.5, RATE), RATE, "WAV", "PCM_16")
V1 = {"instances": [{"b64": base64.b64encode(WAV).decode()}]}
CE_HEADERS = {"ce-specversion": "1.0", "ce-id": "event-1", "ce-source": "urn:test", "ce-type": "audio.recorded"}


def plain_predictions(server) -> list:
    answer = requests.post(server.predict_url, json=V1, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"]


def test_binary_cloudevent_with_json_data(server):
    answer = requests.post(server.predict_url, data=json.dumps(V1), timeout=60,
                           headers={**CE_HEADERS, "content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["ce-specversion"] == "1.0" and answer.headers["ce-id"]
    assert answer.json()["predictions"] == plain_predictions(server)


def test_binary_cloudevent_with_audio_data(server):
    answer = requests.post(server.predict_url, data=WAV, timeout=60, headers={**CE_HEADERS, "content-type": "audio/wav"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == plain_predictions(server)


@pytest.mark.parametrize("content_type", ["application/cloudevents+json", "application/cloudevents+json; charset=utf-8"])
def test_structured_cloudevent(server, content_type):
    event = {"specversion": "1.0", "id": "event-2", "source": "urn:test", "type": "audio.recorded",
             "datacontenttype": "application/json", "data": V1}
    answer = requests.post(server.predict_url, data=json.dumps(event), timeout=60, headers={"content-type": content_type})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/cloudevents+json"
    body = answer.json()
    assert body["specversion"] == "1.0" and body["data"]["predictions"] == plain_predictions(server)


def test_cloudevent_with_broken_data_is_a_client_error(server):
    answer = requests.post(server.predict_url, data=b'{"instances": [', timeout=60,
                           headers={**CE_HEADERS, "content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert "neither audio nor valid JSON" in answer.json()["error"]


def test_structured_cloudevent_with_base64_audio(server):
    event = {"specversion": "1.0", "id": "event-3", "source": "urn:test", "type": "audio.recorded",
             "datacontenttype": "audio/wav", "data_base64": V1["instances"][0]["b64"]}
    answer = requests.post(server.predict_url, data=json.dumps(event), timeout=60,
                           headers={"content-type": "application/cloudevents+json"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["predictions"] == plain_predictions(server)


def test_an_event_missing_required_attributes_is_a_client_error(server):
    answer = requests.post(server.predict_url, data=json.dumps({"specversion": "1.0", "data": V1}), timeout=60,
                           headers={"content-type": "application/cloudevents+json"})
    assert answer.status_code == 400 and "not a valid CloudEvent" in answer.json()["error"], answer.text


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_explain_of_a_cloudevent_is_a_cloudevent(server, mode):
    """V1 :explain answers an event in the event's mode, as :predict does, without sending the
    request's own headers back."""
    if mode == "binary":
        answer = requests.post(server.url + "/v1/models/ast:explain", data=WAV, timeout=120,
                               headers={**CE_HEADERS, "content-type": "audio/wav"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["ce-specversion"] == "1.0" and answer.headers["content-type"] == "application/json"
        assert "ce-source" in answer.headers and answer.headers["ce-id"] != CE_HEADERS["ce-id"]
        body = answer.json()
    else:
        event = {"specversion": "1.0", "id": "event-4", "source": "urn:test", "type": "audio.recorded",
                 "datacontenttype": "audio/wav", "data_base64": V1["instances"][0]["b64"]}
        answer = requests.post(server.url + "/v1/models/ast:explain", data=json.dumps(event), timeout=120,
                               headers={"content-type": "application/cloudevents+json"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/cloudevents+json"
        body = answer.json()["data"]
    assert body["predictions"] == plain_predictions(server)
    assert [e["label"] for e in body["explanations"][0]] == [p["label"] for p in body["predictions"][0]]
