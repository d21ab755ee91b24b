/**
 * Every error the tokenrelay client throws, in one tree (the same as the
 * Python client's):
 *
 *     TokenRelayClientError
 *      ├── StreamFailed            a gRPC status that retrying cannot fix (code + details;
 *      │    │                      `retryAfterMs` when the gateway said when to try again)
 *      │    ├── ResumeRejected     the server refused a resume (NOT_FOUND, PERMISSION_DENIED)
 *      │    └── GenerationFailed   the gateway gave up and the stream refused partials
 *      │                           (policy allowPartial = false): the typed StreamError
 *      ├── ReconnectsExhausted     transient failures outlasted the reconnect budget
 *      ├── DigestMismatch          what was assembled is not what the server says it sent
 *      ├── PartialAnswer           generate(..., {strict: true}) got a partial answer
 *      └── ProtocolViolation       the server broke the contract (gap in seq, no StreamStarted)
 *
 * Every error thrown after the stream started carries a `PartialStream`:
 * what was assembled so far, the last seq and the latest resume token. With
 * it a caller can show what arrived, or resume later with
 * `client.resume(partial)`.
 *
 * grpc errors never escape the client; they are translated at one boundary
 * (`translateFailure` in call.ts).
 */
import { status as GrpcStatus } from '@grpc/grpc-js';

import type { Assembly } from './assembly';
import type { ErrorDetail, ToolCall } from './events';

/** What a stream had delivered when it failed. Pass it to
 * `client.resume(partial)` to pick the stream up with every digest still
 * checkable. */
export class PartialStream {
  /** @internal the assembly to continue from (see client.resume). */
  readonly assembly: Assembly;

  constructor(
    readonly streamId: string,
    readonly resumeToken: string,
    assembly: Assembly,
  ) {
    // A copy: the stream that failed may still be iterated (it is not, in
    // practice), and a resume must continue from exactly this point.
    this.assembly = assembly.copy();
  }

  get lastSeq(): number {
    return this.assembly.lastSeq;
  }

  /** The answer text of chunks 1..lastSeq ("" when the stream was resumed
   * without the earlier text). */
  get text(): string {
    return this.assembly.text;
  }

  get reasoning(): string {
    return this.assembly.reasoning;
  }

  /** The tool calls assembled so far; the last may be incomplete. */
  get toolCalls(): readonly ToolCall[] {
    return this.assembly.toolCalls();
  }
}

/** Base of every client error. `partial` is what had arrived, if anything. */
export class TokenRelayClientError extends Error {
  partial: PartialStream | null;

  constructor(message: string, partial: PartialStream | null = null) {
    super(message);
    this.name = new.target.name;
    this.partial = partial;
  }
}

/** The name of a grpc status code ("INVALID_ARGUMENT"). */
export function statusName(code: GrpcStatus): string {
  return GrpcStatus[code] ?? String(code);
}

/** The server (or gRPC) ended the call with a status that a reconnect cannot
 * fix: a bad request (INVALID_ARGUMENT names the field), credentials, quota.
 * Fix the request or give up; do not retry the same call.
 *
 * `retryAfterMs`: the wait the gateway advised (google.rpc.RetryInfo, or
 * `retry-after-ms` trailing metadata), null when it gave none. A start
 * refused with RESOURCE_EXHAUSTED (load shedding, a tenant's quota) that
 * carries one has already been retried `startRetries` times, each after the
 * advised wait (see RelayClient); this is the last refusal: try again after
 * `retryAfterMs`, on another replica, or with fewer tokens. */
export class StreamFailed extends TokenRelayClientError {
  constructor(
    readonly code: GrpcStatus,
    readonly details: string,
    partial: PartialStream | null = null,
    readonly retryAfterMs: number | null = null,
  ) {
    super(`${statusName(code)}: ${details}`, partial);
  }

  /** "INVALID_ARGUMENT", "PERMISSION_DENIED", … */
  get codeName(): string {
    return statusName(this.code);
  }
}

/** The server refused to reattach: the stream expired or is unknown
 * (NOT_FOUND), or the resume token is not valid here (PERMISSION_DENIED).
 * The partial answer is all there is; start a new stream for the rest. */
export class ResumeRejected extends StreamFailed {}

/** What the server said it had delivered when it gave up (google.rpc.ErrorInfo
 * metadata), to check the chunks held against. */
export interface DeliveredSummary {
  readonly totalSeq: number | null;
  readonly textSha256: string;
  readonly chunksSha256: string;
}

/** The gateway gave up on the generation (every recovery option spent, a
 * provider error that cannot be recovered, a limit) and the stream was
 * started with `policy: {allowPartial: false}`, so the call failed instead of
 * ending with a partial `end`. `error` is the typed StreamError (the one
 * `end.error` would have carried); `code` is the gRPC status derived from it
 * (UNAVAILABLE when `error.retryable`, FAILED_PRECONDITION when not,
 * RESOURCE_EXHAUSTED for limits, DEADLINE_EXCEEDED for your deadline).
 * `partial` holds the chunks delivered before (checked against the server's
 * digest when the client saw them all).
 *
 * The client never resumes this, even for UNAVAILABLE: a resume would end
 * the same way. When `error.retryable`, start again (after
 * `error.retryAfterMs`, when set) with a new idempotency key (the old key
 * names this failed stream); otherwise fix the cause. */
export class GenerationFailed extends StreamFailed {
  constructor(
    code: GrpcStatus,
    details: string,
    readonly error: ErrorDetail,
    readonly delivered: DeliveredSummary,
    partial: PartialStream | null = null,
  ) {
    super(code, details, partial);
  }
}

/** The connection kept failing (UNAVAILABLE, resets) and every reconnect
 * attempt was spent without progress. `cause` is the last failure. The stream
 * may still be alive on the server: resume later with `client.resume(partial)`. */
export class ReconnectsExhausted extends TokenRelayClientError {
  constructor(
    message: string,
    readonly attempts: number,
    override readonly cause: string,
    partial: PartialStream | null = null,
  ) {
    super(message, partial);
  }
}

/** What was assembled from the chunks does not match the server's digest
 * (`which`: "text" for text_sha256, "chunks" for chunks_sha256, "count" when
 * the chunk count differs from total_seq). Do not trust the answer; report
 * the bug and start again. */
export class DigestMismatch extends TokenRelayClientError {
  constructor(
    message: string,
    readonly which: 'text' | 'chunks' | 'count',
    readonly expectedSha256: string,
    readonly actualSha256: string,
    readonly expectedTotalSeq: number,
    readonly actualLastSeq: number,
    partial: PartialStream | null = null,
  ) {
    super(message, partial);
  }
}

/** Strict mode only (`generate(..., {strict: true})`): the gateway gave up and
 * returned a partial answer. `result` holds it, `result.end.error` says why.
 * Without strict mode the same answer is a result with `end.partial` true. */
export class PartialAnswer extends TokenRelayClientError {
  constructor(
    message: string,
    readonly result: unknown,
    partial: PartialStream,
  ) {
    super(message, partial);
  }
}

/** The server sent something the contract forbids (a seq gap, a first event
 * that is not StreamStarted, a tool call that changes its id). This is a
 * server bug; report it. What arrived up to the violation is intact. */
export class ProtocolViolation extends TokenRelayClientError {}
