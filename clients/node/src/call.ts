/**
 * One grpc-js call of Relay.Stream, at the grpc boundary: reading its
 * messages in order, what its failure means (`translateFailure`, the one
 * place grpc statuses become client errors or a reconnect), and closing it.
 */
import * as grpc from '@grpc/grpc-js';

import { isTransient } from './decisions';
import { GenerationFailed, ResumeRejected, StreamFailed, statusName } from './errors';
import {
  type WireCall,
  type WireEvent,
  type WireRequest,
  advisedWaitMs,
  refusedPartial,
} from './wire';

// How long a finished call may take to report its status after StreamEnd
// before the client cancels it (only matters for a misbehaving server).
const CLOSE_TIMEOUT_MS = 1000;

/** A failure a reconnect may fix (never leaves the client); `retryAfterMs`
 * is the wait the server advised (null: none). */
export class Transient extends Error {
  constructor(
    readonly why: string,
    readonly retryAfterMs: number | null = null,
  ) {
    super(why);
  }
}

const RESUME_REFUSALS = new Set([
  grpc.status.NOT_FOUND,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
]);

function isServiceError(error: unknown): error is grpc.ServiceError {
  return error instanceof Error && typeof (error as Partial<grpc.ServiceError>).code === 'number';
}

/** The one place grpc statuses become client errors (or a reconnect). */
export function translateFailure(error: unknown, resuming: boolean): Error {
  if (!isServiceError(error)) {
    // A local stream error (a write on a call that broke): the connection
    // is as good as gone; its status, if any, is not known.
    const message = error instanceof Error ? error.message : String(error);
    return new Transient(`the call failed: ${message}`);
  }
  const { code, details, metadata } = error;
  const refused = refusedPartial(metadata);
  if (refused !== null) {
    return new GenerationFailed(code, details, refused.error, refused.delivered);
  }
  if (isTransient(code, details)) {
    return new Transient(`${statusName(code)}: ${details}`, advisedWaitMs(metadata));
  }
  if (resuming && RESUME_REFUSALS.has(code)) {
    return new ResumeRejected(code, details);
  }
  return new StreamFailed(code, details, null, advisedWaitMs(metadata));
}

export const TIMED_OUT = Symbol('timed out');

/** Reads one call's messages in order, with grpc-js's flow control kept: the
 * call is paused while too many messages wait. Its status (grpc-js emits
 * 'error' before the messages still buffered) is thrown only after them. */
export class CallReader {
  private readonly buffered: WireEvent[] = [];
  private ended = false;
  private failure: unknown = null;
  private wake: (() => void) | null = null;
  private paused = false;

  constructor(private readonly call: WireCall) {
    call.on('data', (message: WireEvent) => {
      this.buffered.push(message);
      if (this.buffered.length >= 64 && !this.paused) {
        this.paused = true;
        call.pause();
      }
      this.notify();
    });
    call.on('error', (error: unknown) => {
      this.failure ??= error;
      this.notify();
    });
    call.on('end', () => {
      this.ended = true;
      this.notify();
    });
    call.on('status', () => {
      // Every message before the status was already pushed; once they are
      // read, nothing more comes even if 'end' is still pending.
      this.notify();
    });
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  /** The next message, null at the end of an OK call; throws the call's
   * failure. `timeoutMs`: resolve TIMED_OUT if nothing came by then. */
  async read(timeoutMs?: number): Promise<WireEvent | null | typeof TIMED_OUT> {
    let timedOut = false;
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            this.notify();
          }, timeoutMs);
    try {
      for (;;) {
        const message = this.buffered.shift();
        if (message !== undefined) {
          if (this.paused && this.buffered.length <= 16) {
            this.paused = false;
            this.call.resume();
          }
          return message;
        }
        if (this.ended || (this.failure !== null && this.call.readableLength === 0)) {
          if (this.failure !== null) {
            throw this.failure;
          }
          return null;
        }
        if (timedOut) {
          return TIMED_OUT;
        }
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
      }
    } finally {
      clearTimeout(timer);
    }
  }
}

export function cancelRequest(reason: string): WireRequest {
  return { cancel: { reason } };
}

/** Half-close after StreamEnd and let the server finish the call cleanly;
 * the answer is complete and verified, so how the call closes is moot. */
export async function finishCall(call: WireCall): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await new Promise<void>((resolve) => {
      call.once('status', () => resolve());
      call.once('error', () => resolve());
      timer = setTimeout(resolve, CLOSE_TIMEOUT_MS);
      call.end();
      // The server's last messages (none are expected) must be read for the
      // status to arrive.
      call.resume();
    });
  } finally {
    clearTimeout(timer);
    call.cancel();
  }
}
