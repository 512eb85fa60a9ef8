"""The benchmarks (`make bench`, docs/performance.md)."""

# Our processes' gRPC transport (services.GRPC_EXPERIMENTS) must be set before grpc is imported, and a
# bench module imports grpc before anything of ours: importing services first sets it for every tool.
import services  # noqa: F401
