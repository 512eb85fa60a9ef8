"""Python clients of the fashion services (sync and asyncio), usable on their own:

    from fashion.client import InferenceClient
    with InferenceClient("localhost:50051") as client:
        print(client.classify("shoe.jpg").category)

`KServeClient` and `AsyncKServeClient` (the KServe V2 / Open Inference Protocol API) are imported
on first use only: their messages register the protocol's `inference.*` names, as tritonclient's
do, and a program may use tritonclient beside these clients.
"""

from typing import TYPE_CHECKING, Any

from fashion.client._channel import ChannelOptions, TlsFileError
from fashion.client._token import TokenFile, TokenFileError, setting_token, token_file
from fashion.client.batch import AsyncBatchClient, BatchClient
from fashion.client.imagefile import ImageFileError
from fashion.client.inference import AsyncInferenceClient, InferenceClient
from fashion.client.monitor import AsyncMonitorClient, MonitorClient

if TYPE_CHECKING:
    from fashion.client.kserve import AsyncKServeClient, KServeClient

__all__ = [
    "AsyncBatchClient", "AsyncInferenceClient", "AsyncKServeClient", "AsyncMonitorClient", "BatchClient",
    "ChannelOptions", "ImageFileError", "InferenceClient", "KServeClient", "MonitorClient", "TlsFileError", "TokenFile",
    "TokenFileError", "setting_token", "token_file",
]


def __getattr__(name: str) -> Any:
    if name in ("KServeClient", "AsyncKServeClient"):
        from fashion.client import kserve

        return getattr(kserve, name)
    raise AttributeError(f"module 'fashion.client' has no attribute {name!r}")
