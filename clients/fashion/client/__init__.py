"""Python clients of the fashion services (sync and asyncio), usable on their own:

    from fashion.client import InferenceClient
    with InferenceClient("localhost:50051") as client:
        print(client.classify("shoe.jpg").category)
"""

from fashion.client._channel import ChannelOptions
from fashion.client._token import TokenFile, TokenFileError, token_file
from fashion.client.batch import AsyncBatchClient, BatchClient
from fashion.client.inference import AsyncInferenceClient, InferenceClient
from fashion.client.monitor import AsyncMonitorClient, MonitorClient

__all__ = [
    "AsyncBatchClient", "AsyncInferenceClient", "AsyncMonitorClient", "BatchClient", "ChannelOptions",
    "InferenceClient", "MonitorClient", "TokenFile", "TokenFileError", "token_file",
]
