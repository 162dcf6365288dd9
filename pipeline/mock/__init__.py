"""A fake OpenAI-compatible chat-completions provider, for dry runs, tests and benchmarks.

Start one in a background thread::

    with MockServer(MockConfig(rpm=60, rate_500=0.05)) as server:
        client = OpenAI(base_url=server.base_url, api_key="x")
        ...
        print(server.stats().to_dict())

Make one model misbehave (here: the first two sightings of each request body get a 503,
and every request for ``gpt-4o`` hangs)::

    MockConfig(model_faults={
        "mock-small": ModelFaults("status", status=503, first=2),
        "gpt-4o": ModelFaults("hang"),
    })

or serve in the current loop with :func:`serve`, or from the command line with :func:`main`.
See :mod:`pipeline.mock.server` for the endpoints, the faults, the token estimate and the toy
prices.
"""

from pipeline.mock.server import (
    FAULT_KINDS,
    PRICE_CACHED_INPUT_PER_MTOK,
    PRICE_INPUT_PER_MTOK,
    PRICE_OUTPUT_PER_MTOK,
    MockConfig,
    MockServer,
    MockStats,
    ModelFaults,
    main,
    parse_fault,
    serve,
)

__all__ = [
    "FAULT_KINDS",
    "PRICE_CACHED_INPUT_PER_MTOK",
    "PRICE_INPUT_PER_MTOK",
    "PRICE_OUTPUT_PER_MTOK",
    "MockConfig",
    "MockServer",
    "MockStats",
    "ModelFaults",
    "main",
    "parse_fault",
    "serve",
]
