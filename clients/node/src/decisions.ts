/**
 * The client's decisions, as pure functions (the Python client's
 * `backoff_delay`, `is_transient` and `start_retry_wait`, with the same
 * tables in the tests).
 */
import { status as GrpcStatus } from '@grpc/grpc-js';

export interface BackoffSettings {
  /** The first delay, doubled per attempt (default 1000). */
  readonly baseMs: number;
  /** No delay is longer (default 30000). */
  readonly capMs: number;
  /** ±fraction of spread (default 0.1: ±10 %). */
  readonly jitter: number;
}

/**
 * Milliseconds to wait before reconnect attempt `attempt` (1-based):
 * baseMs · 2^(attempt-1), capped at capMs, then spread by ±jitter with
 * `random()` in [0, 1) (0.5 gives the exact exponential value). Never
 * negative, never above capMs.
 */
export function backoffDelay(
  attempt: number,
  settings: BackoffSettings,
  random: () => number,
): number {
  if (!Number.isInteger(attempt) || attempt < 1) {
    throw new RangeError(`attempt must be a whole number of at least 1, got ${attempt}`);
  }
  const exponential = Math.min(settings.capMs, settings.baseMs * 2 ** (attempt - 1));
  const spread = exponential * settings.jitter * (2 * random() - 1);
  return Math.max(0, Math.min(settings.capMs, exponential + spread));
}

// Connection-level failures that grpc-js reports with a status other than
// UNAVAILABLE, depending on where in the call the connection broke.
const CONNECTION_FAILURE_HINTS = [
  'socket closed',
  'connection reset',
  'connection refused',
  'connection closed',
  'connection dropped',
  'econnreset',
  'econnrefused',
  'epipe',
  'broken pipe',
  'rst_stream',
  'goaway',
  'stream removed',
  'failed to connect',
  'keepalive',
  'transport closed',
  'end of tcp stream',
];

/**
 * Whether a call that ended with (code, details) is worth a reconnect.
 *
 * UNAVAILABLE: the server is draining or unreachable (the contract says:
 * resume elsewhere). CANCELLED: the client cancels only calls it has stopped
 * reading, so a CANCELLED it reads was the network or a server shutting
 * down; a resume tells the truth either way. INTERNAL and UNKNOWN: only when
 * the transport broke ("RST_STREAM", "read ECONNRESET"); otherwise it is a
 * server bug that a retry would repeat. Everything else (INVALID_ARGUMENT,
 * PERMISSION_DENIED, NOT_FOUND, RESOURCE_EXHAUSTED, …) is final.
 *
 * A status whose details carry a tokenrelay StreamError is decided before
 * this (it is a refused partial, never transient: see GenerationFailed).
 */
export function isTransient(code: GrpcStatus, details: string): boolean {
  if (code === GrpcStatus.UNAVAILABLE || code === GrpcStatus.CANCELLED) {
    return true;
  }
  if (code === GrpcStatus.INTERNAL || code === GrpcStatus.UNKNOWN) {
    const lowered = details.toLowerCase();
    return CONNECTION_FAILURE_HINTS.some((hint) => lowered.includes(hint));
  }
  return false;
}

export interface StartRetrySettings {
  /** Refused starts already sent again on this stream. */
  readonly retriesDone: number;
  /** The budget (RelayClientOptions.startRetries, default 3; 0: never). */
  readonly maxRetries: number;
  /** The longest advised wait that is slept (maxStartRetryWaitMs, 60000). */
  readonly maxWaitMs: number;
}

/**
 * Milliseconds to wait before sending a refused start again, or null: give
 * up (throw the refusal).
 *
 * Only RESOURCE_EXHAUSTED that says how long to wait is worth it (the
 * gateway sheds load or a tenant is over quota, for now); at most
 * `maxRetries` times per stream; a wait longer than `maxWaitMs` is the
 * caller's to decide on, so it is thrown rather than slept. A negative
 * advice (a broken server) waits nothing.
 */
export function startRetryWait(
  code: GrpcStatus,
  retryAfterMs: number | null,
  settings: StartRetrySettings,
): number | null {
  if (code !== GrpcStatus.RESOURCE_EXHAUSTED || retryAfterMs === null || Number.isNaN(retryAfterMs)) {
    return null;
  }
  if (settings.retriesDone >= settings.maxRetries || retryAfterMs > settings.maxWaitMs) {
    return null;
  }
  return Math.max(0, retryAfterMs);
}

/**
 * Milliseconds to wait before a reconnect: the backoff, or the wait the
 * failure advised when it is longer (a replica with no room to take a
 * stream over says when it may have some: RetryInfo on its UNAVAILABLE),
 * but never past capMs (or the backoff, when that is longer).
 */
export function reconnectWait(backoffMs: number, advisedMs: number | null, capMs: number): number {
  if (advisedMs === null || Number.isNaN(advisedMs) || advisedMs <= backoffMs) {
    return backoffMs;
  }
  return Math.min(advisedMs, Math.max(capMs, backoffMs));
}
