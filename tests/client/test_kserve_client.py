"""fashion.client.KServeClient against a real Inference service. In a subprocess: this test process
may hold tritonclient's protos (tests/inference/test_kserve.py), which register the same
`inference.*` names as fashion.kserve."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.images import encode, fashion_images

PROBE = r"""
import json, sys
from fashion.client import KServeClient
from fashion.kserve.v2 import grpc_service_pb2 as kserve

address, png_hex = sys.argv[1], sys.argv[2]
png = bytes.fromhex(png_hex)
out = {}
with KServeClient(address) as client:
    out["live"], out["ready"] = client.server_live(), client.server_ready()
    out["model_ready"] = client.model_ready("linear-test")
    out["inputs"] = [t.name for t in client.model_metadata("linear-test").inputs]
    out["extensions"] = list(client.server_metadata().extensions)
    request = kserve.ModelInferRequest(model_name="linear-test", id="one")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([png, png])
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
    answer = client.model_infer(request)
    out["answer"] = [answer.id, answer.outputs[0].datatype, list(answer.outputs[0].shape)]
    bad = kserve.ModelInferRequest(model_name="linear-test")
    bad.inputs.add(name="image_bytes", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"no")
    out["stream"] = [(r.error_message[:40], r.infer_response.id)
                     for r in client.model_stream_infer([request, bad, request])]
    (stats,) = client.model_statistics("linear-test").model_stats
    out["inferences"] = stats.inference_count
    out["index"] = [m.name for m in client.repository_index().models]
print(json.dumps(out))
"""


def test_kserve_client_calls_every_method(inference_server) -> None:
    png = encode(fashion_images(1)[0][0])
    done = subprocess.run([sys.executable, "-c", PROBE, inference_server.address, png.hex()], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["inputs"] == ["image", "image_fp32", "image_bytes"]
    assert out["extensions"] == ["classification", "statistics"]
    assert out["answer"] == ["one", "BYTES", [2, 2]]
    assert out["stream"] == [["", "one"], ["element 0: not an image: 2 bytes in no s", ""], ["", "one"]]
    assert out["inferences"] >= 6
    assert out["index"] == ["linear-test"]
