/**
 * The tokenrelay Node client: one generation as an async iterator of events
 * that survives a broken connection.
 *
 *     const client = new RelayClient('localhost:50051');
 *     for await (const event of client.stream('sim', [['user', 'hello']])) {
 *       if (event.type === 'chunk' && event.kind === 'text') process.stdout.write(event.text);
 *     }
 *     client.close();
 *
 * What the client does for you (the Python client's behaviour, kept alike):
 *
 * - Reconnects. When the call fails transiently (`isTransient`: UNAVAILABLE,
 *   or a connection-level CANCELLED/INTERNAL/UNKNOWN such as a reset) it
 *   waits `backoffDelay(attempt)`, or the wait the failure advised
 *   (RetryInfo) when it is longer (`reconnectWait`), and reattaches: with
 *   `resume` (latest resume token, last seq it holds) once the server has said StreamStarted,
 *   otherwise by sending the same `start` again with the same idempotency
 *   key, so the server attaches to the generation it may already have begun.
 * - Bounds each attempt: StreamStarted must arrive within `connectTimeoutMs`.
 *   A reconnect spends that window waiting for the channel to connect
 *   (grpc waitForReady), so a gateway that comes back during it is reached.
 * - Counts reconnect attempts per round: `maxAttempts` consecutive failed
 *   attempts without progress throw `ReconnectsExhausted`. Progress is a new
 *   chunk (seq > last seq); a StreamStarted alone is not, so a server that
 *   accepts every resume and drops it at once still exhausts the budget.
 * - Delivers every seq exactly once: chunks at or below the last seq
 *   (replayed after a resume) are dropped and counted; a gap is a
 *   `ProtocolViolation`.
 * - Verifies the end: the text it assembled must hash to `text_sha256`,
 *   every chunk (text, reasoning, tool calls) to `chunks_sha256` when the
 *   server sends it, and its last seq must equal `total_seq`, or
 *   `DigestMismatch` is thrown.
 *
 * - Honours a refused start's advice: a start refused with RESOURCE_EXHAUSTED
 *   (load shedding, a tenant's quota) whose status says when to try again
 *   (google.rpc.RetryInfo in grpc-status-details-bin, or `retry-after-ms`
 *   trailing metadata) is sent again after that wait (a `throttled` event,
 *   then `reconnect.sleep`), `startRetries` times at most, with the same
 *   idempotency key (`startRetryWait`); then `StreamFailed` carries the
 *   advised `retryAfterMs`. A refusal without advice, or with a wait longer
 *   than `maxStartRetryWaitMs`, throws at once.
 *
 * Statuses a reconnect cannot fix (INVALID_ARGUMENT, PERMISSION_DENIED,
 * NOT_FOUND, RESOURCE_EXHAUSTED, …) throw `StreamFailed` / `ResumeRejected`
 * at once. A status whose rich details (grpc-status-details-bin) carry a
 * `tokenrelay.v1.StreamError` is the end of a stream that refused partial
 * answers: it throws `GenerationFailed` with that error, whatever its code
 * (an UNAVAILABLE among them is not a broken connection, and a resume would
 * only end the same way). grpc errors stay inside call.ts and wire.ts.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { setTimeout as sleepFor } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';

import { Assembly } from './assembly';
import {
  CallReader,
  TIMED_OUT,
  Transient,
  cancelRequest,
  finishCall,
  translateFailure,
} from './call';
import { backoffDelay, reconnectWait, startRetryWait } from './decisions';
import {
  GenerationFailed,
  PartialAnswer,
  PartialStream,
  ProtocolViolation,
  ReconnectsExhausted,
  StreamFailed,
  TokenRelayClientError,
} from './errors';
import type {
  Checkpoint,
  Chunk,
  End,
  Notice,
  RelayEvent,
  Started,
  ToolCall,
} from './events';
import {
  type GenerationInput,
  type MessageInput,
  type PolicyInput,
  type RelayStub,
  type WireCall,
  type WireEvent,
  type WireRequest,
  chunkContent,
  newStub,
  toErrorDetail,
  toWirePolicy,
  toWireStart,
} from './wire';
import type { StartGeneration as WireStart } from './generated/tokenrelay/v1/StartGeneration';

export type Sleep = (ms: number) => Promise<void>;

export interface ReconnectOptions {
  /** Consecutive failed attempts without a new chunk before giving up (3). */
  readonly maxAttempts?: number;
  /** First backoff delay, doubled per attempt (1000). */
  readonly baseMs?: number;
  /** Longest backoff delay (30000). */
  readonly capMs?: number;
  /** ±fraction of jitter (0.1). */
  readonly jitter?: number;
  /** The jitter's random source, in [0, 1) (Math.random). */
  readonly random?: () => number;
  /** How the client waits between attempts (a real timer). Tests pass one
   * that records the delay and returns at once. */
  readonly sleep?: Sleep;
  /** How long one attempt may take to get StreamStarted (2000). */
  readonly connectTimeoutMs?: number;
}

