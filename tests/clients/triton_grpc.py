"""tritonclient.grpc in a process of its own: it and kserve register the same protobuf symbols.

Reads a JSON job on stdin: {"url", "model", "clips": [base64 audio], "parameters", "outputs" (names
to request, optional)} or, with "waveform": [[floats]] (its rate, if not 16 kHz, in "parameters":
tritonclient.grpc has no per-input parameters); prints {"ready": ..., "<output>": [...], ...} with every output the server
sent (BYTES as strings), or {"error_code": ..., "error": ...}, as JSON on stdout.
"""

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException


def main() -> None:
    job = json.load(sys.stdin)
    client = triton_grpc.InferenceServerClient(url=job["url"])
    if "waveform" in job:
        samples = np.asarray(job["waveform"], dtype=np.float32)
        tensor = triton_grpc.InferInput("waveform", list(samples.shape), "FP32")
        tensor.set_data_from_numpy(samples)
    else:
        clips = np.array([base64.b64decode(c) for c in job["clips"]], dtype=np.object_)
        tensor = triton_grpc.InferInput("audio", [len(clips)], "BYTES")
        tensor.set_data_from_numpy(clips)
    try:
        requested = [triton_grpc.InferRequestedOutput(name) for name in job.get("outputs", [])]
        result = client.infer(job["model"], [tensor], outputs=requested or None, parameters=job.get("parameters") or None)
    except InferenceServerException as exc:
        print(json.dumps({"error_code": exc.status(), "error": exc.message()}))
        return
    outputs = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
    print(json.dumps({
        "ready": client.is_model_ready(job["model"]),
        **{name: (np.vectorize(bytes.decode, otypes=[object])(data) if data.dtype == np.object_ else data).tolist()
           for name, data in outputs.items()},
    }))


if __name__ == "__main__":
    main()
