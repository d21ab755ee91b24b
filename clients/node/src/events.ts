/**
 * What `RelayClient.stream` yields: plain, typed objects with a `type`
 * discriminator, free of protobuf and grpc.
 *
 * Server events, in the order a stream produces them:
 *
 *     started      the call is attached (first event; again after each reconnect)
 *     chunk        a piece of the answer: text, reasoning or a tool-call delta
 *                  (`kind`); seq 1, 2, 3, … exactly once, no gaps
 *     checkpoint   everything up to seq is stored on the server; a fresh resume token
 *     notice       a non-fatal StreamError: the gateway is recovering, the stream goes on
 *     end          the last event; the client has already checked the digests
 *
 * Client-side events, only when the connection breaks:
 *
 *     reconnecting the call failed transiently; the client waits `delayMs`, then reattaches
 *     reconnected  reattached; the next chunk is `lastSeq + 1`
 *
 * And when the gateway refuses the start for now:
 *
 *     throttled    RESOURCE_EXHAUSTED with an advised wait (load shedding, a
 *                  tenant's quota); the client waits `delayMs`, then sends the
 *                  same start again
 */

export interface Started {
  readonly type: 'started';
  readonly streamId: string;
  readonly resumeToken: string;
  /** True when this call attached to an existing stream (a resume, or a
   * repeated idempotency key) rather than starting the generation. */
  readonly resumed: boolean;
  readonly model: string;
}

/** A piece of a tool call: pieces of one call share `index`; their
 * `arguments` joined in seq order are the call's arguments JSON. The first
 * piece carries `id` and `name`. In WHOLE mode (the default) one piece holds
 * the whole call. */
export interface ToolCallDelta {
  readonly index: number;
  readonly id: string;
  readonly name: string;
  readonly arguments: string;
}

interface ChunkBase {
  readonly type: 'chunk';
  readonly seq: number;
  /** The provider that produced it (e.g. "sim"). */
  readonly provider: string;
  /** The upstream attempt that produced it, starting at 1. */
  readonly attempt: number;
}

export interface TextChunk extends ChunkBase {
  readonly kind: 'text';
  readonly text: string;
}

export interface ReasoningChunk extends ChunkBase {
  readonly kind: 'reasoning';
  readonly reasoning: string;
}

export interface ToolCallChunk extends ChunkBase {
  readonly kind: 'toolCall';
  readonly toolCall: ToolCallDelta;
}

export type Chunk = TextChunk | ReasoningChunk | ToolCallChunk;

export interface Checkpoint {
  readonly type: 'checkpoint';
  readonly seq: number;
  /** Tokens (not chunks) of the answer up to seq. */
  readonly tokenCount: number;
  readonly resumeToken: string;
}

/** A `StreamError` as the server sent it. `type` and `suggestedAction` are the
 * lower-case enum names ("network", "resume"), "" when unspecified. */
export interface ErrorDetail {
  readonly type: string;
  readonly code: string;
  readonly message: string;
  readonly retryable: boolean;
  readonly suggestedAction: string;
  readonly fatal: boolean;
  readonly bytesReceived: number;
  readonly tokensReceived: number;
  readonly provider: string;
  readonly attempt: number;
  /** How long the provider asked to wait, when it said. */
  readonly retryAfterMs: number | null;
}

/** A non-fatal error: the gateway is recovering (retrying, falling back). */
export interface Notice {
  readonly type: 'notice';
  readonly error: ErrorDetail;
}

export interface Usage {
  readonly promptTokens: number;
  readonly completionTokens: number;
}

export interface End {
  readonly type: 'end';
  /** "stop", "length", "tool_calls", "content_filter", "cancelled", "error", … */
  readonly finishReason: string;
  /** True when the gateway gave up: what arrived is all there is, `error` says why. */
  readonly partial: boolean;
  readonly error: ErrorDetail | null;
  readonly usage: Usage;
  /** The seq of the last chunk (a chunk count, not tokens). */
  readonly totalSeq: number;
  /** The server's digest of the text chunks. */
  readonly textSha256: string;
  /** The server's digest of every chunk; "" from a server that does not send it. */
  readonly chunksSha256: string;
  /** True when the client checked `textSha256` against the text it assembled.
   * False only for a resume from a seq > 0 without the earlier text. */
  readonly verified: boolean;
  /** True when the client also checked `chunksSha256` against every chunk it
   * assembled (text, reasoning and tool calls). False when the server sent
   * no chunks digest or the client did not see every chunk. */
  readonly chunksVerified: boolean;
}

/** The connection failed; the client sleeps `delayMs`, then reattaches. */
export interface Reconnecting {
  readonly type: 'reconnecting';
  /** 1-based, within the current budget (see RelayClient). */
  readonly attempt: number;
  readonly maxAttempts: number;
  /** The seq the client will resume from. */
  readonly lastSeq: number;
  readonly delayMs: number;
  /** e.g. "UNAVAILABLE: Connection dropped". */
  readonly cause: string;
}

/** Reattached after a transient failure; chunks continue at lastSeq + 1. */
export interface Reconnected {
  readonly type: 'reconnected';
  readonly attempt: number;
  readonly lastSeq: number;
  /** The delay slept before the successful attempt. */
  readonly delayMs: number;
  /** The failure that started this round of reconnects. */
  readonly cause: string;
}

/** The gateway refused the start for now (load shedding, a tenant's quota:
 * RESOURCE_EXHAUSTED with google.rpc.RetryInfo or `retry-after-ms`); the
 * client sleeps the advised `delayMs`, then sends the same start (same
 * idempotency key: the refused start created nothing). Not a reconnect: the
 * reconnect budget is untouched. */
export interface Throttled {
  readonly type: 'throttled';
  /** 1-based: the how-manieth retry of the start this wait precedes. */
  readonly attempt: number;
  /** RelayClientOptions.startRetries. */
  readonly maxAttempts: number;
  /** The wait the gateway advised. */
  readonly delayMs: number;
  /** e.g. "RESOURCE_EXHAUSTED: this replica is generating 8 streams ...". */
  readonly cause: string;
}

export type RelayEvent =
  | Started
  | Chunk
  | Checkpoint
  | Notice
  | End
  | Reconnecting
  | Reconnected
  | Throttled;

/** A complete tool call, assembled from its deltas (or sent back in an
 * assistant message). `arguments` is JSON text. */
export interface ToolCall {
  readonly id: string;
  readonly name: string;
  readonly arguments: string;
}