export interface KeepaliveOptions {
  /** Ping the gateway after this long without activity (grpc.keepalive_time_ms). */
  readonly timeMs?: number;
  /** A ping unanswered this long breaks the connection (grpc.keepalive_timeout_ms). */
  readonly timeoutMs?: number;
  /** Ping with no call open too (grpc.keepalive_permit_without_calls). */
  readonly permitWithoutCalls?: boolean;
}

export interface RelayClientOptions {
  /** The tenant's API key, sent as `authorization: Bearer <key>` with every
   * call; default: $TOKENRELAY_API_KEY (unset or empty: no key is sent). */
  readonly apiKey?: string;
  /** TLS: the CA that signed the gateway's certificate, as a PEM file path
   * or its contents. Turns TLS on. */
  readonly tlsCa?: string | Buffer;
  /** mTLS: the client's certificate and its key (PEM path or contents), for a
   * gateway that requires client certificates; both or neither. */
  readonly tlsClientCert?: string | Buffer;
  readonly tlsClientKey?: string | Buffer;
  /** Channel credentials built by the caller (instead of the tls* options);
   * default: a plaintext channel. */
  readonly credentials?: grpc.ChannelCredentials;
  /** gRPC metadata sent with every call (an `authorization` entry here wins
   * over apiKey). */
  readonly callMetadata?: Readonly<Record<string, string>>;
  readonly keepalive?: KeepaliveOptions;
  readonly reconnect?: ReconnectOptions;
  /** The recovery policy of every stream; a call's own `policy` fields win. */
  readonly policy?: PolicyInput;
  /** Extra grpc-js channel options, applied after the client's own. */
  readonly channelOptions?: grpc.ChannelOptions;
  /** How many times a start refused with RESOURCE_EXHAUSTED and an advised
   * wait (RetryInfo / retry-after-ms) is sent again, each time after that
   * wait (slept with `reconnect.sleep`); 0 throws the first refusal (3). */
  readonly startRetries?: number;
  /** An advised wait longer than this is not slept: the refusal is thrown at
   * once (its `retryAfterMs` says the wait) (60000). */
  readonly maxStartRetryWaitMs?: number;
}

export interface StreamOptions extends GenerationInput {
  /** Generated (a UUID) when not given; a start retried before StreamStarted
   * reuses it, so the server never runs the generation twice. */
  readonly idempotencyKey?: string;
}

export interface GenerateOptions extends StreamOptions {
  /** Throw PartialAnswer instead of returning a partial result. */
  readonly strict?: boolean;
}

export interface ResumeOptions {
  /** The text of chunks 1..lastSeq, to have the final text digest checked
   * over the whole text (without it, and lastSeq > 0, end.verified is false). */
  readonly textSoFar?: string;
}

/** A whole generation, verified. */
export interface GenerateResult {
  readonly text: string;
  readonly reasoning: string;
  /** Complete tool calls, by index (finishReason "tool_calls"). */
  readonly toolCalls: readonly ToolCall[];
  readonly end: End;
  readonly streamId: string;
  /** Chunks received (end.totalSeq). */
  readonly chunks: number;
  readonly reconnects: number;
  readonly duplicatesDropped: number;
  readonly notices: readonly Notice[];
}

// gRPC's own reconnect backoff starts at 1 s and grows to 120 s. Our backoff
// decides when to try again; the channel's must not make an attempt fail
// because the subchannel is still backing off from the previous refusal.
const DEFAULT_CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.initial_reconnect_backoff_ms': 100,
  'grpc.min_reconnect_backoff_ms': 100,
  'grpc.max_reconnect_backoff_ms': 1000,
};

