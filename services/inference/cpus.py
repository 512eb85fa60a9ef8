"""How the Inference service shares out the machine's cores: the one place it asks how many there
are, how many server processes to run, and each one's share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common.cpus import available_cpus

if TYPE_CHECKING:  # not imported at run time: the worker processes' engine imports this module
    from services.common.config import InferenceSettings


def machine_cpus() -> int:
    """The cores the service may use (its container's CPU quota, else its CPU affinity, else the
    machine's cores): the one place the Inference service asks."""
    return available_cpus()


def server_processes(settings: InferenceSettings) -> int:
    """FASHION_INFERENCE_PROCESSES, or for 0 the default: 1 on up to 2 cores, then one per core (each
    process tops out near one core of gRPC work, so fewer leave cores idle: docs/performance.md)."""
    if settings.inference_processes > 0:
        return settings.inference_processes
    cpus = machine_cpus()
    return 1 if cpus <= 2 else cpus


def process_cpus(settings: InferenceSettings) -> int:
    """The cores of one server process: all of them with one process, else an equal share (at least 1).
    Its ONNX Runtime intra-op threads and worker processes are sized from this, so that the server
    processes together do not oversubscribe the machine."""
    return max(1, machine_cpus() // server_processes(settings))
