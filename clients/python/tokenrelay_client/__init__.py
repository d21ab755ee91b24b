"""tokenrelay client: LLM token streams that survive a broken connection.

    from tokenrelay_client import Chunk, RelayClient

    async with RelayClient("localhost:50051") as client:
        async for event in client.stream("sim", [("user", "hello")]):
            if isinstance(event, Chunk):
                print(event.text, end="", flush=True)

See `client` for the reconnect rules and `errors` for what can go wrong.
"""

from .client import (
    RelayClient,
    RelayStream,
    Result,
    assemble_tool_calls,
    backoff_delay,
    chunk_record,
    is_transient,
    reconnect_wait,
    start_retry_wait,
    text_sha256,
    tool_result,
    verify_assembly,
)
from .errors import (
    DigestMismatch,
    GenerationFailed,
    PartialAnswer,
    PartialStream,
    ProtocolViolation,
    ReconnectsExhausted,
    ResumeRejected,
    StreamFailed,
    TokenRelayClientError,
)
from .events import (
    Checkpoint,
    Chunk,
    End,
    ErrorDetail,
    Event,
    Notice,
    Reconnected,
    Reconnecting,
    Started,
    Throttled,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = [
    "Checkpoint",
    "Chunk",
    "DigestMismatch",
    "End",
    "ErrorDetail",
    "Event",
    "GenerationFailed",
    "Notice",
    "PartialAnswer",
    "PartialStream",
    "ProtocolViolation",
    "Reconnected",
    "Reconnecting",
    "ReconnectsExhausted",
    "RelayClient",
    "RelayStream",
    "Result",
    "ResumeRejected",
    "Started",
    "StreamFailed",
    "Throttled",
    "TokenRelayClientError",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "assemble_tool_calls",
    "backoff_delay",
    "chunk_record",
    "is_transient",
    "reconnect_wait",
    "start_retry_wait",
    "text_sha256",
    "tool_result",
    "verify_assembly",
]