export const API_KEY_ENV = 'TOKENRELAY_API_KEY';

/** The call metadata that carries the API key (or $TOKENRELAY_API_KEY). */
function apiKeyMetadata(apiKey: string | undefined): Record<string, string> {
  const key = (apiKey ?? process.env[API_KEY_ENV] ?? '').trim();
  if (key === '') {
    return {};
  }
  if (!/^[\x21-\x7e]+$/.test(key)) {
    // grpc-js would refuse the header with an error that quotes it.
    throw new TypeError('apiKey must be printable ASCII without spaces');
  }
  return { authorization: `Bearer ${key}` };
}

function pem(value: string | Buffer, option: string): Buffer {
  if (Buffer.isBuffer(value)) {
    return value;
  }
  try {
    return readFileSync(value);
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code ?? String(error);
    throw new TypeError(`${option} ${JSON.stringify(value)} cannot be read (${reason})`);
  }
}

/** TLS credentials from the tls* options; null when none is given. */
function tlsCredentials(options: RelayClientOptions): grpc.ChannelCredentials | null {
  const { tlsCa, tlsClientCert, tlsClientKey } = options;
  if ((tlsClientCert === undefined) !== (tlsClientKey === undefined)) {
    const [given, missing] =
      tlsClientKey === undefined ? ['tlsClientCert', 'tlsClientKey'] : ['tlsClientKey', 'tlsClientCert'];
    throw new TypeError(`${given} is given but ${missing} is not: a client certificate needs both`);
  }
  if (tlsCa === undefined && tlsClientCert === undefined) {
    return null;
  }
  return grpc.credentials.createSsl(
    tlsCa === undefined ? null : pem(tlsCa, 'tlsCa'),
    tlsClientKey === undefined ? null : pem(tlsClientKey, 'tlsClientKey'),
    tlsClientCert === undefined ? null : pem(tlsClientCert, 'tlsClientCert'),
  );
}

function positive(value: number, field: string): number {
  if (!Number.isFinite(value) || value <= 0) {
    throw new RangeError(`${field} must be a positive number, got ${value}`);
  }
  return value;
}

function atLeastZero(value: number, field: string): number {
  if (!Number.isFinite(value) || value < 0) {
    throw new RangeError(`${field} must be 0 or more, got ${value}`);
  }
  return value;
}

/** A client of one tokenrelay gateway (or a load-balanced address). */
export class RelayClient {
  readonly address: string;
  readonly maxAttempts: number;
  readonly backoffBaseMs: number;
  readonly backoffCapMs: number;
  readonly jitter: number;
  readonly connectTimeoutMs: number;
  readonly startRetries: number;
  readonly maxStartRetryWaitMs: number;
  private readonly random: () => number;
  private readonly sleep: Sleep;
  private readonly defaultPolicy: PolicyInput;
  private readonly callMetadata: Readonly<Record<string, string>>;
  private readonly credentials: grpc.ChannelCredentials;
  private readonly tls: boolean;
  private readonly clientCert: boolean;
  private readonly channelOptions: grpc.ChannelOptions;
  private stub: RelayStub | null = null;

