"""The peer we compare against: MLServer 1.7.1 serving the same model.onnx through this small
custom ONNX Runtime runtime (MLServer has no ONNX runtime of its own), with its adaptive
batching enabled in model-settings.json. Runs in its own virtualenv (.venv-mlserver)."""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        extra = self.settings.parameters.extra
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 2))
        if not extra.get("allow_spinning", True):
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        uri = self.settings.parameters.uri
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        (y,) = self._session.run([self._output], {self._input: x})
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(self._output, y)],
        )