  constructor(address: string, options: RelayClientOptions = {}) {
    if (typeof address !== 'string' || address === '') {
      throw new TypeError('address must be a non-empty "host:port" string');
    }
    const reconnect = options.reconnect ?? {};
    this.address = address;
    this.maxAttempts = atLeastZero(reconnect.maxAttempts ?? 3, 'reconnect.maxAttempts');
    this.backoffBaseMs = atLeastZero(reconnect.baseMs ?? 1000, 'reconnect.baseMs');
    this.backoffCapMs = atLeastZero(reconnect.capMs ?? 30_000, 'reconnect.capMs');
    this.jitter = atLeastZero(reconnect.jitter ?? 0.1, 'reconnect.jitter');
    if (this.jitter > 1) {
      throw new RangeError(`reconnect.jitter must be between 0 and 1, got ${this.jitter}`);
    }
    this.connectTimeoutMs = positive(reconnect.connectTimeoutMs ?? 2000, 'reconnect.connectTimeoutMs');
    this.startRetries = atLeastZero(options.startRetries ?? 3, 'startRetries');
    if (!Number.isInteger(this.startRetries)) {
      throw new RangeError(`startRetries must be a whole number, got ${this.startRetries}`);
    }
    this.maxStartRetryWaitMs = atLeastZero(options.maxStartRetryWaitMs ?? 60_000, 'maxStartRetryWaitMs');
    this.random = reconnect.random ?? Math.random;
    this.sleep = reconnect.sleep ?? ((ms: number) => sleepFor(ms));
    // Checked now, so a bad default policy fails here rather than on every call.
    toWirePolicy(options.policy ?? {});
    this.defaultPolicy = { ...options.policy };
    this.callMetadata = { ...apiKeyMetadata(options.apiKey), ...options.callMetadata };
    const tls = tlsCredentials(options);
    if (tls !== null && options.credentials !== undefined) {
      throw new TypeError('give either credentials or the tls* options, not both');
    }
    this.credentials = tls ?? options.credentials ?? grpc.credentials.createInsecure();
    this.tls = tls !== null || options.credentials !== undefined;
    this.clientCert = options.tlsClientCert !== undefined;
    const keepalive: grpc.ChannelOptions = {};
    if (options.keepalive?.timeMs !== undefined) {
      keepalive['grpc.keepalive_time_ms'] = positive(options.keepalive.timeMs, 'keepalive.timeMs');
    }
    if (options.keepalive?.timeoutMs !== undefined) {
      keepalive['grpc.keepalive_timeout_ms'] = positive(
        options.keepalive.timeoutMs,
        'keepalive.timeoutMs',
      );
    }
    if (options.keepalive?.permitWithoutCalls !== undefined) {
      keepalive['grpc.keepalive_permit_without_calls'] = options.keepalive.permitWithoutCalls ? 1 : 0;
    }
    this.channelOptions = { ...DEFAULT_CHANNEL_OPTIONS, ...keepalive, ...options.channelOptions };
  }

  /** Close the channel; streams still open on it fail. */
  close(): void {
    const stub = this.stub;
    this.stub = null;
    stub?.close();
  }

  /** Start a generation; iterate the result for its events. Bad options
   * (an unknown policy field, a message that is not [role, content]) throw a
   * TypeError naming the field, before anything is sent. */
  stream(model: string, messages: Iterable<MessageInput>, options: StreamOptions = {}): RelayStream {
    const key = options.idempotencyKey ?? randomUUID();
    const policy = { ...this.defaultPolicy, ...options.policy };
    const start = toWireStart(
      model,
      messages,
      { ...options, ...(Object.keys(policy).length > 0 ? { policy } : {}) },
      key,
    );
    return new RelayStream(this, { start, resumeToken: '', assembly: Assembly.fresh() });
  }

  /** Reattach to a stream: from a `PartialStream` (an error's `partial`:
   * everything it assembled is continued and every digest stays checkable),
   * or from a resume token and the last seq processed. */
  resume(from: PartialStream): RelayStream;
  resume(resumeToken: string, lastSeq: number, options?: ResumeOptions): RelayStream;
  resume(from: PartialStream | string, lastSeq?: number, options: ResumeOptions = {}): RelayStream {
    if (from instanceof PartialStream) {
      return new RelayStream(this, {
        start: null,
        resumeToken: from.resumeToken,
        assembly: from.assembly.copy(),
        streamId: from.streamId,
      });
    }
    if (typeof from !== 'string' || from === '') {
      throw new TypeError('resume needs a PartialStream or a non-empty resume token');
    }
    if (lastSeq === undefined || !Number.isInteger(lastSeq) || lastSeq < 0) {
      throw new RangeError(`lastSeq must be a whole number of 0 or more, got ${String(lastSeq)}`);
    }
    return new RelayStream(this, {
      start: null,
      resumeToken: from,
      assembly: Assembly.after(lastSeq, options.textSoFar ?? (lastSeq === 0 ? '' : null)),
    });
  }

  /** Run a whole generation and return what it assembled, verified. A partial
   * answer is a result with `end.partial` true, or, with `strict`, a
   * PartialAnswer error carrying that result. */
  async generate(
    model: string,
    messages: Iterable<MessageInput>,
    options: GenerateOptions = {},
  ): Promise<GenerateResult> {
    const relayStream = this.stream(model, messages, options);
    const result = await relayStream.collect();
    if (options.strict && result.end.partial) {
      const error = result.end.error;
      const reason = error !== null ? `${error.code}: ${error.message}` : 'no reason given';
      throw new PartialAnswer(
        `the gateway returned a partial answer (${result.chunks} chunks): ${reason}`,
        result,
        relayStream.partial(),
      );
    }
    return result;
  }

  // -- used by RelayStream ------------------------------------------------------

  /** @internal What a connection failure probably means when TLS is on one
   * side only, or mTLS refused the client (grpc-js only says it failed). */
  tlsHint(cause: string): string {
    if (!this.tls) {
      return /Failed to connect|Connection dropped/.test(cause)
        ? ' (this client speaks plaintext: if the gateway serves TLS, pass tlsCa)'
        : '';
    }
    if (/certificate/i.test(cause)) {
      return " (the gateway's certificate is not one tlsCa signed for this address)";
    }
    if (/Failed to connect|Connection dropped/.test(cause)) {
      return this.clientCert
        ? " (is the client certificate one the gateway's client CA signed?)"
        : ' (if the gateway requires client certificates (mTLS), pass tlsClientCert and tlsClientKey)';
    }
    return '';
  }

  /** @internal */
  openCall(reconnecting: boolean): WireCall {
    if (this.stub === null) {
      this.stub = newStub(this.address, this.credentials, this.channelOptions);
    }
    // A reconnect waits (up to connectTimeoutMs) for the channel to connect
    // rather than failing at once while grpc is still backing off from the
    // last refused connection.
    const metadata = new grpc.Metadata({ waitForReady: reconnecting });
    for (const [key, value] of Object.entries(this.callMetadata)) {
      metadata.set(key, value);
    }
    return this.stub.Stream(metadata);
  }

  /** @internal */
  channelReady(): boolean {
    return (
      this.stub !== null &&
      this.stub.getChannel().getConnectivityState(false) === grpc.connectivityState.READY
    );
  }

  /** @internal */
  delayFor(attempt: number): number {
    return backoffDelay(
      attempt,
      { baseMs: this.backoffBaseMs, capMs: this.backoffCapMs, jitter: this.jitter },
      this.random,
    );
  }

  /** @internal */
  wait(ms: number): Promise<void> {
    return this.sleep(ms);
  }
}

interface StreamSetup {
  readonly start: WireStart | null;
  readonly resumeToken: string;
  readonly assembly: Assembly;
  readonly streamId?: string;
}

/**
 * One generation: iterate it once for its events (see events.ts).
 *
 * While (and after) iterating, `streamId`, `lastSeq`, `resumeToken`, `text`,
 * `reasoning`, `toolCalls()`, `reconnects` and `duplicatesDropped` describe
 * what arrived. Leaving the loop early (break, an exception) closes the call;
 * the server keeps the generation running for its grace period, so
 * `client.resume(stream.partial())` can pick it up. `cancel()` stops the
 * generation itself.
 */
export class RelayStream implements AsyncIterable<RelayEvent> {
  streamId: string;
  resumeToken: string;
  reconnects = 0;
  duplicatesDropped = 0;
  readonly notices: Notice[] = [];
  end: End | null = null;
  private readonly client: RelayClient;
  private readonly start: WireStart | null;
  private readonly assembly: Assembly;
  private lastCheckpointSeq: number;
  // Notices received since the last new chunk: a resume from lastSeq
  // replays them, and the caller has already seen them.
  private noticesSinceChunk: Notice[] = [];
  private call: WireCall | null = null;
  // The last failure to reach the gateway (the channel was not connected).
  private connectFailure = '';
  private pendingCancel: string | null = null;
  private iterating = false;

  /** @internal use RelayClient.stream / resume */
  constructor(client: RelayClient, setup: StreamSetup) {
    this.client = client;
    this.start = setup.start;
    this.resumeToken = setup.resumeToken;
    this.assembly = setup.assembly;
    this.streamId = setup.streamId ?? '';
    this.lastCheckpointSeq = setup.assembly.lastSeq;
  }

  get idempotencyKey(): string {
    return this.start?.idempotencyKey ?? '';
  }

  get lastSeq(): number {
    return this.assembly.lastSeq;
  }

  /** The answer text so far (chunks 1..lastSeq, when known). */
  get text(): string {
    return this.assembly.text;
  }

  get reasoning(): string {
    return this.assembly.reasoning;
  }

  /** The tool calls so far, by index; the last may still be incomplete. */
  toolCalls(): ToolCall[] {
    return this.assembly.toolCalls();
  }

  /** What has arrived, to show or to resume from later. */
  partial(): PartialStream {
    return new PartialStream(this.streamId, this.resumeToken, this.assembly);
  }

  [Symbol.asyncIterator](): AsyncGenerator<RelayEvent, void, undefined> {
    if (this.iterating) {
      throw new Error('a RelayStream can be iterated only once');
    }
    this.iterating = true;
    return this.events();
  }

  /** Ask the server to stop the generation; it ends with finishReason
   * "cancelled". Keep iterating to receive that end. */
  cancel(reason = ''): void {
    this.pendingCancel = reason;
    const call = this.call;
    if (call !== null && !call.writableEnded && !call.destroyed) {
      call.write(cancelRequest(reason));
      this.pendingCancel = null;
    }
  }

  /** Iterate to the end and return the result. */
  async collect(): Promise<GenerateResult> {
    for await (const event of this) {
      void event;
    }
    if (this.end === null) {
      throw new ProtocolViolation('the stream ended without StreamEnd', this.partial());
    }
    return {
      text: this.text,
      reasoning: this.reasoning,
      toolCalls: this.toolCalls(),
      end: this.end,
      streamId: this.streamId,
      chunks: this.lastSeq,
      reconnects: this.reconnects,
      duplicatesDropped: this.duplicatesDropped,
      notices: [...this.notices],
    };
  }

  // -- the reconnect loop -------------------------------------------------------

  private async *events(): AsyncGenerator<RelayEvent, void, undefined> {
    const client = this.client;
    let attempt = 0; // failed attempts in the current round (reset by a new chunk)
    let roundCause = '';
    let delayMs = 0;
    let startRetries = 0; // refused starts sent again (RelayClient.startRetries)
    for (;;) {
      const seqBefore = this.lastSeq;
      const call = client.openCall(attempt > 0);
      this.call = call;
      const resuming = this.resumeToken !== '';
      let cause = '';
      let refused: StreamFailed | null = null;
      let waitMs: number | null = null;
      let advisedMs: number | null = null; // the wait a transient failure advised
      try {
        for await (const event of this.attachAndRead(call, resuming)) {
          if (event.type === 'started' && attempt > 0) {
            this.reconnects += 1;
            yield { type: 'reconnected', attempt, lastSeq: this.lastSeq, delayMs, cause: roundCause };
          }
          yield event;
          if (event.type === 'end') {
            await finishCall(call);
            return;
          }
        }
        // attachAndRead returns only after the end, or throws.
        throw new ProtocolViolation('the call ended without StreamEnd');
      } catch (error: unknown) {
        if (error instanceof Transient) {
          cause = error.why;
          advisedMs = error.retryAfterMs;
        } else if (error instanceof GenerationFailed) {
          error.partial = this.partial();
          this.checkFailedDelivery(error);
          throw error;
        } else if (error instanceof StreamFailed && !resuming) {
          // A refused start: shed load, a quota (until it passes).
          waitMs = startRetryWait(error.code, error.retryAfterMs, {
            retriesDone: startRetries,
            maxRetries: client.startRetries,
            maxWaitMs: client.maxStartRetryWaitMs,
          });
          if (waitMs === null) {
            error.partial ??= this.partial();
            throw error;
          }
          refused = error;
        } else if (error instanceof TokenRelayClientError) {
          error.partial ??= this.partial();
          throw error;
        } else {
          throw error;
        }
      } finally {
        this.call = null;
        call.cancel(); // a no-op for a call that has its status
      }
      if (refused !== null && waitMs !== null) {
        // Not a broken connection: the reconnect budget is untouched.
        startRetries += 1;
        yield {
          type: 'throttled',
          attempt: startRetries,
          maxAttempts: client.startRetries,
          delayMs: waitMs,
          cause: refused.message,
        };
        await client.wait(waitMs);
        continue;
      }
      if (this.lastSeq > seqBefore || attempt === 0) {
        // Progress since the last failure (or the first failure): a new round.
        attempt = 0;
        roundCause = cause;
      }
      if (attempt >= client.maxAttempts) {
        throw new ReconnectsExhausted(
          `gave up after ${attempt} reconnect attempt(s) without progress; last failure: ${cause}` +
            client.tlsHint(cause),
          attempt,
          cause,
          this.partial(),
        );
      }
      attempt += 1;
      delayMs = reconnectWait(client.delayFor(attempt), advisedMs, client.backoffCapMs);
      yield {
        type: 'reconnecting',
        attempt,
        maxAttempts: client.maxAttempts,
        lastSeq: this.lastSeq,
        delayMs,
        cause,
      };
      await client.wait(delayMs);
    }
  }

  /** Send the first request on `call` and yield its new events. Throws
   * Transient when a reconnect may help, a TokenRelayClientError otherwise.
   * Returns after yielding the end. */
  private async *attachAndRead(
    call: WireCall,
    resuming: boolean,
  ): AsyncGenerator<RelayEvent, void, undefined> {
    const reader = new CallReader(call);
    let first: WireRequest;
    if (resuming) {
      first = { resume: { resumeToken: this.resumeToken, lastSeq: this.lastSeq } };
    } else if (this.start !== null) {
      first = { start: this.start };
    } else {
      throw new Error('a RelayStream without a start has a resume token'); // unreachable
    }
    const timeoutMs = this.client.connectTimeoutMs;
    let read: WireEvent | null | typeof TIMED_OUT;
    try {
      call.write(first);
      // StreamStarted is the server's first answer and comes at once; a call
      // without it in time is as good as a broken connection.
      read = await reader.read(timeoutMs);
    } catch (error: unknown) {
      const failure = translateFailure(error, resuming);
      if (failure instanceof Transient && !this.client.channelReady()) {
        // grpc's own words for it ("connect ECONNREFUSED ..."): a reconnect
        // that waits for the channel only sees time run out.
        this.connectFailure = failure.why;
      }
      throw failure;
    }
    if (read === TIMED_OUT) {
      throw new Transient(this.whyNoStart(timeoutMs));
    }
    let message: WireEvent | null = read;
    this.connectFailure = ''; // the gateway answered: any old refusal is history
    if (this.pendingCancel !== null) {
      call.write(cancelRequest(this.pendingCancel));
      this.pendingCancel = null;
    }

    let started = false;
    const replayedNotices = [...this.noticesSinceChunk];
    for (;;) {
      if (started) {
        try {
          message = (await reader.read()) as WireEvent | null;
        } catch (error: unknown) {
          throw translateFailure(error, resuming);
        }
      }
      if (message === null) {
        // The call ended OK without StreamEnd: the contract says the end is
        // always last, so the connection was cut short; resume.
        throw new Transient('the call ended without StreamEnd');
      }
      if (!started) {
        if (message.kind !== 'started' || !message.started) {
          throw new ProtocolViolation(`the first event was ${JSON.stringify(message.kind)}, not "started"`);
        }
        started = true;
        yield this.onStarted(message.started);
        continue;
      }
      if (message.kind === 'chunk' && message.chunk) {
        const chunk = this.onChunk(message.chunk);
        if (chunk !== null) {
          replayedNotices.length = 0;
          yield chunk;
        }
      } else if (message.kind === 'checkpoint' && message.checkpoint) {
        const checkpoint = this.onCheckpoint(message.checkpoint);
        if (checkpoint !== null) {
          yield checkpoint;
        }
      } else if (message.kind === 'error' && message.error) {
        const detail = toErrorDetail(message.error);
        const replayed = replayedNotices.findIndex((notice) => sameError(notice.error, detail));
        if (replayed >= 0) {
          replayedNotices.splice(replayed, 1);
          continue;
        }
        if (detail.fatal) {
          // A fatal error is followed by an end (partial) that carries it.
          continue;
        }
        const notice: Notice = { type: 'notice', error: detail };
        this.notices.push(notice);
        this.noticesSinceChunk.push(notice);
        yield notice;
      } else if (message.kind === 'end' && message.end) {
        yield this.onEnd(message.end);
        return;
      }
      // An unknown kind comes from a newer server: skip it.
    }
  }

  private whyNoStart(timeoutMs: number): string {
    const seconds = `${timeoutMs / 1000} s`;
    if (this.client.channelReady()) {
      return `no StreamStarted within ${seconds}`;
    }
    if (this.connectFailure) {
      return `${this.connectFailure} (still no connection after ${seconds})`;
    }
    return `no connection to ${this.client.address} within ${seconds}`;
  }

  // -- event handlers ---------------------------------------------------------------

  private onStarted(started: NonNullable<WireEvent['started']>): Started {
    if (this.streamId && started.streamId !== this.streamId) {
      throw new ProtocolViolation(
        `reattached to stream ${JSON.stringify(started.streamId)}, expected ${JSON.stringify(this.streamId)}`,
      );
    }
    this.streamId = started.streamId;
    if (started.resumeToken) {
      this.resumeToken = started.resumeToken;
    }
    return {
      type: 'started',
      streamId: started.streamId,
      resumeToken: started.resumeToken,
      resumed: started.resumed,
      model: started.model,
    };
  }

  private onChunk(chunk: NonNullable<WireEvent['chunk']>): Chunk | null {
    const content = chunkContent(chunk);
    if (!this.assembly.accept(chunk.seq, content)) {
      this.duplicatesDropped += 1;
      return null;
    }
    this.noticesSinceChunk = [];
    const base = { type: 'chunk', seq: chunk.seq, provider: chunk.provider, attempt: chunk.attempt } as const;
    switch (content.kind) {
      case 'text':
        return { ...base, kind: 'text', text: content.text };
      case 'reasoning':
        return { ...base, kind: 'reasoning', reasoning: content.reasoning };
      case 'toolCall':
        return { ...base, kind: 'toolCall', toolCall: content.toolCall };
    }
  }

  private onCheckpoint(checkpoint: NonNullable<WireEvent['checkpoint']>): Checkpoint | null {
    if (checkpoint.resumeToken) {
      this.resumeToken = checkpoint.resumeToken;
    }
    if (checkpoint.seq <= this.lastCheckpointSeq) {
      return null; // replayed after a resume
    }
    this.lastCheckpointSeq = checkpoint.seq;
    return {
      type: 'checkpoint',
      seq: checkpoint.seq,
      tokenCount: checkpoint.tokenCount,
      resumeToken: checkpoint.resumeToken,
    };
  }

  /** What the server says it delivered before giving up must be what we
   * hold, as for an end (DigestMismatch otherwise). */
  private checkFailedDelivery(failure: GenerationFailed): void {
    const delivered = failure.delivered;
    if (delivered.totalSeq === null) {
      return;
    }
    try {
      this.assembly.verify(
        delivered.totalSeq,
        delivered.textSha256 || null,
        delivered.chunksSha256 || null,
      );
    } catch (error: unknown) {
      if (error instanceof TokenRelayClientError) {
        error.partial = this.partial();
      }
      throw error;
    }
  }

  private onEnd(end: NonNullable<WireEvent['end']>): End {
    // text_sha256 is always sent and always checked (when we saw the whole
    // text); chunks_sha256 only when the server sends it.
    const { verified, chunksVerified } = this.assembly.verify(
      end.totalSeq,
      end.textSha256,
      end.chunksSha256 || null,
    );
    this.end = {
      type: 'end',
      finishReason: end.finishReason,
      partial: end.partial,
      error: end.error ? toErrorDetail(end.error) : null,
      usage: {
        promptTokens: end.usage?.promptTokens ?? 0,
        completionTokens: end.usage?.completionTokens ?? 0,
      },
      totalSeq: end.totalSeq,
      textSha256: end.textSha256,
      chunksSha256: end.chunksSha256,
      verified,
      chunksVerified,
    };
    return this.end;
  }
}

function sameError(a: Notice['error'], b: Notice['error']): boolean {
  return (Object.keys(a) as (keyof Notice['error'])[]).every((key) => a[key] === b[key]);
}
